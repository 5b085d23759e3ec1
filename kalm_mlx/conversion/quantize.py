"""Q8 / Q4 affine quantization of a checkpoint, and a measure of what it costs in quality.

Every ``nn.Linear`` and ``nn.Embedding`` layer of the encoder is quantized (for KaLM-V2
the token embedding is the largest tensor), except layers whose input size the group
size does not divide; those stay in float and are named in the record and the report.
The record written into the converted config is all :func:`kalm_mlx.loading.build_model`
needs to rebuild the quantized layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..loading import (
    QUANTIZATION_GROUP_SIZES,
    Checkpoint,
    embedder_from_checkpoint,
    quantizable_modules,
    release_memory,
    resolve_dtype,
)
from ..pooling import normalize

QUANTIZE_BITS = {"q8": 8, "q4": 4}
"""``--quantize`` values and their bits per weight."""
DEFAULT_GROUP_SIZE = 64

REPORT_TEXTS = (
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "The mitochondrion is the powerhouse of the cell.",
    "How do I reverse a list in Python? Use reversed(items) or items[::-1].",
    "Quarterly revenue grew 12% while operating costs stayed flat.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "机器学习模型将文本映射为向量。",
    "ok",
)
"""The texts the conversion report embeds with the float and the quantized model."""


@dataclass
class QuantizationPlan:
    """Which layers to quantize, with how many bits and which group size."""

    bits: int
    group_size: int
    modules: list[str] = field(default_factory=list)
    """Dotted paths of the layers to quantize."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Layers left in float, with the reason."""

    @property
    def name(self) -> str:
        """The ``--quantize`` value, such as ``q8``."""
        return f"q{self.bits}"

    def record(self) -> dict:
        """The ``quantization`` entry of the converted config."""
        return {
            "mode": "affine",
            "bits": self.bits,
            "group_size": self.group_size,
            "modules": list(self.modules),
            "skipped": dict(self.skipped),
        }


def parse_quantize(quantize: str, group_size: int | None) -> tuple[int, int]:
    """Bits and group size from ``--quantize`` and ``--group-size``; ValueError naming a bad one."""
    if quantize not in QUANTIZE_BITS:
        raise ValueError(f"--quantize {quantize!r} is not one of {', '.join(QUANTIZE_BITS)}")
    if group_size is None:
        group_size = DEFAULT_GROUP_SIZE
    if isinstance(group_size, bool) or group_size not in QUANTIZATION_GROUP_SIZES:
        raise ValueError(
            f"--group-size {group_size!r} is not one of {', '.join(map(str, QUANTIZATION_GROUP_SIZES))}"
        )
    return QUANTIZE_BITS[quantize], int(group_size)


def plan_quantization(model: nn.Module, bits: int, group_size: int) -> QuantizationPlan:
    """Choose the layers of ``model`` to quantize: every Linear and Embedding the group size fits."""
    plan = QuantizationPlan(bits=bits, group_size=group_size)
    for path, layer in sorted(quantizable_modules(model).items()):
        input_size = layer.weight.shape[-1]
        if input_size % group_size:
            plan.skipped[path] = (
                f"input size {input_size} is not a multiple of group size {group_size}"
            )
        else:
            plan.modules.append(path)
    return plan


def quantize_tensor(weight: mx.array, plan: QuantizationPlan,
                    dtype: mx.Dtype | None = None) -> tuple[mx.array, mx.array, mx.array]:
    """Affine-quantize one weight matrix: (packed weight, scales, biases).

    The weight is quantized from float32 whatever its stored dtype; scales and biases are
    stored in ``dtype`` (default: the weight's own dtype).
    """
    packed, scales, biases = mx.quantize(
        weight.astype(mx.float32), group_size=plan.group_size, bits=plan.bits, mode="affine"
    )
    store = dtype or weight.dtype
    return packed, scales.astype(store), biases.astype(store)


def embedding_agreement(reference: Checkpoint, quantized: Checkpoint,
                        texts: tuple[str, ...] | list[str] = REPORT_TEXTS) -> dict:
    """Embed ``texts`` with both checkpoints and compare the vectors, text by text.

    Both run in the default compute dtype, the quantized one loaded as ``load()`` would
    by default (``quantized="auto"``). Returns ``texts`` (count), ``mean_cosine``,
    ``min_cosine``, ``worst_text`` and ``vectors`` (the quantized model's, float32).
    """
    dtype = resolve_dtype(None)
    # One model at a time, so that the float and the quantized weights never coexist.
    embedder = embedder_from_checkpoint(reference, dtype)
    reference_vectors = embedder.encode(list(texts))
    del embedder
    embedder = embedder_from_checkpoint(quantized, dtype)
    vectors = embedder.encode(list(texts))
    del embedder
    release_memory()
    cosines = np.sum(normalize(reference_vectors) * normalize(vectors), axis=1)
    worst = int(np.argmin(cosines))
    return {
        "texts": len(texts),
        "mean_cosine": float(np.mean(cosines)),
        "min_cosine": float(cosines[worst]),
        "worst_text": texts[worst],
        "vectors": vectors,
    }
