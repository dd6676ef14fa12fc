"""The scheduler-side plan: what is loaded and saved, step by step."""

from splitwise_local.connector.keys import KeyIdentity
from splitwise_local.connector.planner import Planner, StepPlan, prompt_chunks

IDENTITY = KeyIdentity("m", "bf16", "per-head/3x64", 128)
PROMPT = list(range(1000, 1300))  # 300 tokens: chunks 0-128, 128-256, 256-300


def stored_prefix(stored: set[str]):
    def exists(keys):
        count = 0
        for key in keys:
            if key not in stored:
                break
            count += 1
        return count

    return exists


def test_chunked_prefill_saves_each_chunk_once_when_complete_including_the_partial_tail():
    planner = Planner(IDENTITY, stored_prefix(set()), loads=False, saves=True)
    step1 = StepPlan()
    planner.new_request("r", PROMPT, [4, 5], 200, step1)
    assert [(c.start, c.end) for c in step1.saves[0].chunks] == [(0, 128)]
    step2 = StepPlan()
    planner.running_request("r", [9], 300, step2)
    assert [(c.start, c.end) for c in step2.saves[0].chunks] == [(128, 256), (256, 300)]
    assert step2.saves[0].block_ids == [4, 5, 9]
    step3 = StepPlan()
    planner.running_request("r", None, 301, step3)  # decoding: nothing more to save
    assert step3.saves == []


def test_consumer_matches_all_but_the_last_token_and_plans_the_load():
    stored = {c.key for c in prompt_chunks(IDENTITY, PROMPT)}
    planner = Planner(IDENTITY, stored_prefix(stored), loads=True, saves=False)
    assert planner.match("r", PROMPT, 0) == 299
    planner.allocated("r", 299)
    plan = StepPlan()
    planner.new_request("r", PROMPT, [1, 2, 3], 300, plan)
    (load,) = plan.loads
    assert (load.start, load.end, load.block_ids, load.tail) == (0, 299, [1, 2, 3], 299)
    assert [(c.start, c.end) for c in load.chunks] == [(0, 128), (128, 256), (256, 300)]
    assert plan.saves == []


def test_consumer_match_stops_at_the_first_missing_chunk_and_respects_local_hits():
    chunks = prompt_chunks(IDENTITY, PROMPT)
    planner = Planner(
        IDENTITY, stored_prefix({chunks[0].key, chunks[2].key}), loads=True, saves=False
    )
    assert planner.match("r", PROMPT, 0) == 128
    assert planner.match("r", PROMPT, 128) == 0  # the local prefix cache already has it
    planner = Planner(IDENTITY, stored_prefix({c.key for c in chunks}), loads=True, saves=False)
    assert planner.match("r", PROMPT, 128) == 171
    planner.allocated("r", 171)
    plan = StepPlan()
    planner.new_request("r", PROMPT, [1, 2, 3], 300, plan)
    (load,) = plan.loads
    assert (load.start, load.end) == (128, 299)
    assert [(c.start, c.end) for c in load.chunks] == [(128, 256), (256, 300)]


def test_a_one_token_prompt_is_never_matched():
    planner = Planner(IDENTITY, stored_prefix(set()), loads=True, saves=False)
    assert planner.match("r", [5], 0) == 0


def test_kv_both_does_not_save_again_what_it_loaded():
    chunks = prompt_chunks(IDENTITY, PROMPT)
    stored = {chunks[0].key, chunks[1].key}
    planner = Planner(IDENTITY, stored_prefix(stored), loads=True, saves=True)
    assert planner.match("r", PROMPT, 0) == 256
    planner.allocated("r", 256)
    plan = StepPlan()
    planner.new_request("r", PROMPT, [1, 2, 3], 300, plan)
    assert [(c.start, c.end) for c in plan.saves[0].chunks] == [(256, 300)]


def test_finished_forgets_the_request():
    planner = Planner(IDENTITY, stored_prefix(set()), loads=True, saves=True)
    planner.new_request("r", PROMPT, [1], 100, StepPlan())
    planner.finished("r")
    plan = StepPlan()
    planner.running_request("r", None, 300, plan)
    assert plan.saves == []


def test_producer_skips_the_prefix_the_store_already_holds():
    chunks = prompt_chunks(IDENTITY, PROMPT)
    planner = Planner(IDENTITY, stored_prefix({chunks[0].key}), loads=False, saves=True)
    plan = StepPlan()
    planner.new_request("r", PROMPT, [1, 2, 3], 300, plan)
    assert [(c.start, c.end) for c in plan.saves[0].chunks] == [(128, 256), (256, 300)]


def test_the_chunk_holding_only_the_last_token_is_fetched_for_the_tail():
    prompt = list(range(129))  # chunks 0-128 and 128-129
    stored = {c.key for c in prompt_chunks(IDENTITY, prompt)}
    planner = Planner(IDENTITY, stored_prefix(stored), loads=True, saves=False)
    planner.allocated("r", planner.match("r", prompt, 0))
    plan = StepPlan()
    planner.new_request("r", prompt, [1, 2], 129, plan)
    (load,) = plan.loads
    assert (load.start, load.end, load.tail) == (0, 128, 128)
    assert [(c.start, c.end) for c in load.chunks] == [(0, 128), (128, 129)]


def test_a_partial_match_has_no_tail_to_patch():
    chunks = prompt_chunks(IDENTITY, PROMPT)
    planner = Planner(IDENTITY, stored_prefix({chunks[0].key}), loads=True, saves=False)
    planner.allocated("r", planner.match("r", PROMPT, 0))
    plan = StepPlan()
    planner.new_request("r", PROMPT, [1, 2, 3], 300, plan)
    assert plan.loads[0].tail is None and plan.loads[0].end == 128
