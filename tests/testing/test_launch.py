"""`Launch`: what every test, benchmark and the experiment that start the system rely on."""

from __future__ import annotations

import pytest

from splitwise_testing.launch import Launch, LaunchFailed


def test_a_run_folder_under_missing_folders_is_made(tmp_path):
    """The benchmarks' default run folders (`runs/bench-chaos`) lie under `runs/`, which a fresh
    clone does not have; the launch makes it instead of failing to open its log files."""
    run_dir = tmp_path / "runs" / "bench-chaos"
    launch = Launch(["--help"], run_dir)
    assert launch.popen.wait(60) == 0
    assert launch.out_path.read_bytes().startswith(b"usage:")
    assert launch.out_path.parent == tmp_path / "runs"


def test_a_launcher_that_exits_early_is_one_clear_failure_with_its_output(tmp_path):
    """The failure names the cause on its first line (what the experiment records) and keeps
    everything the launcher said after it."""
    launch = Launch(["--port", "not-a-port"], tmp_path / "run")
    with pytest.raises(LaunchFailed) as failed:
        launch.wait_for("ready: http://", timeout=60)
    first, *rest = str(failed.value).splitlines()
    assert first == "the launcher exited with code 2 before printing 'ready: http://'"
    assert "--port" in "\n".join(rest) and "invalid" in "\n".join(rest)
