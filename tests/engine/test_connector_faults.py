"""The connector under real serving conditions, on real engines: what a decode engine answers
when KV is partly there, corrupted, or the store dies, freezes or comes back; many loads at once;
its own prefix cache; and the connector's counters on /metrics.

One launch for the module: a prefill engine (kv_producer) and a decode engine that runs as
`kv_both` with vLLM's prefix cache on (the launcher's default), so it also saves what it had to
compute. The reference is the session's plain engine. Each case checks the answer against the
plain engine, that the decode engine is still up and serving, the one warning it logs, and how
many tokens it loaded and recomputed; a prompt the plain engine answers two ways is counted and
left out (see `Plain`). The store is killed late in the module, so the cases that need it intact
come first.
"""

from __future__ import annotations

import itertools
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from splitwise_local.config import SplitwiseConfig
from splitwise_local.connector.keys import chunk_keys, key_identity, per_head_layout
from splitwise_local.hardware.dtype import cpu_dtype
from splitwise_testing.system import start_system
from tests.engine.checks import (
    Judged,
    Reference,
    assert_matches,
    completion_tokens,
    reference_reply,
)

pytestmark = pytest.mark.engine

CHUNK = 256
LOAD = r"splitwise load req=(\S+) tokens=(\d+) chunks=\d+ bytes=\d+ ms=\S+ verified=(\S+)"
PARTIAL = r"splitwise load-partial req=\S+ loaded=(\d+) of (\d+) tokens, recomputing tokens (\d+)-"
RECOVERED = r"Recovered from KV load failure: 1 request\(s\) rescheduled \((\d+) tokens affected\)"


@pytest.fixture(scope="module")
def system(model_dir, tmp_path_factory):
    roles = {"prefill": "prefill", "decode": "both"}
    system = start_system(
        tmp_path_factory.mktemp("faults"), model_dir, SplitwiseConfig(chunk_size=CHUNK), roles,
        {"verify_loads": True}, engine_args={"decode": ["--enable-prefix-caching"]},
    )  # fmt: skip
    yield system
    system.stop()


@pytest.fixture(scope="module")
def identity(model_dir):
    layout = per_head_layout(3, 64)
    return key_identity(model_dir, dtype=cpu_dtype().dtype, layout=layout, chunk_size=CHUNK)


@pytest.fixture(scope="module")
def texts(prose_tokens):
    """Independent prompts of exact lengths: each starts with a token of its own (so no two
    share a chunk) and goes on with a stretch of the text."""
    count = itertools.count()

    def text(length: int) -> list[int]:
        k = next(count)
        start = k * 1009 % (len(prose_tokens) - length)
        return [3000 + k, *prose_tokens[start + 1 : start + length]]

    return text


def answer(engine, prompt, max_tokens=32) -> list[int]:
    return completion_tokens(engine.complete(prompt, max_tokens=max_tokens))


class Plain:
    """The session's plain engine as judge. Each prompt runs on it twice; a prompt whose two
    runs disagree (a bf16 near-tie) is recorded as left out instead of judged, and the module
    fails at its end if more than `ALLOWED_UNSTABLE` of its ten single-prompt comparisons were."""

    # Two plain runs part only where a prompt meets a near-tie, which few prompts do: one of ten
    # left out is such a prompt; two mean the reference varies for some other reason, and this
    # module would have judged too little to call the connector's answers right.
    ALLOWED_UNSTABLE = 1

    def __init__(self, engine) -> None:
        self.engine = engine
        self.judged = Judged(self.ALLOWED_UNSTABLE)

    def assert_like(self, got: list[int], prompt: list[int], what: str, max_tokens=32) -> None:
        first, second = (
            Reference.of(reference_reply(self.engine, prompt, max_tokens)) for _ in "12"
        )
        self.judged.record(f"{what} ({len(prompt)} tokens)", first.tokens == second.tokens)
        if first.tokens == second.tokens:
            assert_matches(got, first, what)


@pytest.fixture(scope="module")
def plain(reference):
    judge = Plain(reference)
    yield judge
    judge.judged.check()


def metric_reaches(engine, name: str, value: float, timeout: float = 15) -> float:
    """The metric once it reaches `value` (stats reach /metrics a moment after the answer)."""
    deadline = time.monotonic() + timeout
    while (current := engine.metric(name)) < value and time.monotonic() < deadline:
        time.sleep(0.5)
    return current


def stored_chunks(backend, keys, expected: int, timeout: float = 15) -> int:
    """How many of `keys` the store holds once `expected` are there: saves land a moment after
    the answer of an engine that also decodes."""
    deadline = time.monotonic() + timeout
    while (held := backend.exists(keys)) < expected and time.monotonic() < deadline:
        time.sleep(0.2)
    return held


def assert_serving(engine, plain, prompt) -> None:
    """Still up, and the next request answers correctly."""
    plain.assert_like(answer(engine, prompt, 8), prompt, "next", 8)


