"""The launch's decisions, made before anything starts: small pure functions of the settings and
of what was resolved on this host (resolve.py), each returning data.

- `plan_store`: our store, a Mooncake master, or none; its ports and the engines' address.
- `plan_ports`: every port the launch will listen on, for the check that they are free.
- `plan_engines`: each engine's `EngineSpec` by role and placement, its name and log.
- `plan_proxy`: the proxy's `ProxySettings`, routing like the engines compute.

None of them touches a file, a socket or a process; system.py builds the children from them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from splitwise_local.proxy.settings import ProxySettings
from splitwise_local.serve.engine import EngineSpec, Role, merge_args
from splitwise_local.serve.lmcache_config import LMCacheConfigError, lmcache_settings
from splitwise_local.serve.placement import Placement
from splitwise_local.serve.ports import PortClaim
from splitwise_local.serve.resolve import EngineArgs, Resolved
from splitwise_local.serve.settings import LaunchError, LaunchSettings
from splitwise_local.tracing import PROTOCOL_ENV, SERVICE_ENV

ROLES = ("prefill", "decode")
DEFAULT_STORE_PORT = 10080  # the store's own default TCP port
MOONCAKE_MASTER_PORT = 50051  # mooncake_master's own default RPC port
LOOPBACK = "127.0.0.1"  # every component but the proxy listens here only


@dataclass(frozen=True)
class StorePlan:
    """The store a launch runs: ours, or a Mooncake master that the engines' backend talks to."""

    kind: Literal["splitwise", "mooncake"]
    port: int  # our store's TCP port (lm://), or the master's RPC port
    metrics_port: int | None = None  # our store's /metrics (the master's is chosen at start)
    shm_url: str | None = None  # how the engines on this host reach our store

    @property
    def lmcache_url(self) -> str:
        """Where LMCache's connector reaches our store: its TCP port speaks LMCache's protocol."""
        return f"lm://{LOOPBACK}:{self.port}"


def store_url(config_url: str, store_port: int | None) -> tuple[int, str]:
    """Our store's TCP port (the one asked for, else the config's lm:// port, else the default)
    and the shm:// URL the engines on this host use."""
    scheme, _, rest = config_url.partition("://")
    if scheme == "mooncakestore":
        raise LaunchError(
            "the launcher runs our own store; remote_url mooncakestore:// is for "
            "engines started with the `engine` subcommand"
        )
    port = store_port
    if port is None and scheme == "lm":
        port = int(rest.rsplit(":", 1)[1]) if ":" in rest else DEFAULT_STORE_PORT
    port = port if port is not None else DEFAULT_STORE_PORT
    shm_name = rest if scheme == "shm" else f"splitwise-{port}"  # the store's own default
    return port, f"shm://{shm_name}"


def plan_store(settings: LaunchSettings, resolved: Resolved) -> StorePlan | None:
    """The store of this launch (None with `--connector none`); raises LaunchError where the
    connector cannot work with it here."""
    if settings.connector == "none":
        return None
    if settings.store == "mooncake":
        return StorePlan("mooncake", settings.store_port or MOONCAKE_MASTER_PORT)
    port, shm_url = store_url(resolved.config.remote_url, settings.store_port)
    store = StorePlan("splitwise", port, settings.store_metrics_port or port + 1, shm_url)
    if settings.connector == "lmcache":
        if resolved.device == "cpu":
            raise LaunchError("--connector lmcache runs LMCache's GPU connector: it needs CUDA")
        try:
            lmcache_settings(resolved.config, store.lmcache_url)
        except LMCacheConfigError as exc:
            raise LaunchError(str(exc)) from None
    return store


def engine_name(role: str, index: int, count: int) -> str:
    """`decode engine` when the role has one engine, else `decode engine 0`, `decode engine 1`..."""
    return f"{role} engine" if count == 1 else f"{role} engine {index}"


def log_name(role: str, index: int, count: int) -> str:
    """The engine's log file in the run folder: `decode.log`, or `decode-1.log` when the role
    has several."""
    return f"{role}.log" if count == 1 else f"{role}-{index}.log"


def engine_counts(settings: LaunchSettings) -> dict[str, int]:
    """How many engines each role has."""
    return {"prefill": settings.prefill, "decode": settings.decode}


def first_port(settings: LaunchSettings, role: str) -> int:
    """The port of the role's first engine; the others take the next ones."""
    return settings.prefill_port if role == "prefill" else settings.decode_port


def plan_ports(settings: LaunchSettings, store: StorePlan | None) -> list[PortClaim]:
    """Every port the launch will listen on, each with the option that chose it."""
    claims = [PortClaim("proxy", settings.host, settings.port, "--port")]
    for role, count in engine_counts(settings).items():
        for index in range(count):
            option = f"--{role}-port" + (f"; engine {index} uses it + {index}" if index else "")
            port = first_port(settings, role) + index
            claims.append(PortClaim(engine_name(role, index, count), LOOPBACK, port, option))
    if store is not None and store.kind == "mooncake":
        claims.append(PortClaim("mooncake master", LOOPBACK, store.port, "--store-port"))
    elif store is not None:
        assert store.metrics_port is not None
        claims.append(PortClaim("store", LOOPBACK, store.port, "--store-port"))
        metrics = PortClaim(
            "store's /metrics", LOOPBACK, store.metrics_port, "--store-metrics-port"
        )
        claims.append(metrics)
    if settings.prometheus:
        claims.append(
            PortClaim("prometheus", LOOPBACK, settings.prometheus_port, "--prometheus-port")
        )
    return claims


