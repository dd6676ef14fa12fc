"""Saves on real engines: a store slow to write, preemption, and aborts during a load or a save.

One launch for the module: a store whose writes can be made to answer late (a delay file read
at each write, `splitwise_testing/slow_store.py`), a prefill engine (kv_producer) and a decode
engine that also saves (kv_both) with a KV cache of 15 blocks of 32 tokens and 128-token steps,
so a few concurrent prompts make vLLM preempt requests in the middle of their prefill. The
engines run in float32 (the keys below need the dtype, and it is the fast one on an AVX2-only CPU).

What is checked is behaviour, never a duration: deadlines are hang guards only. How long a
decode step gets while the store is slow is measured by `bench save_stall`.
"""

from __future__ import annotations

import itertools
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from splitwise_local.config import SplitwiseConfig
from splitwise_local.connector.keys import chunk_keys, key_identity, per_head_layout
from splitwise_testing.slow_store import slow_store
from splitwise_testing.system import start_system
from tests.engine.checks import completion_tokens

pytestmark = pytest.mark.engine

CHUNK = 64
SLOW_WRITE_S = 3.0  # under the store client's 5 s deadline: writes succeed, late
LOAD = r"splitwise load req=(\S+) tokens=(\d+) chunks=\d+ bytes=\d+ ms=\S+ verified=(\S+)"
ENGINE_ARGS = ["--dtype", "float32"]
# vLLM admits a request only when its whole prompt fits (scheduler_reserve_full_isl), which
# avoids preemption in the middle of a prefill: turned off, so that it happens.
SMALL_CACHE = ["--block-size", "32", "--num-gpu-blocks-override", "16", "--max-model-len", "448",
               "--max-num-batched-tokens", "128", "--no-scheduler-reserve-full-isl"]  # fmt: skip


@pytest.fixture(scope="module")
def delay(tmp_path_factory):
    path = tmp_path_factory.mktemp("slow") / "delay"

    def set_delay(seconds: float) -> None:
        path.write_text(str(seconds))

    set_delay(0)
    set_delay.path = path
    return set_delay


@pytest.fixture(scope="module")
def system(model_dir, tmp_path_factory, delay):
    with slow_store(delay.path, "--max-size-gb", "1") as store:
        config = SplitwiseConfig(chunk_size=CHUNK, remote_url=store.shm_url)
        system = start_system(
            tmp_path_factory.mktemp("saves"), model_dir, config,
            {"prefill": "prefill", "decode": "both"},
            {"verify_loads": True, "save_queue_mb": 16}, transport="remote",
            engine_args={"prefill": ENGINE_ARGS, "decode": [*ENGINE_ARGS, *SMALL_CACHE]},
        )  # fmt: skip
        try:
            yield system
        finally:
            system.stop()


@pytest.fixture(scope="module")
def identity(model_dir):
    layout = per_head_layout(3, 64)
    return key_identity(model_dir, dtype="float32", layout=layout, chunk_size=CHUNK)


@pytest.fixture(scope="module")
def texts(prose_tokens):
    """Independent prompts of exact lengths (a token of their own first: no shared chunk)."""
    count = itertools.count()

    def text(length: int) -> list[int]:
        k = next(count)
        start = k * 1009 % (len(prose_tokens) - length)
        return [7000 + k, *prose_tokens[start + 1 : start + length]]

    return text


