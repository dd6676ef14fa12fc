"""Errors in the shape OpenAI clients parse: {"error": {"message", "type", "param", "code"}}.

Every error the proxy itself produces goes through here, so SDKs show the message instead of a
JSON decoding failure. Engines' own error answers are passed through untouched instead, with one
exception: vLLM checks some fields (`logprobs` over `--max-logprobs`, for one) only once a stream
has begun, so it answers 200 and then an error event; a stream whose first event is such a 4xx
error becomes that error, with its status, as OpenAI would answer it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from starlette.responses import JSONResponse

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "tokens",  # OpenAI's type for a tokens-per-minute limit (its code: rate_limit_exceeded)
}


def error_body(
    status: int, message: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object, its `type` named from the status as OpenAI and vLLM name it."""
    error_type = ERROR_TYPES.get(
        status, "server_error" if status >= 500 else "invalid_request_error"
    )
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    code: str | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """An OpenAI-format error answer: what every failure looks like to a caller."""
    return JSONResponse(error_body(status, message, code, param), status, headers=headers)


def stream_refusal(head: bytes) -> JSONResponse | None:
    """The 4xx answer for a stream whose first event (`head` holds it) is an error with a 4xx
    `code`, as vLLM sends for a request it refuses after its 200; None for any other stream."""
    event = head.split(b"\n\n", 1)[0]
    if not event.startswith(b"data: "):
        return None
    try:
        payload = json.loads(event.removeprefix(b"data: "))
    except ValueError:
        return None
    error = payload.get("error") if isinstance(payload, dict) else None
    status = error.get("code") if isinstance(error, dict) else None
    if type(status) is not int or not 400 <= status < 500:
        return None
    return JSONResponse(payload, status)
