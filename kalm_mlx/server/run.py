"""Run the server with uvicorn: graceful shutdown on SIGTERM/SIGINT, exit status 0."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import warnings

import uvicorn

from ..embedder import EmptyTextWarning, TruncationWarning
from ..ensemble import Ensemble
from ..settings import Settings, parse_byte_size
from .access import configure_logging
from .app import create_app
from .batcher import InputError, ModelUnavailableError
from .config import ServerConfig

logger = logging.getLogger("kalm_mlx.server")


def build_uvicorn_server(app, config: ServerConfig) -> uvicorn.Server:
    """A ``uvicorn.Server`` for ``app``: no access log of its own (the app logs each request)."""
    return uvicorn.Server(uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=config.shutdown_timeout,
    ))


def serve(config: ServerConfig, settings: Settings, exit_process: bool = False) -> int:
    """Serve ``settings``' models until SIGTERM or SIGINT; returns 0 after a graceful shutdown
    (in-flight requests finish first, for up to ``config.shutdown_timeout`` seconds).

    ``uvicorn.run`` re-raises the signal after shutting down, so the process would die by
    it; here the server is run directly and the re-raised signal is absorbed. With
    ``exit_process`` the process then ends with ``os._exit`` (after flushing), which skips
    MLX's teardown: MLX 0.32 on Linux can abort at interpreter exit once a thread other than
    the main one has run compiled functions (ml-explore/mlx#3126), as the batcher's does.
    """
    configure_logging(config.log_format)
    # Counted per request (X-Truncated-Inputs, metrics); a warning per batch would flood the log.
    for category in (TruncationWarning, EmptyTextWarning, UnicodeWarning):
        warnings.filterwarnings("ignore", category=category)
    if not config.loopback and not config.api_key:
        logger.warning("listening on %s without an API key: anyone who can reach this port can use "
                       "it (set EMBED_API_KEY or --api-key)", config.host)
    ensemble = Ensemble.from_settings(settings)
    # Preloading here rather than in the app's lifespan turns a model that cannot be loaded
    # into one clear error line and status 2, before the port opens.
    app = create_app(ensemble, dataclasses.replace(config, preload=False))
    status = _preload(app, ensemble.models) if config.preload else 0
    if status == 0:
        server = build_uvicorn_server(app, config)
        logger.info("kalm-mlx serve on http://%s:%d: models %s (default %s), batching %s",
                    config.host, config.port, ", ".join(ensemble.models), ensemble.default_model,
                    "on" if config.batching else "off")
        previous = {sig: signal.signal(sig, _absorb) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            server.run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        status = 0 if server.started else 1
    if exit_process:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def _preload(app, models) -> int:
    """Load and warm ``models`` on the app's batcher thread; 0, or 2 after logging why one failed."""
    batcher = app.state.server.batcher
    batcher.start()
    logger.info("preloading %s", ", ".join(models))
    try:
        batcher.preload(models)
    except (ModelUnavailableError, InputError) as err:
        logger.error("--preload: %s", err)
        batcher.stop()
        return 2
    return 0


def _absorb(signum, frame) -> None:
    """Stands in for the default handler while uvicorn re-raises the signal it shut down on."""


def serve_command(args) -> int:
    """``kalm-mlx serve``: flags over ``EMBED_*`` variables, then :func:`serve` until a signal."""
    environ = dict(os.environ)
    if args.models is not None:
        environ["EMBED_MODELS"] = args.models
    settings = Settings.from_env(environ)
    max_body = parse_byte_size(args.max_body_bytes) if args.max_body_bytes is not None else None
    config = ServerConfig.from_env(
        environ, host=args.host, port=args.port, api_key=args.api_key, preload=args.preload,
        max_inputs=args.max_inputs, max_body_bytes=max_body, max_queued_texts=args.max_queued_texts,
        max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms, batching=args.batching,
        log_format=args.log_format)
    return serve(config, settings, exit_process=True)
