"""A stand-in launcher: starts children of every kind that must die with it, then waits.

`python -m tests.serve.starter start RUN_DIR` starts these `Child`ren, tagged with RUN_DIR:
- `polite` stops on SIGTERM; `stubborn` ignores it.
- `family` stops on SIGTERM, like vLLM's API server, but leaves two children that ignore it in
  its session: `renamed-family`, which renames itself as vLLM's engine core does (that blanks
  its environment in /proc, tag and all), and `tracker`, which keeps its environment (vLLM
  leaves multiprocessing's resource tracker so).
- `loner` stops on SIGTERM and leaves one such renamed child alone: `renamed-loner`.
- `escaper`'s child `stubborn-escaper` ignores SIGTERM and leaves for a session of its own.
Each process writes `up-<kind>` into RUN_DIR once it is set up.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import setproctitle

from splitwise_local.serve.console import Console
from splitwise_local.serve.process import RUN_ENV, Child

GRANDCHILDREN = {
    "family": ("renamed-family", "tracker"),
    "loner": ("renamed-loner",),
    "escaper": ("stubborn-escaper",),
}
KINDS = ("polite", "stubborn", *GRANDCHILDREN)
EVERY_KIND = {*KINDS, *(kind for kinds in GRANDCHILDREN.values() for kind in kinds)}


def command(kind: str, run_dir: str) -> list[str]:
    return [sys.executable, "-m", "tests.serve.starter", "child", kind, run_dir]


def child(kind: str, run_dir: str) -> None:
    if kind not in ("polite", *GRANDCHILDREN):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if kind.startswith("renamed-"):
        setproctitle.setproctitle(kind)
    for grandchild in GRANDCHILDREN.get(kind, ()):
        escape = kind == "escaper"
        subprocess.Popen(command(grandchild, run_dir), start_new_session=escape)
    (Path(run_dir) / f"up-{kind}").touch()
    time.sleep(600)


def start(run_dir: str) -> None:
    env = {**os.environ, RUN_ENV: run_dir}
    for kind in KINDS:
        log = Path(run_dir) / f"{kind}.log"
        Child(kind, command(kind, run_dir), env, log, Console()).start()
    time.sleep(600)


if __name__ == "__main__":
    {"start": start, "child": child}[sys.argv[1]](*sys.argv[2:])
