"""The console never fails a stop: it writes where the streams are now, and drops a line it
cannot write (pytest closes its captures on Ctrl-C before the engines' fixtures tear down)."""

from __future__ import annotations

import io
import sys

from splitwise_local.serve.console import Console


def test_a_closed_stream_drops_the_line_and_raises_nothing():
    closed = io.StringIO()
    closed.close()
    console = Console("info", out=closed, err=closed)
    console.say("launcher", "stopping store")
    console.error("launcher", "store exited (1)")
    console.child_line("store", "INFO bye", 20)


def test_without_streams_of_its_own_it_writes_where_sys_stdout_is_now(monkeypatch):
    console = Console()
    now, later = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", now)
    console.say("launcher", "starting store")
    monkeypatch.setattr(sys, "stderr", later)
    console.error("launcher", "store exited (1)")
    assert now.getvalue() == "[launcher] starting store\n"
    assert later.getvalue() == "[launcher] error: store exited (1)\n"
