"""NomicBERT encoder (nomic-ai/nomic-embed-text-v1.5).

A BERT variant: rotary positions instead of learned ones, one fused q|k|v projection,
a gated (SwiGLU) MLP, no biases, post-norm layers, 8192-token context. Written from
nomic's ``modeling_hf_nomic_bert.py`` (nomic-ai/contrastors) and checked against it.

``config.json`` comes in two spellings: nomic's GPT-2 style keys (``n_embd``,
``n_head``, ``n_layer``, ``n_inner``, ``rotary_emb_base``, ...) and transformers 5's
native ones (``hidden_size``, ``rope_parameters``, ...). The real v1.5 config carries
both; nomic's keys win where both are present. Missing flags take the values of
nomic-embed-text-v1.5 (and of transformers' NomicBertConfig): no biases, full-width
rotary with base 1000, SwiGLU.
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
    gelu,
    pack_rows,
    packed_tokens,
    pad_rows,
    padding_key_mask,
    strip_prefix,
    swiglu,
)


MODEL_TYPES = ("nomic_bert",)
DEFAULT_POOLING = "mean"


def _swiglu(value: mx.array, gate: mx.array) -> mx.array:
    return swiglu(gate, value)


def _glu(value: mx.array, gate: mx.array) -> mx.array:
    return value * mx.sigmoid(gate)


def _geglu(value: mx.array, gate: mx.array) -> mx.array:
    return value * gelu(gate)


# activation_function -> value, gate -> value * act(gate), with fc12 the gate. swiglu is
# Qwen2's (compiled rational silu on the CPU), geglu uses the CPU erf GELU of base.
GATE_ACTIVATIONS = {
    "swiglu": _swiglu,
    "geglu": _geglu,
    "glu": _glu,
}
# transformers 5's hidden_act spelling of the same choice.
_HIDDEN_ACT_TO_FUNCTION = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu", "sigmoid": "glu"}
# nomic's gated MLP rounds its width up to a multiple of this.
_MLP_MULTIPLE_OF = 256


def default_max_tokens(config: dict) -> int:
    """Token limit when the checkpoint names none: nomic-embed's 8192 (or ``n_positions``)."""
    return int(config.get("n_positions") or 8192)


def _first(config: dict, *keys: str, default=None):
    """Value of the first of ``keys`` present (and not None) in ``config``."""
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return default


