"""A benchmark run as a user runs it: `python -m splitwise_local bench NAME ... --json PATH` in a
child process, and the checks every benchmark's JSON must pass whatever it measured."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def run_bench(name: str, args: list[str], out: Path, timeout_s: float) -> dict[str, Any]:
    """Runs `bench NAME ARGS --json OUT`; returns its JSON once the run exited 0 and the JSON
    records the command, the commit, the machine (CPU model and ISA flags) and `ratios`.
    `timeout_s` is a hang guard only."""
    argv = [sys.executable, "-m", "splitwise_local", "bench", name, *args, "--json", str(out)]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, f"bench {name} exited {done.returncode}:\n{done.stderr[-4000:]}"
    result = json.loads(out.read_text())
    assert result["command"].startswith(f"python -m splitwise_local bench {name} ")
    assert result["command"].endswith(f"--json {out}")
    assert result["commit"] != "unknown"
    assert result["machine"]["cpu"] and result["machine"]["isa"]
    assert result.get("ratios"), "the JSON has no ratios"
    return result


def positive(value: Any) -> bool:
    """A measured number: finite and above zero (not None, not NaN, not a bool)."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )
