"""The launcher's console: every component's lines, prefixed by its name, filtered by level.

Two engines at INFO print hundreds of lines while they start; the console shows a chosen level
and above (the log files keep everything), while the launcher's own progress lines always show.
"""

from __future__ import annotations

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


def line_level(line: str, previous: int) -> int:
    """The level of one log line; a line without one (a traceback, a wrapped message) keeps the
    level of the line before it, except that a traceback always counts as an error."""
    if line.startswith("Traceback"):
        return LEVELS["error"]
    match = _LEVEL_RE.search(line, 0, _LEVEL_SEARCH_WIDTH)
    return _LEVEL_WORDS[match.group(1)] if match else previous


class Console:
    """Writes whole lines from many threads, each prefixed by its component."""

    def __init__(
        self, level: str = "warning", out: TextIO | None = None, err: TextIO | None = None
    ) -> None:
        self.threshold = LEVELS[level]
        self._out = out if out is not None else sys.stdout
        self._err = err if err is not None else sys.stderr
        self._lock = threading.Lock()

    def _write(self, stream: TextIO, component: str, text: str) -> None:
        with self._lock:
            for line in text.splitlines() or [""]:
                stream.write(f"[{component}] {line}\n")
            stream.flush()

    def say(self, component: str, text: str) -> None:
        """A line that always shows: the launcher's progress."""
        self._write(self._out, component, text)

    def error(self, component: str, text: str) -> None:
        """A failure the user must read; goes to stderr."""
        self._write(self._err, component, "error: " + text)

    def child_line(self, component: str, line: str, level: int) -> None:
        if level >= self.threshold:
            self._write(self._out, component, line)


class ConsoleHandler(logging.Handler):
    """Routes an in-process component's log records (the proxy's) onto the console."""

    def __init__(self, console: Console, component: str) -> None:
        super().__init__()
        self.console = console
        self.component = component

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.child_line(self.component, self.format(record), record.levelno)
        except Exception:
            self.handleError(record)
