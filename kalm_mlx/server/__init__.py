"""``kalm-mlx serve``: an HTTP embedding server, a drop-in for engram-embed and OpenAI's API.

FastAPI app (:func:`create_app`), the batcher that gathers concurrent requests into
encoder batches (:mod:`kalm_mlx.server.batcher`), and the uvicorn runner (:func:`serve`).
Needs the ``serve`` extra: ``pip install 'kalm-mlx[serve]'``.
"""

from .app import create_app
from .batcher import Batcher, EmbedJob, EmbedResult
from .config import ServerConfig
from .run import serve

__all__ = ["Batcher", "EmbedJob", "EmbedResult", "ServerConfig", "create_app", "serve"]
