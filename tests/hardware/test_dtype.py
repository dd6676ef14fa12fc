"""The engine dtype by CPU: vLLM's own GEMM timed in both dtypes, the faster chosen, once per
machine; the override; and the launcher's engines and proxy keys agreeing on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from splitwise_local.hardware import dtype
from splitwise_local.hardware.dtype import DtypeChoice, ProbeFailed, choose, cpu_dtype
from splitwise_local.serve.engine import EngineSpec


def test_choose_takes_bf16_unless_fp32_is_clearly_faster():
    assert choose({"bfloat16": 1.0, "float32": 2.0}, "cpu").dtype == "bfloat16"
    assert choose({"bfloat16": 5.0, "float32": 1.0}, "cpu").dtype == "float32"  # AVX2-only
    # Within the margin bf16 stays: it halves the KV bytes every save and load moves.
    assert choose({"bfloat16": 1.05, "float32": 1.0}, "cpu").dtype == "bfloat16"
    assert choose({"bfloat16": 1.2, "float32": 1.0}, "cpu").dtype == "float32"
    reason = choose({"bfloat16": 0.002, "float32": 0.004}, "Some CPU").reason
    assert "2.0 ms in bfloat16" in reason and "4.0 ms in float32" in reason
    assert "Some CPU" in reason


def test_the_choice_is_probed_once_per_machine_and_cached(tmp_path, monkeypatch):
    monkeypatch.delenv(dtype.OVERRIDE_ENV, raising=False)
    monkeypatch.setattr(dtype, "CACHE_DIR", tmp_path)
    dtype._measured.cache_clear()
    first = cpu_dtype()
    assert first.dtype in dtype.DTYPES
    assert set(first.seconds) == set(dtype.DTYPES) and all(first.seconds.values())
    assert first == choose(first.seconds, first.cpu)  # the faster of what was measured
    cached = json.loads(dtype.cache_path().read_text())
    assert DtypeChoice(**cached) == first
    # A second process reads the file instead of probing: a planted answer comes back as is.
    planted = {"dtype": "float32", "seconds": {"bfloat16": 9.0, "float32": 1.0}, "cpu": "x"}
    dtype.cache_path().write_text(json.dumps(planted))
    dtype._measured.cache_clear()
    assert cpu_dtype() == DtypeChoice(**planted)
    dtype.cache_path().write_text("{torn")  # a torn file is probed again, not trusted
    dtype._measured.cache_clear()
    assert cpu_dtype().seconds and cpu_dtype().dtype in dtype.DTYPES
    dtype._measured.cache_clear()


def test_the_override_skips_the_probe_and_rejects_unknown_dtypes(monkeypatch):
    monkeypatch.setenv(dtype.OVERRIDE_ENV, "float32")
    assert cpu_dtype().dtype == "float32" and "SPLITWISE_CPU_DTYPE" in cpu_dtype().reason
    monkeypatch.setenv(dtype.OVERRIDE_ENV, "fp8")
    with pytest.raises(ProbeFailed, match="fp8"):
        cpu_dtype()


@pytest.mark.parametrize("choice", ["float32", "bfloat16"])
def test_a_cpu_engine_runs_the_chosen_dtype_unless_told_otherwise(monkeypatch, tmp_path, choice):
    monkeypatch.setenv(dtype.OVERRIDE_ENV, choice)
    spec = EngineSpec(model=tmp_path, port=1, role="plain")
    command = spec.command()
    assert command[command.index("--dtype") + 1] == choice
    told = EngineSpec(model=tmp_path, port=1, role="plain", extra_args=["--dtype=float16"])
    assert [a for a in told.command() if a.startswith("--dtype")] == ["--dtype=float16"]


def test_the_launcher_gives_engines_and_proxy_keys_the_same_dtype(monkeypatch, tmp_path):
    from splitwise_local.serve.console import Console
    from splitwise_local.serve.engine import flag_value
    from splitwise_local.serve.resolve import engine_dtype

    monkeypatch.setenv(dtype.OVERRIDE_ENV, "float32")
    console = Console("warning")
    extra, line = engine_dtype("cpu", ["--served-model-name", "m"], console)
    assert flag_value(extra, "--dtype") == "float32" and line.startswith("dtype: float32")
    extra, line = engine_dtype("cpu", ["--dtype", "bfloat16"], console)
    assert extra == ["--dtype", "bfloat16"] and "given after --" in line
    assert engine_dtype("cuda", ["--x"], console) == (["--x"], None)  # vLLM's own on GPUs


def test_the_module_runs_as_a_command_with_the_override():
    env = {**os.environ, dtype.OVERRIDE_ENV: "float32"}
    done = subprocess.run(
        [sys.executable, "-m", "splitwise_local.hardware.dtype"],
        capture_output=True, text=True, timeout=60, env=env, check=True,
    )  # fmt: skip
    assert done.stdout.startswith("float32: set by SPLITWISE_CPU_DTYPE")