def until(condition, what: str, timeout: float = 120) -> None:
    """A hang guard, not a timing claim."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.5)


def stored(system, identity, prompt) -> tuple[int, int]:
    """(chunks of the prompt the store holds, from the first; chunks it has)."""
    keys = chunk_keys(identity, prompt)
    return system.backend().exists(keys), len(keys)


def fully_stored(system, identity, prompt) -> bool:
    held, total = stored(system, identity, prompt)
    return held == total


def loaded_tokens(engine) -> list[tuple[int, str]]:
    return [(int(t), v) for _, t, v in engine.expect_log(LOAD)]


def test_a_store_slow_to_write_stalls_no_answer_and_loads_keep_working(
    system, identity, texts, delay
):
    """Writes held SLOW_WRITE_S each: decode's saves of a prompt it computes drop what does not
    fit the queue (a 128-token step takes less than SLOW_WRITE_S here), a producer's answer
    waits a bounded moment and is counted late, and a load runs meanwhile."""
    prefill, decode = system.engines["prefill"], system.engines["decode"]
    ready = texts(128)
    prefill.complete(ready, max_tokens=1)
    assert fully_stored(system, identity, ready)  # a producer answers once its prompt is stored

    delay(SLOW_WRITE_S)
    late = prefill.metric("splitwise:save_late_total")
    dropped = decode.metric("splitwise:save_dropped_total")
    fresh = texts(384)  # decode computes it in three steps of two chunks (5.9 MB each)
    assert len(completion_tokens(decode.complete(fresh, max_tokens=4))) == 4
    held, total = stored(system, identity, fresh)
    assert held < total  # the answer did not wait for its saves
    answered = texts(200)
    decode.new_log()
    with ThreadPoolExecutor(2) as pool:
        answering = pool.submit(prefill.complete, answered, max_tokens=1)  # its write is held
        loading = pool.submit(decode.complete, ready, max_tokens=8)
        assert len(completion_tokens(loading.result(timeout=300))) == 8
        answering.result(timeout=300)
    assert loaded_tokens(decode) == [(127, "ok")]  # loads work while the store is slow to write
    until(lambda: prefill.metric("splitwise:save_late_total") > late, "counted late")
    assert prefill.metric("splitwise:save_late_total") == late + 1
    delay(0)
    until(lambda: fully_stored(system, identity, answered), "the late put lands")
    until(lambda: decode.metric("splitwise:save_dropped_total") > dropped, "counted")
    assert stored(system, identity, fresh)[0] < total  # what was dropped is not saved later


def test_preempted_requests_keep_being_saved(system, identity, texts, delay):
    """Three 250-token prompts on a cache of 480 tokens: vLLM preempts one in the middle of its
    prefill and runs it again later, from its first token, in new blocks."""
    delay(0)
    decode = system.engines["decode"]
    preemptions = decode.metric("vllm:num_preemptions_total")
    prompts = [texts(250) for _ in range(3)]
    with ThreadPoolExecutor(len(prompts)) as pool:
        replies = list(pool.map(lambda p: decode.complete(p, max_tokens=16), prompts))
    assert all(len(completion_tokens(reply)) == 16 for reply in replies)
    assert decode.metric("vllm:num_preemptions_total") > preemptions, "nothing was preempted"
    assert "Traceback" not in decode.new_log()
    for prompt in prompts:
        until(lambda p=prompt: fully_stored(system, identity, p), "every chunk is saved")


def usage_back_to_zero(engine) -> bool:
    return engine.metric("vllm:kv_cache_usage_perc") == 0


def abandon(engine, prompt, after_s: float) -> None:
    """Sends a request and hangs up after `after_s`: vLLM aborts it."""
    body = {"model": engine.model, "prompt": prompt, "max_tokens": 64, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{engine.url}/v1/completions", json=body, timeout=after_s)


def test_a_request_aborted_while_its_kv_is_saved_frees_its_blocks(system, texts, delay):
    prefill, decode = system.engines["prefill"], system.engines["decode"]
    delay(SLOW_WRITE_S)
    abandon(decode, texts(300), after_s=2)  # computing, its first chunks' saves held
    delay(0)
    until(lambda: usage_back_to_zero(decode), "the aborted request's blocks are freed")
    prompt = texts(200)
    prefill.complete(prompt, max_tokens=1)
    decode.new_log()
    assert len(completion_tokens(decode.complete(prompt, max_tokens=8))) == 8
    assert loaded_tokens(decode) == [(199, "ok")]
    assert "Traceback" not in decode.new_log()


def test_a_request_aborted_while_its_kv_is_loaded_frees_its_blocks(system, texts, delay):
    """The worker holds still while the scheduler plans the load; the caller hangs up; the
    worker runs on. vLLM keeps the blocks of a request in WAITING_FOR_REMOTE_KVS until the
    loader reports it, so they must come back once the load is over."""
    delay(0)
    prefill, decode = system.engines["prefill"], system.engines["decode"]
    prompt = texts(300)
    prefill.complete(prompt, max_tokens=1)
    worker = decode.worker()
    decode.new_log()
    worker.send_signal(signal.SIGSTOP)
    try:
        abandon(decode, prompt, after_s=3)
    finally:
        worker.send_signal(signal.SIGCONT)
    until(lambda: usage_back_to_zero(decode), "the aborted load's blocks are freed")
    assert len(completion_tokens(decode.complete(prompt, max_tokens=8))) == 8
    log = decode.wait_log(LOAD)
    assert re.findall(LOAD, log)[-1][1:] == ("299", "ok")
    assert "Traceback" not in decode.new_log()
