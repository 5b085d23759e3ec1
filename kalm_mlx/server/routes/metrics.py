"""``GET /metrics``: Prometheus' text format, or a JSON snapshot for ``Accept: application/json``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..state import ServerState, server_state

router = APIRouter(tags=["metrics"])


@router.get("/metrics", summary="Prometheus metrics (JSON with Accept: application/json)",
            response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {},
                                                                  "application/json": {}}}})
async def metrics(request: Request, server: Annotated[ServerState, Depends(server_state)]) -> Response:
    if "application/json" in request.headers.get("accept", ""):
        return JSONResponse(server.metrics.snapshot())
    return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)
