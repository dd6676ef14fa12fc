"""The scheduler-side plan: what is loaded and saved, step by step (vLLM's async protocol)."""

from dataclasses import replace

import pytest

from splitwise_local.connector.health import StoreDown
from splitwise_local.connector.keys import KeyIdentity
from splitwise_local.connector.lookups import Lookup
from splitwise_local.connector.planner import Planner, StepPlan, prompt_chunks

IDENTITY = KeyIdentity("m", "bf16", "per-head/3x64", 128)
PROMPT = list(range(1000, 1300))  # 300 tokens: chunks 0-128, 128-256, 256-300
BLOCK = 128


def lookup_of(stored: set[str]):
    def lookup(req_id, keys):
        present = next((i for i, key in enumerate(keys) if key not in stored), len(keys))
        return Lookup(present, any(key in stored for key in keys[present + 1 :]))

    return lookup


def planner(stored=(), *, loads=True, saves=False, keep_tail=True, lookup=None) -> Planner:
    return Planner(
        IDENTITY, lookup or lookup_of(set(stored)), block_size=BLOCK,
        loads=loads, saves=saves, keep_tail=keep_tail,
    )  # fmt: skip


def all_keys(prompt=PROMPT) -> set[str]:
    return {c.key for c in prompt_chunks(IDENTITY, prompt)}


def test_chunked_prefill_saves_each_chunk_once_when_complete_including_the_partial_tail():
    p = planner(loads=False, saves=True)
    step1 = p.begin_step(idle=False)
    p.new_request("r", PROMPT, [4, 5], 0, 200, step1)
    assert [(c.start, c.end) for c in step1.saves[0].chunks] == [(0, 128)]
    step2 = p.begin_step(idle=False)
    p.running_request("r", [9], 300, step2)
    assert [(c.start, c.end) for c in step2.saves[0].chunks] == [(128, 256), (256, 300)]
    assert step2.saves[0].block_ids == [4, 5, 9]
    step3 = p.begin_step(idle=False)
    p.running_request("r", None, 301, step3)  # decoding: nothing more to save
    assert step3.saves == []
    assert [s.completes_prompt for s in (step1.saves[0], step2.saves[0])] == [False, True]


def test_a_preempted_request_goes_on_saving_from_its_new_blocks():
    p = planner(loads=False, saves=True)
    step1 = p.begin_step(idle=False)
    p.new_request("r", PROMPT, [4, 5], 0, 200, step1)  # chunk 0-128 saved
    step2 = p.begin_step(idle=False)
    p.resumed("r", [7, 8, 9], 256, step2)  # preempted; recomputed in all-new blocks
    (save,) = step2.saves
    assert [(c.start, c.end) for c in save.chunks] == [(128, 256)]
    assert save.block_ids == [7, 8, 9] and not save.completes_prompt
    step3 = p.begin_step(idle=False)
    p.running_request("r", None, 300, step3)
    (save,) = step3.saves
    assert [(c.start, c.end) for c in save.chunks] == [(256, 300)] and save.completes_prompt
    assert save.block_ids == [7, 8, 9]


def test_a_full_hit_loads_all_but_the_last_token_async_and_keeps_the_tail():
    p = planner(all_keys())
    assert p.match("r", PROMPT, 0) == 299
    p.allocated("r", [1, 2, 3], 299)
    (load,) = p.begin_step(idle=True).loads
    assert (load.start, load.end, load.block_ids, load.tail) == (0, 299, [1, 2, 3], 299)
    assert [(c.start, c.end) for c in load.chunks] == [(0, 128), (128, 256), (256, 300)]
    assert p.begin_step(idle=True).loads == []  # handed over once
    # The load is done; vLLM schedules the last token: the tail goes over the computed KV.
    step = p.begin_step(idle=False)
    p.new_request("r", PROMPT, [1, 2, 3], 299, 300, step)
    assert [(t.req_id, t.slot) for t in step.tails] == [("r", 3 * BLOCK + 299 - 256)]  # block id 3
    assert step.saves == []


def test_the_tail_is_not_kept_with_a_lossy_serde():
    p = planner(all_keys(), keep_tail=False)
    p.allocated("r", [1, 2, 3], p.match("r", PROMPT, 0))
    (load,) = p.begin_step(idle=True).loads
    assert load.tail is None and load.end == 299
    assert [(c.start, c.end) for c in load.chunks] == [(0, 128), (128, 256), (256, 300)]


def test_a_prompt_extending_a_stored_one_loads_the_stored_part_without_a_tail():
    stored = PROMPT[:256]
    p = planner(all_keys(stored))
    assert p.match("r", [*stored, 7], 0) == 256  # the 257-token prompt of the issue
    p.allocated("r", [1, 2], 256)
    (load,) = p.begin_step(idle=True).loads
    assert (load.start, load.end, load.tail) == (0, 256, None)
    assert [(c.start, c.end) for c in load.chunks] == [(0, 128), (128, 256)]
    step = p.begin_step(idle=False)
    p.new_request("r", [*stored, 7], [1, 2, 3], 256, 257, step)
    assert step.tails == []


