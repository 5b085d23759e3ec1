"""Checkpoints in, MLX models out.

A checkpoint is either a Hugging Face folder (config.json, safetensors, tokenizer
files, optional sentence-transformers files) or a folder written by ``convert``,
whose config.json carries a ``kalm_mlx`` section. Both are read into the same
:class:`Checkpoint`, from which :func:`build_model` makes the MLX module and
:func:`embedder_from_checkpoint` the Embedder. Names are not resolved here: that is
:mod:`kalm_mlx.hub`, and :func:`kalm_mlx.load` (in :mod:`kalm_mlx.api`) composes the two.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ._backend import trim_malloc
from .embedder import Embedder, load_tokenizer
from .models import family_module, family_of
from .models.base import Linear, check_weights, cpu_weight_layout
from .pooling import POOLING_METHODS
from .registry import ModelEntry, find_model, get_model

META_KEY = "kalm_mlx"
FORMAT_VERSION = 1
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
)


@dataclass
class Checkpoint:
    """Everything needed to build an embedder, read from one folder."""

    folder: Path
    config: dict
    """The architecture config (Hugging Face config.json, without the kalm_mlx section)."""
    meta: dict
    """How to embed: family, pooling, max_tokens, prompts, dims, dtype, source, quantization."""
    weights: dict[str, mx.array] = field(repr=False)
    """Tensors under the encoder's own names."""

    @property
    def tokenizer_path(self) -> Path:
        return self.folder / "tokenizer.json"