@dataclass
class ModelArgs:
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    rotary_fraction: float = 1.0
    rope_base: float = 1000.0
    rope_traditional: bool = False
    """True for nomic's ``rotary_emb_interleaved`` (GPT-J pairs), False for rotated halves."""
    qkv_bias: bool = False
    """Bias of Wqkv and of out_proj (nomic's ``qkv_proj_bias`` covers both)."""
    mlp_fc1_bias: bool = False
    mlp_fc2_bias: bool = False
    activation_function: str = "swiglu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dims(self) -> int:
        return int(self.head_dim * self.rotary_fraction)

    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        """Build the arguments from a NomicBERT ``config.json`` dict (nomic or transformers keys)."""
        _check_unsupported(config)
        try:
            hidden = int(_first(config, "n_embd", "hidden_size"))
            heads = int(_first(config, "n_head", "num_attention_heads"))
            layers = int(_first(config, "n_layer", "num_hidden_layers"))
            vocab = int(config["vocab_size"])
        except (KeyError, TypeError):
            raise ValueError(
                "NomicBERT config lacks one of n_embd/hidden_size, n_head/num_attention_heads, "
                "n_layer/num_hidden_layers, vocab_size"
            ) from None
        if config.get("n_inner") is not None:
            # nomic's gated MLP rounds n_inner up to a multiple of 256.
            inner = int(config["n_inner"])
            inner = -(-inner // _MLP_MULTIPLE_OF) * _MLP_MULTIPLE_OF
        elif config.get("intermediate_size") is not None:
            inner = int(config["intermediate_size"])
        else:
            raise ValueError("NomicBERT config lacks n_inner/intermediate_size")
        # nomic pads the vocabulary (and the embedding matrix) to a multiple.
        multiple = int(config.get("pad_vocab_size_multiple") or 1)
        vocab = -(-vocab // multiple) * multiple
        args = cls(
            hidden_size=hidden,
            num_hidden_layers=layers,
            intermediate_size=inner,
            num_attention_heads=heads,
            vocab_size=vocab,
            type_vocab_size=int(config.get("type_vocab_size", 2)),
            layer_norm_eps=float(_first(config, "layer_norm_epsilon", "layer_norm_eps", default=1e-12)),
            rotary_fraction=float(config.get("rotary_emb_fraction", 1.0)),
            rope_base=float(_rope_base(config)),
            rope_traditional=bool(config.get("rotary_emb_interleaved", False)),
            qkv_bias=bool(config.get("qkv_proj_bias", False)),
            mlp_fc1_bias=bool(config.get("mlp_fc1_bias", False)),
            mlp_fc2_bias=bool(config.get("mlp_fc2_bias", False)),
            activation_function=_activation_function(config),
        )
        if args.hidden_size % args.num_attention_heads:
            raise ValueError(
                f"NomicBERT config: n_embd {args.hidden_size} is not a multiple of "
                f"n_head {args.num_attention_heads}"
            )
        if not 0 < args.rotary_fraction <= 1 or args.rotary_dims % 2:
            raise ValueError(
                f"NomicBERT config: rotary_emb_fraction {args.rotary_fraction} is not supported "
                "(learned positions are not implemented; the rotary width must be even)"
            )
        return args


def _rope_base(config: dict) -> float:
    rope_parameters = config.get("rope_parameters") or {}
    return _first(config, "rotary_emb_base", default=rope_parameters.get("rope_theta", 1000.0))


def _activation_function(config: dict) -> str:
    name = config.get("activation_function")
    if name is None:
        hidden_act = config.get("hidden_act", "silu")
        name = _HIDDEN_ACT_TO_FUNCTION.get(hidden_act, hidden_act)
    if name not in GATE_ACTIVATIONS:
        raise ValueError(
            f"NomicBERT config: activation {name!r} is not supported; "
            f"supported: {', '.join(GATE_ACTIVATIONS)}"
        )
    return name


def _check_unsupported(config: dict) -> None:
    """Reject configs that ask for variants this encoder does not implement."""
    refusals = {
        "prenorm": "pre-norm layers",
        "parallel_block": "parallel attention/MLP blocks",
        "causal": "causal attention",
        "rotary_scaling_factor": "dynamic NTK rotary scaling",
        "rotary_emb_scale_base": "xPos rotary scaling",
        "num_experts": "mixture-of-experts layers",
    }
    for key, what in refusals.items():
        if config.get(key):
            raise ValueError(f"NomicBERT config: {key}={config[key]!r} ({what}) is not supported")
    rope_type = (config.get("rope_parameters") or {}).get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"NomicBERT config: rope_type {rope_type!r} is not supported")
    heads = _first(config, "n_head", "num_attention_heads")
    kv_heads = config.get("num_heads_kv")
    if kv_heads is not None and kv_heads != heads:
        raise ValueError("NomicBERT config: grouped-query attention (num_heads_kv) is not supported")


class Embeddings(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.word_embeddings = nn.Embedding(args.vocab_size, args.hidden_size)
        if args.type_vocab_size > 0:
            self.token_type_embeddings = nn.Embedding(args.type_vocab_size, args.hidden_size)

    def __call__(self, input_ids: mx.array) -> mx.array:
        h = self.word_embeddings(input_ids)
        if "token_type_embeddings" in self:
            # One segment per text: token type 0 everywhere.
            h = h + self.token_type_embeddings(mx.zeros((1,), dtype=mx.int32))
        return h


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.head_dim = args.head_dim
        self.scale = self.head_dim**-0.5
        self.rotary_dims = args.rotary_dims
        self.rope_base = args.rope_base
        self.rope_traditional = args.rope_traditional
        dim = args.hidden_size
        self.Wqkv = Linear(dim, 3 * dim, bias=args.qkv_bias)
        self.out_proj = Linear(dim, dim, bias=args.qkv_bias)

    def _rope(self, x: mx.array) -> mx.array:
        # Rotates the first rotary_dims features of each head and leaves the rest.
        return mx.fast.rope(
            x,
            self.rotary_dims,
            traditional=self.rope_traditional,
            base=self.rope_base,
            scale=1.0,
            offset=0,
        )

    def __call__(self, x: mx.array, mask: mx.array | None, packed: PackedTokens | None = None) -> mx.array:
        # x is (B, L, E), or (N, E) real tokens when ``packed``: attention runs padded.
        qkv = pad_rows(packed, self.Wqkv(x))
        batch, length, _ = qkv.shape
        # Wqkv's rows are q | k | v, each laid out head by head.
        qkv = qkv.reshape(batch, length, 3, self.n_heads, self.head_dim).transpose(2, 0, 3, 1, 4)
        queries, keys, values = qkv[0], qkv[1], qkv[2]
        queries, keys = self._rope(queries), self._rope(keys)
        out = attention(queries, keys, values, self.scale, mask).transpose(0, 2, 1, 3).reshape(batch, length, -1)
        return self.out_proj(pack_rows(packed, out))


class GatedMLP(nn.Module):
    """fc2(fc11(x) * act(fc12(x))): fc12 is the gate, fc11 the value."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.fc11 = Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_fc1_bias)
        self.fc12 = Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_fc1_bias)
        self.fc2 = Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_fc2_bias)
        self.activation = GATE_ACTIVATIONS[args.activation_function]

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.activation(self.fc11(x), self.fc12(x)))


class Block(nn.Module):
    """Post-norm block: x = norm1(x + attn(x)); x = norm2(x + mlp(x))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attn = Attention(args)
        self.mlp = GatedMLP(args)
        self.norm1 = LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.norm2 = LayerNorm(args.hidden_size, eps=args.layer_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array | None, packed: PackedTokens | None = None) -> mx.array:
        h = self.norm1(x + self.attn(x, mask, packed))
        return self.norm2(h + self.mlp(h))


class Encoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.layers = [Block(args) for _ in range(args.num_hidden_layers)]

    def __call__(self, h: mx.array, mask: mx.array | None, packed: PackedTokens | None = None) -> mx.array:
        for layer in self.layers:
            h = layer(h, mask, packed)
        return h


# Tensors of nomic checkpoints that an embedding model does not use: the pooler, the
# MLM head, and buffers some exports include.
_DROPPED = re.compile(r"^(pooler\.|cls\.)|(^|\.)(inv_freq|position_ids)$")


class Model(nn.Module):
    """NomicBERT encoder: token ids (B, L) -> last hidden states (B, L, H).

    Module and parameter names follow nomic's checkpoints exactly (``emb_ln``,
    ``encoder.layers.N.attn.Wqkv``, ``mlp.fc11``...), so errors name tensors as the file does.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embeddings = Embeddings(args)
        self.emb_ln = LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.encoder = Encoder(args)

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None) -> mx.array:
        h = self.emb_ln(self.embeddings(input_ids))
        packed = packed_tokens(attention_mask, h.dtype)
        h = self.encoder(pack_rows(packed, h), padding_key_mask(attention_mask, h.dtype), packed)
        return pad_rows(packed, h)

    def sanitize(self, weights: dict[str, mx.array], source: str = "checkpoint") -> dict[str, mx.array]:
        """Check a nomic checkpoint's tensors and return the ones the encoder uses.

        Accepts names with or without the ``bert.`` prefix (nomic's pre-training
        checkpoints have it); drops the pooler, the MLM head and rotary buffers; raises
        ValueError naming any other unexpected tensor, a missing one, or a wrong shape.
        """
        weights = strip_prefix(weights, ("bert.",))
        kept = {name: value for name, value in weights.items() if not _DROPPED.search(name)}
        check_weights(self, kept, source)
        return kept
