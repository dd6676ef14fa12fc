"""`serve --connector lmcache`: refused up front where it cannot work, before anything starts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _serve(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "splitwise_local", "--connector", "lmcache", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


@pytest.mark.parametrize(
    ("device", "env", "message"),
    [
        ("cpu", {}, "needs CUDA"),
        ("cuda", {"SPLITWISE_STORE_AUTH_TOKEN": "s3cret"}, "cannot carry a token"),
    ],
)
def test_lmcache_is_refused_where_it_cannot_work(fake_model, tmp_path, device, env, message):
    run_dir = tmp_path / "run"
    result = _serve(
        "--device", device, "--model", str(fake_model), "--run-dir", str(run_dir), env=env
    )
    assert result.returncode == 1
    assert message in result.stdout + result.stderr
    assert not run_dir.exists()  # refused before the run folder or any child
