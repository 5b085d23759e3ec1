"""A checkpoint folder (Hugging Face or converted) -> a self-describing MLX folder.

Names are resolved above this layer (:func:`kalm_mlx.api.convert` takes hub ids and
registry names); here SRC is a folder already.

Everything is read and checked before anything is written; the output is written to
a temporary folder beside OUT and renamed into place at the end, so an interrupted
or failed conversion leaves no half-written OUT and an existing OUT untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import mlx.core as mx

from ..loading import (
    DTYPES,
    META_KEY,
    TOKENIZER_FILES,
    Checkpoint,
    model_skeleton,
    read_checkpoint,
)
from ..registry import ModelEntry
from ..models.base import check_weights

from .quantize import (
    QuantizationPlan,
    embedding_agreement,
    parse_quantize,
    plan_quantization,
    quantize_tensor,
)

PROGRESS_MIN_BYTES = 100_000_000
"""Below this many bytes of weights a conversion is quick and shows no progress bar by default."""


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
    check_weights(model_skeleton(checkpoint), checkpoint.weights, str(checkpoint.folder))


def prepare_weights(
    weights: dict[str, mx.array],
    dtype: str | None = None,
    plan: QuantizationPlan | None = None,
    progress: bool | None = None,
) -> dict[str, mx.array]:
    """The tensors to write: cast to ``dtype`` (integer tensors kept) and quantized per ``plan``.

    Tensors are computed one at a time behind a tqdm progress bar; ``progress`` None shows
    it for checkpoints over :data:`PROGRESS_MIN_BYTES` when stderr is a terminal.
    """
    from tqdm.auto import tqdm

    target = DTYPES[dtype] if dtype is not None else None
    quantized = {f"{path}.weight": path for path in plan.modules} if plan else {}
    total = sum(value.nbytes for value in weights.values())
    if progress is None:
        # tqdm's disable=None hides the bar when stderr is not a terminal.
        disable = True if total < PROGRESS_MIN_BYTES else None
    else:
        disable = not progress
    description = f"quantizing {plan.name}" if plan else "converting"
    out: dict[str, mx.array] = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc=description, disable=disable) as bar:
        for name, value in weights.items():
            if name in quantized:
                layer = quantized[name]
                new = dict(zip((name, f"{layer}.scales", f"{layer}.biases"),
                               quantize_tensor(value, plan, target)))
            elif target is not None and mx.issubdtype(value.dtype, mx.floating):
                new = {name: value.astype(target)}
            else:
                new = {name: value}
            mx.eval(list(new.values()))
            out.update(new)
            bar.update(value.nbytes)
    return out


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


def check_options(dtype: str | None, quantize: str | None,
                  group_size: int | None) -> tuple[int, int] | None:
    """Check ``--dtype``, ``--quantize`` and ``--group-size``; return (bits, group size) or None.

    Raises ConversionError naming the bad option.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if quantize is None and group_size is not None:
        raise ConversionError("--group-size applies only with --quantize q8|q4")
    if quantize is None:
        return None
    try:
        return parse_quantize(quantize, group_size)
    except ValueError as err:
        raise ConversionError(str(err)) from None


def convert_folder(
    folder: str | Path,
    out: str | Path,
    *,
    entry: ModelEntry | None = None,
    source: str | None = None,
    dtype: str | None = None,
    quantize: str | None = None,
    group_size: int | None = None,
    force: bool = False,
    progress: bool | None = None,
) -> dict:
    """Convert the checkpoint in ``folder`` (Hugging Face or converted) into OUT.

    ``entry`` is the registry entry the folder holds, when known; ``source`` is what is
    recorded as the model's source (default: the folder). ``dtype`` casts the stored
    weights (default: keep the source's dtype). ``quantize`` (``q8`` or ``q4``) quantizes
    every Linear and Embedding layer with ``group_size`` (32, 64 or 128; default 64),
    skipping layers whose input size it does not divide. ``progress`` shows a progress
    bar (None: for large checkpoints on a terminal).

    Returns a report dict: output, family, tensors, parameters, dtype, bytes_before,
    bytes_after, quantization (None, or bits, group_size, modules and skipped as in the
    config) and quality (None, or the agreement of quantized and float embeddings on
    built-in texts: texts, mean_cosine, min_cosine, worst_text and the quantized vectors).
    Raises ConversionError (a ValueError) before writing anything when an input is bad.
    """
    bits_and_group = check_options(dtype, quantize, group_size)
    folder = Path(folder)
    out = validate_output(Path(out), folder, force)
    if not (folder / "tokenizer.json").exists():
        raise ConversionError(f"{folder}: tokenizer.json not found; kalm-mlx needs the fast tokenizer file")
    checkpoint = read_checkpoint(folder, entry)
    check_checkpoint(checkpoint)
    plan = None
    if bits_and_group is not None:
        plan = _plan(checkpoint, *bits_and_group)
    bytes_before = _folder_bytes(folder)
    meta = dict(checkpoint.meta, source=source or str(folder))
    if dtype is not None:
        meta["dtype"] = dtype
    if plan is not None:
        meta["quantization"] = plan.record()
    converted = replace(checkpoint, meta=meta,
                        weights=prepare_weights(checkpoint.weights, dtype, plan, progress))
    quality = None
    if plan is not None:
        check_checkpoint(converted)
        quality = embedding_agreement(checkpoint, converted)
    write_folder(out, converted, force)
    return {
        "output": str(out),
        "family": meta["family"],
        "tensors": len(converted.weights),
        "parameters": sum(v.size for v in checkpoint.weights.values()),
        "dtype": meta["dtype"],
        "bytes_before": bytes_before,
        "bytes_after": _folder_bytes(out),
        "quantization": meta.get("quantization"),
        "quality": quality,
    }


def _plan(checkpoint: Checkpoint, bits: int, group_size: int) -> QuantizationPlan:
    """The quantization plan for a checkpoint; ConversionError when it cannot be quantized."""
    existing = checkpoint.meta.get("quantization")
    if existing:
        raise ConversionError(
            f"{checkpoint.folder} is already quantized (q{existing.get('bits')}, group size "
            f"{existing.get('group_size')}); convert from its float folder or the original checkpoint"
        )
    plan = plan_quantization(model_skeleton(checkpoint), bits, group_size)
    if not plan.modules:
        raise ConversionError(
            f"no layer of {checkpoint.folder} has an input size that is a multiple of "
            f"group size {group_size}; try a smaller --group-size"
        )
    return plan


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def format_report(report: dict) -> str:
    """Human-readable lines for a conversion report."""
    lines = [
        f"wrote {report['output']}",
        f"  family {report['family']}, {report['tensors']} tensors, "
        f"{report['parameters']:,} parameters, dtype {report['dtype']}",
        f"  on disk: {_human_bytes(report['bytes_before'])} -> {_human_bytes(report['bytes_after'])}",
    ]
    quantization = report.get("quantization")
    if quantization:
        modules, skipped = quantization["modules"], quantization.get("skipped") or {}
        lines.append(
            f"  quantized q{quantization['bits']}, group size {quantization['group_size']}: "
            f"{len(modules)} of {len(modules) + len(skipped)} Linear/Embedding layers"
        )
        for path, reason in skipped.items():
            lines.append(f"  kept in float: {path} ({reason})")
    quality = report.get("quality")
    if quality:
        lines.append(
            f"  cosine to the float model on {quality['texts']} built-in texts: "
            f"mean {quality['mean_cosine']:.5f}, worst {quality['min_cosine']:.5f}"
        )
    return "\n".join(lines)
