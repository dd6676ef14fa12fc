"""Children die with whatever started them, however it ends, and the next launch sweeps what
outlived it: real processes, a stand-in launcher (starter.py) killed with SIGKILL."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from splitwise_local.serve.console import Console
from splitwise_local.serve.leftovers import sweep_orphans
from splitwise_local.serve.process import RUN_ENV, Child, alive, tagged
from tests.serve.starter import EVERY_KIND

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[2]
GONE_WITHIN_S = 60.0  # a hang guard: the guardian kills what is left after its 5 s grace


class Starter:
    """The stand-in launcher, its stderr in a file, and every process it set up."""

    def __init__(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True)
        self.run_dir = run_dir
        self.err_path = run_dir / "starter.stderr"
        with self.err_path.open("wb") as err:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "tests.serve.starter", "start", str(run_dir)],
                cwd=REPO,
                stderr=err,
            )
        deadline = time.monotonic() + 60
        while {p.name.removeprefix("up-") for p in run_dir.glob("up-*")} != EVERY_KIND:
            assert self.popen.poll() is None and time.monotonic() < deadline, self.err
            time.sleep(0.1)
        self.processes = psutil.Process(self.popen.pid).children(recursive=True)
        self.pids = self._kinds()

    @property
    def err(self) -> str:
        return self.err_path.read_text()

    def pid(self, kind: str) -> int:
        return self.pids[kind]

    def _kinds(self) -> dict[str, int]:
        """Each process's kind (starter.py's), by the arguments it was started with or, for a
        renamed one, its new name."""
        found = {}
        for process in self.processes:
            arguments = process.cmdline()
            if process.name().startswith("renamed-"):
                found[process.name()] = process.pid
            elif arguments[3:4] == ["child"]:
                found[arguments[4]] = process.pid
        return found

    def guardian(self) -> psutil.Process:
        (found,) = [p for p in self.processes if "splitwise_local.serve.guardian" in p.cmdline()]
        return found

    def kill(self) -> None:
        self.popen.kill()
        self.popen.wait()

    def cleanup(self) -> None:
        self.kill()
        for process in alive(self.processes):
            process.kill()


@pytest.fixture
def starters():
    started: list[Starter] = []
    yield started
    for starter in started:
        starter.cleanup()


def wait_gone(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while (left := alive(processes)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def test_a_child_started_from_a_thread_outlives_the_thread(tmp_path):
    """The parent-death signal fires when the forking *thread* exits: a child restarted by a
    watcher thread must not die when that thread does."""
    command = [sys.executable, "-c", "import time; time.sleep(60)"]
    child = Child("sleeper", command, dict(os.environ), tmp_path / "sleeper.log", Console())
    thread = threading.Thread(target=child.start)
    thread.start()
    thread.join()
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            child.popen.wait(2.0)
    finally:
        child.kill()


def test_every_child_and_grandchild_dies_with_a_killed_launcher(tmp_path, starters):
    starter = Starter(tmp_path / "run")
    starters.append(starter)
    renamed = psutil.Process(starter.pid("renamed-loner"))
    assert RUN_ENV not in renamed.environ()  # only its session says whose it is
    starter.kill()
    assert wait_gone(starter.processes, GONE_WITHIN_S) == []
    assert tagged(str(starter.run_dir)) == []
    deadline = time.monotonic() + GONE_WITHIN_S
    while "[guardian]" not in starter.err and time.monotonic() < deadline:
        time.sleep(0.1)
    (line,) = [line for line in starter.err.splitlines() if line.startswith("[guardian]")]
    killed = line.partition("; killed ")[2]
    # What ignores SIGTERM was killed by the guardian; the rest stopped on the signal.
    for kind in ("stubborn", "renamed-family", "tracker", "renamed-loner", "stubborn-escaper"):
        assert f"(pid {starter.pid(kind)})" in killed, line
    for kind in ("polite", "family", "loner", "escaper"):
        assert f"(pid {starter.pid(kind)})" not in killed, line


def test_the_next_start_sweeps_what_outlived_a_launcher_and_its_guardian(tmp_path, starters):
    dead, live = Starter(tmp_path / "dead"), Starter(tmp_path / "live")
    starters += [dead, live]
    dead.guardian().kill()
    dead.popen.kill()  # not collected yet: a zombie, dead all the same
    # A renamed process alone in a session whose leader is gone carries nothing the sweep can
    # read (renamed-loner): only the guardian, which knew the session, finds it.
    kinds = ("stubborn", "renamed-family", "tracker", "stubborn-escaper")
    survivors = [psutil.Process(dead.pid(kind)) for kind in kinds]
    assert alive(survivors) == survivors

    said = sweep_orphans()

    assert said is not None and said.startswith("killed "), said
    for process in survivors:
        assert f"(pid {process.pid})" in said, said
    assert alive(survivors) == []
    assert tagged(str(dead.run_dir)) == []
    assert alive(live.processes) == live.processes  # a live launcher's children stay
