"""Every error in OpenAI's envelope: ``{"error": {"message", "type", "param", "code"}}``.

FastAPI answers a bad body with 422 and a ``detail`` list, and 404/405 with
``{"detail": ...}``; these handlers turn all of them (and anything unexpected) into the
envelope, with 400 for a bad body as OpenAI does.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("kalm_mlx.server")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_error",
}


CLIENT_CLOSED_REQUEST = 499
"""The status logged (never sent: nobody is listening) when a client went away before its answer."""


class ClientDisconnected(Exception):
    """The client closed the connection while its request was being served."""


class APIError(Exception):
    """An error answered as ``status`` with OpenAI's envelope (and optional headers)."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """The envelope for one error."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """A JSON response holding the envelope."""
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


INPUT_FORMS = ("a non-empty string, a non-empty list of non-empty strings, a list of token ids "
               "(integers >= 0), or a list of such lists")

_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _location(loc) -> list[str | int]:
    """Field names and list indices of an error location, without pydantic's union branch tags."""
    out: list[str | int] = []
    for part in loc:
        tag = isinstance(part, str) and (part == "body" or "[" in part or "-" in part or part in _TYPE_TAGS)
        if not tag:
            out.append(part)
    return out


def _where(loc: list[str | int]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "body"


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """(a readable message, the parameter) for the first problem pydantic found."""
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    loc = _location(first.get("loc", ()))
    param = loc[0] if loc and isinstance(loc[0], str) else None
    message = f"{_where(loc)}: {first.get('msg', 'invalid value')}"
    if param == "input" and len(errors) > 1:  # the union of input forms reports every branch
        message = f"input must be {INPUT_FORMS}; {message}"
    return message, param


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = validation_message(exc)
    content_type = request.headers.get("content-type", "")
    if request.method == "POST" and "json" not in content_type:
        message = f"send a JSON body with Content-Type: application/json (got {content_type or 'none'}); {message}"
    return error_response(400, message, param, "invalid_request")


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    status = exc.status_code
    if status == 404:
        message = f"no such route: {request.method} {request.url.path}"
    elif status == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    code = "request_too_large" if status == 413 else None
    return error_response(status, message, None, code, getattr(exc, "headers", None))


async def _client_disconnected(request: Request, exc: ClientDisconnected) -> Response:
    return Response(status_code=CLIENT_CLOSED_REQUEST)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, RecursionError):  # a body nested too deep for the JSON parser
        return error_response(400, "the body is nested too deeply", None, "invalid_request")
    logger.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response(500, f"internal error: {type(exc).__name__}", None, "internal_error")


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that keep every error in the envelope."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(ClientDisconnected, _client_disconnected)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
