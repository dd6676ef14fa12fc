"""What the operator asked of `python -m splitwise_local [serve]`: `LaunchSettings`, and the
command line that fills it.

The settings are read once, at the entry point (`settings_from_args`), and are frozen: everything
below takes them typed, never the raw arguments. Their defaults are the command line's (the
parser takes them from here), and the proxy's options reuse the proxy's own fields, so a
default, a bound or a description lives in one place. A value out of range is a `LaunchError`
naming the option, before anything starts.
"""

from __future__ import annotations

import argparse
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from splitwise_local.proxy.settings import Disagg, EnginePolicy, ProxySettings
from splitwise_local.serve.console import LEVELS
from splitwise_local.serve.prometheus import DEFAULT_INTERVAL_S as SCRAPE_INTERVAL_S
from splitwise_local.serve.prometheus import DEFAULT_PORT as PROMETHEUS_PORT
from splitwise_local.serve.supervisor import RestartPolicy

Port = Annotated[int, Field(ge=1, le=65535)]
Positive = Annotated[int, Field(ge=1)]
Seconds = Annotated[float, Field(gt=0)]
LogLevel = Literal["debug", "info", "warning", "error"]


class LaunchError(RuntimeError):
    """A problem found before anything started; the message is one line for the user."""


def proxy_field(name: str) -> Any:
    """The proxy's own field `name` (its default, bounds and description), for the option that
    sets it from the launcher."""
    return ProxySettings.model_fields[name]


