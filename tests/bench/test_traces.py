"""Trace replay: a window is a time span and a count, scaling keeps the trace's shape, Mooncake's
blocks become tokens that share exactly the trace's prefixes, and a replay states what it did."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from splitwise_bench.prefix_reuse import prefix_reuse
from splitwise_bench.trace_files import TraceError, TraceRequest, load_trace
from splitwise_bench.traces import (
    BlockTokens,
    ReplaySettings,
    build_replay,
    interarrival_cv,
    scale,
    sessions,
    window,
)
from splitwise_bench.workloads import poisson_arrivals


def test_a_window_is_a_time_span_and_a_count():
    trace = [TraceRequest(i, t, 10, 1) for i, t in enumerate([0.0, 1.0, 2.0, 2.5, 3.0, 9.0])]
    assert [r.row for r in window(trace, 1.0, 2.0)] == [1, 2, 3]  # [1, 3): 3.0 is out
    assert [r.row for r in window(trace, 2.0)] == [2, 3, 4, 5]
    assert [r.row for r in window(trace, 0.0, None, 2)] == [0, 1]
    assert window(trace, 10.0) == []


def test_length_scaling_keeps_the_whole_distribution_not_just_the_mean():
    chosen = window(load_trace("azure-conv"), 600.0, 600.0)
    replayed = scale(chosen, 0.5, 1.0, max_model_len=10**6)
    trace_lengths = np.array([r.input_len for r in chosen])
    replay_lengths = np.array([r.prompt_len for r in replayed])
    assert not any(r.prompt_clipped or r.output_clipped for r in replayed)
    for q in (1, 10, 25, 50, 75, 90, 99):  # every quantile scales, within rounding
        assert np.percentile(replay_lengths, q) == pytest.approx(
            0.5 * np.percentile(trace_lengths, q), abs=1
        )
    # each request keeps its own lengths, so the joint shape survives too
    assert [(r.prompt_len, r.output_len) for r in replayed] == [
        (max(1, round(r.input_len * 0.5)), max(1, round(r.output_len * 0.5))) for r in chosen
    ]


def test_lengths_that_do_not_fit_the_model_are_cut_and_counted():
    chosen = [
        TraceRequest(0, 0.0, 90, 20),  # prompt cut to 100 - 20
        TraceRequest(1, 1.0, 10, 500),  # output cut to 100 - 1, then the prompt to 1
        TraceRequest(2, 2.0, 60, 40),  # fits exactly
        TraceRequest(3, 3.0, 0, 0),  # at least one token each
    ]
    replayed = scale(chosen, 1.0, 1.0, max_model_len=100)
    assert [(r.prompt_len, r.output_len) for r in replayed] == [(80, 20), (1, 99), (60, 40), (1, 1)]
    assert [r.prompt_clipped for r in replayed] == [True, True, False, False]
    assert [r.output_clipped for r in replayed] == [False, True, False, False]
    # on the shipped trace at full length: exactly those over 2,048 with their output
    chosen = window(load_trace("azure-conv"), 0.0, 300.0)
    replayed = scale(chosen, 1.0, 1.0, max_model_len=2048)
    over = sum(r.input_len + r.output_len > 2048 for r in chosen)
    assert over > 10
    assert sum(r.prompt_clipped for r in replayed) == over
    assert all(r.prompt_len + r.output_len <= 2048 for r in replayed)


def test_time_scaling_keeps_the_bursts():
    chosen = window(load_trace("azure-code"), 0.0, 900.0)
    replayed = scale(chosen, 1.0, 7.0, max_model_len=10**6)
    trace_times = [r.arrival_s for r in chosen]
    replay_times = [r.arrival_s for r in replayed]
    assert replay_times == pytest.approx([(t - trace_times[0]) * 7.0 for t in trace_times])
    assert interarrival_cv(replay_times) == pytest.approx(interarrival_cv(trace_times))
    # the coding trace is far burstier than a Poisson process of the same rate (CV 1), which a
    # replay that kept only the mean rate would send
    rate = (len(replay_times) - 1) / replay_times[-1]
    assert interarrival_cv(replay_times) > 3
    poisson = poisson_arrivals(len(replay_times), rate, seed=0)
    assert interarrival_cv(poisson) == pytest.approx(1.0, abs=0.15)


def test_a_mooncake_block_is_a_function_of_its_id(tokenizer):
    one, other = BlockTokens(tokenizer, 64, seed=3), BlockTokens(tokenizer, 64, seed=3)
    assert np.array_equal(one.block(7), other.block(7))  # same id, same tokens, any instance
    assert not np.array_equal(one.block(7), one.block(8))  # another id, other tokens
    assert not np.array_equal(one.block(7), BlockTokens(tokenizer, 64, seed=4).block(7))
    ids = np.concatenate([one.block(h) for h in range(200)])
    assert ids.min() >= 0 and ids.max() < len(tokenizer)
    assert not set(ids.tolist()) & set(tokenizer.all_special_ids)
    assert one.prompt([(7, 64), (8, 10)]) == (*one.block(7).tolist(), *one.block(8)[:10].tolist())


def common_blocks(a: tuple[tuple[int, int], ...], b: tuple[tuple[int, int], ...]) -> int:
    return next(
        (k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x[0] != y[0]), min(len(a), len(b))
    )


def test_synthesized_mooncake_prompts_share_exactly_the_traces_prefixes(tokenizer):
    settings = ReplaySettings("mooncake-conv", length_scale=0.05, start_s=600.0, duration_s=120.0)
    replay = build_replay(settings, tokenizer)
    size = settings.block_tokens()
    assert size == 26  # ceil(512 x 0.05)
    rows = {r.row: r for r in load_trace("mooncake-conv")}
    judged = shared_beyond_the_first = 0
    for spec, sent in zip(replay.specs, replay.replayed, strict=True):
        assert isinstance(spec.prompt, tuple) and len(spec.prompt) == spec.prompt_len
        ids = [h for h, _ in sent.blocks]
        assert ids == list(rows[sent.row].hash_ids[: len(ids)])  # the trace's blocks, in order
        assert -(-spec.prompt_len // size) == len(ids)  # only the last block is partial
    for (a, ra), (b, rb) in itertools.combinations(
        zip(replay.specs, replay.replayed, strict=True), 2
    ):
        k = common_blocks(ra.blocks, rb.blocks)
        shared = min(k * size, a.prompt_len, b.prompt_len)
        assert a.prompt[:shared] == b.prompt[:shared]
        if k < min(len(ra.blocks), len(rb.blocks)):  # the first block that differs differs
            end = min((k + 1) * size, a.prompt_len, b.prompt_len)
            assert a.prompt[k * size : end] != b.prompt[k * size : end]
        judged += 1
        shared_beyond_the_first += k > 1
    assert judged > 1000 and shared_beyond_the_first > 10  # the window has real sharing


def test_a_replay_states_its_scales_and_sends_exact_lengths(tokenizer):
    settings = ReplaySettings("azure-conv", length_scale=0.25, time_scale=10.0, duration_s=20.0)
    replay = build_replay(settings, tokenizer, max_model_len=2048)
    summary = replay.summary
    assert (summary["length_scale"], summary["time_scale"]) == (0.25, 10.0)
    assert summary["window"]["requests"] == len(replay.specs) > 10
    assert summary["shape"]["interarrival_cv"]["replay"] == pytest.approx(
        summary["shape"]["interarrival_cv"]["trace"]
    )
    assert summary["shape"]["requests_per_s"]["replay"] == pytest.approx(
        summary["shape"]["requests_per_s"]["trace"] / 10
    )
    for spec in replay.specs:
        assert isinstance(spec.prompt, str) and spec.kind == "azure-conv"
        assert len(tokenizer(spec.prompt)["input_ids"]) == spec.prompt_len
    assert replay.arrivals[0] == 0.0 and replay.arrivals == sorted(replay.arrivals)
    assert build_replay(settings, tokenizer).specs == replay.specs  # seeded


def test_a_mooncake_replay_reports_ideal_reuse_at_each_capacity(tokenizer):
    settings = ReplaySettings("mooncake-conv", length_scale=0.05, start_s=600.0, duration_s=60.0)
    replay = build_replay(settings, tokenizer, capacities=[{"blocks": 50}, {"bytes": 23_040}])
    reuse = replay.summary["prefix_reuse"]
    assert reuse["replay"]["block_ratio"] > 0
    small, one_token = reuse["lru"]
    assert (small["capacity_blocks"], small["capacity_tokens"]) == (50, 50 * 26)
    assert (one_token["capacity_bytes"], one_token["capacity_tokens"]) == (23_040, 1)
    assert small["reused_blocks"] <= reuse["replay"]["reused_blocks"]
    assert one_token["reused_blocks"] == 0


def test_a_thinned_window_keeps_whole_conversations_and_their_reuse():
    hour = window(load_trace("mooncake-conv"), 0.0, 1800.0)
    kept = sessions(hour, 0.05, seed=1)
    groups = {r.hash_ids[:2] for r in kept}
    assert kept == [r for r in hour if r.hash_ids[:2] in groups]  # whole, in order
    assert len(groups) == round(0.05 * len({r.hash_ids[:2] for r in hour}))
    assert {r.hash_ids[:2] for r in sessions(hour, 0.05, seed=2)} != groups
    consecutive = hour[: len(kept)]  # as many requests, one after the other

    def ratio(requests):
        return prefix_reuse(r.blocks() for r in requests).as_dict()["token_ratio"]

    assert ratio(kept) > 2 * ratio(consecutive)


def test_a_replay_of_sessions_sends_the_kept_conversations(tokenizer):
    settings = ReplaySettings(
        "mooncake-conv", length_scale=0.05, duration_s=600.0, max_requests=20, sessions=0.1
    )
    replay = build_replay(settings, tokenizer)
    chosen = sessions(window(load_trace("mooncake-conv"), 0.0, 600.0), 0.1, 0)[:20]
    assert [r.row for r in replay.replayed] == [r.row for r in chosen]
    assert replay.summary["window"]["sessions"] == 0.1


@pytest.mark.parametrize(
    ("settings", "capacities", "message"),
    [
        (ReplaySettings("azure-conv", length_scale=0), (), "length_scale"),
        (ReplaySettings("azure-conv", time_scale=-1), (), "time_scale"),
        (ReplaySettings("azure-conv", duration_s=0), (), "duration"),
        (ReplaySettings("azure-conv", max_requests=0), (), "requests"),
        (ReplaySettings("azure-conv", start_s=10**6), (), "no request"),
        (ReplaySettings("nope"), (), "unknown trace"),
        (ReplaySettings("azure-code"), ({"blocks": 4},), "no prompt blocks"),
        (ReplaySettings("azure-conv", sessions=0.5), (), "sessions need"),
        (ReplaySettings("mooncake-conv", sessions=0.0), (), "sessions must"),
        (ReplaySettings("mooncake-conv", sessions=1.5), (), "sessions must"),
    ],
)
def test_impossible_replays_are_refused_with_the_setting_named(
    tokenizer, settings, capacities, message
):
    with pytest.raises(TraceError, match=message):
        build_replay(settings, tokenizer, capacities=capacities)
