"""Errors in the shape OpenAI clients parse: {"error": {"message", "type", "param", "code"}}.

Every error the proxy itself produces goes through here, so SDKs show the message instead of a
JSON decoding failure. Engines' own error answers are passed through untouched instead.
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.responses import JSONResponse

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
}


def error_body(status: int, message: str, code: str | None = None, param: str | None = None):
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