def read_json(path: Path) -> dict:
    """Read a JSON object from ``path``, raising ValueError that names the file when malformed."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: malformed JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def read_safetensors(folder: Path) -> dict[str, mx.array]:
    """Read every safetensors file of a folder (sharded with an index, or not) into one dict.

    Raises FileNotFoundError when there is none and ValueError naming the file when one is
    truncated or corrupt, or when two files hold the same tensor.
    """
    index_path = folder / "model.safetensors.index.json"
    if index_path.exists():
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index_path}: no 'weight_map' object")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for path in files:
            if not path.exists():
                raise FileNotFoundError(f"{path}: listed in {index_path.name} but missing")
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        hint = ""
        if (folder / "pytorch_model.bin").exists():
            hint = " (only pytorch_model.bin found: kalm-mlx reads safetensors only)"
        raise FileNotFoundError(f"{folder}: no safetensors weights{hint}")
    weights: dict[str, mx.array] = {}
    for path in files:
        try:
            shard = mx.load(str(path))
        except Exception as err:  # mx.load names the tensor but not the file
            raise ValueError(f"{path}: cannot read safetensors weights: {err}") from None
        clash = set(shard) & set(weights)
        if clash:
            raise ValueError(f"{path}: tensor '{sorted(clash)[0]}' also appears in another file")
        weights.update(shard)
    return weights


def stored_dtype(weights: dict[str, mx.array]) -> str:
    """Name of the dtype most floating-point weights are stored in."""
    counts: dict[str, int] = {}
    for value in weights.values():
        if mx.issubdtype(value.dtype, mx.floating):
            name = str(value.dtype).split(".")[-1]
            counts[name] = counts.get(name, 0) + value.size
    return max(counts, key=counts.get) if counts else "float32"


# --- sentence-transformers settings -------------------------------------------------------


def _pooling_from_st(folder: Path) -> str | None:
    modules_path = folder / "modules.json"
    pooling_dir = "1_Pooling"
    if modules_path.exists():
        with open(modules_path, encoding="utf-8") as f:
            modules = json.load(f)
        for module in modules:
            kind = module.get("type", "")
            if kind.endswith("Pooling"):
                pooling_dir = module.get("path") or pooling_dir
            elif kind.endswith(("Dense", "LayerNorm", "WordEmbeddings", "CNN", "LSTM")):
                raise ValueError(
                    f"{modules_path}: sentence-transformers module {kind} is not supported"
                )
    config_path = folder / pooling_dir / "config.json"
    if not config_path.exists():
        return None
    config = read_json(config_path)
    modes = {
        "pooling_mode_cls_token": "cls",
        "pooling_mode_mean_tokens": "mean",
        "pooling_mode_lasttoken": "last",
    }
    chosen = [mode for key, mode in modes.items() if config.get(key)]
    unsupported = [
        key
        for key in ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
                    "pooling_mode_weightedmean_tokens")
        if config.get(key)
    ]
    if unsupported or len(chosen) != 1:
        raise ValueError(
            f"{config_path}: unsupported pooling {unsupported or chosen}; "
            f"kalm-mlx supports exactly one of {', '.join(POOLING_METHODS)}"
        )
    return chosen[0]


def _max_tokens_from_st(folder: Path) -> int | None:
    path = folder / "sentence_bert_config.json"
    if not path.exists():
        return None
    value = read_json(path).get("max_seq_length")
    return int(value) if value else None


def _prompts_from_st(folder: Path) -> dict[str, str]:
    path = folder / "config_sentence_transformers.json"
    if not path.exists():
        return {}
    prompts = read_json(path).get("prompts") or {}
    return {str(k): str(v) for k, v in prompts.items()}


def entry_for_folder(folder: Path, config: dict) -> ModelEntry | None:
    """Guess the registry entry of a Hugging Face folder from its hub-cache path or config."""
    candidates = [config.get("_name_or_path", "")]
    for part in folder.resolve().parts:
        if part.startswith("models--"):
            candidates.append(part[len("models--"):].replace("--", "/"))
    for candidate in candidates:
        if candidate:
            entry = find_model(candidate)
            if entry is not None:
                return entry
    return None


def embedding_meta(folder: Path, config: dict, entry: ModelEntry | None, source: str) -> dict:
    """Work out how a Hugging Face checkpoint embeds: checkpoint files first, then the registry."""
    family = family_of(config, str(folder / "config.json"))
    module = family_module(family)
    if entry is None and family == "qwen2":
        # A Qwen2 encoder of unknown origin is treated as KaLM-shaped: same prompts.
        prompt_source = get_model("kalm-v2")
    else:
        prompt_source = entry
    prompts = dict(prompt_source.prompts) if prompt_source else {"query": "", "document": ""}
    prompts.update(_prompts_from_st(folder))
    pooling = _pooling_from_st(folder) or (entry.pooling if entry else module.DEFAULT_POOLING)
    max_tokens = _max_tokens_from_st(folder) or (
        entry.max_tokens if entry else module.default_max_tokens(config)
    )
    dim = module.ModelArgs.from_config(config).hidden_size
    return {
        "format_version": FORMAT_VERSION,
        "name": entry.name if entry else folder.name,
        "family": family,
        "pooling": pooling,
        "max_tokens": int(max_tokens),
        "dim": dim,
        "prompts": prompts,
        "query_template": prompt_source.query_template if prompt_source else None,
        "default_instruction": prompt_source.default_instruction if prompt_source else None,
        "task_instructions": dict(prompt_source.task_instructions) if prompt_source else {},
        "matryoshka_dims": list(entry.matryoshka_dims) if entry else [],
        "matryoshka_layer_norm": bool(entry and entry.matryoshka_layer_norm),
        "source": source,
        "quantization": None,
    }


# --- reading folders ----------------------------------------------------------------------


def read_hf_checkpoint(folder: Path, entry: ModelEntry | None = None,
                       source: str | None = None) -> Checkpoint:
    """Read a Hugging Face folder and rename its tensors with the encoder's ``sanitize``."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path}: not found (is {folder} a model folder?)")
    config = read_json(config_path)
    config.pop(META_KEY, None)
    if entry is None:
        entry = entry_for_folder(folder, config)
    meta = embedding_meta(folder, config, entry, source or str(folder))
    module = family_module(meta["family"])
    model = module.Model(module.ModelArgs.from_config(config))
    raw = read_safetensors(folder)
    meta["dtype"] = stored_dtype(raw)
    weights = model.sanitize(raw, source=str(folder))
    return Checkpoint(folder=folder, config=config, meta=meta, weights=weights)


def read_converted(folder: Path) -> Checkpoint:
    """Read a folder written by ``convert`` (config.json with a ``kalm_mlx`` section)."""
    folder = Path(folder)
    config = read_json(folder / "config.json")
    meta = config.pop(META_KEY)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{folder / 'config.json'}: kalm_mlx format {meta.get('format_version')!r} is not "
            f"{FORMAT_VERSION}; convert the model again"
        )
    weights = read_safetensors(folder)
    return Checkpoint(folder=folder, config=config, meta=meta, weights=weights)


