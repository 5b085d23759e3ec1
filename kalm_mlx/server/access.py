"""One log line and the request metrics for every HTTP request (an ASGI middleware).

Route handlers add what they know (model, inputs, tokens) to ``request.state.log``.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .state import ServerState

logger = logging.getLogger("kalm_mlx.server")

LOG_FIELDS = ("model", "inputs", "tokens", "truncated", "priority", "error")


class JSONFormatter(logging.Formatter):
    """A log record as one JSON object: time, level, message and the record's ``fields``."""

    def format(self, record: logging.LogRecord) -> str:
        body = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return json.dumps(body, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``time level message key=value ...``."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        extra = " ".join(f"{key}={value}" for key, value in fields.items()
                         if key not in ("method", "path", "status", "ms"))
        line = super().format(record)
        return f"{line} {extra}".rstrip()


def configure_logging(log_format: str = "text") -> None:
    """Send the server's log (and uvicorn's) to stderr, as text or JSON lines."""
    formatter: logging.Formatter
    if log_format == "json":
        formatter = JSONFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = TextFormatter("%(asctime)s %(levelname)s %(message)s")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    for name in ("kalm_mlx.server", "uvicorn", "uvicorn.error"):
        log = logging.getLogger(name)
        log.handlers[:] = [handler]
        log.setLevel(logging.INFO)
        log.propagate = False


class AccessLogMiddleware:
    """Counts in-flight requests, records status and latency per route, logs one line each.

    ``routes`` are the paths metrics are labelled with (others count as ``other``);
    ``counted`` those whose requests count as in flight in ``/health``.
    """

    def __init__(self, app: ASGIApp, server: ServerState, routes: frozenset[str], counted: frozenset[str]):
        self.app = app
        self.server = server
        self.metrics = server.metrics
        self.routes = routes
        self.counted = counted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        state = scope.setdefault("state", {})
        state["log"] = {}

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        counted = scope["path"] in self.counted
        self.server.in_flight += counted
        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.server.in_flight -= counted
            self.metrics.in_flight.dec()
            seconds = time.perf_counter() - start
            status = state.get("log", {}).get("status", status)
            route = scope["path"] if scope["path"] in self.routes else "other"
            self.metrics.observe_request(route, status, seconds)
            fields = {"method": scope["method"], "path": scope["path"], "status": status,
                      "ms": round(seconds * 1000, 2)}
            fields.update({k: v for k, v in state.get("log", {}).items() if k in LOG_FIELDS})
            logger.info("%s %s %d %.1fms", scope["method"], scope["path"], status, seconds * 1000,
                        extra={"fields": fields})