class LaunchSettings(BaseModel):
    """One launch, as asked: engines, ports, store, proxy, supervision and observability."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Model and engines.
    model: str | None = None  # None: the embedded default model
    config: str | None = None  # the splitwise YAML; None: $SPLITWISE_CONFIG_FILE, built-ins
    device: Literal["auto", "cpu", "cuda"] = "auto"
    prefill: Positive = 1
    decode: Positive = 1
    prefill_gpus: str | None = None
    decode_gpus: str | None = None
    tp: Positive | None = None
    kv_cache_gb: Positive = 1
    disable_mla: bool = False
    extra: tuple[str, ...] = ()  # vLLM arguments after a bare `--`, for every engine
    # Ports.
    host: str = "127.0.0.1"
    port: Port = 8030
    prefill_port: Port = 8010
    decode_port: Port = 8020
    store_port: Port | None = None
    store_metrics_port: Port | None = None
    # The KV path.
    connector: Literal["splitwise", "lmcache", "none"] = "splitwise"
    store: Literal["splitwise", "mooncake"] = "splitwise"
    # The proxy: routing.
    disagg: Disagg = proxy_field("disagg")
    disagg_threshold: int = proxy_field("disagg_threshold_tokens")
    busy_tokens: int = proxy_field("busy_tokens")
    prefill_policy: EnginePolicy = proxy_field("prefill_policy")
    decode_policy: EnginePolicy = proxy_field("decode_policy")
    affinity_chunks: int = proxy_field("affinity_chunks")
    fallback_to_decode: bool = proxy_field("fallback_to_decode")
    fallback_to_prefill: bool = proxy_field("fallback_to_prefill")
    route_detail: bool = proxy_field("route_detail")
    # The proxy: callers and engines.
    api_key: str | None = proxy_field("api_key")
    max_body_bytes: int = proxy_field("max_body_bytes")
    retry_after: int = proxy_field("retry_after_s")
    connect_timeout: float = proxy_field("connect_timeout_s")
    prefill_timeout: float = proxy_field("prefill_timeout_s")
    decode_timeout: float = proxy_field("decode_timeout_s")
    health_timeout: float = proxy_field("health_timeout_s")
    store_timeout: float = proxy_field("store_timeout_s")
    backoff_initial: float = proxy_field("backoff_initial_s")
    backoff_max: float = proxy_field("backoff_max_s")
    max_connections: int = proxy_field("max_connections")
    # The proxy: admission.
    admission: bool = proxy_field("admission")
    admission_tokens: int | None = proxy_field("admission_tokens")
    admission_ttft: float = proxy_field("admission_ttft_s")
    # Supervision.
    restart: Literal["on-failure", "never"] = RestartPolicy.mode
    health_deadline: Seconds = RestartPolicy.health_deadline_s
    max_restarts: Annotated[int, Field(ge=0)] = RestartPolicy.max_restarts
    startup_timeout: Seconds = RestartPolicy.ready_timeout_s
    stop_grace: Annotated[float, Field(ge=0)] = 15.0
    # Observability.
    log_level: LogLevel = "warning"
    run_dir: str | None = None  # None: a new runs/<time>
    prometheus: bool = False
    prometheus_port: Port = PROMETHEUS_PORT
    scrape_interval: Seconds = SCRAPE_INTERVAL_S

    @model_validator(mode="after")
    def _store_speaks_the_connector(self) -> LaunchSettings:
        if self.store == "mooncake" and self.connector == "lmcache":
            raise ValueError("--store mooncake works with --connector splitwise only")
        return self


DEFAULTS = LaunchSettings()


def settings_from_args(args: argparse.Namespace) -> LaunchSettings:
    """The settings the parsed command line asks for (`args.extra`: what followed a bare `--`);
    raises LaunchError naming the first bad option."""
    values = {name: value for name, value in vars(args).items() if name != "subcommand"}
    values["extra"] = tuple(values.get("extra", ()))
    try:
        return LaunchSettings(**values)
    except ValidationError as exc:
        error = exc.errors()[0]
        message = error["msg"].removeprefix("Value error, ")
        if not error["loc"]:  # a rule across options: the message names them
            raise LaunchError(message) from None
        option = "--" + str(error["loc"][0]).replace("_", "-")
        raise LaunchError(f"{option} {error['input']!r}: {message}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `serve` subcommand's options (the default command), in groups; their defaults are
    `LaunchSettings`'."""
    parser.epilog = "Arguments after a bare `--` go to every vLLM engine unchanged."
    add_engine_arguments(parser.add_argument_group("model and engines"))
    add_port_arguments(parser.add_argument_group("ports"))
    add_store_arguments(parser.add_argument_group("KV transfer and store"))
    add_routing_arguments(parser.add_argument_group("proxy: routing"))
    add_proxy_arguments(parser.add_argument_group("proxy: callers and engines"))
    add_admission_arguments(parser.add_argument_group("proxy: admission"))
    add_supervision_arguments(parser.add_argument_group("supervision"))
    add_observability_arguments(parser.add_argument_group("logs and metrics"))
    parser.set_defaults(**DEFAULTS.model_dump(exclude={"extra"}))


Group = argparse._ArgumentGroup  # what add_argument_group returns (argparse has no public name)


def add_engine_arguments(group: Group) -> None:
    """What is served, and by how many engines where."""
    group.add_argument(
        "--model",
        help="checkpoint folder, Hugging Face id or short name such as DeepSeek-V2-Lite "
        "(default: the embedded SmolLM2)",
    )
    group.add_argument(
        "--config", help="splitwise YAML config (default: $SPLITWISE_CONFIG_FILE, built-ins)"
    )
    group.add_argument("--device", choices=["auto", "cpu", "cuda"])
    group.add_argument("--prefill", type=int, metavar="N", help="prefill engines (%(default)s)")
    group.add_argument("--decode", type=int, metavar="M", help="decode engines (%(default)s)")
    group.add_argument(
        "--prefill-gpus",
        help="GPUs of the prefill engines, split evenly between them (default: the first ones)",
    )
    group.add_argument(
        "--decode-gpus",
        help="GPUs of the decode engines, split evenly between them (default: the next ones)",
    )
    group.add_argument("--tp", type=int, metavar="K", help="GPUs per engine (tensor-parallel size)")
    group.add_argument(
        "--kv-cache-gb", type=int, help="on the CPU: each engine's KV cache space (%(default)s)"
    )
    group.add_argument(
        "--disable-mla",
        action="store_true",
        help="set VLLM_MLA_DISABLE=1: MLA models run as plain attention",
    )


