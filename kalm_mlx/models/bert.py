"""BERT encoder (bge-base-en-v1.5, all-MiniLM-L6-v2, gte-base: all ``BertModel`` checkpoints).

Post-norm transformer layers over word + absolute position + token type embeddings.
Every text is a single segment, so the token type is always 0. The pooler and the
masked-language-model head are not part of an embedding model and are dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .base import (
    LayerNorm,
    Linear,
    PackedTokens,
    attention,
    check_weights,
    first_rows,
    gelu,
    pack_rows,
    packed_tokens,
    pad_rows,
    padding_key_mask,
    strip_prefix,
)


MODEL_TYPES = ("bert",)
# Pooling normally comes from the checkpoint's 1_Pooling/config.json or the registry.
DEFAULT_POOLING = "mean"

# Hugging Face hidden_act -> MLX activation. "gelu" is the exact (erf) GELU; the
# tanh approximation must not stand in for it.
ACTIVATIONS = {
    "gelu": gelu,
    "gelu_new": nn.gelu_approx,
    "gelu_pytorch_tanh": nn.gelu_approx,
    "relu": nn.relu,
}


def default_max_tokens(config: dict) -> int:
    """Token limit when the checkpoint names none: 512, or fewer position embeddings."""
    return min(512, int(config.get("max_position_embeddings", 512)))


@dataclass
class ModelArgs:
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        """Build the arguments from a Hugging Face BERT ``config.json`` dict."""
        try:
            args = cls(
                hidden_size=int(config["hidden_size"]),
                num_hidden_layers=int(config["num_hidden_layers"]),
                intermediate_size=int(config["intermediate_size"]),
                num_attention_heads=int(config["num_attention_heads"]),
                vocab_size=int(config["vocab_size"]),
                max_position_embeddings=int(config["max_position_embeddings"]),
                type_vocab_size=int(config.get("type_vocab_size", 2)),
                layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
                hidden_act=str(config.get("hidden_act", "gelu")),
            )
        except KeyError as err:
            raise ValueError(f"BERT config lacks the key {err.args[0]!r}") from None
        if args.hidden_size % args.num_attention_heads:
            raise ValueError(
                f"BERT config: hidden_size {args.hidden_size} is not a multiple of "
                f"num_attention_heads {args.num_attention_heads}"
            )
        if args.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"BERT config: hidden_act {args.hidden_act!r} is not supported; "
                f"supported: {', '.join(ACTIVATIONS)}"
            )
        position_type = config.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(
                f"BERT config: position_embedding_type {position_type!r} is not supported "
                "(only 'absolute')"
            )
        if args.type_vocab_size < 1:
            raise ValueError("BERT config: type_vocab_size must be at least 1")
        return args


# Module and parameter names follow Hugging Face's BertModel exactly, so that the
# checkpoint needs no renaming and every error names the tensor as the file spells it.


class Embeddings(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.word_embeddings = nn.Embedding(args.vocab_size, args.hidden_size)
        self.position_embeddings = nn.Embedding(args.max_position_embeddings, args.hidden_size)
        self.token_type_embeddings = nn.Embedding(args.type_vocab_size, args.hidden_size)
        self.LayerNorm = LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.max_positions = args.max_position_embeddings

    def __call__(self, input_ids: mx.array) -> mx.array:
        length = input_ids.shape[1]
        if length > self.max_positions:
            raise ValueError(
                f"BERT input has {length} tokens; the model has {self.max_positions} positions"
            )
        # Embedding calls rather than weight slices, so that quantized embeddings work too.
        h = self.word_embeddings(input_ids)
        h = h + self.position_embeddings(mx.arange(length))
        # One segment per text: token type 0 everywhere.
        h = h + self.token_type_embeddings(mx.zeros((1,), dtype=mx.int32))
        return self.LayerNorm(h)


class SelfAttention(nn.Module):
    """The query, key and value projections and the attention itself (HF's ``attention.self``)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.head_dim = args.head_dim
        self.scale = self.head_dim**-0.5
        dim = args.hidden_size
        self.query = Linear(dim, dim, bias=True)
        self.key = Linear(dim, dim, bias=True)
        self.value = Linear(dim, dim, bias=True)

    def _heads(self, x: mx.array) -> mx.array:
        batch, length, _ = x.shape
        return x.reshape(batch, length, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)

    def __call__(self, x: mx.array, mask: mx.array | None, packed: PackedTokens | None = None,
                 first_token_only: bool = False) -> mx.array:
        # x is (B, L, E), or (N, E) real tokens when ``packed``: attention runs padded.
        # ``first_token_only``: every token is a key and a value, only each text's first a query;
        # returns (B, 1, E).
        keys, values = (self._heads(pad_rows(packed, proj(x))) for proj in (self.key, self.value))
        if first_token_only:
            queries = self._heads(self.query(first_rows(packed, x)))
            packed = None
        else:
            queries = self._heads(pad_rows(packed, self.query(x)))
        out = attention(queries, keys, values, self.scale, mask)
        batch, _, length, _ = out.shape
        return pack_rows(packed, out.transpose(0, 2, 1, 3).reshape(batch, length, -1))


class DenseAddNorm(nn.Module):
    """Post-norm residual step: LayerNorm(dense(x) + residual) (HF's ``*.output``)."""

    def __init__(self, in_dims: int, args: ModelArgs):
        super().__init__()
        self.dense = Linear(in_dims, args.hidden_size, bias=True)
        self.LayerNorm = LayerNorm(args.hidden_size, eps=args.layer_norm_eps)

    def __call__(self, x: mx.array, residual: mx.array) -> mx.array:
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        # Hugging Face names this submodule "self"; as an attribute that would read badly.
        self["self"] = SelfAttention(args)
        self.output = DenseAddNorm(args.hidden_size, args)

    def __call__(self, x: mx.array, mask: mx.array | None, packed: PackedTokens | None = None,
                 first_token_only: bool = False) -> mx.array:
        residual = first_rows(packed, x) if first_token_only else x
        return self.output(self["self"](x, mask, packed, first_token_only), residual)


class Intermediate(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.dense = Linear(args.hidden_size, args.intermediate_size, bias=True)
        self.activation = ACTIVATIONS[args.hidden_act]

    def __call__(self, x: mx.array) -> mx.array:
        return self.activation(self.dense(x))


class Layer(nn.Module):
    """Post-norm layer: h = LN(x + attn(x)); out = LN(h + dense(act(dense(h))))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.intermediate = Intermediate(args)
        self.output = DenseAddNorm(args.intermediate_size, args)

    def __call__(self, x: mx.array, mask: mx.array | None, packed: PackedTokens | None = None,
                 first_token_only: bool = False) -> mx.array:
        h = self.attention(x, mask, packed, first_token_only)
        return self.output(self.intermediate(h), h)


class Encoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.layer = [Layer(args) for _ in range(args.num_hidden_layers)]

    def __call__(self, h: mx.array, mask: mx.array | None, packed: PackedTokens | None = None,
                 first_token_only: bool = False) -> mx.array:
        # With ``first_token_only`` the last layer computes each text's first token only: the
        # attention's queries, its output and the feed-forward block on B rows instead of B x L.
        for index, layer in enumerate(self.layer):
            h = layer(h, mask, packed, first_token_only and index == len(self.layer) - 1)
        return h


# Tensors of a BertModel / BertForMaskedLM checkpoint that an embedding model does not use.
_DROPPED = re.compile(r"^(pooler\.|cls\.|embeddings\.position_ids$)")


class Model(nn.Module):
    """BERT encoder: token ids (B, L) -> last hidden states (B, L, H), no pooler.

    ``first_token_only=True`` returns the first token's states only, (B, 1, H), as CLS
    pooling needs: the last layer then skips the other tokens' queries and feed-forward
    work (a twelfth less compute on a 12-layer model), with the same vectors.
    """

    supports_first_token_only = True

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embeddings = Embeddings(args)
        self.encoder = Encoder(args)

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None,
                 first_token_only: bool = False) -> mx.array:
        h = self.embeddings(input_ids)
        packed = packed_tokens(attention_mask, h.dtype)
        h = self.encoder(pack_rows(packed, h), padding_key_mask(attention_mask, h.dtype), packed, first_token_only)
        return h if first_token_only else pad_rows(packed, h)

    def sanitize(self, weights: dict[str, mx.array], source: str = "checkpoint") -> dict[str, mx.array]:
        """Check a Hugging Face BERT checkpoint's tensors and return them under this module's names.

        Accepts names with or without the ``bert.`` prefix and legacy ``LayerNorm.gamma``
        / ``beta`` names; drops the pooler, the ``cls.*`` (MLM / NSP) heads and the
        ``position_ids`` buffer; raises ValueError naming any other unexpected tensor,
        a missing one, or one whose shape the config does not imply.
        """
        weights = strip_prefix(weights, ("bert.",))
        kept = {}
        for name, value in weights.items():
            if _DROPPED.match(name):
                continue
            # TF-era checkpoints call LayerNorm parameters gamma and beta.
            name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name)
            name = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)
            kept[name] = value
        check_weights(self, kept, source)
        return kept
