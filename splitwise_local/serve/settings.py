"""What the operator asked of `python -m splitwise_local [serve]`: `LaunchSettings`.

The settings are read once, at the entry point (options.py reads the command line), and are
frozen: everything below takes them typed, never the raw arguments. Their defaults are the
command line's, and the proxy's settings reuse the proxy's own fields, so a default or a bound
lives in one place.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from splitwise_local.proxy.settings import Disagg, EnginePolicy, ProxySettings
from splitwise_local.serve.prometheus import DEFAULT_INTERVAL_S as SCRAPE_INTERVAL_S
from splitwise_local.serve.prometheus import DEFAULT_PORT as PROMETHEUS_PORT
from splitwise_local.serve.supervisor import RestartPolicy
from splitwise_local.tracing import TracesProtocol, traces_endpoint

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
    itl_objective: float = proxy_field("itl_objective_ms")
    prefill_policy: EnginePolicy = proxy_field("prefill_policy")
    decode_policy: EnginePolicy = proxy_field("decode_policy")
    affinity_chunks: int = proxy_field("affinity_chunks")
    fallback_to_decode: bool = proxy_field("fallback_to_decode")
    fallback_to_prefill: bool = proxy_field("fallback_to_prefill")
    route_detail: bool = proxy_field("route_detail")
    # The proxy: callers.
    api_key: str | None = proxy_field("api_key")
    max_body_bytes: int = proxy_field("max_body_bytes")
    retry_after: int = proxy_field("retry_after_s")
    max_connections: int = proxy_field("max_connections")
    # The proxy: timeouts and back-off.
    connect_timeout: float = proxy_field("connect_timeout_s")
    prefill_timeout: float = proxy_field("prefill_timeout_s")
    decode_timeout: float = proxy_field("decode_timeout_s")
    health_timeout: float = proxy_field("health_timeout_s")
    store_timeout: float = proxy_field("store_timeout_s")
    backoff_initial: float = proxy_field("backoff_initial_s")
    backoff_max: float = proxy_field("backoff_max_s")
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
    # Tracing: the proxy's and every engine's (vLLM's own, with our connector's spans).
    otlp_traces_protocol: TracesProtocol = proxy_field("otlp_traces_protocol")
    otlp_traces_endpoint: str | None = proxy_field("otlp_traces_endpoint")

    @model_validator(mode="after")
    def _store_speaks_the_connector(self) -> LaunchSettings:
        if self.store == "mooncake" and self.connector == "lmcache":
            raise ValueError("--store mooncake works with --connector splitwise only")
        return self

    @field_validator("otlp_traces_endpoint")
    @classmethod
    def _valid_traces_endpoint(cls, url: str | None, info: ValidationInfo) -> str | None:
        """Checked here, so a typo fails before anything starts; for http/protobuf with OTLP's
        /v1/traces path, since the engines post to the URL as given."""
        return traces_endpoint(url, info.data["otlp_traces_protocol"]) if url else None


DEFAULTS = LaunchSettings()
