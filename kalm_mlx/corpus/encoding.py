"""One step of the corpus job: texts -> vectors with per-text token counts, on one Embedder.

Shared by the single-machine job and the Ray actor, so that both give the same vectors.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from ..embedder import EmptyTextWarning, TruncationWarning

KINDS = ("document", "query")


def job_prompt(embedder, kind: str, instruction: str | None = None) -> str:
    """The prompt ``encode_documents`` (``kind="document"``) or ``encode_queries`` prepends."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if kind == "query":
        return embedder.query_prompt(instruction)
    if instruction is not None:
        raise ValueError("an instruction applies to queries only (kind='query')")
    return embedder.prompts.get("document", "")


def embed_texts(embedder, texts: Sequence[str], prompt: str = "", dim: int | None = None,
                batch_size: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Embed ``texts`` as ``embedder.encode(texts, prompt=prompt, truncate_dim=dim)`` does.

    Returns (vectors, tokens per text, which texts were truncated). The counts come from
    :meth:`~kalm_mlx.Embedder.tokenize` (about 1 % of the encoding time), so a truncated
    text counts twice in ``embedder.truncated_texts``. The per-call truncation and
    empty-text warnings are silenced: the caller counts those texts instead.
    """
    texts = list(texts)
    prompted = [prompt + text for text in texts] if prompt else texts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        warnings.simplefilter("ignore", EmptyTextWarning)
        before = embedder.truncated_texts
        ids = embedder.tokenize(prompted)
        truncated = _truncated_flags(embedder, prompted, ids, embedder.truncated_texts - before)
        vectors = embedder.encode(texts, prompt=prompt, batch_size=batch_size, truncate_dim=dim)
    tokens = np.fromiter((len(seq) for seq in ids), dtype=np.int64, count=len(ids))
    return vectors, tokens, truncated


def _truncated_flags(embedder, texts: list[str], ids: list[list[int]], count: int) -> np.ndarray:
    """Which texts the tokenizer cut, given how many it cut (``count``).

    A cut text has exactly ``max_tokens`` ids; when more texts than ``count`` are that long
    (some fit exactly), each candidate is tokenised alone to tell them apart.
    """
    flags = np.zeros(len(ids), dtype=bool)
    if not count:
        return flags
    at_limit = [i for i, seq in enumerate(ids) if len(seq) >= embedder.max_tokens]
    if len(at_limit) == count:
        flags[at_limit] = True
        return flags
    for i in at_limit:
        before = embedder.truncated_texts
        embedder.tokenize([texts[i]])
        flags[i] = embedder.truncated_texts > before
    return flags
