"""Kills what a process that started children leaves running when it dies without stopping them.

`python -m splitwise_local.serve.guardian TAG`, started by serve/process.py with the first child
of the process TAG names (a launcher, or a test run's pytest). It reads the children's pids from
stdin, one a line, until EOF: the starter holds the pipe's other end, so EOF comes when it has
exited, however (kill -9, the OOM killer). Its children then have had their parent-death signal
(SIGTERM, on which vLLM's API server stops its engine core and worker); what is still running
after `GRACE_S`, in a child's session, tagged with TAG or below either, gets SIGKILL. After an
orderly stop nothing is left, and it exits without a word.
"""

from __future__ import annotations

import signal
import sys
import time

import psutil

from splitwise_local.serve.leftovers import describe, left_behind
from splitwise_local.serve.process import LAUNCHER_ENV, alive

GRACE_S = 5.0  # vLLM's API server stops with its engine core in 1.3 s after SIGTERM (measured)


def our_sessions(leaders: dict[int, float]) -> list[int]:
    """The sessions the children lead, by pid (each child is the leader of its own), given each
    leader's start time. A leader's pid is reused only once its session is empty; a session whose
    leader is gone or is still the child started is ours."""
    sessions = []
    for pid, started in leaders.items():
        try:
            if psutil.Process(pid).create_time() != started:
                continue
        except psutil.NoSuchProcess:
            pass
        sessions.append(pid)
    return sessions


def main(tag: str) -> int:
    for sig in (signal.SIGINT, signal.SIGHUP):  # the terminal's, meant for the launcher
        signal.signal(sig, signal.SIG_IGN)
    leaders: dict[int, float] = {}
    for line in sys.stdin.buffer:
        pid = int(line)
        try:
            leaders[pid] = psutil.Process(pid).create_time()
        except psutil.NoSuchProcess:
            continue

    def left() -> list[psutil.Process]:
        return left_behind(lambda env: env.get(LAUNCHER_ENV) == tag, our_sessions(leaders))

    found = left()
    if not found:
        return 0
    deadline = time.monotonic() + GRACE_S
    while alive(found) and time.monotonic() < deadline:
        time.sleep(0.1)
    stubborn = alive(found) + [p for p in left() if p not in found]
    names = [describe(process) for process in stubborn]
    for process in stubborn:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            continue
    parent = tag.partition(":")[0]
    what = f"killed {', '.join(names)}" if names else "all stopped on their parent-death signal"
    sys.stderr.write(
        f"[guardian] process {parent} exited with {len(found)} process(es) of its own still "
        f"running; {what}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
