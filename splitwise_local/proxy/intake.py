"""What the proxy takes from a caller before routing: the API key, a size-limited JSON body, and
the headers it passes on to the engines. Whatever it refuses is an OpenAI-format error."""

from __future__ import annotations

import hmac
import json

from starlette.requests import Request
from starlette.responses import Response

from splitwise_local.proxy.errors import error_response
from splitwise_local.proxy.routing import Json


class Refused(Exception):
    """A caller's request the proxy answers itself; `kind` labels the errors counter."""

    def __init__(self, kind: str, response: Response) -> None:
        super().__init__(kind)
        self.kind = kind
        self.response = response


def check_key(request: Request, key: str | None) -> None:
    """Refuses (401) a caller without the configured API key (constant-time compare), and a
    credential that is not ASCII whether a key is configured or not: it can be neither compared
    as text nor forwarded to the engines as sent."""
    auth = request.headers.get("authorization")
    if auth is not None and not auth.isascii():
        message = "malformed Authorization header"
    elif key is None:
        return
    else:
        scheme, _, token = (auth or "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode()):
            return
        message = "missing or wrong API key"
    raise Refused("unauthorized", error_response(401, message, "invalid_api_key"))


async def read_json(request: Request, limit: int) -> tuple[bytes, Json]:
    """The body as sent and as a JSON object; refused when over `limit` bytes (before reading it
    all) or not a JSON object. A caller who leaves meanwhile raises ClientDisconnect."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw)
    except ValueError as exc:
        message = f"request body is not valid JSON: {exc}"
        raise Refused("bad_request", error_response(400, message, "invalid_json")) from None
    if not isinstance(body, dict):
        message = "request body must be a JSON object"
        raise Refused("bad_request", error_response(400, message, "invalid_json"))
    return raw, body


def _too_large(limit: int) -> Refused:
    message = f"request body is over {limit} bytes"
    return Refused("body_too_large", error_response(413, message, "body_too_large"))


def engine_headers(request: Request, key: str | None) -> dict[str, str]:
    """Headers for the engines: JSON, the API key (ours, else the caller's), the request id."""
    headers = {"content-type": "application/json"}
    auth = f"Bearer {key}" if key else request.headers.get("authorization")
    if auth:
        headers["authorization"] = auth
    if request_id := request.headers.get("x-request-id"):
        headers["x-request-id"] = request_id
    return headers
