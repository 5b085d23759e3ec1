"""Hugging Face folder (or hub id, or converted folder) -> self-describing MLX folder.

Everything is read and checked before anything is written; the output is written to
a temporary folder beside OUT and renamed into place at the end, so an interrupted
or failed conversion leaves no half-written OUT and an existing OUT untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from kalm_mlx.hub import resolve
from kalm_mlx.loading import (
    DTYPES,
    META_KEY,
    TOKENIZER_FILES,
    Checkpoint,
    read_checkpoint,
)
from kalm_mlx.models import family_module
from kalm_mlx.models.base import check_weights


class ConversionError(ValueError):
    """A conversion was refused or failed; nothing was written."""


def _folder_bytes(folder: Path, pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern))


def validate_output(out: Path, src: Path | None, force: bool) -> Path:
    """Check that OUT may be written: refuse an existing OUT without ``force`` and OUT inside SRC."""
    out = Path(out).expanduser().absolute()
    if out.exists() and not force:
        raise ConversionError(f"{out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise ConversionError(f"{out} exists and is not a folder")
    if src is not None:
        src = src.resolve()
        if out.resolve() == src or src in out.resolve().parents:
            raise ConversionError(f"output {out} must not be the source folder or inside it")
    if not out.parent.exists():
        raise ConversionError(f"the parent folder of {out} does not exist")
    return out


def check_checkpoint(checkpoint: Checkpoint) -> None:
    """Check every tensor against the shapes the config implies (quantized layers included)."""
    import mlx.nn as nn

    module = family_module(checkpoint.meta["family"])
    model = module.Model(module.ModelArgs.from_config(checkpoint.config))
    quantization = checkpoint.meta.get("quantization")
    if quantization:
        modules = set(quantization["modules"])
        nn.quantize(model, group_size=quantization["group_size"], bits=quantization["bits"],
                    class_predicate=lambda path, _m: path in modules)
    check_weights(model, checkpoint.weights, str(checkpoint.folder))


def cast_weights(weights: dict[str, mx.array], dtype: str) -> dict[str, mx.array]:
    """Cast floating-point tensors to ``dtype``; integer (packed) tensors stay as they are."""
    target = DTYPES[dtype]
    return {
        name: value.astype(target) if mx.issubdtype(value.dtype, mx.floating) else value
        for name, value in weights.items()
    }


def save_weights(folder: Path, weights: dict[str, mx.array]) -> None:
    """Write safetensors shards (with an index when there are several), as mlx-lm does."""
    from mlx_lm.utils import make_shards

    shards = make_shards(weights)
    if len(shards) == 1:
        mx.save_safetensors(str(folder / "model.safetensors"), shards[0], metadata={"format": "mlx"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(folder / name), shard, metadata={"format": "mlx"})
        weight_map.update({tensor: name for tensor in shard})
    index = {
        "metadata": {"total_size": sum(v.nbytes for v in weights.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_folder(out: Path, checkpoint: Checkpoint, force: bool) -> None:
    """Write ``checkpoint`` to OUT atomically (temporary folder, then rename)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_weights(tmp, checkpoint.weights)
        config = dict(checkpoint.config)
        config[META_KEY] = checkpoint.meta
        (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        for name in TOKENIZER_FILES:
            if (checkpoint.folder / name).exists():
                shutil.copy2(checkpoint.folder / name, tmp / name)
        # mkdtemp makes the folder 0700, and a rename keeps that.
        os.chmod(tmp, 0o755)
        for path in tmp.iterdir():
            os.chmod(path, 0o644)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def convert(
    src: str | Path,
    out: str | Path,
    *,
    dtype: str | None = None,
    force: bool = False,
) -> dict:
    """Convert SRC (local HF folder, hub id, registry name or converted folder) into OUT.

    ``dtype`` casts the stored weights (default: keep the source's dtype). Returns a
    report dict: tensors, parameters, bytes before and after, dtype, output path.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    local_src = Path(src).expanduser()
    out = validate_output(Path(out), local_src if local_src.exists() else None, force)
    folder, entry = resolve(src)
    if not (folder / "tokenizer.json").exists():
        raise ConversionError(f"{folder}: tokenizer.json not found; kalm-mlx needs the fast tokenizer file")
    checkpoint = read_checkpoint(folder, entry)
    check_checkpoint(checkpoint)
    bytes_before = _folder_bytes(folder)
    if dtype is not None:
        checkpoint.weights = cast_weights(checkpoint.weights, dtype)
        checkpoint.meta["dtype"] = dtype
    checkpoint.meta["source"] = str(src)
    write_folder(out, checkpoint, force)
    weights = checkpoint.weights
    return {
        "output": str(out),
        "family": checkpoint.meta["family"],
        "tensors": len(weights),
        "parameters": sum(v.size for v in weights.values()),
        "dtype": checkpoint.meta["dtype"],
        "bytes_before": bytes_before,
        "bytes_after": _folder_bytes(out),
    }