def test_kv_both_saves_only_what_it_computed():
    prompt = PROMPT[:256] + list(range(5000, 5200))  # stored prefix of 256, 200 new tokens
    p = planner(all_keys(PROMPT[:256]), saves=True)
    assert p.match("r", prompt, 0) == 256
    p.allocated("r", [1, 2], 256)
    p.begin_step(idle=True)
    step = p.begin_step(idle=False)
    p.new_request("r", prompt, [1, 2, 3, 4], 256, 456, step)
    assert [(c.start, c.end) for c in step.saves[0].chunks] == [(256, 384), (384, 456)]


def test_kv_both_saves_again_what_a_failed_load_made_it_recompute():
    prompt = PROMPT[:256] + list(range(5000, 5200))
    p = planner(all_keys(PROMPT[:256]), saves=True)
    p.allocated("r", [1, 2], p.match("r", prompt, 0))
    p.begin_step(idle=True)
    step = p.begin_step(idle=False)  # vLLM kept only the first block: the rest is computed
    p.new_request("r", prompt, [1, 2, 3, 4], 128, 456, step)
    assert [(c.start, c.end) for c in step.saves[0].chunks] == [(128, 256), (256, 384), (384, 456)]


def test_match_stops_at_the_first_missing_chunk_and_respects_local_hits(caplog):
    chunks = prompt_chunks(IDENTITY, PROMPT)
    assert planner({chunks[0].key, chunks[2].key}).match("r", PROMPT, 0) == 128
    assert "lacks tokens 128-256 but holds later chunks" in caplog.text
    assert planner({chunks[0].key}).match("r", PROMPT, 128) == 0  # the local cache has it
    p = planner(all_keys())
    assert p.match("r", PROMPT, 128) == 171
    p.allocated("r", [1, 2, 3], 171)
    (load,) = p.begin_step(idle=True).loads
    assert (load.start, load.end) == (128, 299)
    assert [(c.start, c.end) for c in load.chunks] == [(128, 256), (256, 300)]


def test_a_request_is_loaded_at_most_once():
    p = planner(all_keys())
    p.allocated("r", [1, 2, 3], p.match("r", PROMPT, 0))
    assert p.match("r", PROMPT, 0) == 0  # vLLM asks again after a failed load: compute
    p.finished("r")
    assert p.match("r", PROMPT, 0) == 299


def test_an_unanswered_lookup_asks_again_and_a_down_store_raises():
    answers = iter([None, None, Lookup(3, False)])
    p = planner(lookup=lambda req_id, keys: next(answers))
    assert p.match("r", PROMPT, 0) is None
    assert p.match("r", PROMPT, 0) is None
    assert p.match("r", PROMPT, 0) == 299

    def down(req_id, keys):
        raise StoreDown("no")

    with pytest.raises(StoreDown):
        planner(lookup=down).match("r", PROMPT, 0)


def test_a_one_token_prompt_is_never_matched():
    assert planner(all_keys([5])).match("r", [5], 0) == 0


def test_finished_forgets_the_request():
    p = planner(saves=True)
    p.new_request("r", PROMPT, [1], 0, 100, StepPlan())
    p.finished("r")
    plan = StepPlan()
    p.running_request("r", None, 300, plan)
    assert plan.saves == []


def test_a_partial_match_has_no_tail_to_patch():
    chunks = prompt_chunks(IDENTITY, PROMPT)
    p = planner({chunks[0].key})
    p.allocated("r", [1, 2, 3], p.match("r", PROMPT, 0))
    (load,) = p.begin_step(idle=True).loads
    assert load.tail is None and load.end == 128


def test_the_chunk_holding_only_the_last_token_is_fetched_for_the_tail():
    prompt = list(range(129))  # chunks 0-128 and 128-129
    p = planner(all_keys(prompt))
    p.allocated("r", [1], p.match("r", prompt, 0))
    (load,) = p.begin_step(idle=True).loads
    assert (load.start, load.end, load.tail) == (0, 128, 128)
    assert [(c.start, c.end) for c in load.chunks] == [(0, 128), (128, 129)]


def test_each_rank_must_hold_a_chunk_for_it_to_count():
    identity = replace(IDENTITY, tp_size=2)
    chunks = prompt_chunks(identity, PROMPT)
    stored = {k for c in chunks for k in c.keys} - {chunks[1].keys[1]}
    p = Planner(identity, lookup_of(stored), block_size=BLOCK, loads=True, saves=False,
                keep_tail=True)  # fmt: skip
    assert p.match("r", PROMPT, 0) == 128