def is_converted(folder: Path) -> bool:
    """True when ``folder`` holds a model written by ``convert``."""
    path = Path(folder) / "config.json"
    if not path.exists():
        return False
    try:
        return META_KEY in read_json(path)
    except ValueError:
        return False


def read_checkpoint(folder: Path, entry: ModelEntry | None = None) -> Checkpoint:
    """Read a converted folder or a raw Hugging Face folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")
    if is_converted(folder):
        return read_converted(folder)
    return read_hf_checkpoint(folder, entry)


# --- quantization -------------------------------------------------------------------------

QUANTIZED_CHOICES = ("auto", "keep", "dequantize")
"""What ``load(quantized=...)`` does with a quantized folder (see :func:`modules_to_dequantize`)."""
QUANTIZATION_BITS = (4, 8)
QUANTIZATION_GROUP_SIZES = (32, 64, 128)


def check_quantized_choice(quantized: str) -> None:
    """Raise ValueError unless ``quantized`` is one of :data:`QUANTIZED_CHOICES`."""
    if quantized not in QUANTIZED_CHOICES:
        raise ValueError(f"quantized={quantized!r} is not one of {', '.join(QUANTIZED_CHOICES)}")


def quantizable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The model's ``nn.Linear`` and ``nn.Embedding`` layers by dotted path: what may be quantized."""
    return {
        path: module
        for path, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Embedding))
    }


def apply_quantization(model: nn.Module, quantization: dict, source: str) -> None:
    """Turn the layers a folder's quantization record lists into quantized layers, in place.

    The record is ``{"bits", "group_size", "modules": [paths], ...}`` as written by
    ``convert``; raises ValueError naming ``source`` when it is malformed or lists a
    layer the model does not have (or cannot quantize).
    """
    bits = quantization.get("bits")
    group_size = quantization.get("group_size")
    modules = quantization.get("modules")
    if bits not in QUANTIZATION_BITS:
        raise ValueError(f"{source}: quantization bits {bits!r} is not one of {QUANTIZATION_BITS}")
    if group_size not in QUANTIZATION_GROUP_SIZES:
        raise ValueError(
            f"{source}: quantization group_size {group_size!r} is not one of {QUANTIZATION_GROUP_SIZES}"
        )
    if quantization.get("mode", "affine") != "affine":
        raise ValueError(f"{source}: quantization mode {quantization['mode']!r} is not 'affine'")
    if not isinstance(modules, list) or not all(isinstance(path, str) for path in modules):
        raise ValueError(f"{source}: quantization 'modules' must be a list of layer paths")
    candidates = quantizable_modules(model)
    unknown = sorted(set(modules) - set(candidates))
    if unknown:
        raise ValueError(
            f"{source}: quantization lists layer '{unknown[0]}', which is not a Linear or "
            f"Embedding layer of this {type(model).__module__.split('.')[-1]} model"
        )
    listed = set(modules)
    nn.quantize(
        model,
        group_size=group_size,
        bits=bits,
        mode="affine",
        class_predicate=lambda path, _module: path in listed,
    )


def model_skeleton(checkpoint: Checkpoint) -> nn.Module:
    """The checkpoint's encoder with its recorded layers quantized, before any weight is loaded.

    Its initial weights are lazy and never computed; they only give names and shapes.
    """
    module = family_module(checkpoint.meta["family"])
    model = module.Model(module.ModelArgs.from_config(checkpoint.config))
    quantization = checkpoint.meta.get("quantization")
    if quantization:
        apply_quantization(model, quantization, str(checkpoint.folder / "config.json"))
    return model


def modules_to_dequantize(model: nn.Module, quantized: str) -> list[str]:
    """Paths of the quantized layers to turn back into float layers, for ``load(quantized=...)``.

    ``keep``: none. ``dequantize``: all. ``auto`` (the default): none on a GPU; on the CPU
    the quantized Linear layers but not the embedding table. MLX's CPU quantized matmul is
    about 50x slower than float32 with OpenBLAS, while a quantized embedding is a row
    lookup that costs nothing extra, and for KaLM it holds over a quarter of the weights.
    """
    check_quantized_choice(quantized)
    layers = {
        path: module
        for path, module in model.named_modules()
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    }
    if quantized == "keep" or (quantized == "auto" and mx.default_device() == mx.gpu):
        return []
    if quantized == "dequantize":
        return sorted(layers)
    return sorted(path for path, module in layers.items() if isinstance(module, nn.QuantizedLinear))


