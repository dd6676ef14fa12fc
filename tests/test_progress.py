"""Progress where work is long: bars on a terminal, nothing in a log (one rule, progress.py)."""

from __future__ import annotations

import io
import os
import subprocess
import sys

from splitwise_local.progress import Progress
from tests.terminal import open_terminal, read_all, run_on_a_terminal


def test_a_bar_draws_on_a_terminal_and_not_into_a_file():
    leader, follower = open_terminal()
    with os.fdopen(follower, "w") as terminal:
        for _ in Progress(range(3), desc="work", file=terminal, mininterval=0):
            pass
    assert "work: 100%|" in read_all(leader)
    log = io.StringIO()
    for _ in Progress(range(3), desc="work", file=log):
        pass
    assert log.getvalue() == ""


def test_bench_shows_progress_on_a_terminal_only():
    argv = [sys.executable, "-m", "splitwise_local", "bench", "proxy", "--tokens", "2"]
    argv += ["--token-interval-ms", "1", "--single-client-requests", "2"]
    argv += ["--requests-per-client", "1", "--rounds", "1", "--concurrency", "1"]
    code, terminal = run_on_a_terminal(argv, timeout=120)
    assert code == 0, terminal
    assert "bench proxy: 100%|" in terminal
    logged = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert logged.returncode == 0, logged.stderr
    assert "Latency added by the proxy" in logged.stdout
    assert "%|" not in logged.stderr + logged.stdout and "\r" not in logged.stderr
