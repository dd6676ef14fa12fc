"""The other-load meter: CPU burnt outside the benchmark's processes is foreign, inside is ours."""

from __future__ import annotations

import fcntl
import os
import shlex
import subprocess
import sys
import time

from splitwise_bench.host_load import HostLoad, lock_status

BURN = "import time\nend = time.process_time() + {s}\nwhile time.process_time() < end: pass\n"


def test_a_child_of_ours_is_ours():
    with HostLoad() as load:
        subprocess.run([sys.executable, "-c", BURN.format(s=1.0)], check=True)
    assert load.result["ours_core_s"] >= 0.9  # the reaped child's time is counted as ours


def test_a_process_outside_our_tree_is_foreign(tmp_path):
    # Started through a shell that exits at once, the burner is re-parented to init: not ours.
    marker = tmp_path / "done"
    script = BURN.format(s=1.5) + f"open({str(marker)!r}, 'w').close()\n"
    command = f"{shlex.quote(sys.executable)} -c {shlex.quote(script)} &"
    subprocess.run(["sh", "-c", command], check=True)
    with HostLoad() as load:
        deadline = time.monotonic() + 30
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    assert marker.exists()
    assert load.result["foreign_core_s"] >= 1.0
    assert load.result["ours_core_s"] < 0.5  # this process only slept
    assert load.result["quiet"] is False


def test_lock_status_names_a_lock_held_by_this_run(tmp_path):
    path = tmp_path / "engine.lock"
    path.touch()
    assert lock_status(path) == {"path": str(path), "held": False, "by_this_run": False}
    with path.open() as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert lock_status(path)["by_this_run"] is True
    other = subprocess.Popen(["flock", str(path), "sleep", "30"])
    try:
        deadline = time.monotonic() + 10
        while not lock_status(path)["held"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lock_status(path) == {"path": str(path), "held": True, "by_this_run": False}
    finally:
        other.terminate()
        other.wait()
    assert os.path.exists(path)