def _dequantized_layer(layer: nn.Module, dtype: mx.Dtype) -> nn.Module:
    weight = mx.dequantize(
        layer["weight"],
        scales=layer["scales"],
        biases=layer.get("biases"),
        group_size=layer.group_size,
        bits=layer.bits,
        mode=layer.mode,
    ).astype(dtype)
    if isinstance(layer, nn.QuantizedEmbedding):
        plain = nn.Embedding(*weight.shape)
    else:
        output_dims, input_dims = weight.shape
        plain = Linear(input_dims, output_dims, bias="bias" in layer)
        if "bias" in layer:
            plain.bias = layer.bias
    plain.weight = weight
    return plain


def dequantize_modules(model: nn.Module, paths: list[str], dtype: mx.Dtype) -> None:
    """Replace the quantized layers at ``paths`` by plain ``nn.Linear`` / ``nn.Embedding`` in ``dtype``.

    The weights come from ``mx.dequantize``; each layer is computed before the next one is
    started, so that no more than one layer's temporaries exist at a time.
    """
    for path in paths:
        *parents, name = path.split(".")
        parent = model
        for part in parents:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        plain = _dequantized_layer(parent[name], dtype)
        mx.eval(plain.parameters())
        setattr(parent, name, plain)


# --- building -----------------------------------------------------------------------------


def resolve_dtype(dtype: str | None) -> mx.Dtype:
    """Compute dtype from its name; None picks float16 on a GPU and float32 on the CPU."""
    if dtype is None:
        return mx.float16 if mx.default_device() == mx.gpu else mx.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def build_model(checkpoint: Checkpoint, dtype: mx.Dtype, quantized: str = "auto",
                consume: bool = False) -> nn.Module:
    """Instantiate the encoder, rebuild quantized layers, and load the weights in ``dtype``.

    ``quantized`` says which quantized layers stay quantized (see :func:`modules_to_dequantize`).
    On the CPU, some float weights are stored column-major (:func:`~kalm_mlx.models.base.cpu_weight_layout`).
    ``consume`` empties ``checkpoint.weights`` as each tensor is cast, so that a float16
    folder loaded in float32 never holds both copies at once (peak ~1x, not ~1.5x).
    """
    check_quantized_choice(quantized)
    model = model_skeleton(checkpoint)
    check_weights(model, checkpoint.weights, str(checkpoint.folder))
    source = checkpoint.weights if consume else dict(checkpoint.weights)
    weights = []
    for name in list(source):
        value = source.pop(name)
        if mx.issubdtype(value.dtype, mx.floating) and value.dtype != dtype:
            value = value.astype(dtype)
            mx.eval(value)  # one tensor at a time: its source can be freed right away
        weights.append((name, value))
    model.load_weights(weights, strict=True)
    del weights
    dequantize_modules(model, modules_to_dequantize(model, quantized), dtype)
    if mx.default_device() == mx.cpu:
        cpu_weight_layout(model)
    model.eval()
    mx.eval(model.parameters())
    return model


def release_memory() -> None:
    """Give freed memory back to the system: MLX's buffer cache, and glibc's free heap on Linux.

    Dropped MLX arrays go to MLX's cache, and small freed blocks (the tokenizer's JSON, for
    one) stay in the C heap; both still count in the process's resident memory until then.
    """
    mx.clear_cache()
    trim_malloc()


def embedder_from_checkpoint(checkpoint: Checkpoint, dtype: mx.Dtype, quantized: str = "auto",
                             consume: bool = False) -> Embedder:
    """Build an :class:`~kalm_mlx.Embedder` (model and tokenizer) from a checkpoint read in memory."""
    model = build_model(checkpoint, dtype, quantized, consume=consume)
    tokenizer = load_tokenizer(checkpoint.tokenizer_path, int(checkpoint.meta["max_tokens"]))
    return Embedder(model, tokenizer, checkpoint.meta, dtype)
