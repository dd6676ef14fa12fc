"""Token identity: decode after prefill's save answers exactly what one engine alone answers.

For each configuration (chunk sizes 256, 32 and 200), prompts of
about 20, 128, 129, 200 and 1,000 tokens go to the prefill engine with max_tokens=1, then to the
decode engine for 64 greedy tokens; the reference is a plain engine given the same prompt. The
reference runs each prompt twice: a prompt whose two reference runs differ is unstable on this
engine (bf16 near-ties), reported and left out, never compared loosely; each test counts what it
judged and fails under its minimum.
"""

from __future__ import annotations

import pytest

from splitwise_local.config import SplitwiseConfig
from splitwise_testing.system import start_system
from tests.engine.checks import References, assert_loaded, completion_tokens, first_diff

pytestmark = pytest.mark.engine

CONFIGS = {
    "chunk256": {"chunk_size": 256},
    "chunk32": {"chunk_size": 32},
    "chunk200": {"chunk_size": 200},
}
PROMPT_LENGTHS = (20, 128, 129, 200, 1000)
CHATS = (
    "What is the capital of France?",
    "Summarise this story in two sentences.\n\n" + "The tide clock keeper " * 60,
)


@pytest.fixture(scope="session")
def prompts(prose_tokens) -> dict[int, list[int]]:
    """Independent prompts (from different places in the text) of exact token lengths."""
    result, offset = {}, 0
    for length in PROMPT_LENGTHS:
        result[length] = prose_tokens[offset : offset + length]
        offset += length + 7
    return result


@pytest.fixture(scope="session")
def references(reference) -> References:
    return References(reference)


@pytest.fixture(scope="module", params=list(CONFIGS))
def system(request, model_dir, tmp_path_factory):
    config = SplitwiseConfig(**CONFIGS[request.param])
    root = tmp_path_factory.mktemp(request.param)
    roles = {"prefill": "prefill", "decode": "decode"}
    system = start_system(root, model_dir, config, roles, {"verify_loads": True})
    yield system
    system.stop()


def test_completions_are_token_identical(system, prompts, references):
    prefill, decode = system.engines["prefill"], system.engines["decode"]
    compared = 0
    for length, prompt in prompts.items():
        expected = references.tokens(
            f"completion-{length}", lambda e, p=prompt: completion_tokens(e.complete(p))
        )
        decode.new_log()
        prefill.complete(prompt, max_tokens=1)
        got = completion_tokens(decode.complete(prompt))
        assert_loaded(decode, length)
        if expected is None:
            continue
        assert got == expected, (
            f"{length}-token prompt diverged at token {first_diff(got, expected)}"
        )
        compared += 1
    # A near-tie is rare: one of the five prompts may meet one; two would mean the reference
    # varies for some other reason, and too little was judged to call the loads right.
    assert compared >= len(prompts) - 1, f"only {compared} of {len(prompts)} prompts judged"


def test_chat_is_token_identical(system, references):
    prefill, decode = system.engines["prefill"], system.engines["decode"]
    compared = 0
    for text in CHATS:
        expected = references.tokens(
            f"chat-{text[:40]}", lambda e, t=text: completion_tokens(e.chat(t))
        )
        decode.new_log()
        prefill.chat(text, max_tokens=1)
        reply = decode.chat(text)
        prompt_len = reply["usage"]["prompt_tokens"]
        assert_loaded(decode, prompt_len)
        if expected is not None:
            assert completion_tokens(reply) == expected
            compared += 1
    # One of the two chats may meet a near-tie; with neither judged this test proved nothing.
    assert compared >= len(CHATS) - 1, f"only {compared} of {len(CHATS)} chats judged"
