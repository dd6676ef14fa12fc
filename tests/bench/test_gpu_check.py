"""`scripts/gpu_check.sh --dry-run`: the GPU check's own code, on the CPU, so it cannot rot
before a GPU machine runs it; and with only the packages such a machine has."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# What the GPU machine has besides the standard library (and torch's own requirements).
GPU_MACHINE = ["torch", "numpy", "psutil", "xxhash", "PyYAML", "aiohttp", "prometheus-client"]

pytestmark = pytest.mark.timeout(600)


def dry_run(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "gpu-check.json"
    result = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--dry-run", "--json", str(out)],
        cwd=REPO,
        env={**os.environ, "PYTHON": sys.executable, **env},
        capture_output=True,
        text=True,
        timeout=500,
    )
    return result, out


def test_the_dry_run_checks_every_layout_and_moves_kv_through_a_real_store(tmp_path):
    result, out = dry_run(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert "gpu_check.py --dry-run" in report["command"] and report["commit"]
    assert report["machine"]["cpu"] and "isa" in report["machine"]
    assert report["mode"] == "dry-run" and report["passed"]
    checks = report["layout_checks"]
    assert len(checks) == 26 and all(c["gather"] and c["scatter"] for c in checks)
    assert {c["adapter"].split("-")[0] for c in checks} == {"per", "mla"}
    transfers = report["transfers"]
    layouts = ["LBHNC", "LBNHC", "LHBNC", "BLHNC", "BLNHC", "BHLNC"]
    assert [t["layout"] for t in transfers] == layouts and all(t["verified"] for t in transfers)
    assert transfers[0]["bytes"] == 90 * 3 * 2 * 2 * 8 * 2  # tokens, layers, K/V, heads, bf16
    assert set(report["ratios"]) == {"save_over_copy", "load_over_copy", "e2e_over_prefill"}
    assert all(value > 0 for value in report["ratios"].values())


def requirements(distribution: str) -> list[str]:
    names = []
    for requirement in metadata.requires(distribution) or []:
        if "extra ==" not in requirement:
            names.append(re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0])
    return names


def absent_on_a_gpu_machine() -> list[str]:
    """Top-level modules installed here that no distribution a GPU machine has provides."""

    def key(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    present, pending = set(), list(GPU_MACHINE)
    while pending:
        name = pending.pop()
        if key(name) in present:
            continue
        present.add(key(name))
        try:
            pending += requirements(name)
        except metadata.PackageNotFoundError:
            continue
    return sorted(
        module
        for module, dists in metadata.packages_distributions().items()
        if "splitwise_local" not in dists  # ours: the check ships with its own packages
        and module not in sys.stdlib_module_names
        and not any(key(dist) in present for dist in dists)
    )


GUARD = textwrap.dedent(
    """
    import importlib.abc, os, sys

    ABSENT = set(os.environ["SPLITWISE_ABSENT"].split(","))

    class Absent(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in ABSENT:
                raise ModuleNotFoundError(f"No module named {name!r} (not on a GPU machine)",
                                          name=name)
            return None

    sys.meta_path.insert(0, Absent())
    """
)


def test_the_check_imports_only_what_a_gpu_machine_has(tmp_path):
    absent = absent_on_a_gpu_machine()
    assert {"vllm", "constriction", "cryptography"} <= set(absent) and "torch" not in absent
    (tmp_path / "sitecustomize.py").write_text(GUARD)
    result, out = dry_run(
        tmp_path,
        PYTHONPATH=str(tmp_path),
        SPLITWISE_ABSENT=",".join(absent),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["passed"] and report["payload"]["serde"] == "naive"
    assert not report["payload"]["sealed"]
