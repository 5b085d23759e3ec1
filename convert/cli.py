"""``python -m convert SRC -o OUT`` / ``kalm-mlx-convert``: the conversion command line.

The options and their handling are those of ``kalm-mlx convert`` (:mod:`kalm_mlx.cli`).
"""

from __future__ import annotations

import argparse
import sys

from kalm_mlx.cli import add_convert_arguments, run_convert


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the conversion CLI."""
    parser = argparse.ArgumentParser(
        prog="kalm-mlx-convert",
        description="Convert a Hugging Face embedding checkpoint into a kalm-mlx folder.",
    )
    add_convert_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the conversion CLI; returns the process exit code (0, or 2 on an error)."""
    args = build_parser().parse_args(argv)
    try:
        return run_convert(args)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