def add_port_arguments(group: Group) -> None:
    """Where each component listens; engines of a role take consecutive ports."""
    group.add_argument("--host", help="the proxy's address (%(default)s)")
    group.add_argument("--port", type=int, help="the proxy's port (%(default)s)")
    group.add_argument(
        "--prefill-port",
        type=int,
        help="the first prefill engine's port; the others take the next ones (%(default)s)",
    )
    group.add_argument(
        "--decode-port",
        type=int,
        help="the first decode engine's port; the others take the next ones (%(default)s)",
    )
    group.add_argument(
        "--store-port", type=int, help="the store's TCP port (default: the config's lm:// port)"
    )
    group.add_argument(
        "--store-metrics-port",
        type=int,
        help="the store's Prometheus /metrics port (default: the store's port + 1)",
    )


def add_store_arguments(group: Group) -> None:
    """How KV moves between the engines, and which store holds it."""
    group.add_argument(
        "--connector",
        choices=["splitwise", "lmcache", "none"],
        help="KV transfer between the engines; lmcache: vLLM's LMCacheConnectorV1 on our store "
        "(CUDA only); none: plain engines, no store",
    )
    group.add_argument(
        "--store",
        choices=["splitwise", "mooncake"],
        help="the KV store: ours, or a local mooncake_master (Mooncake Store over TCP)",
    )


def add_routing_arguments(group: Group) -> None:
    """How the proxy routes each request (proxy/routing.py)."""
    group.add_argument(
        "--disagg",
        choices=["auto", "always", "never"],
        help="auto: per request, through prefill only when the prompt's uncached part is long "
        "(or straight to decode while prefill is saturated); always: through prefill; "
        "never: decode engines alone",
    )
    group.add_argument(
        "--disagg-threshold",
        type=int,
        metavar="TOKENS",
        help="auto: prompts with fewer uncached tokens go straight to decode (%(default)s)",
    )
    group.add_argument(
        "--busy-tokens",
        type=int,
        metavar="TOKENS",
        help="auto: an engine with this many prompt tokens pending is saturated; while every "
        "prefill engine is, requests go straight to a decode engine that is not (%(default)s)",
    )
    policies = ["kv_affinity", "least_loaded"]
    group.add_argument(
        "--prefill-policy",
        choices=policies,
        help="which prefill engine: the one that last saw the prompt's prefix, or the least "
        "loaded (%(default)s)",
    )
    group.add_argument(
        "--decode-policy", choices=policies, help="which decode engine (%(default)s)"
    )
    group.add_argument(
        "--affinity-chunks",
        type=int,
        metavar="N",
        help="kv_affinity: chunk keys remembered per engine (%(default)s)",
    )
    group.add_argument(
        "--no-fallback",
        dest="fallback_to_decode",
        action="store_false",
        help="fail a request whose prefill fails, instead of letting decode compute the prompt",
    )
    group.add_argument(
        "--no-fallback-to-prefill",
        dest="fallback_to_prefill",
        action="store_false",
        help="while no decode engine is reachable, answer 503 instead of serving whole "
        "requests on a prefill engine",
    )
    group.add_argument(
        "--route-detail",
        action="store_true",
        help="show callers each request's route (x-splitwise-route header) and engine addresses "
        "in errors and /health; off by default: it tells any caller whether another caller's "
        "prompt is stored",
    )


