"""``python -m convert SRC -o OUT`` / ``kalm-mlx-convert``: the conversion command line."""

from __future__ import annotations

import argparse
import sys

from kalm_mlx.loading import QUANTIZATION_GROUP_SIZES

from .convert import convert
from .quantize import DEFAULT_GROUP_SIZE, QUANTIZE_BITS


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the conversion CLI (shared with ``kalm-mlx convert``)."""
    parser = argparse.ArgumentParser(
        prog="kalm-mlx-convert",
        description="Convert a Hugging Face embedding checkpoint into a kalm-mlx folder.",
    )
    parser.add_argument("src", help="local Hugging Face folder, hub id, registry name or converted folder")
    parser.add_argument("-o", "--output", required=True, help="output folder")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"],
                        help="dtype of the stored weights (default: keep the source's)")
    parser.add_argument("--quantize", choices=list(QUANTIZE_BITS),
                        help="quantize every Linear and Embedding layer to 8 or 4 bits (MLX affine)")
    parser.add_argument("--group-size", type=int, choices=list(QUANTIZATION_GROUP_SIZES),
                        help=f"weights per quantization scale and bias (default {DEFAULT_GROUP_SIZE})")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    return parser


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


def main(argv: list[str] | None = None) -> int:
    """Run the conversion CLI; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        report = convert(args.src, args.output, dtype=args.dtype, quantize=args.quantize,
                         group_size=args.group_size, force=args.force)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0
