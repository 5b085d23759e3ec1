"""The inputs every runtime gets, and the arithmetic they cost.

Workloads are lists of token-id lists, generated deterministically from a seed, so that
every runtime embeds exactly the same ids (tokenization, the same Rust tokenizer on every
side, is left out of the timings). FLOPs count only the matrix multiplications the
encoder (bidirectional Qwen2, BERT or NomicBERT) must do on the real (unpadded) tokens:
padding a runtime computes is its own cost, and shows up as lower utilisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FIRST_SPECIAL_ID = 151643
"""Qwen2's first special token (<|endoftext|>); workloads draw ordinary BPE ids below it."""


@dataclass(frozen=True)
class EncoderShape:
    """The sizes that set an encoder's arithmetic (read from its config.json)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    mlp_matrices: int = 3
    """3 for a gated MLP (Qwen2's gate/up/down, nomic's fc11/fc12/fc2), 2 for BERT's."""

    @classmethod
    def from_config(cls, config: dict) -> "EncoderShape":
        """Build from a Qwen2, BERT or NomicBERT ``config.json`` dict (nomic's own keys or transformers')."""
        def first(*keys):
            return next(config[key] for key in keys if config.get(key) is not None)

        heads = int(first("n_head", "num_attention_heads"))
        return cls(
            hidden_size=int(first("n_embd", "hidden_size")),
            num_hidden_layers=int(first("n_layer", "num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(config.get("num_key_value_heads") or heads),
            intermediate_size=int(first("n_inner", "intermediate_size")),
            vocab_size=int(config["vocab_size"]),
            mlp_matrices=2 if config.get("model_type") == "bert" else 3,
        )

    @property
    def linear_params_per_layer(self) -> int:
        """Weights of one layer's projections (q, k, v, o and the MLP's two or three)."""
        hidden = self.hidden_size
        kv_dim = self.num_key_value_heads * (hidden // self.num_attention_heads)
        attention = hidden * hidden * 2 + hidden * kv_dim * 2
        return attention + self.mlp_matrices * hidden * self.intermediate_size

    def text_flops(self, length: int) -> int:
        """Multiply-add FLOPs (2 per MAC) to encode one text of ``length`` tokens.

        Projections: 2 x weights per token per layer. Attention: Q.K^T and P.V, each
        2 x length^2 x hidden per layer (all heads together). Embedding lookups, norms,
        RoPE and activations are not counted.
        """
        per_layer = 2 * length * self.linear_params_per_layer + 4 * length * length * self.hidden_size
        return per_layer * self.num_hidden_layers

    def workload_flops(self, token_ids: list[list[int]]) -> int:
        """Useful FLOPs of a list of texts (each at its own length, no padding)."""
        return sum(self.text_flops(len(ids)) for ids in token_ids)


def random_ids(lengths: list[int], vocab_size: int, seed: int) -> list[list[int]]:
    """One list of random ordinary token ids per length, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    high = min(vocab_size, FIRST_SPECIAL_ID)
    return [rng.integers(0, high, size=int(n)).tolist() for n in lengths]


def long_tailed_lengths(count: int, seed: int, low: int = 8, high: int = 512,
                        median: float = 40.0, sigma: float = 1.0) -> list[int]:
    """``count`` text lengths from a log-normal distribution clipped to [low, high].

    With the defaults, half the texts are under 40 tokens, one in twenty is over about
    200 and a few hit the 512 limit (as truncated long documents do), mean about 65.
    """
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.normal(np.log(median), sigma, size=count))
    return np.clip(np.rint(lengths), low, high).astype(int).tolist()


def mixed_corpus(count: int, vocab_size: int, seed: int = 0, high: int = 512) -> list[list[int]]:
    """The realistic workload: ``count`` texts of long-tailed lengths between 8 and ``high`` tokens."""
    return random_ids(long_tailed_lengths(count, seed, high=high), vocab_size, seed + 1)


def short_texts(count: int, vocab_size: int, seed: int = 0, low: int = 8, high: int = 24) -> list[list[int]]:
    """``count`` short texts (queries, memories) of uniformly drawn lengths ``low``..``high`` tokens."""
    lengths = np.random.default_rng(seed).integers(low, high + 1, size=count)
    return random_ids(lengths.tolist(), vocab_size, seed + 1)


def fixed_batch(texts: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """``texts`` texts of exactly ``length`` tokens (no padding anywhere)."""
    return random_ids([length] * texts, vocab_size, seed)


def length_distribution(token_ids: list[list[int]]) -> dict:
    """Summary of a workload's lengths for the report: count, tokens, mean and percentiles."""
    lengths = np.array([len(ids) for ids in token_ids])
    return {
        "texts": int(lengths.size),
        "tokens": int(lengths.sum()),
        "mean": round(float(lengths.mean()), 1),
        "p50": int(np.percentile(lengths, 50)),
        "p90": int(np.percentile(lengths, 90)),
        "p99": int(np.percentile(lengths, 99)),
        "max": int(lengths.max()),
    }
