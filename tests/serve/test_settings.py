"""The launcher's settings (serve/settings.py) and its command line (serve/options.py): read once,
frozen, the parser's defaults taken from the settings, every setting reachable by an option, and
a bad value one line naming its option before anything starts."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
from pydantic import ValidationError

from splitwise_local.serve.options import add_arguments, settings_from_args
from splitwise_local.serve.settings import DEFAULTS, LaunchError, LaunchSettings

# Every option of `serve` with a value that is not its default.
EVERY_OPTION = [
    *("--model", "m", "--config", "c.yaml", "--device", "cpu", "--prefill", "2"),
    *("--decode", "3", "--prefill-gpus", "0,1", "--decode-gpus", "2", "--tp", "2"),
    *("--kv-cache-gb", "4", "--disable-mla"),
    *("--host", "0.0.0.0", "--port", "9030", "--prefill-port", "9010", "--decode-port", "9020"),
    *("--store-port", "11000", "--store-metrics-port", "11001"),
    *("--connector", "lmcache", "--store", "splitwise"),
    *("--disagg", "always", "--disagg-threshold", "64", "--busy-tokens", "100"),
    *("--itl-objective", "250"),
    *("--prefill-policy", "least_loaded", "--decode-policy", "kv_affinity"),
    *("--affinity-chunks", "8", "--no-fallback", "--no-fallback-to-prefill", "--route-detail"),
    *("--api-key", "k", "--max-body-bytes", "1000", "--retry-after", "3"),
    *("--connect-timeout", "1.5", "--prefill-timeout", "60", "--decode-timeout", "70"),
    *("--health-timeout", "3", "--store-timeout", "0.5"),
    *("--backoff-initial", "2", "--backoff-max", "20", "--max-connections", "64"),
    *("--admission", "--admission-tokens", "5000", "--admission-ttft", "0.5"),
    *("--startup-timeout", "100", "--stop-grace", "5", "--restart", "never"),
    *("--health-deadline", "10", "--max-restarts", "2"),
    *("--run-dir", "runs/x", "--log-level", "info", "--prometheus"),
    *("--prometheus-port", "9100", "--scrape-interval", "1"),
    *("--otlp-traces-endpoint", "http://127.0.0.1:4318", "--otlp-traces-protocol", "http/protobuf"),
]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_the_command_lines_defaults_are_the_settings_defaults():
    assert settings_from_args(parse()) == LaunchSettings() == DEFAULTS
    with pytest.raises(ValidationError, match="frozen"):
        DEFAULTS.port = 1  # type: ignore[misc]


def test_every_setting_is_reachable_from_the_command_line():
    args = parse(*EVERY_OPTION)
    args.extra = ["--max-model-len", "512"]
    settings = settings_from_args(args)
    same = [
        name
        for name in LaunchSettings.model_fields
        if getattr(settings, name) == getattr(DEFAULTS, name)
    ]
    assert same == ["store"]  # mooncake and lmcache do not go together
    assert settings.extra == ("--max-model-len", "512")
    assert settings_from_args(parse("--store", "mooncake")).store == "mooncake"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--prefill", "0"], "--prefill 0: Input should be greater than or equal to 1"),
        (["--port", "70000"], "--port 70000: Input should be less than or equal to 65535"),
        (["--busy-tokens", "0"], "--busy-tokens 0: Input should be greater than 0"),
        (["--health-deadline", "0"], "--health-deadline 0.0: Input should be greater than 0"),
        (
            ["--otlp-traces-endpoint", "localhost:4317"],
            "--otlp-traces-endpoint 'localhost:4317': 'localhost:4317' is not an "
            "http(s)://host:port URL",
        ),
        (
            ["--store", "mooncake", "--connector", "lmcache"],
            "--store mooncake works with --connector splitwise only",
        ),
    ],
)
def test_a_bad_value_is_one_line_naming_its_option(argv, message):
    with pytest.raises(LaunchError) as caught:
        settings_from_args(parse(*argv))
    assert str(caught.value) == message


def test_a_bad_value_exits_2_before_anything_starts(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "splitwise_local", "--prefill", "0", "--run-dir", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "[launcher] error: --prefill 0: Input should be greater than or equal to 1"
    ]
    assert not run_dir.exists()


def test_help_shows_the_groups_and_the_proxys_options():
    out = subprocess.run(
        [sys.executable, "-m", "splitwise_local", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    for title in ("model and engines:", "ports:", "proxy: routing:", "supervision:"):
        assert title in out
    for option in ("--model", "--prefill-gpus", "--connector", "--log-level", "--busy-tokens"):
        assert option in out
    assert "(4096)" in out  # the proxy's own default, shown
