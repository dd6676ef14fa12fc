"""`bench sweep`: DistServe's highest rate at 90% attainment, from real runs against a server."""

from __future__ import annotations

import json

import pytest
from serve_fake import Knobs, serve_fake

from splitwise_bench.sweep import capacity, curve, sustained_rate, workload_seed
from splitwise_local.cli import main

SMALL = [
    "--num-requests",
    "5",
    "--prompt-len",
    "24",
    "--output-len",
    "6",
    "--long-prompt-len",
    "100",
    "--long-output-len",
    "3",
    "--long-fraction",
    "0.4",
    "--no-progress",
    "--warmup",
    "1",
]


@pytest.mark.parametrize(
    ("points", "expected"),
    [
        # met at 1 and 2, missed at 3: the line 0.95 -> 0.75 crosses 0.9 a quarter of the way
        ([(1, 1.0), (2, 0.95), (3, 0.75)], {"tested": 2, "interpolated": 2.25, "bound": "exact"}),
        ([(1, 1.0), (2, 0.9)], {"tested": 2, "interpolated": 2, "bound": "at_least"}),
        ([(1, 0.5), (2, 0.4)], {"tested": None, "interpolated": None, "bound": "below"}),
        # a later rate that recovers does not count: the first miss ends the sustained range
        ([(1, 1.0), (2, 0.5), (3, 1.0)], {"tested": 1, "interpolated": 1.2, "bound": "exact"}),
    ],
)
def test_sustained_rate(points, expected):
    found = sustained_rate(points)
    assert found["bound"] == expected["bound"] and found["tested"] == expected["tested"]
    if expected["interpolated"] is None:
        assert found["interpolated"] is None
    else:
        assert found["interpolated"] == pytest.approx(expected["interpolated"])


def test_capacity_spread_across_seeds():
    runs = [
        {"seed": s, "rate": r, "attainment": {"both": a}}
        for s, table in ((0, {1: 1.0, 2: 0.8}), (1, {1: 1.0, 2: 1.0}))
        for r, a in table.items()
    ]
    found = capacity(runs)
    assert found["per_seed"]["0"]["interpolated"] == pytest.approx(1.5)
    assert found["per_seed"]["1"] == {"tested": 2, "interpolated": 2, "bound": "at_least"}
    assert found["interpolated"] == {"mean": pytest.approx(1.75), "min": 1.5, "max": 2}
    assert found["bounds"] == ["at_least", "exact"]


def test_every_run_draws_its_own_prompts_and_every_system_the_same():
    seeds = {workload_seed(s, r) for s in (0, 1, 2) for r in (0.5, 1, 1.5, 2, 3)}
    assert len(seeds) == 15
    assert workload_seed(1, 0.5) == workload_seed(1, 0.5)


def test_sweep_measures_attainment_per_rate_and_seed(tokenizer, tmp_path):
    out = tmp_path / "sweep.json"
    # every token takes 10 ms; a 9 ms TPOT SLO fails every request, 50 ms passes them
    with serve_fake(tokenizer, Knobs(token_interval_s=0.01)) as (url, fake):
        code = main(
            [
                "bench",
                "sweep",
                "--url",
                url,
                "--rates",
                "20,10",
                "--seeds",
                "3,4",
                "--slo-tpot-ms",
                "50",
                "--json",
                str(out),
                *SMALL,
            ]
        )
        strict = tmp_path / "strict.json"
        main(
            [
                "bench",
                "sweep",
                "--url",
                url,
                "--rates",
                "20",
                "--seeds",
                "3",
                "--slo-tpot-ms",
                "9",
                "--json",
                str(strict),
                *SMALL,
            ]
        )
    assert code == 0
    result = json.loads(out.read_text())
    assert result["rates"] == [10.0, 20.0] and result["seeds"] == [3, 4]
    runs = result["runs"]
    assert [(r["seed"], r["rate"]) for r in runs] == [(3, 10), (3, 20), (4, 10), (4, 20)]
    assert all(r["completed"] == 5 and r["attainment"]["both"] == 1.0 for r in runs)
    # one warm-up request for the whole sweep, then 5 per run, each run with its own prompts
    assert len(fake.requests) == 1 + 4 * 5 + 1 + 5
    prompts = [tuple(b["prompt"] for b in fake.requests[1 + 5 * i : 6 + 5 * i]) for i in range(4)]
    assert len(set(prompts)) == 4
    # per-request records are kept at the CDF rate (the middle one) only
    assert [("per_request" in r) for r in runs] == [False, True, False, True]
    assert result["cdf_rate"] == 20.0
    assert result["capacity"]["per_seed"]["3"]["bound"] == "at_least"
    assert result["curve"] == curve(runs)
    assert result["curve"][0]["attainment"]["per_seed"] == [1.0, 1.0]
    assert set(result["host_load"]) >= {"max_foreign_fraction", "quiet_runs", "runs"}
    failed = json.loads(strict.read_text())
    assert failed["runs"][0]["attainment"] == {"ttft": 1.0, "tpot": 0.0, "both": 0.0}
    assert failed["capacity"]["per_seed"]["3"]["bound"] == "below"


def test_unknown_cdf_rate_is_refused_before_sending(tokenizer, capsys):
    with serve_fake(tokenizer) as (url, fake):
        code = main(["bench", "sweep", "--url", url, "--rates", "1,2", "--cdf-rate", "3", *SMALL])
    assert code == 1 and not fake.requests
    assert "--cdf-rate 3.0 is not one of the rates" in capsys.readouterr().err