def test_a_prompt_extending_a_stored_one_loads_the_stored_part_and_saves_the_rest(
    system, plain, texts, identity
):
    """The issue's reproduction: 256 tokens stored, the same 256 plus one sent to decode."""
    prefill, decode = system.engines["prefill"], system.engines["decode"]
    stored, extra = texts(256), texts(8)
    prompt = stored + extra[:1]
    prefill.complete(stored, max_tokens=1)
    decode.new_log()
    got = answer(decode, prompt)
    (_, tokens, verified), *_ = decode.expect_log(LOAD)
    assert (int(tokens), verified) == (256, "ok")  # the stored part; token 256 is computed
    assert "load-partial" not in decode.new_log()
    plain.assert_like(got, prompt, "257-token prompt")
    # kv_both: the chunk decode computed (token 256) is in the store now, under its key.
    assert stored_chunks(system.backend(), chunk_keys(identity, prompt), 2) == 2
    assert_serving(decode, plain, extra)


def test_a_missing_middle_chunk_loads_the_part_before_it(system, plain, texts, identity):
    prefill, decode = system.engines["prefill"], system.engines["decode"]
    prompt = texts(1000)
    prefill.complete(prompt, max_tokens=1)
    keys = chunk_keys(identity, prompt)
    backend = system.backend()
    assert backend.delete(keys[1])
    hits = decode.metric("vllm:external_prefix_cache_hits_total")
    decode.new_log()
    got = answer(decode, prompt)
    log = decode.wait_log(LOAD)
    assert len(re.findall(r"lacks tokens 256-512 but holds later chunks", log)) == 1
    assert [int(t) for _, t, _ in re.findall(LOAD, log)] == [256]
    assert decode.metric("vllm:external_prefix_cache_hits_total") - hits == 256  # 744 computed
    plain.assert_like(got, prompt, "missing chunk 256-512")
    assert stored_chunks(backend, keys, 4) == 4  # kv_both saved what it computed: no more hole


