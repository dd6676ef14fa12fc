"""Workloads: exact prompt lengths from the real tokenizer, seeded repeatability, arrivals."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from splitwise_bench.workloads import (
    PromptCutter,
    WorkloadError,
    WorkloadSettings,
    build_workload,
    load_corpus,
    poisson_arrivals,
    warmup_requests,
)


def token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


@pytest.mark.parametrize("kind", ["fixed", "mixed", "shared-prefix", "multi-turn"])
def test_prompts_have_the_exact_token_lengths_asked_for(tokenizer, kind):
    settings = WorkloadSettings(
        kind=kind, num_requests=12, prompt_len=37, long_prompt_len=700, prefix_len=200, seed=3
    )
    specs = build_workload(settings, tokenizer)
    assert [s.index for s in specs] == list(range(12))
    for spec in specs:
        assert token_count(tokenizer, spec.prompt) == spec.prompt_len
    expected = {(p, o) for p, o in settings.shapes()}
    assert {(s.prompt_len, s.output_len) for s in specs} <= expected


def test_mixed_sends_an_exact_share_of_long_prompts(tokenizer):
    settings = WorkloadSettings(num_requests=10, long_fraction=0.3, long_prompt_len=300)
    kinds = [s.kind for s in build_workload(settings, tokenizer)]
    assert kinds.count("long") == 3 and kinds.count("short") == 7
    lengths = {s.kind: s.prompt_len for s in build_workload(settings, tokenizer)}
    assert lengths == {"long": 300, "short": settings.prompt_len}


def test_shared_prefix_prompts_share_their_group_prefix_tokens(tokenizer):
    settings = WorkloadSettings(
        kind="shared-prefix", num_requests=8, prefix_len=150, prompt_len=20, num_prefixes=2
    )
    ids = [tokenizer(s.prompt)["input_ids"] for s in build_workload(settings, tokenizer)]
    prefixes = {tuple(i[:150]) for i in ids}
    suffixes = {tuple(i[150:]) for i in ids}
    assert len(prefixes) == 2  # every prompt starts with one of the two group prefixes
    assert len(suffixes) == 8  # and goes on with its own text


def test_multi_turn_resends_each_conversations_history(tokenizer):
    settings = WorkloadSettings(
        kind="multi-turn", num_requests=7, prefix_len=60, prompt_len=10, output_len=5, turns=3
    )
    specs = build_workload(settings, tokenizer)
    assert settings.conversations() == 3
    # round robin: turn 1 of conversations 0, 1, 2, then turn 2 of each, then one turn 3
    assert [(s.conversation, s.kind) for s in specs] == [
        (0, "turn-1"), (1, "turn-1"), (2, "turn-1"),
        (0, "turn-2"), (1, "turn-2"), (2, "turn-2"), (0, "turn-3"),
    ]  # fmt: skip
    assert [s.prompt_len for s in specs] == [60, 60, 60, 75, 75, 75, 90]
    by_conversation: dict[int, list[list[int]]] = {}
    for spec in specs:
        ids = tokenizer(spec.prompt)["input_ids"]
        assert len(ids) == spec.prompt_len
        by_conversation.setdefault(spec.conversation, []).append(ids)
    for turns in by_conversation.values():
        for earlier, later in itertools.pairwise(turns):
            assert later[: len(earlier)] == earlier  # the whole history, token for token
    firsts = {tuple(turns[0]) for turns in by_conversation.values()}
    assert len(firsts) == 3  # conversations do not share their history


def test_same_seed_same_prompts_other_seed_other_prompts(tokenizer):
    a = build_workload(WorkloadSettings(num_requests=6, seed=1), tokenizer)
    b = build_workload(WorkloadSettings(num_requests=6, seed=1), tokenizer)
    c = build_workload(WorkloadSettings(num_requests=6, seed=2), tokenizer)
    assert a == b
    assert [s.prompt for s in a] != [s.prompt for s in c]


def test_warmup_prompts_are_not_the_measured_ones(tokenizer):
    settings = WorkloadSettings(kind="fixed", num_requests=4)
    measured = {s.prompt for s in build_workload(settings, tokenizer)}
    warm = warmup_requests(settings, tokenizer, 2)
    assert len(warm) == 2 and not measured & {s.prompt for s in warm}
    assert all(token_count(tokenizer, s.prompt) == settings.prompt_len for s in warm)


def test_poisson_arrivals_are_seeded_and_have_the_asked_rate():
    times = poisson_arrivals(2000, rate=4.0, seed=7)
    assert times == poisson_arrivals(2000, rate=4.0, seed=7)
    assert times[0] == 0.0 and all(np.diff(times) >= 0)
    assert np.mean(np.diff(times)) == pytest.approx(0.25, rel=0.1)
    with pytest.raises(WorkloadError, match="rate"):
        poisson_arrivals(3, rate=0, seed=0)


@pytest.mark.parametrize(
    ("settings", "max_model_len", "message"),
    [
        (WorkloadSettings(long_fraction=1.5), None, "long_fraction"),
        (WorkloadSettings(num_requests=0), None, "num_requests"),
        (WorkloadSettings(long_prompt_len=2000, long_output_len=100), 2048, "max_model_len"),
        (WorkloadSettings(kind="fixed", prompt_len=3000), 2048, "max_model_len"),
        (WorkloadSettings(kind="multi-turn", prefix_len=1500, turns=4), 2048, "max_model_len"),
        (WorkloadSettings(kind="multi-turn", turns=0), None, "turns"),
    ],
)
def test_impossible_settings_are_refused_with_the_setting_named(settings, max_model_len, message):
    with pytest.raises(WorkloadError, match=message):
        settings.validate(max_model_len)


def test_a_prompt_longer_than_the_corpus_is_refused(tokenizer):
    cutter = PromptCutter(tokenizer, load_corpus(), np.random.default_rng(0))
    with pytest.raises(WorkloadError, match="corpus"):
        cutter.cut(10**6)


def test_the_cutter_names_the_shortest_prompt_it_can_cut(tokenizer):
    cutter = PromptCutter(tokenizer, load_corpus(), np.random.default_rng(0))
    shortest = cutter.cut(cutter.min_length)
    assert token_count(tokenizer, shortest) == cutter.min_length
    with pytest.raises(WorkloadError, match="no text"):
        cutter.cut(cutter.min_length - 1)
