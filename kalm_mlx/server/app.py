"""``create_app``: the FastAPI app of ``kalm-mlx serve`` around an ensemble."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from .. import __version__
from .access import AccessLogMiddleware
from .auth import APIKeyMiddleware
from .batcher import Batcher
from .catalog import Catalog
from .config import ServerConfig
from .errors import install_error_handlers
from .limits import BodySizeLimitMiddleware
from .metrics import ServerMetrics
from .routes import embeddings, metrics, models, rank
from .state import ServerState

logger = logging.getLogger("kalm_mlx.server")

ROUTES = frozenset({"/v1/embeddings", "/v1/rank", "/v1/models", "/health", "/metrics"})
EMBEDDING_ROUTES = frozenset({"/v1/embeddings", "/v1/rank"})


def create_app(ensemble, config: ServerConfig | None = None) -> FastAPI:
    """The server app for ``ensemble`` (a :class:`kalm_mlx.Ensemble`): its enabled models are the
    ensemble's, the first one the default.

    The batcher's worker thread starts with the app (its lifespan) and stops with it;
    with ``config.preload`` every model is loaded and warmed before the app takes requests.
    """
    config = config or ServerConfig()
    server_metrics = ServerMetrics(ensemble, lambda: batcher.queued_texts)
    batcher = Batcher(
        ensemble,
        max_batch_size=config.max_batch_size,
        max_queued_texts=config.max_queued_texts,
        batch_wait=config.batch_wait_ms / 1000,
        batching=config.batching,
        on_batch=server_metrics.observe_batch,
    )
    server = ServerState(config=config, ensemble=ensemble, batcher=batcher,
                         catalog=Catalog(ensemble.models, batcher.info), metrics=server_metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        if config.preload:
            logger.info("preloading %s", ", ".join(ensemble.models))
            await asyncio.to_thread(batcher.preload, ensemble.models)
        try:
            yield
        finally:
            await asyncio.to_thread(batcher.stop)

    app = FastAPI(
        title="kalm-mlx",
        version=__version__,
        description="Text embeddings with MLX: OpenAI's embeddings API and engram-embed's, "
                    "with requests batched together.",
        lifespan=lifespan,
    )
    app.state.server = server
    install_error_handlers(app)
    for module in (embeddings, rank, models, metrics):
        app.include_router(module.router)
    # Outermost last: the log sees every answer, the key is checked before the body is read.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=config.max_body_bytes)
    if config.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key)
    app.add_middleware(AccessLogMiddleware, server=server, routes=ROUTES, counted=EMBEDDING_ROUTES)
    return app
