"""The command line: subcommands listed, `serve` the default, extra vLLM args after `--`."""

import subprocess
import sys

from splitwise_bench import BENCHMARKS
from splitwise_local.cli import split_extra, subcommands


def run_cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "splitwise_local", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_help_lists_every_subcommand():
    result = run_cli("--help")
    assert result.returncode == 0
    for name in ("serve", "store", "proxy", "engine", "model", "bench"):
        assert name in subcommands()
        assert name in result.stdout
    listed = " ".join(result.stdout.split())  # argparse wraps the help text
    assert f"benchmarks: {', '.join(BENCHMARKS)}" in listed


def test_each_subcommand_has_its_own_help():
    for name in subcommands():
        result = run_cli(name, "--help")
        assert result.returncode == 0, result.stderr
        assert "usage:" in result.stdout


def test_options_without_a_subcommand_go_to_serve():
    result = run_cli("--port", "not-a-number")
    assert result.returncode == 2
    assert "splitwise_local serve: error: argument --port" in result.stderr


def test_everything_after_a_double_dash_is_for_vllm():
    assert split_extra(["--port", "1", "--", "--max-model-len", "512"]) == (
        ["--port", "1"],
        ["--max-model-len", "512"],
    )
    assert split_extra(["store"]) == (["store"], [])
