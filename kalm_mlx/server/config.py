"""The server's own settings (host, port, limits, batching), from flags and ``EMBED_*`` variables.

Which models are served, their weights and the memory budget are the ensemble's
:class:`kalm_mlx.settings.Settings`; everything else about serving is here.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..settings import parse_byte_size

LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class ServerConfig:
    """How ``kalm-mlx serve`` listens, limits and batches (see :meth:`from_env` for the variables)."""

    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    """When set, every route but ``/health`` needs ``Authorization: Bearer <key>``."""
    preload: bool = False
    """Load and warm every model before the port opens (default: on first request)."""
    max_inputs: int = 2048
    """Inputs per request (OpenAI's limit)."""
    max_body_bytes: int = 32 * 10**6
    """Request body size limit."""
    max_queued_texts: int = 8192
    """Texts waiting to be embedded beyond which requests are refused with 503 and Retry-After."""
    max_batch_size: int = 32
    """Texts per encoder batch (the token budget is the model's ``max_batch_tokens``)."""
    batch_wait_ms: float = 5.0
    """How long the free worker may wait for the clients its last batch answered (see :class:`Batcher`)."""
    batching: bool = True
    """False: one request at a time per model, encoded whole (engram-embed's design)."""
    log_format: str = "text"
    shutdown_timeout: float = 30.0
    """Seconds in-flight requests get to finish after SIGTERM or SIGINT (as engram-embed)."""

    def __post_init__(self):
        checks = {
            "port": 0 <= self.port <= 65535,
            "max_inputs": self.max_inputs >= 1,
            "max_body_bytes": self.max_body_bytes >= 1,
            "max_queued_texts": self.max_queued_texts >= 1,
            "max_batch_size": self.max_batch_size >= 1,
            "batch_wait_ms": 0 <= self.batch_wait_ms <= 1000,
            "log_format": self.log_format in LOG_FORMATS,
            "shutdown_timeout": self.shutdown_timeout >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is out of range")

    @property
    def loopback(self) -> bool:
        """Whether :attr:`host` only accepts connections from this machine."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> ServerConfig:
        """Read ``PORT``, ``EMBED_HOST``, ``EMBED_API_KEY``, ``EMBED_PRELOAD``, ``EMBED_MAX_INPUTS``,
        ``EMBED_MAX_BODY_BYTES``, ``EMBED_MAX_QUEUED_TEXTS``, ``EMBED_MAX_BATCH_SIZE``,
        ``EMBED_BATCH_WAIT_MS``, ``EMBED_BATCHING`` (on/off) and ``EMBED_LOG_FORMAT`` (text/json).

        ``overrides`` (command-line flags) win over the variables; None means not given.
        A bad value raises ValueError naming the variable.
        """
        env = os.environ if environ is None else environ
        values = {}
        for variable, (name, parse) in _VARIABLES.items():
            text = (env.get(variable) or "").strip()
            if text:
                try:
                    values[name] = parse(text)
                except ValueError as err:
                    raise ValueError(f"{variable}={text!r}: {err}") from None
        values.update({name: value for name, value in overrides.items() if value is not None})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise TypeError(f"unknown server settings: {', '.join(sorted(unknown))}")
        return cls(**values)


def parse_switch(text: str) -> bool:
    """``on``/``off`` (also true/false, yes/no, 1/0) as a bool."""
    value = text.strip().lower()
    if value in ("1", "on", "true", "yes"):
        return True
    if value in ("0", "off", "false", "no"):
        return False
    raise ValueError("expected on or off")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError("expected a whole number") from None
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError("expected a port number") from None
    if not 0 <= value <= 65535:
        raise ValueError("a port is 0..65535")
    return value


def _milliseconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("expected milliseconds") from None
    if not 0 <= value <= 1000:
        raise ValueError("must be 0..1000 ms")
    return value


def _log_format(text: str) -> str:
    if text.lower() not in LOG_FORMATS:
        raise ValueError(f"expected one of {', '.join(LOG_FORMATS)}")
    return text.lower()


_VARIABLES: dict[str, tuple[str, Callable[[str], object]]] = {
    "PORT": ("port", _port),
    "EMBED_HOST": ("host", str),
    "EMBED_API_KEY": ("api_key", str),
    "EMBED_PRELOAD": ("preload", parse_switch),
    "EMBED_MAX_INPUTS": ("max_inputs", _positive_int),
    "EMBED_MAX_BODY_BYTES": ("max_body_bytes", parse_byte_size),
    "EMBED_MAX_QUEUED_TEXTS": ("max_queued_texts", _positive_int),
    "EMBED_MAX_BATCH_SIZE": ("max_batch_size", _positive_int),
    "EMBED_BATCH_WAIT_MS": ("batch_wait_ms", _milliseconds),
    "EMBED_BATCHING": ("batching", parse_switch),
    "EMBED_LOG_FORMAT": ("log_format", _log_format),
}
