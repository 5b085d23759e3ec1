"""Helpers the embedding and rank routes share: running jobs, errors, priority."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Sequence

import numpy as np
from fastapi import Request

from ..batcher import (
    BatcherStoppedError,
    EmbedJob,
    EmbedResult,
    InputError,
    ModelUnavailableError,
    QueueFullError,
)
from ..catalog import UnknownModelError
from ..errors import APIError, ClientDisconnected
from ..state import ServerState

RETRY_AFTER_SHUTTING_DOWN = "1"
RETRY_AFTER_UNAVAILABLE = "30"
def is_recall(priority: str | None) -> bool:
    """Whether an ``X-Priority`` header value asks for the recall lane (any other value: normal)."""
    return priority is not None and priority.strip().lower() == "recall"


def resolve_model(server: ServerState, requested: str | None, param: str = "model") -> str:
    """The enabled model a request names, else a 404 listing the enabled ones."""
    try:
        return server.catalog.resolve(requested)
    except UnknownModelError as err:
        raise APIError(404, str(err), param=param, code="model_not_found") from None


def check_input_count(server: ServerState, count: int, param: str = "input") -> None:
    """413 when a request holds more inputs than ``--max-inputs``."""
    limit = server.config.max_inputs
    if count > limit:
        raise APIError(413, f"{count} inputs in one request; the limit is {limit}", param=param,
                       code="too_many_inputs")


def encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """A vector as JSON floats, or as base64 of its little-endian float32 bytes (OpenAI's)."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector.tolist()


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_jobs(request: Request, server: ServerState, jobs: Sequence[EmbedJob]) -> list[EmbedResult]:
    """Embed ``jobs`` at once through the batcher; the batcher's errors become API errors.

    If the client disconnects first, the jobs' queued texts are dropped and
    :class:`ClientDisconnected` is raised.
    """
    tasks = [asyncio.ensure_future(server.batcher.embed(job)) for job in jobs]
    together = asyncio.gather(*tasks)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({together, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if together not in done:
            raise ClientDisconnected()
        return together.result()
    except QueueFullError as err:
        raise APIError(503, str(err), code="queue_full", headers={"Retry-After": str(err.retry_after)}) from None
    except InputError as err:
        raise APIError(400, str(err), param=err.param, code="invalid_input") from None
    except ModelUnavailableError as err:
        raise APIError(503, str(err), param="model", code="model_unavailable",
                       headers={"Retry-After": RETRY_AFTER_UNAVAILABLE}) from None
    except BatcherStoppedError as err:
        raise APIError(503, str(err), code="shutting_down", headers={"Retry-After": RETRY_AFTER_SHUTTING_DOWN}) from None
    finally:
        watcher.cancel()
        for task in tasks:
            task.cancel()  # no-op for finished ones; drops the queued texts of the others
        together.cancel()
