"""The connector on Mooncake Store with real vLLM CPU engines (marked `engine`; the lead runs it).

`start_system(..., transport="mooncake")` starts a loopback mooncake_master instead of our
store, and both engines get `remote_url: mooncakestore://...`: their connectors mount their
memory into the store and move KV through it over TCP. The token-identity and proof-of-use
tests of tests/engine are imported and run again here, against this module's `system`
(pytest collects imported test functions and resolves their fixtures in this module).
"""

from __future__ import annotations

import pytest

from splitwise_local.config import MooncakeOptions, SplitwiseConfig
from splitwise_local.store.mooncake import MasterAddress, MooncakeBackend
from splitwise_testing.system import start_system
from tests.engine.conftest import model_dir, prose_tokens, reference, tokenizer  # noqa: F401
from tests.engine.test_connector_identity import (  # noqa: F401
    assert_loaded,
    completion_tokens,
    prompts,
    references,
    test_chat_is_token_identical,
    test_completions_are_token_identical,
)
from tests.engine.test_connector_proof import (  # noqa: F401
    saved_keys,
    test_one_poisoned_middle_chunk_changes_the_output_and_restoring_it_restores_it,
    test_prompts_with_a_common_prefix_share_its_chunks,
)

pytestmark = pytest.mark.engine

MiB = 1024 * 1024
OPTIONS = MooncakeOptions(global_segment_size=256 * MiB, local_buffer_size=16 * MiB)


@pytest.fixture(scope="module")
def system(model_dir, tmp_path_factory):  # noqa: F811
    roles = {"prefill": "prefill", "decode": "decode"}
    config = SplitwiseConfig(chunk_size=256, mooncake=OPTIONS)
    root = tmp_path_factory.mktemp("mooncake-engines")
    system = start_system(root, model_dir, config, roles, {"verify_loads": True}, "mooncake")
    yield system
    system.stop()


@pytest.fixture(scope="module")
def observer(system):
    """A client of the engines' store that mounts no memory: when it closes, no engine's KV
    goes with it."""
    options = OPTIONS.model_copy(update={"global_segment_size": 0})
    backend = MooncakeBackend(MasterAddress.parse(system.config.remote_url), options)
    yield backend
    backend.close()


def test_decode_loads_the_prefills_chunks_from_mooncake(
    system,
    observer,
    prose_tokens,  # noqa: F811
    reference,  # noqa: F811
):
    prefill, decode = system.engines["prefill"], system.engines["decode"]
    prompt = prose_tokens[3000:4000]
    hits_before = decode.metric("vllm:external_prefix_cache_hits_total")
    prefill.new_log()
    decode.new_log()
    prefill.complete(prompt, max_tokens=1)
    keys = saved_keys(prefill)
    assert len(keys) == 4  # 256 + 256 + 256 + 232 tokens
    assert observer.exists(keys) == 4 and all(observer.get_many(keys))
    answer = completion_tokens(decode.complete(prompt))
    assert_loaded(decode, len(prompt))
    assert decode.metric("vllm:external_prefix_cache_hits_total") - hits_before == 999
    assert answer == completion_tokens(reference.complete(prompt))


# Imported last so that it runs last: it kills the master.
from tests.engine.test_connector_proof import (  # noqa: E402, F401
    test_a_dead_store_costs_the_cache_not_the_request,
)