def test_a_corrupted_middle_chunk_is_caught_and_recomputed_from_there(
    system, plain, texts, identity
):
    prefill, decode = system.engines["prefill"], system.engines["decode"]
    prompt = texts(1000)
    prefill.complete(prompt, max_tokens=1)
    key = chunk_keys(identity, prompt)[1]
    backend = system.backend()
    value = bytearray(backend.get(key))
    value[len(value) // 2] ^= 0x40  # one bit of one layer's K, deep inside the chunk
    backend.put(key, bytes(value))
    decode.new_log()
    got = answer(decode, prompt)
    log = decode.wait_log(RECOVERED)
    (partial,) = re.findall(PARTIAL, log)
    assert partial == ("256", "999", "256")  # chunk 0 loaded, tokens 256 on recomputed
    assert "checksum mismatch" in log
    assert re.findall(RECOVERED, log) == [str(999 - 256)]  # exactly the tokens not loaded
    plain.assert_like(got, prompt, "corrupted chunk 256-512")
    assert_serving(decode, plain, texts(40))


def test_a_local_prefix_cache_hit_loads_only_the_rest(system, plain, texts):
    """Two prompts of equal length sharing 512 tokens: the second finds them in decode's own
    prefix cache (filled by the first load) and loads only what follows."""
    prefill, decode = system.engines["prefill"], system.engines["decode"]
    shared, first_rest, second_rest = texts(512), texts(200), texts(200)
    first, second = shared + first_rest, shared + second_rest
    for prompt in (first, second):
        prefill.complete(prompt, max_tokens=1)
    answer(decode, first, 1)
    local = decode.metric("vllm:prefix_cache_hits_total")
    decode.new_log()
    got = answer(decode, second)
    (_, tokens, verified), *_ = decode.expect_log(LOAD)
    assert (int(tokens), verified) == (711 - 512, "ok")
    assert decode.metric("vllm:prefix_cache_hits_total") - local == 512
    plain.assert_like(got, second, "prompt with a locally cached prefix")


def test_eight_mixed_prompts_at_once_load_their_own_bytes(system, plain, texts):
    prefill, decode = system.engines["prefill"], system.engines["decode"]
    lengths = (20, 1500, 300, 129, 900, 64, 1200, 513)
    prompts = [texts(n) for n in lengths]
    together = ThreadPoolExecutor(len(prompts))

    def at_once(engine, max_tokens=24) -> list[list[int]]:
        return list(together.map(lambda p: answer(engine, p, max_tokens), prompts))

    saved = prefill.metric("splitwise:saved_tokens_total")
    at_once(prefill, 1)
    total = saved + sum(lengths)
    assert metric_reaches(prefill, "splitwise:saved_tokens_total", total) == total
    hits = decode.metric("vllm:external_prefix_cache_hits_total")
    loaded = decode.metric("splitwise:loaded_tokens_total")
    decode.new_log()
    got = at_once(decode)
    log = decode.wait_log(LOAD)
    deadline = time.monotonic() + 15
    while len(re.findall(LOAD, log)) < len(prompts) and time.monotonic() < deadline:
        log += decode.wait_log(LOAD)
    loads = sorted((int(tokens), verified) for _, tokens, verified in re.findall(LOAD, log))
    # Each request loaded L-1 tokens, and read back from its blocks the bytes its producer
    # computed (the chunk checksums are the producer's; `verified` re-reads the cache).
    assert loads == sorted((n - 1, "ok") for n in lengths)
    assert decode.metric("vllm:external_prefix_cache_hits_total") - hits == sum(lengths) - 8
    total = loaded + sum(lengths) - 8
    assert metric_reaches(decode, "splitwise:loaded_tokens_total", total) == total

    def references() -> list[Reference]:
        asked = together.map(lambda p: reference_reply(plain.engine, p, 24), prompts)
        return [Reference.of(reply) for reply in asked]

    first, second = references(), references()
    # Eight at once, the plain engine's batches differ from run to run, so near-ties part its
    # two runs more often than alone: two of the eight may be left out; more, and this case
    # would judge too few loads to call concurrent loads right.
    judged = Judged(allowed_out=2)
    for n, mine, ref, again in zip(lengths, got, first, second, strict=True):
        what = f"{n}-token prompt among 8 at once"
        judged.record(what, ref.tokens == again.tokens)
        if ref.tokens == again.tokens:
            assert_matches(mine, ref, what)
    judged.check()


def test_the_store_killed_between_lookup_and_load_costs_a_recompute(system, plain, texts):
    """The scheduler has found the chunks; the store dies before the worker fetches them."""
    prefill, decode = system.engines["prefill"], system.engines["decode"]
    prompt = texts(700)
    prefill.complete(prompt, max_tokens=1)
    worker = decode.worker()
    decode.new_log()
    worker.send_signal(signal.SIGSTOP)  # the worker holds still; the scheduler plans the load
    try:
        reply = ThreadPoolExecutor(1).submit(answer, decode, prompt)
        time.sleep(2)
        system.store_child.signal_group(signal.SIGKILL)
        system.store_child.reap()
    finally:
        worker.send_signal(signal.SIGCONT)
    got = reply.result(timeout=120)
    log = decode.wait_log(RECOVERED)
    assert re.findall(PARTIAL, log) == [("0", "699", "0")]
    assert re.findall(RECOVERED, log) == ["699"]
    plain.assert_like(got, prompt, "store killed before the load")


def test_a_dead_store_costs_hits_and_a_restarted_one_brings_them_back(system, plain, texts):
    prefill, decode = system.engines["prefill"], system.engines["decode"]
    pids = {name: engine.child.pid for name, engine in system.engines.items()}
    assert not system.store_child.running  # killed by the previous case
    prompt = texts(600)
    decode.new_log()
    prefill.complete(prompt, max_tokens=1)
    plain.assert_like(answer(decode, prompt), prompt, "dead store")
    assert re.search(r"store unavailable for req=\S+, computing the prompt", decode.new_log())

    system.restart_store()  # empty, same shm name: the connectors find it by themselves
    time.sleep(4.5)  # the guards' longest back-off
    prompt = texts(600)
    hits = decode.metric("vllm:external_prefix_cache_hits_total")
    prefill.complete(prompt, max_tokens=1)
    plain.assert_like(answer(decode, prompt), prompt, "restarted store")
    assert decode.metric("vllm:external_prefix_cache_hits_total") - hits == 599
    assert {name: engine.child.pid for name, engine in system.engines.items()} == pids


def test_a_frozen_store_never_hangs_an_engine(system, plain, texts):
    """Neither engine waits for a frozen store: decode computes the prompt once its lookup's
    deadline has passed, prefill answers once its bounded wait for the save is over. (An engine
    that waited would end the request at the client's timeout.)"""
    prefill, decode = system.engines["prefill"], system.engines["decode"]
    stored = texts(600)
    prefill.complete(stored, max_tokens=1)
    fresh = texts(600)
    decode.new_log()
    prefill.new_log()
    system.store_child.signal_group(signal.SIGSTOP)
    try:
        got = answer(decode, stored, 8)
        plain.assert_like(got, stored, "frozen store", 8)
        unanswered = r"store unavailable for req=\S+, computing the prompt: no answer within"
        assert re.search(unanswered, decode.wait_log(unanswered))
        answer(prefill, fresh, 1)
        late = r"splitwise save-late req=\S+: answering before its chunks are stored"
        assert re.search(late, prefill.wait_log(late))
    finally:
        system.store_child.signal_group(signal.SIGCONT)
    time.sleep(4.5)
    prompt = texts(300)
    prefill.complete(prompt, max_tokens=1)
    decode.new_log()
    answer(decode, prompt, 4)
    (_, tokens, _), *_ = decode.expect_log(LOAD)
    assert int(tokens) == 299  # thawed: hits again


def test_the_connector_counters_are_on_each_engines_metrics(system):
    prefill, decode = system.engines["prefill"], system.engines["decode"]
    assert prefill.metric("splitwise:saved_bytes_total") > 0
    assert prefill.metric("splitwise:save_failures_total") > 0  # the dead and frozen store
    assert decode.metric("splitwise:loaded_bytes_total") > 0
    assert decode.metric("splitwise:load_failures_total") >= 2  # corrupt chunk, killed store
    assert decode.metric("splitwise:store_unavailable_total") >= 1
