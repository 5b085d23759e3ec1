"""The entry points that take a model's name: :func:`load` and :func:`convert`.

Both compose the layers below: :mod:`kalm_mlx.hub` turns a name into a folder (converting
a registry model into the cache on first use), then :mod:`kalm_mlx.loading` reads that
folder into an Embedder, or :mod:`kalm_mlx.conversion` writes it out as a kalm-mlx folder.
"""

from __future__ import annotations

from pathlib import Path

from .conversion import check_options, convert_folder, validate_output
from .embedder import Embedder
from .hub import resolve
from .loading import check_quantized_choice, embedder_from_checkpoint, read_checkpoint, release_memory, resolve_dtype


def load(name_or_path: str | Path, dtype: str | None = None, quantized: str = "auto") -> Embedder:
    """Load an embedding model and return an :class:`~kalm_mlx.Embedder`.

    ``name_or_path`` is a converted folder, a raw Hugging Face folder, a registry
    name or alias (``kalm-v2``, ``minilm``, ``kalm-v2-q8``...) or a hub id; a registry
    model is converted into ``~/.cache/kalm-mlx`` on first use (see :mod:`kalm_mlx.hub`).
    ``dtype`` is the compute dtype (float32, float16, bfloat16); by default float16 on a
    GPU and float32 on the CPU.

    ``quantized`` matters for folders converted with ``--quantize``: ``keep`` keeps every
    quantized layer (least memory), ``dequantize`` turns them all into ``dtype`` layers
    (fastest on the CPU), and ``auto`` keeps them all on a GPU but, on the CPU, dequantizes
    the Linear layers and keeps the embedding table quantized: MLX's CPU quantized matmul
    is ~50x slower than float32, an embedding lookup is not.
    """
    compute_dtype = resolve_dtype(dtype)
    check_quantized_choice(quantized)
    folder, entry = resolve(name_or_path, convert_missing=True)
    checkpoint = read_checkpoint(folder, entry)
    embedder = embedder_from_checkpoint(checkpoint, compute_dtype, quantized, consume=True)
    # The tensors that were cast or dequantized are garbage now; hand their memory back.
    del checkpoint
    release_memory()
    return embedder


def convert(
    src: str | Path,
    out: str | Path,
    *,
    dtype: str | None = None,
    quantize: str | None = None,
    group_size: int | None = None,
    force: bool = False,
    progress: bool | None = None,
) -> dict:
    """Convert SRC (local HF folder, hub id, registry name or converted folder) into OUT.

    The options are checked and OUT validated before SRC is looked up (so a bad option
    never waits on a download); then it is :func:`kalm_mlx.conversion.convert_folder`
    on the folder SRC names, whose report it returns. Raises ConversionError (a
    ValueError) before writing anything when an input is bad.
    """
    check_options(dtype, quantize, group_size)
    local_src = Path(src).expanduser()
    validate_output(Path(out), local_src if local_src.exists() else None, force)
    folder, entry = resolve(src)
    return convert_folder(folder, out, entry=entry, source=str(src), dtype=dtype, quantize=quantize,
                          group_size=group_size, force=force, progress=progress)
