"""``GET /v1/models`` and ``GET /health``, in engram-embed's shapes."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends

from ... import __version__
from ..schemas import Health, HealthModel, ModelCard, ModelList
from ..state import ServerState, server_state

router = APIRouter(tags=["models"])


@router.get("/v1/models", response_model=ModelList, summary="The enabled models")
async def list_models(server: Annotated[ServerState, Depends(server_state)]) -> ModelList:
    loaded = server.ensemble.loaded
    return ModelList(data=[ModelCard(**_model_fields(server, name, loaded)) for name in server.catalog.enabled])


def _model_fields(server: ServerState, name: str, loaded: dict) -> dict:
    """What ``/v1/models`` and ``/health`` both say of an enabled model."""
    facts = server.catalog.facts(name)
    return {"id": name, "dimensions": facts.dimensions, "max_tokens": facts.max_tokens, "loaded": name in loaded}


@router.get("/health", response_model=Health, summary="Liveness and model status (no key needed)")
async def health(server: Annotated[ServerState, Depends(server_state)]) -> Health:
    loaded = server.ensemble.loaded
    models = [HealthModel(**_model_fields(server, name, loaded), default=name == server.catalog.default)
              for name in server.catalog.enabled]
    memory = sum(loaded.values())
    last = server.batcher.last_batch_time
    return Health(
        models=models,
        loaded_count=len(loaded),
        version=__version__,
        uptime_secs=int(time.time() - server.started),
        memory_bytes=memory,
        memory_mb=round(memory / 2**20, 2),
        last_embedding_time=int(last) if last is not None else None,
        in_flight_requests=server.in_flight,
    )
