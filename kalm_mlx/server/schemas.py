"""Request and response bodies (pydantic), so that ``/openapi.json`` documents the API."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, Field, StrictBool, StrictInt, StrictStr, field_validator

# pydantic refuses a str holding a lone UTF-16 surrogate ("unable to parse raw data as a
# unicode string"), so such texts are a 400 before they reach a tokenizer.
Text = Annotated[StrictStr, Field(min_length=1)]
TokenId = Annotated[StrictInt, Field(ge=0)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]

EmbeddingInput = (
    Text
    | Annotated[list[Text], Field(min_length=1)]
    | TokenIds
    | Annotated[list[TokenIds], Field(min_length=1)]
)

INPUT_TYPES = {"query": "query", "document": "document",
               "search_query": "query", "search_document": "document"}


class EmbeddingRequest(BaseModel):
    """``POST /v1/embeddings``: OpenAI's body, plus engram-embed's ``model: "*"`` and kalm-mlx's
    ``input_type``, ``instruction`` and ``truncate``."""

    input: EmbeddingInput = Field(
        description="A text, a list of texts, a list of token ids, or a list of such lists.")
    model: StrictStr | None = Field(
        None, description='An enabled model: name, alias or hub id; "*" or "all" for every one. '
                          "Default: the first enabled model.")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: little-endian float32 bytes, as OpenAI.")
    dimensions: Annotated[StrictInt, Field(ge=1)] | None = Field(
        None, description="Matryoshka: keep this many dims (one the model was trained for).")
    user: StrictStr | None = Field(None, description="Accepted and ignored.")
    input_type: Literal["query", "document", "search_query", "search_document"] | None = Field(
        None, description="Which of the model's prompts to apply (default document).")
    instruction: StrictStr | None = Field(
        None, description="Instruction or task name for instruction-tuned models (KaLM); implies query.")
    truncate: StrictBool = Field(
        True, description="Cut texts over the model's token limit (false: refuse them with 400).")

    @property
    def kind(self) -> str:
        """``query`` or ``document``: the prompt the texts get."""
        if self.input_type is None:
            return "query" if self.instruction is not None else "document"
        return INPUT_TYPES[self.input_type]


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str = Field(description="Floats, or base64 little-endian float32.")
    index: int


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    """OpenAI's response."""

    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class ModelEmbeddings(BaseModel):
    model: str
    dimensions: int
    data: list[Embedding]


class Timing(BaseModel):
    total_ms: float
    per_model: dict[str, float]


class EnsembleEmbeddingList(BaseModel):
    """engram-embed's response to ``model: "*"``: every enabled model's vectors."""

    object: Literal["list"] = "list"
    embeddings: list[ModelEmbeddings]
    timing: Timing
    usage: Usage


class RankRequest(BaseModel):
    """``POST /v1/rank``: documents ranked for a query by the fused rankings of the models."""

    query: Text
    documents: Annotated[list[Text], Field(min_length=1)]
    models: Annotated[list[StrictStr], Field(min_length=1)] | None = Field(
        None, description="Enabled models to fuse (default: every enabled model).")
    fusion: Literal["rrf", "score"] = Field(
        "rrf", description="rrf: sum of w / (k + rank); score: weighted mean cosine.")
    top_k: Annotated[StrictInt, Field(ge=1)] | None = None
    k: Annotated[float, Field(ge=0)] = 60.0
    instruction: StrictStr | None = Field(None, description="Query instruction (KaLM).")

    @field_validator("k")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("k must be a finite number")
        return value


class RankResult(BaseModel):
    index: int
    score: float


class RankResponse(BaseModel):
    object: Literal["list"] = "list"
    models: list[str]
    fusion: str
    k: float
    results: list[RankResult]
    per_model: dict[str, list[float]] = Field(description="Each model's cosine for every document.")
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "kalm-mlx"
    dimensions: int | None
    max_tokens: int | None
    loaded: bool


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthModel(BaseModel):
    id: str
    dimensions: int | None
    max_tokens: int | None
    loaded: bool
    default: bool


class Health(BaseModel):
    """engram-embed's ``/health`` body."""

    status: Literal["ok"] = "ok"
    models: list[HealthModel]
    loaded_count: int
    version: str
    uptime_secs: int
    memory_bytes: int = Field(description="Bytes of model weights loaded now.")
    memory_mb: float
    last_embedding_time: int | None = Field(description="Unix time of the last batch, or null.")
    in_flight_requests: int


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    error: ErrorDetail
