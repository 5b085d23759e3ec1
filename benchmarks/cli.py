"""Command line of the benchmarks.

    python -m benchmarks            # full run, ~13 minutes on a quiet 2-core x86; writes benchmarks/results/
    python -m benchmarks --quick    # a few minutes; writes benchmarks/results/tmp/ (not committed)
    python -m benchmarks --model minilm   # another family: benchmarks/results/minilm/
    python -m benchmarks serve ...  # the HTTP server under load: see :mod:`benchmarks.serve`
    python -m benchmarks index ...  # the corpus job against encode(), and on Ray: see :mod:`benchmarks.index`

By default the model is a random checkpoint of KaLM-Embedding-V2's shape, generated on
first use and cached in ``$KALM_MLX_BENCH_CACHE`` or ``~/.cache/kalm-mlx-bench``
(see :mod:`benchmarks.checkpoint`). ``--model`` picks another family: ``minilm`` (the real
all-MiniLM-L6-v2 weights), ``bge-base``, ``gte-base`` or ``nomic`` (random weights in their real
shapes, cached the same way), ``kalm-v2``, or any encoder folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m benchmarks``."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="kalm-mlx against sentence-transformers/torch on the same weights and token ids.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats and texts (a few minutes); results go to benchmarks/results/tmp")
    parser.add_argument("--model", default="kalm-v2",
                        help="minilm | bge-base | gte-base | nomic | kalm-v2 (default) | an encoder folder")
    parser.add_argument("--out", type=Path, help="where results.json, results.md and the plots go")
    parser.add_argument("--no-torch", action="store_true", help="leave out the torch baseline")
    parser.add_argument("--no-onnx", action="store_true", help="leave out ONNX Runtime")
    parser.add_argument("--no-quantized", action="store_true", help="skip the q8 and q4 variants")
    parser.add_argument("--cache", type=Path, help="checkpoint cache folder (default: $KALM_MLX_BENCH_CACHE "
                                                   "or ~/.cache/kalm-mlx-bench)")
    return parser


def results_folder(model: str, quick: bool = False) -> Path:
    """Where a run's report goes: benchmarks/results/ for KaLM-V2, results/<model>/ for the others;
    under results/tmp/ for a quick run (not committed)."""
    name = Path(model).name
    if quick:
        return RESULTS / "tmp" / name
    return RESULTS if name == "kalm-v2" else RESULTS / name


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks and write the report; return the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        from benchmarks.serve import main as serve_main

        return serve_main(argv[1:])
    if argv[:1] == ["index"]:
        from benchmarks.index import main as index_main

        return index_main(argv[1:])
    args = build_parser().parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from benchmarks import checkpoint, report
    from benchmarks.run import Progress, Settings, run_benchmarks

    progress = Progress()
    settings = Settings.quick() if args.quick else Settings.full()
    if args.model in checkpoint.MODEL_CHOICES and args.model != "minilm":
        progress(f"{args.model}-shaped random checkpoint (generated on first use, then cached)")
    try:
        folder = checkpoint.benchmark_folder(args.model, args.cache)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    progress(f"model: {folder}; mode: {settings.mode}")
    results = run_benchmarks(settings, folder, with_torch=not args.no_torch, with_onnx=not args.no_onnx,
                             with_quantized=not args.no_quantized, progress=progress)
    out = args.out or results_folder(args.model, args.quick)
    for path in report.write(results, out):
        progress(f"wrote {path}")
    print(report.markdown(results))
    return 0
