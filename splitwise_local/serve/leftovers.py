"""What a starter of children left running when it died (kill -9, the OOM killer): found by the
tags every child carries in its environment and by the sessions the children lead, and killed.

The guardian (guardian.py) does it for its one starter as soon as that one dies; the next launch
does it for every launcher that has died (`sweep_orphans`), in case the guardian died too.
Processes of a live launcher, this one's included, are never touched.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Mapping

import psutil

from splitwise_local.serve.process import COMPONENT_ENV, LAUNCHER_ENV, alive, launcher_tag


def _launcher_alive(tag: str) -> bool:
    """Whether the process `tag` names still runs (a zombie has died; its parent has not
    collected it yet); a tag that is not one counts as alive, so nothing is killed for it."""
    pid = tag.partition(":")[0]
    if not pid.isdigit():
        return True
    try:
        process = psutil.Process(int(pid))
        return launcher_tag(process.pid) == tag and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def left_behind(
    belongs: Callable[[Mapping[str, str]], bool], sessions: Iterable[int] = ()
) -> list[psutil.Process]:
    """Live processes whose environment `belongs`, every process in their sessions or in
    `sessions`, and the descendants of all of them; never this process, its ancestors or its
    own session.

    The sessions matter: vLLM's engine core and workers rename themselves (setproctitle), which
    blanks the environment /proc shows, so only the session their API server leads says whose
    they are.
    """
    me = psutil.Process()
    spared = {me.pid, *(parent.pid for parent in me.parents())}
    wanted = set(sessions)
    found: dict[int, psutil.Process] = {}
    everyone = [process for process in psutil.process_iter() if process.pid not in spared]
    for process in everyone:
        with contextlib.suppress(psutil.Error, OSError):
            if belongs(process.environ()):
                found[process.pid] = process
                wanted.add(os.getsid(process.pid))
    wanted.discard(os.getsid(0))
    for process in everyone:
        with contextlib.suppress(OSError):
            if process.pid not in found and os.getsid(process.pid) in wanted:
                found[process.pid] = process
    for process in list(found.values()):
        with contextlib.suppress(psutil.Error):
            for descendant in process.children(recursive=True):
                if descendant.pid not in spared:
                    found.setdefault(descendant.pid, descendant)
    return alive(list(found.values()))


def describe(process: psutil.Process) -> str:
    """`decode engine (pid 12)`, or the process's name where its environment is unreadable."""
    try:
        name = process.environ().get(COMPONENT_ENV) or process.name()
    except psutil.Error:
        name = "a process"
    return f"{name} (pid {process.pid})"


def sweep_orphans() -> str | None:
    """Kills what launchers that have died left running (their tag names a process that is
    gone, with those processes' sessions and descendants) and says what it killed; None when
    there was nothing. Processes of a live launcher, this one's included, are never touched."""
    dead: dict[str, bool] = {}

    def orphaned(env: Mapping[str, str]) -> bool:
        tag = env.get(LAUNCHER_ENV)
        if tag is None:
            return False
        if tag not in dead:
            dead[tag] = not _launcher_alive(tag)
        return dead[tag]

    found = left_behind(orphaned)
    if not found:
        return None
    names = [describe(process) for process in found]
    for process in found:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(found, timeout=5.0)  # gone, so their ports are free
    return (
        f"killed {len(found)} process(es) that an earlier run left running when its launcher "
        f"died: {', '.join(names)}"
    )
