"""``EMBED_API_KEY``: ``Authorization: Bearer <key>`` on every route but ``/health``.

An ASGI middleware rather than a route dependency, so that FastAPI's own routes
(``/openapi.json``, ``/docs``) and unknown paths are covered too.
"""

from __future__ import annotations

import secrets

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import error_response

OPEN_PATHS = frozenset({"/health"})


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def key_matches(given: str | None, expected: str) -> bool:
    """Constant-time comparison of a presented key with the configured one."""
    if given is None:
        return False
    return secrets.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8"))


class APIKeyMiddleware:
    """Refuse requests without the right bearer key with 401 (in OpenAI's envelope)."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        if not key_matches(bearer_token(authorization), self.api_key):
            message = ("missing API key: send Authorization: Bearer <key>" if not authorization
                       else "invalid API key")
            response = error_response(401, message, None, "invalid_api_key",
                                      headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
