"""What the proxy needs to know: the engines of each role, the API key, timeouts and limits.

The endpoint lists come from the command line, else from `PREFILL_ENDPOINTS` /
`DECODE_ENDPOINTS` (comma-separated, as the seed configured its proxy), which a `.env` file in
the working directory may also set. URLs are validated here so a typo fails at startup, not on
the first request.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

PREFILL_ENV = "PREFILL_ENDPOINTS"
DECODE_ENV = "DECODE_ENDPOINTS"
API_KEY_ENV = "PROXY_API_KEY"


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

    prefill: list[str] = Field(min_length=1, description="prefill engine base URLs")
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

    @field_validator("prefill", "decode")
    @classmethod
    def _valid_urls(cls, urls: list[str]) -> list[str]:
        normalized = [normalize_endpoint(url) for url in urls]
        if len(set(normalized)) != len(normalized):
            raise ValueError(f"an endpoint is listed twice: {normalized}")
        return normalized


def endpoints_from_env(environ: Mapping[str, str]) -> dict[str, list[str]]:
    """The endpoint lists the environment sets (keys absent when the variable is unset)."""
    found = {}
    for role, var in (("prefill", PREFILL_ENV), ("decode", DECODE_ENV)):
        if environ.get(var):
            found[role] = split_endpoints(environ[var])
    return found
