"""`bench.launched.Launch`: what every benchmark that starts the system relies on."""

from __future__ import annotations

from splitwise_testing.launch import Launch


def test_a_run_folder_under_missing_folders_is_made(tmp_path):
    """The benchmarks' default run folders (`runs/bench-chaos`) lie under `runs/`, which a fresh
    clone does not have; the launch makes it instead of failing to open its log files."""
    run_dir = tmp_path / "runs" / "bench-chaos"
    launch = Launch(["--help"], run_dir)
    assert launch.popen.wait(60) == 0
    assert launch.out_path.read_bytes().startswith(b"usage:")
    assert launch.out_path.parent == tmp_path / "runs"
