"""Settings validation and where the `proxy` subcommand takes its endpoints from."""

from __future__ import annotations

import argparse

import pytest
from pydantic import ValidationError

from splitwise_local.proxy.server import add_arguments, environment, settings_from_args
from splitwise_local.proxy.settings import ProxySettings


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_flags_win_over_environment():
    env = {"PREFILL_ENDPOINTS": "http://a:1", "DECODE_ENDPOINTS": "http://b:2, http://c:3/"}
    settings = settings_from_args(parse("--prefill", "http://p:9/v1", "--no-fallback"), env)
    assert settings.prefill == ["http://p:9"]
    assert settings.decode == ["http://b:2", "http://c:3"]
    assert settings.fallback_to_decode is False
    assert settings.api_key is None


def test_route_detail_is_off_unless_the_operator_turns_it_on():
    endpoints = ("--prefill", "http://p:1", "--decode", "http://d:2")
    assert settings_from_args(parse(*endpoints), {}).route_detail is False
    assert settings_from_args(parse(*endpoints, "--route-detail"), {}).route_detail is True


def test_admission_flags_reach_the_settings():
    endpoints = ("--prefill", "http://p:1", "--decode", "http://d:2")
    default = settings_from_args(parse(*endpoints), {})
    assert (default.admission, default.admission_tokens, default.admission_ttft_s) == (
        False,
        None,
        1.5,
    )
    flags = ("--admission", "--admission-tokens", "5000", "--admission-ttft", "0.8")
    chosen = settings_from_args(parse(*endpoints, *flags), {})
    assert (chosen.admission, chosen.admission_tokens, chosen.admission_ttft_s) == (True, 5000, 0.8)
    with pytest.raises(ValueError, match="admission_tokens"):
        settings_from_args(parse(*endpoints, "--admission-tokens", "0"), {})


def test_tracing_is_off_unless_an_endpoint_is_given():
    endpoints = ("--prefill", "http://p:1", "--decode", "http://d:2")
    assert settings_from_args(parse(*endpoints), {}).otlp_traces_endpoint is None
    flags = ("--otlp-traces-endpoint", "http://127.0.0.1:4317")
    traced = settings_from_args(parse(*endpoints, *flags), {})
    assert (traced.otlp_traces_endpoint, traced.otlp_traces_protocol) == (flags[1], "grpc")
    # The protocol as vLLM reads it from the environment, or from the flag, which wins.
    env = {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}
    http = settings_from_args(parse(*endpoints, "--otlp-traces-endpoint", "http://h:4318"), env)
    assert http.otlp_traces_endpoint == "http://h:4318/v1/traces"
    flag = parse(*endpoints, *flags, "--otlp-traces-protocol", "grpc")
    assert settings_from_args(flag, env).otlp_traces_protocol == "grpc"
    with pytest.raises(ValueError, match="otlp_traces_endpoint"):
        settings_from_args(parse(*endpoints, "--otlp-traces-endpoint", "localhost:4317"), {})


def test_dotenv_file_is_read_and_environment_wins(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text(
        "PREFILL_ENDPOINTS=http://from-file:1\nDECODE_ENDPOINTS=http://from-file:2\n"
        "PROXY_API_KEY=k1\n"
    )
    monkeypatch.setenv("DECODE_ENDPOINTS", "http://from-env:3")
    monkeypatch.delenv("PREFILL_ENDPOINTS", raising=False)
    monkeypatch.delenv("PROXY_API_KEY", raising=False)
    settings = settings_from_args(parse("--decode-timeout", "7"), environment(tmp_path))
    assert settings.prefill == ["http://from-file:1"]
    assert settings.decode == ["http://from-env:3"]
    assert settings.api_key == "k1"
    assert settings.decode_timeout_s == 7


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--decode", "http://d:1"], "no prefill engines: pass --prefill"),
        (["--prefill", "http://p:1", "--decode", "d:1"], "is not an http"),
        (["--prefill", "http://p:1", "--decode", "http://d:x"], "invalid decode"),
        (["--prefill", "http://p:1/api", "--decode", "http://d:1"], "base URL"),
        (["--prefill", "http://p:1,http://p:1", "--decode", "http://d:1"], "listed twice"),
    ],
)
def test_bad_endpoints_are_named(argv, message):
    with pytest.raises(ValueError, match=message):
        settings_from_args(parse(*argv), {})


def test_settings_reject_unknown_keys_and_empty_pools():
    with pytest.raises(ValidationError):
        ProxySettings(prefill=["http://p:1"], decode=[])
    with pytest.raises(ValidationError):
        ProxySettings(prefill=["http://p:1"], decode=["http://d:1"], retries=3)
