"""The launch's pure planners (serve/plan.py): the store, the ports to check, the engines by role
and placement, and the proxy's settings, each from the settings and what was resolved."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitwise_local.config import SplitwiseConfig
from splitwise_local.hardware.device import Device
from splitwise_local.models.hub import Model
from splitwise_local.proxy.settings import ProxySettings
from splitwise_local.serve.placement import Placement
from splitwise_local.serve.plan import (
    EnginePlan,
    StorePlan,
    plan_engines,
    plan_ports,
    plan_proxy,
    plan_store,
)
from splitwise_local.serve.ports import PortClaim
from splitwise_local.serve.resolve import EngineArgs, Resolved
from splitwise_local.serve.settings import LaunchError, LaunchSettings

MODEL = Model(Path("/models/tiny"), "tiny")
ARGS = EngineArgs(("--served-model-name", "tiny", "--dtype", "float32"), "tiny")
CONFIG_FILE = Path("/runs/x/splitwise.yaml")


def resolved(device: Device = "cpu", **config: object) -> Resolved:
    return Resolved(device, SplitwiseConfig(**config), MODEL)


def on_cores(settings: LaunchSettings) -> dict[str, list[Placement]]:
    """One core per engine, prefill first."""
    counts = {"prefill": settings.prefill, "decode": settings.decode}
    cores = iter(range(counts["prefill"] + counts["decode"]))
    return {
        role: [Placement(cpu_cores=str(next(cores))) for _ in range(n)]
        for role, n in counts.items()
    }


def engines(settings: LaunchSettings, where=None, device: Device = "cpu") -> list[EnginePlan]:
    store = plan_store(settings, resolved(device))
    config_file = CONFIG_FILE if store is not None else None
    where = where or on_cores(settings)
    return plan_engines(settings, resolved(device), ARGS, where, store, config_file)


def test_our_store_listens_where_the_config_says_unless_told_otherwise():
    config = {"remote_url": "lm://127.0.0.1:10099"}
    assert plan_store(LaunchSettings(), resolved(**config)) == StorePlan(
        "splitwise", 10099, 10100, "shm://splitwise-10099"
    )
    asked = LaunchSettings(store_port=12000, store_metrics_port=13000)
    assert plan_store(asked, resolved(**config)) == StorePlan(
        "splitwise", 12000, 13000, "shm://splitwise-12000"
    )
    assert plan_store(LaunchSettings(connector="none"), resolved()) is None
    assert plan_store(LaunchSettings(store="mooncake"), resolved()) == StorePlan("mooncake", 50051)


@pytest.mark.parametrize(
    ("settings", "device", "config", "message"),
    [
        (LaunchSettings(connector="lmcache"), "cpu", {}, "needs CUDA"),
        (
            LaunchSettings(connector="lmcache"),
            "cuda",
            {"store_auth_token": "t"},
            "cannot carry a token",
        ),
        (LaunchSettings(), "cpu", {"remote_url": "mooncakestore://h:1"}, "mooncakestore://"),
    ],
)
def test_a_store_that_cannot_work_here_is_refused(settings, device, config, message):
    with pytest.raises(LaunchError, match=message):
        plan_store(settings, resolved(device, **config))


def test_the_ports_to_check_name_each_component_and_its_option():
    settings = LaunchSettings(prefill=2, prometheus=True)
    claims = plan_ports(settings, plan_store(settings, resolved()))
    assert claims == [
        PortClaim("proxy", "127.0.0.1", 8030, "--port"),
        PortClaim("prefill engine 0", "127.0.0.1", 8010, "--prefill-port"),
        PortClaim("prefill engine 1", "127.0.0.1", 8011, "--prefill-port; engine 1 uses it + 1"),
        PortClaim("decode engine", "127.0.0.1", 8020, "--decode-port"),
        PortClaim("store", "127.0.0.1", 10080, "--store-port"),
        PortClaim("store's /metrics", "127.0.0.1", 10081, "--store-metrics-port"),
        PortClaim("prometheus", "127.0.0.1", 9099, "--prometheus-port"),
    ]
    mooncake = LaunchSettings(store="mooncake", host="0.0.0.0")
    claims = plan_ports(mooncake, plan_store(mooncake, resolved()))
    assert claims[0] == PortClaim("proxy", "0.0.0.0", 8030, "--port")
    assert claims[-1] == PortClaim("mooncake master", "127.0.0.1", 50051, "--store-port")
    assert [c.component for c in plan_ports(LaunchSettings(connector="none"), None)] == [
        "proxy",
        "prefill engine",
        "decode engine",
    ]


@pytest.mark.parametrize(
    ("settings", "roles"),
    [
        (LaunchSettings(), ["prefill", "both"]),  # decode engines save what they compute
        (LaunchSettings(disagg="always"), ["prefill", "decode"]),
        (LaunchSettings(connector="none"), ["plain", "plain"]),
    ],
)
def test_each_engine_gets_its_kv_role(settings, roles):
    assert [engine.spec.role for engine in engines(settings)] == roles


def test_engines_are_numbered_named_and_placed_by_role():
    plans = engines(LaunchSettings(prefill=1, decode=2, kv_cache_gb=3))
    assert [(p.name, p.log_name, p.spec.port, p.spec.cpu_cores) for p in plans] == [
        ("prefill engine", "prefill.log", 8010, "0"),
        ("decode engine 0", "decode-0.log", 8020, "1"),
        ("decode engine 1", "decode-1.log", 8021, "2"),
    ]
    spec = plans[0].spec
    assert (spec.model, spec.config_file, spec.kv_cache_gb) == (MODEL.folder, CONFIG_FILE, 3)
    assert spec.extra_args == list(ARGS.args)
    assert plans[0].env == {}
    assert engines(LaunchSettings(disable_mla=True))[1].env == {"VLLM_MLA_DISABLE": "1"}


def test_an_engine_on_several_gpus_runs_tensor_parallel_and_lmcache_reaches_our_store():
    settings = LaunchSettings(connector="lmcache", tp=2)
    where = {"prefill": [Placement(gpus="0,1")], "decode": [Placement(gpus="2,3")]}
    plans = engines(settings, where, device="cuda")
    command = plans[1].spec.extra_args
    assert command[command.index("--tensor-parallel-size") + 1] == "2"
    assert (plans[1].spec.gpus, plans[1].spec.cpu_cores) == ("2,3", None)
    assert {(p.spec.connector, p.spec.store_url) for p in plans} == {
        ("lmcache", "lm://127.0.0.1:10080")
    }


def test_with_tracing_every_engine_traces_where_the_proxy_does():
    plans = engines(LaunchSettings(decode=2))
    assert all("--otlp-traces-endpoint" not in plan.spec.command() for plan in plans)
    assert all(plan.env == {} for plan in plans)
    settings = LaunchSettings(decode=2, otlp_traces_endpoint="http://127.0.0.1:4317")
    plans = engines(settings)
    for plan in plans:
        command = plan.spec.command()
        assert command[command.index("--otlp-traces-endpoint") + 1] == "http://127.0.0.1:4317"
    assert [plan.env for plan in plans] == [
        {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc", "OTEL_SERVICE_NAME": name}
        for name in ("prefill-engine", "decode-engine-0", "decode-engine-1")
    ]
    assert proxy_for(settings).otlp_traces_endpoint == "http://127.0.0.1:4317"
    # http/protobuf: the engines and the proxy post to OTLP's path for traces.
    http = LaunchSettings(
        otlp_traces_endpoint="http://h:4318", otlp_traces_protocol="http/protobuf"
    )
    command = engines(http)[0].spec.command()
    assert command[command.index("--otlp-traces-endpoint") + 1] == "http://h:4318/v1/traces"
    assert proxy_for(http).otlp_traces_endpoint == "http://h:4318/v1/traces"


def proxy_for(settings: LaunchSettings, where=None, args: EngineArgs = ARGS) -> ProxySettings:
    plans = engines(settings, where)
    config_file = CONFIG_FILE if settings.connector != "none" else None
    return plan_proxy(settings, resolved(), args, plans, config_file)


def test_every_proxy_setting_is_reachable_from_the_launcher():
    settings = LaunchSettings(
        prefill=2,
        api_key="k",
        disagg="always",
        disagg_threshold=64,
        busy_tokens=100,
        itl_objective=250,
        prefill_policy="least_loaded",
        decode_policy="kv_affinity",
        affinity_chunks=8,
        fallback_to_decode=False,
        fallback_to_prefill=False,
        route_detail=True,
        max_body_bytes=1000,
        retry_after=3,
        connect_timeout=1.5,
        prefill_timeout=60,
        decode_timeout=70,
        health_timeout=3,
        store_timeout=0.5,
        backoff_initial=2,
        backoff_max=20,
        max_connections=64,
        admission=True,
        admission_tokens=5000,
        admission_ttft=0.5,
        otlp_traces_protocol="http/protobuf",
        otlp_traces_endpoint="http://127.0.0.1:4318",
    )
    where = {"prefill": [Placement(gpus="0,1"), Placement(gpus="2,3")]}
    where["decode"] = [Placement(gpus="4,5")]
    proxy = proxy_for(settings, where)
    defaults = {
        name: field.get_default(call_default_factory=True)
        for name, field in ProxySettings.model_fields.items()
    }
    unchanged = [name for name, default in defaults.items() if getattr(proxy, name) == default]
    assert unchanged == []
    assert proxy.prefill == ["http://127.0.0.1:8010", "http://127.0.0.1:8011"]
    assert (proxy.busy_tokens, proxy.decode_timeout_s, proxy.tp_size) == (100, 70, 2)


def test_the_proxys_keys_match_what_the_engines_compute():
    proxy = proxy_for(LaunchSettings())
    assert (proxy.model, proxy.kv_config) == (str(MODEL.folder), str(CONFIG_FILE))
    assert (proxy.kv_dtype, proxy.tp_size) == ("float32", 1)
    fp8 = EngineArgs((*ARGS.args, "--kv-cache-dtype", "fp8"), "tiny")
    assert proxy_for(LaunchSettings(), args=fp8).kv_dtype == "fp8"
    assert proxy_for(LaunchSettings(connector="none")).kv_config is None