def kv_roles(use_store: bool, disagg: str) -> dict[str, Role]:
    """Each launcher role's engine role. Decode engines also save (kv_both) whenever requests
    may reach them without a prefill: what they computed is then in the store for the next."""
    if not use_store:
        return {"prefill": "plain", "decode": "plain"}
    return {"prefill": "prefill", "decode": "decode" if disagg == "always" else "both"}


@dataclass(frozen=True)
class EnginePlan:
    """One engine: its role and number, its name and log, where it runs and how it starts."""

    role: str  # "prefill" or "decode"
    index: int
    name: str  # "decode engine", or "decode engine 1" when the role has several
    log_name: str
    placement: Placement
    spec: EngineSpec
    env: Mapping[str, str] = field(default_factory=dict)  # set over the spec's environment


def plan_engines(
    settings: LaunchSettings,
    resolved: Resolved,
    args: EngineArgs,
    where: Mapping[str, list[Placement]],
    store: StorePlan | None,
    config_file: Path | None,
) -> list[EnginePlan]:
    """Every engine of the launch, prefill first, on the GPUs or cores `where` gives it; with
    several GPUs an engine runs tensor-parallel over them. With tracing on, each traces to the
    endpoint (vLLM's flag; the protocol, and its name as the spans' service, in its
    environment)."""
    roles = kv_roles(store is not None, settings.disagg)
    lmcache_url = store.lmcache_url if store and settings.connector == "lmcache" else None
    env = {"VLLM_MLA_DISABLE": "1"} if settings.disable_mla else {}
    plans = []
    for role, count in engine_counts(settings).items():
        for index, spot in enumerate(where[role]):
            extra = list(args.args)
            if spot.tp > 1:
                extra = merge_args(["--tensor-parallel-size", str(spot.tp)], extra)
            name, log = engine_name(role, index, count), log_name(role, index, count)
            engine_env = dict(env)
            if settings.otlp_traces_endpoint is not None:
                extra = merge_args(["--otlp-traces-endpoint", settings.otlp_traces_endpoint], extra)
                engine_env[PROTOCOL_ENV] = settings.otlp_traces_protocol
                engine_env[SERVICE_ENV] = name.replace(" ", "-")
            spec = EngineSpec(
                model=resolved.model.folder,
                port=first_port(settings, role) + index,
                role=roles[role],
                config_file=config_file,
                device=resolved.device,
                gpus=spot.gpus,
                cpu_cores=spot.cpu_cores,
                kv_cache_gb=settings.kv_cache_gb,
                extra_args=extra,
                connector="lmcache" if lmcache_url else "splitwise",
                store_url=lmcache_url,
            )
            plans.append(EnginePlan(role, index, name, log, spot, spec, engine_env))
    return plans


def plan_proxy(
    settings: LaunchSettings,
    resolved: Resolved,
    args: EngineArgs,
    engines: list[EnginePlan],
    config_file: Path | None,
) -> ProxySettings:
    """The proxy's settings: the engines of each role, the operator's routing and limits, and
    what routing like the engines compute takes (the model's tokenizer, the KV dtype and
    tensor-parallel size of the keys, and the store's config when it runs ours)."""
    return ProxySettings(
        prefill=[engine.spec.url for engine in engines if engine.role == "prefill"],
        decode=[engine.spec.url for engine in engines if engine.role == "decode"],
        api_key=settings.api_key,
        fallback_to_decode=settings.fallback_to_decode,
        fallback_to_prefill=settings.fallback_to_prefill,
        retry_after_s=settings.retry_after,
        connect_timeout_s=settings.connect_timeout,
        prefill_timeout_s=settings.prefill_timeout,
        decode_timeout_s=settings.decode_timeout,
        health_timeout_s=settings.health_timeout,
        max_body_bytes=settings.max_body_bytes,
        backoff_initial_s=settings.backoff_initial,
        backoff_max_s=settings.backoff_max,
        max_connections=settings.max_connections,
        disagg=settings.disagg,
        disagg_threshold_tokens=settings.disagg_threshold,
        busy_tokens=settings.busy_tokens,
        itl_objective_ms=settings.itl_objective,
        prefill_policy=settings.prefill_policy,
        decode_policy=settings.decode_policy,
        affinity_chunks=settings.affinity_chunks,
        model=str(resolved.model.folder),
        kv_config=str(config_file) if config_file and settings.connector == "splitwise" else None,
        kv_dtype=args.kv_dtype,
        tp_size=engines[0].placement.tp,
        store_timeout_s=settings.store_timeout,
        admission=settings.admission,
        admission_tokens=settings.admission_tokens,
        admission_ttft_s=settings.admission_ttft,
        route_detail=settings.route_detail,
        otlp_traces_protocol=settings.otlp_traces_protocol,
        otlp_traces_endpoint=settings.otlp_traces_endpoint,
    )
