"""``POST /v1/rank``: documents ranked for a query by the ensemble's fused rankings."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request

from ...fusion import fuse_ranking
from ..batcher import EmbedJob
from ..catalog import ALL_MODELS
from ..schemas import ErrorBody, RankRequest, RankResponse
from ..state import ServerState, server_state
from .common import check_input_count, is_recall, resolve_model, run_jobs

router = APIRouter(tags=["rank"])

ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 404, 413, 503)}


def selected_models(server: ServerState, requested: list[str] | None) -> list[str]:
    """The enabled models a rank request names (every enabled one by default), in order, once each."""
    if requested is None or any(name.strip().lower() in ALL_MODELS for name in requested):
        return list(server.catalog.enabled)
    chosen: list[str] = []
    for name in requested:
        model = resolve_model(server, name, param="models")
        if model not in chosen:
            chosen.append(model)
    return chosen


@router.post("/v1/rank", response_model=RankResponse, responses=ERRORS,
             summary="Rank documents for a query, fusing the models' rankings")
async def rank(
    body: RankRequest,
    request: Request,
    server: Annotated[ServerState, Depends(server_state)],
    x_priority: Annotated[str | None, Header()] = None,
) -> RankResponse:
    request.state.log.update(inputs=len(body.documents) + 1, model="rank")
    check_input_count(server, len(body.documents), param="documents")
    names = selected_models(server, body.models)
    recall = is_recall(x_priority)
    jobs = []
    for name in names:
        jobs.append(EmbedJob(model=name, texts=[body.query], kind="query", instruction=body.instruction,
                             instruction_optional=True, recall=recall))
        jobs.append(EmbedJob(model=name, texts=body.documents, kind="document", recall=recall))
    results = await run_jobs(request, server, jobs)
    scores = {}
    for position, name in enumerate(names):
        query, documents = results[2 * position], results[2 * position + 1]
        scores[name] = documents.vectors @ query.vectors[0]
    weights = {name: server.ensemble.weights[name] for name in names}
    ranking = fuse_ranking(scores, weights, body.fusion, body.k, body.top_k)
    tokens = sum(result.tokens for result in results)
    request.state.log["tokens"] = tokens
    return RankResponse(
        models=names,
        fusion=body.fusion,
        k=body.k,
        results=[{"index": index, "score": score} for index, score in ranking],
        per_model={name: [float(s) for s in values] for name, values in scores.items()},
        usage={"prompt_tokens": tokens, "total_tokens": tokens},
    )
