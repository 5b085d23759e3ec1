"""What the routes share: the settings, the ensemble, the batcher, the catalog and the metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import Request

from .batcher import Batcher
from .catalog import Catalog
from .config import ServerConfig
from .metrics import ServerMetrics


@dataclass
class ServerState:
    """One server's parts, kept on ``app.state.server``."""

    config: ServerConfig
    ensemble: object
    batcher: Batcher
    catalog: Catalog
    metrics: ServerMetrics
    started: float = field(default_factory=time.time)
    in_flight: int = 0
    """Embedding and rank requests being served now."""


def server_state(request: Request) -> ServerState:
    """The :class:`ServerState` of the app serving ``request`` (a FastAPI dependency)."""
    return request.app.state.server
