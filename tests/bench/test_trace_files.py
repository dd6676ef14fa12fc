"""The shipped traces: each parses whole into its published shape, a malformed file is refused
with the reason, and each ships with its license and in the package data."""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from splitwise_bench import trace_files
from splitwise_bench.trace_files import (
    TraceError,
    load_trace,
    parse_azure,
    parse_mooncake,
)


@pytest.mark.parametrize(
    ("name", "count", "first", "median_prompt", "median_output", "rate"),
    [
        ("azure-conv", 19_366, (374, 44), 1020, 129, 5.5),
        ("azure-code", 8_819, (4808, 10), 1469, 13, 2.6),
        ("mooncake-conv", 12_031, (6758, 500), 6909, 350, 3.4),
    ],
)
def test_each_shipped_trace_parses_whole(name, count, first, median_prompt, median_output, rate):
    trace = load_trace(name)
    assert len(trace) == count
    assert (trace[0].input_len, trace[0].output_len) == first
    arrivals = [r.arrival_s for r in trace]
    assert arrivals[0] == 0.0 and all(np.diff(arrivals) >= 0)
    assert 3400 < arrivals[-1] < 3600  # one hour-long sample
    assert np.median([r.input_len for r in trace]) == median_prompt
    assert np.median([r.output_len for r in trace]) == median_output
    assert count / arrivals[-1] == pytest.approx(rate, abs=0.05)
    if name == "mooncake-conv":
        assert all(len(r.hash_ids) == -(-r.input_len // 512) for r in trace)
        assert trace[0].hash_ids == tuple(range(14))
    else:
        assert all(not r.hash_ids for r in trace)


def test_parsers_read_the_published_formats():
    azure = parse_azure(
        [
            "TIMESTAMP,ContextTokens,GeneratedTokens\n",
            "2023-11-16 18:15:59.9000000,374,44\n",
            "2023-11-16 18:16:00.4000001,396,109\n",
        ]
    )
    assert [(r.row, r.input_len, r.output_len) for r in azure] == [(0, 374, 44), (1, 396, 109)]
    assert azure[0].arrival_s == 0.0
    assert azure[1].arrival_s == pytest.approx(0.5000001, abs=1e-9)  # across a minute, in ns
    mooncake = parse_mooncake(
        [
            '{"timestamp": 1500, "input_length": 600, "output_length": 5, "hash_ids": [0, 1]}\n',
            "\n",
            '{"timestamp": 4000, "input_length": 512, "output_length": 2, "hash_ids": [0]}\n',
        ]
    )
    assert [r.arrival_s for r in mooncake] == [0.0, 2.5]  # ms, from the first request
    assert mooncake[0].hash_ids == (0, 1)
    assert mooncake[0].blocks() == [(0, 512), (1, 88)]


@pytest.mark.parametrize(
    ("parse", "lines", "message"),
    [
        (parse_azure, ["time,tokens\n", "1,2\n"], "columns"),
        (parse_azure, ["TIMESTAMP,ContextTokens,GeneratedTokens\n", "x,1,2\n"], "malformed"),
        (parse_mooncake, ['{"timestamp": 0}\n'], "line 1"),
        (
            parse_mooncake,
            ['{"timestamp": 0, "input_length": 513, "output_length": 1, "hash_ids": [0]}'],
            "1 hash ids for 513 tokens",
        ),
    ],
)
def test_malformed_traces_are_refused_with_the_reason(parse, lines, message):
    with pytest.raises(TraceError, match=message):
        parse(lines)


def test_traces_ship_with_their_licenses():
    folder = resources.files("splitwise_bench").joinpath("data", "traces")
    names = {p.name for p in folder.iterdir()}
    assert {info.file for info in trace_files.TRACES.values()} <= names
    assert {"README.md", "LICENSE-CC-BY-4.0.txt", "LICENSE-Apache-2.0.txt"} <= names
    readme = " ".join(folder.joinpath("README.md").read_text("utf-8").split())
    assert "Splitwise: Efficient generative LLM inference using phase splitting" in readme
    assert "Mooncake" in readme and "CC-BY 4.0" in readme and "Apache-2.0" in readme


def test_the_package_data_patterns_cover_every_trace_file():
    root = Path(__file__).resolve().parents[2]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["splitwise_bench"]
    package = root / "splitwise_bench"
    shipped = {p for pattern in patterns for p in package.glob(pattern) if p.is_file()}
    files = {p for p in (package / "data" / "traces").iterdir()}
    assert files and files <= shipped