def add_proxy_arguments(group: Group) -> None:
    """What the proxy asks of its callers and how long it waits for the engines and store."""
    group.add_argument("--api-key", help="require this Bearer token from the proxy's callers")
    group.add_argument(
        "--max-body-bytes", type=int, metavar="N", help="largest request body (%(default)s)"
    )
    group.add_argument(
        "--retry-after",
        type=int,
        metavar="SECONDS",
        help="Retry-After of a 503 when no engine can take a request (%(default)s)",
    )
    group.add_argument(
        "--connect-timeout",
        type=float,
        metavar="SECONDS",
        help="connecting to an engine (%(default)s)",
    )
    group.add_argument(
        "--prefill-timeout",
        type=float,
        metavar="SECONDS",
        help="a whole prefill request (%(default)s)",
    )
    group.add_argument(
        "--decode-timeout",
        type=float,
        metavar="SECONDS",
        help="longest wait for the next bytes of a decode answer (%(default)s)",
    )
    group.add_argument(
        "--health-timeout",
        type=float,
        metavar="SECONDS",
        help="each engine's answer to /health (%(default)s)",
    )
    group.add_argument(
        "--store-timeout",
        type=float,
        metavar="SECONDS",
        help="the store's answer to a routing lookup (%(default)s)",
    )
    group.add_argument(
        "--backoff-initial",
        type=float,
        metavar="SECONDS",
        help="an engine (or the store) that failed is skipped this long, doubling per failure "
        "(%(default)s)",
    )
    group.add_argument(
        "--backoff-max",
        type=float,
        metavar="SECONDS",
        help="the longest it is skipped (%(default)s)",
    )
    group.add_argument(
        "--max-connections",
        type=int,
        metavar="N",
        help="pooled connections to the engines (%(default)s)",
    )


def add_admission_arguments(group: Group) -> None:
    """Whether the proxy refuses requests its engines cannot start in time (proxy/admission.py)."""
    group.add_argument(
        "--admission",
        action="store_true",
        help="refuse a request (429, Retry-After) while its engines have more prompt tokens "
        "queued than the bound; off, the queue and the bound are only measured (/metrics)",
    )
    group.add_argument(
        "--admission-tokens",
        type=int,
        metavar="TOKENS",
        help="the bound on each engine role's queued prompt tokens (default: measured, what "
        "the role clears within --admission-ttft)",
    )
    group.add_argument(
        "--admission-ttft",
        type=float,
        metavar="SECONDS",
        help="the time to first token the measured bound aims at (%(default)s)",
    )


def add_supervision_arguments(group: Group) -> None:
    """How long to wait for the children, and what to do when one dies or freezes."""
    group.add_argument(
        "--startup-timeout",
        type=float,
        metavar="SECONDS",
        help="longest wait for a component to be ready, at start and after a restart (%(default)s)",
    )
    group.add_argument(
        "--stop-grace",
        type=float,
        metavar="SECONDS",
        help="a component that has not stopped this long after SIGTERM is killed (%(default)s)",
    )
    group.add_argument(
        "--restart",
        choices=["on-failure", "never"],
        help="a child that dies or freezes while serving: restart it with back-off "
        "(on-failure) or stop everything with exit 1 (never)",
    )
    group.add_argument(
        "--health-deadline",
        type=float,
        metavar="SECONDS",
        help="a child whose health check fails this long is frozen, and restarted (%(default)s)",
    )
    group.add_argument(
        "--max-restarts",
        type=int,
        metavar="N",
        help="restarts of one child within 10 minutes before giving up (stop, exit 1) "
        "(%(default)s)",
    )


def add_observability_arguments(group: Group) -> None:
    """Where the logs go, what the console shows, and the optional Prometheus."""
    group.add_argument("--run-dir", help="folder for logs and the per-run config (runs/<time>)")
    group.add_argument(
        "--log-level",
        choices=list(LEVELS),
        help="children's lines shown on the console (the log files keep all)",
    )
    group.add_argument(
        "--prometheus",
        action="store_true",
        help="also run Prometheus (Debian's), scraping the proxy, every engine and the store",
    )
    group.add_argument("--prometheus-port", type=int, help="Prometheus's port (%(default)s)")
    group.add_argument(
        "--scrape-interval",
        type=float,
        metavar="SECONDS",
        help="how often Prometheus scrapes each component (%(default)s)",
    )
