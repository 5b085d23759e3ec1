"""``POST /v1/embeddings``: OpenAI's embeddings API, and engram-embed's ``model: "*"``."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse

from ..batcher import EmbedJob
from ..catalog import ALL_MODELS
from ..schemas import EmbeddingList, EmbeddingRequest, EnsembleEmbeddingList, ErrorBody
from ..state import ServerState, server_state
from .common import check_input_count, encode_vector, is_recall, resolve_model, run_jobs

router = APIRouter(tags=["embeddings"])

ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 404, 413, 503)}


def split_input(value) -> tuple[list[str] | None, list[list[int]] | None]:
    """(texts, None) or (None, token id lists) from OpenAI's ``input`` forms."""
    if isinstance(value, str):
        return [value], None
    if value and isinstance(value[0], str):
        return list(value), None
    if value and isinstance(value[0], int):
        return None, [list(value)]
    return None, [list(ids) for ids in value]


@router.post("/v1/embeddings", response_model=EmbeddingList | EnsembleEmbeddingList, responses=ERRORS,
             summary="Embed texts (OpenAI-compatible; model \"*\" for every enabled model)")
async def create_embeddings(
    body: EmbeddingRequest,
    request: Request,
    server: Annotated[ServerState, Depends(server_state)],
    x_priority: Annotated[str | None, Header(description="recall: ahead of queued bulk work")] = None,
):
    texts, token_ids = split_input(body.input)
    count = len(texts if texts is not None else token_ids)
    log = request.state.log
    log.update(inputs=count, model=body.model or server.catalog.default)
    check_input_count(server, count)
    everything = body.model is not None and body.model.strip().lower() in ALL_MODELS
    names = list(server.catalog.enabled) if everything else [resolve_model(server, body.model)]
    recall = is_recall(x_priority)
    if recall:
        log["priority"] = "recall"
    jobs = [
        EmbedJob(model=name, texts=texts, token_ids=token_ids, kind=body.kind, instruction=body.instruction,
                 instruction_optional=everything, dimensions=body.dimensions, truncate=body.truncate,
                 recall=recall)
        for name in names
    ]
    start = time.perf_counter()
    results = await run_jobs(request, server, jobs)
    total_ms = (time.perf_counter() - start) * 1000
    tokens = sum(result.tokens for result in results)
    truncated = sum(result.truncated for result in results)
    for result in results:
        if result.truncated:
            server.metrics.truncated.labels(result.model).inc(result.truncated)
    log.update(model="*" if everything else names[0], tokens=tokens, truncated=truncated)
    headers = {"X-Truncated-Inputs": str(truncated)}
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}

    def data(vectors) -> list[dict]:
        return [{"object": "embedding", "embedding": encode_vector(vector, body.encoding_format), "index": i}
                for i, vector in enumerate(vectors)]

    if not everything:
        result = results[0]
        content = {"object": "list", "data": data(result.vectors), "model": result.model, "usage": usage}
        return JSONResponse(content, headers=headers)
    content = {
        "object": "list",
        "embeddings": [{"model": r.model, "dimensions": int(r.vectors.shape[1]), "data": data(r.vectors)}
                       for r in results],
        "timing": {"total_ms": round(total_ms, 3),
                   "per_model": {r.model: round(r.seconds * 1000, 3) for r in results}},
        "usage": usage,
    }
    return JSONResponse(content, headers=headers)
