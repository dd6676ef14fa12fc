"""What the proxy needs to know: the engines of each role, the API key, timeouts and limits.

The endpoint lists come from the command line, else from `PREFILL_ENDPOINTS` /
`DECODE_ENDPOINTS` (comma-separated), which a `.env` file in the working directory may also set.
URLs are validated here so a typo fails at startup, not on the first request.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from splitwise_local.tracing import DEFAULT_PROTOCOL, TracesProtocol, traces_endpoint

PREFILL_ENV = "PREFILL_ENDPOINTS"
DECODE_ENV = "DECODE_ENDPOINTS"
API_KEY_ENV = "PROXY_API_KEY"
# Chosen by measurement (`bench routing`) on this project's 2-core machines: docs/routing.md.
DEFAULT_DISAGG_THRESHOLD_TOKENS = 128
DEFAULT_BUSY_TOKENS = 4096
# The longest wait between two tokens that auto may cause a decode engine's streams by computing a
# prompt there; docs/routing.md says how it was chosen.
DEFAULT_ITL_OBJECTIVE_MS = 100.0
# Three quarters of the experiment's 2 s TTFT SLO: the rest is left for the hand-over to decode
# and its first token.
DEFAULT_ADMISSION_TTFT_S = 1.5

Disagg = Literal["always", "never", "auto"]
EnginePolicy = Literal["kv_affinity", "least_loaded"]


def normalize_endpoint(url: str) -> str:
    """`http://host:port` with no trailing slash; an OpenAI-style `/v1` suffix is accepted."""
    url = url.strip().rstrip("/")
    url = url.removesuffix("/v1")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http(s)://host:port URL")
    if parts.path or parts.query or parts.fragment:
        raise ValueError(f"{url!r}: give the server's base URL, e.g. http://127.0.0.1:8010")
    try:
        parts.port  # noqa: B018 - raises ValueError on a non-numeric or out-of-range port
    except ValueError as exc:
        raise ValueError(f"{url!r}: {exc}") from None
    return url


def split_endpoints(value: str | None) -> list[str]:
    """`"a, b,,c"` -> `["a", "b", "c"]`: the comma-separated form of the CLI and environment."""
    return [part.strip() for part in (value or "").split(",") if part.strip()]


class ProxySettings(BaseModel):
    """Validated proxy settings; the defaults suit CPU engines, whose prefill can take minutes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prefill: list[str] = Field(
        default_factory=list, description="prefill engine base URLs (none only with disagg never)"
    )
    decode: list[str] = Field(min_length=1, description="decode engine base URLs")
    api_key: str | None = Field(
        default=None, description="required from callers as a Bearer token; sent to the engines"
    )
    fallback_to_decode: bool = Field(
        default=True, description="on a prefill failure, let decode compute the prompt itself"
    )
    fallback_to_prefill: bool = Field(
        default=True,
        description="while no decode engine is reachable, a prefill engine serves whole requests",
    )
    retry_after_s: int = Field(
        default=10, gt=0, description="Retry-After of a 503 (no engine to send a request to)"
    )
    connect_timeout_s: float = Field(default=5.0, gt=0)
    prefill_timeout_s: float = Field(default=600.0, gt=0, description="whole prefill request")
    decode_timeout_s: float = Field(
        default=600.0, gt=0, description="longest wait for the next bytes of a decode answer"
    )
    health_timeout_s: float = Field(default=2.0, gt=0)
    max_body_bytes: int = Field(default=16 * 1024 * 1024, gt=0)
    backoff_initial_s: float = Field(default=1.0, gt=0, description="first mark-down period")
    backoff_max_s: float = Field(default=30.0, gt=0, description="mark-down period cap")
    max_connections: int = Field(default=1024, gt=0, description="pooled upstream connections")
    # Routing (routing.py says what each setting does).
    disagg: Disagg = Field(
        default="auto",
        description="always: prefill then decode; never: decode alone; auto: per request",
    )
    disagg_threshold_tokens: int = Field(
        default=DEFAULT_DISAGG_THRESHOLD_TOKENS,
        ge=0,
        description="auto: a prompt with fewer uncached tokens goes straight to decode",
    )
    busy_tokens: int = Field(
        default=DEFAULT_BUSY_TOKENS,
        gt=0,
        description="auto: prompt tokens pending on an engine that make it saturated",
    )
    itl_objective_ms: float = Field(
        default=DEFAULT_ITL_OBJECTIVE_MS,
        ge=0,
        description="auto: never send a prompt straight to a decode engine whose running "
        "streams would then wait longer than this between two tokens (ms; 0: off)",
    )
    prefill_policy: EnginePolicy = "kv_affinity"
    decode_policy: EnginePolicy = "least_loaded"
    affinity_chunks: int = Field(
        default=1024, gt=0, description="chunk keys remembered per engine for kv_affinity"
    )
    model: str | None = Field(
        default=None, description="the engines' checkpoint folder: tokenizer, chat template, keys"
    )
    kv_config: str | None = Field(
        default=None,
        description="the engines' splitwise YAML: the store to ask, chunk size, auth token",
    )
    kv_dtype: str = Field(
        default="bfloat16", description="the engines' KV cache dtype (auto: the checkpoint's)"
    )
    tp_size: int = Field(default=1, gt=0, description="the engines' tensor-parallel size")
    store_timeout_s: float = Field(default=1.0, gt=0, description="longest wait for the store")
    # Admission (admission.py says how the bound is measured and what is counted).
    admission: bool = Field(
        default=False,
        description="refuse (429, Retry-After) a request whose engine role has more prompt "
        "tokens queued than the bound; off, the queue and bound are only measured",
    )
    admission_tokens: int | None = Field(
        default=None,
        gt=0,
        description="the bound on each role's queued prompt tokens (default: measured, the "
        "tokens the role clears within admission_ttft_s)",
    )
    admission_ttft_s: float = Field(
        default=DEFAULT_ADMISSION_TTFT_S,
        gt=0,
        description="the time to first token the measured bound aims at",
    )
    route_detail: bool = Field(
        default=False,
        description="show callers how each request was routed (the x-splitwise-route header: "
        "path, reason, stored tokens, engines) and engine addresses in errors and /health; off, "
        "a caller cannot learn whether another caller's prompt is stored",
    )

    # Tracing (tracing.py): the protocol first, the endpoint's check reads it.
    otlp_traces_protocol: TracesProtocol = Field(
        default=DEFAULT_PROTOCOL,
        description="OTLP protocol of the traces endpoint (vLLM's default is grpc)",
    )
    otlp_traces_endpoint: str | None = Field(
        default=None,
        description="send OpenTelemetry traces here (grpc: http://host:4317; http/protobuf: "
        "http://host:4318, /v1/traces added); off when unset",
    )

    @model_validator(mode="after")
    def _prefill_unless_never(self) -> ProxySettings:
        if not self.prefill and self.disagg != "never":
            raise ValueError("prefill engines are needed unless disagg is never")
        return self

    @field_validator("prefill", "decode")
    @classmethod
    def _valid_urls(cls, urls: list[str]) -> list[str]:
        normalized = [normalize_endpoint(url) for url in urls]
        if len(set(normalized)) != len(normalized):
            raise ValueError(f"an endpoint is listed twice: {normalized}")
        return normalized

    @field_validator("otlp_traces_endpoint")
    @classmethod
    def _valid_traces_endpoint(cls, url: str | None, info: ValidationInfo) -> str | None:
        protocol = info.data.get("otlp_traces_protocol", DEFAULT_PROTOCOL)
        return traces_endpoint(url, protocol) if url else None
