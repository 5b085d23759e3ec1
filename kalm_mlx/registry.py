"""The one table of models kalm-mlx knows by name."""

from __future__ import annotations

from dataclasses import dataclass, field

KALM_QUERY_TEMPLATE = "Instruct: {instruction} \n Query: "
KALM_DEFAULT_INSTRUCTION = "Given a query, retrieve documents that answer the query"


@dataclass(frozen=True)
class ModelEntry:
    """One known model: where it comes from and how it embeds."""

    name: str
    hub_id: str
    family: str
    dim: int
    max_tokens: int
    pooling: str
    parameters: int
    """Parameter count, for memory estimates (bytes = parameters x bytes per weight)."""
    aliases: tuple[str, ...] = ()
    query_prompt: str = ""
    document_prompt: str = ""
    query_template: str | None = None
    """Query prompt with an ``{instruction}`` slot, for instruction-tuned models."""
    default_instruction: str | None = None
    task_instructions: dict[str, str] = field(default_factory=dict)
    matryoshka_dims: tuple[int, ...] = ()
    opt_in: bool = False
    description: str = ""

    @property
    def prompts(self) -> dict[str, str]:
        """The model's named prompts: ``{"query": ..., "document": ...}``."""
        return {"query": self.query_prompt, "document": self.document_prompt}

    def memory_bytes(self, bytes_per_weight: float = 4.0) -> int:
        """Approximate bytes of loaded weights (4 for float32, 2 for float16, ~1.06 for q8)."""
        return int(self.parameters * bytes_per_weight)


_KALM_TASKS = {
    "retrieval": KALM_DEFAULT_INSTRUCTION,
}


def _kalm(name: str, hub_id: str, aliases: tuple[str, ...], description: str) -> ModelEntry:
    return ModelEntry(
        name=name,
        hub_id=hub_id,
        family="qwen2",
        dim=896,
        max_tokens=512,
        pooling="mean",
        parameters=494_032_768,
        aliases=aliases,
        query_prompt=KALM_QUERY_TEMPLATE.format(instruction=KALM_DEFAULT_INSTRUCTION),
        document_prompt="",
        query_template=KALM_QUERY_TEMPLATE,
        default_instruction=KALM_DEFAULT_INSTRUCTION,
        task_instructions=dict(_KALM_TASKS),
        matryoshka_dims=(896, 512, 256, 128, 64),
        opt_in=True,
        description=description,
    )


MODELS: tuple[ModelEntry, ...] = (
    _kalm(
        "kalm-v2",
        "HIT-TMG/KaLM-embedding-multilingual-mini-instruct-v2",
        ("kalm", "kalm-embedding-v2"),
        "KaLM-Embedding-V2: multilingual, instruction-tuned, Qwen2-0.5B without causal mask",
    ),
    _kalm(
        "kalm-v2.5",
        "KaLM-Embedding/KaLM-embedding-multilingual-mini-instruct-v2.5",
        ("kalm-embedding-v2.5",),
        "KaLM-Embedding-V2.5: same architecture as V2, newer training",
    ),
)


def _index() -> dict[str, ModelEntry]:
    table: dict[str, ModelEntry] = {}
    for entry in MODELS:
        for key in (entry.name, entry.hub_id, *entry.aliases):
            table[key.lower()] = entry
    return table


_BY_NAME = _index()


def list_models() -> list[ModelEntry]:
    """Return every registry entry, in table order."""
    return list(MODELS)


def find_model(name: str) -> ModelEntry | None:
    """Return the entry whose name, alias or hub id matches ``name`` (case-insensitive), or None."""
    return _BY_NAME.get(name.strip().lower())


def get_model(name: str) -> ModelEntry:
    """Return the entry for ``name``, or raise ValueError listing the valid names."""
    entry = find_model(name)
    if entry is None:
        valid = ", ".join(e.name for e in MODELS)
        raise ValueError(f"unknown model {name!r}; known models: {valid}")
    return entry
