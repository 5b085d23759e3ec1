"""One step of the corpus job: texts -> vectors with per-text token counts, on one Embedder.

Shared by the single-machine job and the Ray actor, so that both give the same vectors.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from ..embedder import EmptyTextWarning, TruncationWarning
from ..ensemble import check_kind


def job_prompt(embedder, kind: str, instruction: str | None = None) -> str:
    """The prompt ``encode_documents`` (``kind="document"``) or ``encode_queries`` prepends."""
    if check_kind(kind) == "query":
        return embedder.query_prompt(instruction)
    if instruction is not None:
        raise ValueError("an instruction applies to queries only (kind='query')")
    return embedder.prompts.get("document", "")


@dataclass
class Tokenized:
    """Texts as one model's token ids, with the counts the job reports."""

    ids: list[list[int]]
    tokens: np.ndarray
    """Tokens per text (prompt and special tokens included, after truncation)."""
    truncated: np.ndarray
    """Whether each text was cut to the model's token limit."""


def tokenize_texts(embedder, texts: Sequence[str], prompt: str = "") -> Tokenized:
    """``texts`` with ``prompt`` prepended, tokenised exactly as ``encode()`` tokenises them.

    Uses only the tokenizer, so it may run on another thread than the one encoding.
    """
    prompted = [prompt + text for text in texts] if prompt else list(texts)
    ids, cut = embedder.tokenize_with_truncation(prompted)
    truncated = np.array(cut, dtype=bool)
    tokens = np.fromiter((len(seq) for seq in ids), dtype=np.int64, count=len(ids))
    return Tokenized(ids, tokens, truncated)


def encode_tokenized(embedder, tokenized: Tokenized, dim: int | None = None, batch_size: int = 32) -> np.ndarray:
    """The vectors ``encode()`` gives for the texts behind ``tokenized`` (zeros for empty ones)."""
    return embedder.encode_tokens(tokenized.ids, batch_size=batch_size, truncate_dim=dim)


@contextmanager
def counted_warnings_off() -> Iterator[None]:
    """Silence the truncation and empty-text warnings, which the job counts instead.

    ``warnings.catch_warnings`` is process-wide and not thread-safe: enter this once, on the
    thread that starts the job's other threads, around all of them.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        warnings.simplefilter("ignore", EmptyTextWarning)
        yield


def embed_texts(embedder, texts: Sequence[str], prompt: str = "", dim: int | None = None,
                batch_size: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Embed ``texts`` as ``embedder.encode(texts, prompt=prompt, truncate_dim=dim)`` does.

    Returns (vectors, tokens per text, which texts were truncated); the texts are
    tokenised once (:func:`tokenize_texts`, then :func:`encode_tokenized`), and the
    warnings the counts replace are silenced. For one thread at a time.
    """
    with counted_warnings_off():
        tokenized = tokenize_texts(embedder, texts, prompt)
        vectors = encode_tokenized(embedder, tokenized, dim, batch_size)
    return vectors, tokenized.tokens, tokenized.truncated
