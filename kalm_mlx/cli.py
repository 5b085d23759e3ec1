"""The ``kalm-mlx`` command: ``embed`` texts, list the ``models``, ``convert`` checkpoints, ``info``.

``kalm-mlx embed`` prints one JSON object per line and per text, in input order::

    {"text": "hello", "embedding": [0.0123, -0.0456, ...]}

Texts come from the arguments or, when there are none, from standard input, one per
line (read and embedded in chunks, so a long stream needs little memory). Vector
components are written with the shortest decimal form that reads back as the same
float32. Errors print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice

import numpy as np

from .api import convert
from .conversion import DEFAULT_GROUP_SIZE, QUANTIZE_BITS, format_report
from .loading import QUANTIZATION_GROUP_SIZES

DEFAULT_MODEL = "minilm"
"""The model ``embed`` uses without ``--model``: its weights ship with a package, so it works offline."""

STDIN_CHUNK = 256
"""Texts read from standard input per call to the model."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``kalm-mlx`` and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="kalm-mlx",
        description="Text embeddings with MLX: KaLM-Embedding-V2, BGE, MiniLM, GTE and Nomic.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    embed = commands.add_parser(
        "embed",
        help="embed texts and print JSON lines",
        description="Embed texts (arguments, or standard input one per line) and print one JSON "
                    'object per text: {"text": ..., "embedding": [...]}.',
    )
    embed.add_argument("texts", nargs="*", metavar="TEXT", help="texts to embed (default: read stdin)")
    embed.add_argument("-m", "--model", default=DEFAULT_MODEL,
                       help=f"registry name, hub id or folder (default: {DEFAULT_MODEL})")
    kind = embed.add_mutually_exclusive_group()
    kind.add_argument("--query", action="store_true",
                      help="embed as search queries (the model's query prompt)")
    kind.add_argument("--document", action="store_true",
                      help="embed as documents (the model's document prompt)")
    embed.add_argument("--instruction", metavar="TEXT",
                       help="query instruction or task name (retrieval, sts, classification, "
                            "clustering) for instruction-tuned models; implies --query")
    embed.add_argument("--dim", type=int, metavar="N",
                       help="keep the first N dimensions (one of the model's Matryoshka dims)")
    embed.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                       help="compute dtype (default: float16 on a GPU, float32 on the CPU)")
    embed.add_argument("--batch-size", type=int, default=32, metavar="N",
                       help="texts per batch (default: 32)")
    embed.add_argument("--quantized", choices=["auto", "keep", "dequantize"], default="auto",
                       help="for quantized folders: keep the quantized layers or dequantize them "
                            "(default auto: dequantize the Linear layers on the CPU only)")

    models = commands.add_parser(
        "models",
        help="list the known models",
        description="List the registry: dimensions, token limit, memory, opt-in, local copies.",
    )
    models.add_argument("--json", action="store_true", help="print one JSON object per model")

    info = commands.add_parser(
        "info",
        help="show versions, device, BLAS, threads, caches and converted models",
        description="Show what a bug report needs: kalm-mlx, MLX, Python and OS versions, MLX's "
                    "device, the BLAS library and its threads, CPU streams, compiled CPU paths, "
                    "the cache folders and the models converted there.",
    )
    info.add_argument("--json", action="store_true", help="print one JSON object")

    convert = commands.add_parser(
        "convert",
        help="convert a Hugging Face checkpoint (same as kalm-mlx-convert)",
        description="Convert a Hugging Face embedding checkpoint into a kalm-mlx folder.",
    )
    add_convert_arguments(convert)

    index = commands.add_parser(
        "index",
        help="embed a corpus of files into Parquet shards (resumable; --ray for a Ray cluster)",
        description="Embed every text of JSONL, Parquet, CSV/TSV or plain-text files (files, folders, "
                    "globs) into OUT/part-NNNNN.parquet (id, optional text, one vector column per "
                    "model) with OUT/_manifest.json. Run the same command again to resume.",
    )
    add_index_arguments(index)

    serve = commands.add_parser(
        "serve",
        help="run the HTTP embedding server (OpenAI's and engram-embed's API)",
        description="Serve the models of EMBED_MODELS over HTTP: POST /v1/embeddings, POST /v1/rank, "
                    "GET /v1/models, /health, /metrics. Flags override the variables named in brackets.",
    )
    add_serve_arguments(serve)
    return parser


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``serve`` options; each overrides the environment variable named in its help."""
    add = parser.add_argument
    add("--host", help="address to listen on [EMBED_HOST] (default 127.0.0.1)")
    add("--port", type=int, help="port [PORT] (default 8080)")
    add("--models", help="comma list of models, first = default, or all [EMBED_MODELS] (default bge-base)")
    add("--api-key", help="require Authorization: Bearer KEY except on /health [EMBED_API_KEY]")
    add("--preload", action="store_true", default=None,
        help="load and warm every model before the port opens [EMBED_PRELOAD=on] (default: on first use)")
    add("--max-inputs", type=int, metavar="N", help="inputs per request [EMBED_MAX_INPUTS] (default 2048)")
    add("--max-body-bytes", metavar="SIZE", help="request body limit, e.g. 32MB [EMBED_MAX_BODY_BYTES]")
    add("--max-queued-texts", type=int, metavar="N",
        help="texts waiting beyond which requests get 503 + Retry-After [EMBED_MAX_QUEUED_TEXTS] (default 8192)")
    add("--max-batch-size", type=int, metavar="N", help="texts per encoder batch [EMBED_MAX_BATCH_SIZE] (default 32)")
    add("--batch-wait-ms", type=float, metavar="MS",
        help="how long a batch may wait for the clients the last one answered [EMBED_BATCH_WAIT_MS] (default 5)")
    add("--no-batching", dest="batching", action="store_false", default=None,
        help="one request at a time per model, as engram-embed [EMBED_BATCHING=off]")
    add("--log-format", choices=["text", "json"], help="log lines as text or JSON [EMBED_LOG_FORMAT]")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``kalm-mlx``; returns the exit status (0 success, 2 error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # argparse has printed the usage or the help
        return int(exit_.code or 0)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            if args.command == "embed":
                return run_embed(args)
            if args.command == "models":
                return run_models(args)
            if args.command == "index":
                return run_index(args)
            if args.command == "info":
                return run_info(args)
            if args.command == "serve":
                from .server.run import serve_command  # the serve extra: fastapi, uvicorn

                return serve_command(args)
            return run_convert(args)
    except (ValueError, TypeError, OSError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


# --- embed ---------------------------------------------------------------------------------


def run_embed(args: argparse.Namespace) -> int:
    """``kalm-mlx embed``: load the model, embed the texts, print JSON lines."""
    import kalm_mlx

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, not {args.batch_size}")
    if not args.texts and sys.stdin.isatty():
        raise ValueError("give texts as arguments or pipe them on standard input, one per line")
    model = kalm_mlx.load(args.model, dtype=args.dtype, quantized=args.quantized)
    options = {"batch_size": args.batch_size, "truncate_dim": args.dim}
    chunks = [args.texts] if args.texts else _chunks(_stdin_lines(), STDIN_CHUNK)
    for texts in chunks:
        if args.query or args.instruction is not None:
            vectors = model.encode_queries(texts, instruction=args.instruction, **options)
        elif args.document:
            vectors = model.encode_documents(texts, **options)
        else:
            vectors = model.encode(texts, **options)
        for text, vector in zip(texts, vectors):
            sys.stdout.write(embedding_line(text, vector) + "\n")
        sys.stdout.flush()
    return 0


def embedding_line(text: str, vector: np.ndarray) -> str:
    """One JSON line ``{"text": ..., "embedding": [...]}`` with float32-exact components."""
    components = ", ".join(str(value) for value in np.asarray(vector, dtype=np.float32))
    return f'{{"text": {json.dumps(text, ensure_ascii=False)}, "embedding": [{components}]}}'


def _stdin_lines() -> Iterator[str]:
    for line in sys.stdin:
        yield line.rstrip("\r\n")


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


# --- convert -------------------------------------------------------------------------------


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the conversion options (SRC, -o OUT, --dtype, --quantize, --group-size, --force) to ``parser``.

    Shared by ``kalm-mlx convert`` and the ``kalm-mlx-convert`` / ``python -m convert`` command.
    """
    parser.add_argument("src", help="local Hugging Face folder, hub id, registry name or converted folder")
    parser.add_argument("-o", "--output", required=True, help="output folder")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"],
                        help="dtype of the stored weights (default: keep the source's)")
    parser.add_argument("--quantize", choices=list(QUANTIZE_BITS),
                        help="quantize every Linear and Embedding layer to 8 or 4 bits (MLX affine)")
    parser.add_argument("--group-size", type=int, choices=list(QUANTIZATION_GROUP_SIZES),
                        help=f"weights per quantization scale and bias (default {DEFAULT_GROUP_SIZE})")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")


def run_convert(args: argparse.Namespace) -> int:
    """Convert ``args.src`` into ``args.output`` and print the report; returns 0.

    Errors (a bad option, an unreadable checkpoint, an existing OUT) raise ValueError or OSError.
    """
    report = convert(args.src, args.output, dtype=args.dtype, quantize=args.quantize,
                     group_size=args.group_size, force=args.force)
    print(format_report(report))
    return 0


# --- models --------------------------------------------------------------------------------


def model_rows() -> list[dict]:
    """One dict per registry model: what ``kalm-mlx models`` prints."""
    from .hub import local_copies
    from .registry import list_models

    return [
        {
            "name": entry.name,
            "hub_id": entry.hub_id,
            "family": entry.family,
            "dim": entry.dim,
            "max_tokens": entry.max_tokens,
            "pooling": entry.pooling,
            "parameters": entry.parameters,
            "memory_mb_float32": round(entry.memory_bytes(4) / 1e6),
            "memory_mb_float16": round(entry.memory_bytes(2) / 1e6),
            "matryoshka_dims": list(entry.matryoshka_dims),
            "prompts": entry.prompts,
            "opt_in": entry.opt_in,
            "aliases": list(entry.aliases),
            "local": local_copies(entry),
        }
        for entry in list_models()
    ]


def run_models(args: argparse.Namespace) -> int:
    """``kalm-mlx models``: the registry as a table, or as JSON lines with ``--json``."""
    rows = model_rows()
    if args.json:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
        return 0
    header = ("NAME", "DIM", "TOKENS", "POOLING", "MB f32/f16", "OPT-IN", "LOCAL", "HUB ID")
    table = [header] + [
        (
            row["name"],
            str(row["dim"]),
            str(row["max_tokens"]),
            row["pooling"],
            f"{row['memory_mb_float32']}/{row['memory_mb_float16']}",
            "yes" if row["opt_in"] else "no",
            ",".join(row["local"]) or "-",
            row["hub_id"],
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
    return 0


# --- info ----------------------------------------------------------------------------------


def run_info(args: argparse.Namespace) -> int:
    """``kalm-mlx info``: the environment as aligned key/value lines, or one JSON object."""
    from .info import environment_report, report_lines

    report = environment_report()
    if args.json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
    else:
        print("\n".join(report_lines(report)))
    return 0


# --- index ---------------------------------------------------------------------------------


def add_index_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``index`` arguments (see :func:`kalm_mlx.corpus.embed_corpus`)."""
    add = parser.add_argument
    add("inputs", nargs="+", metavar="INPUT", help="files, folders or glob patterns")
    add("-o", "--output", required=True, metavar="OUT", help="output folder")
    add("-m", "--model", default=DEFAULT_MODEL, metavar="M[,M2...]",
        help=f"model(s), comma-separated: one vector column each (default: {DEFAULT_MODEL})")
    add("--kind", choices=["document", "query"],
        help="use the models' document or query prompt (default: document; query with --instruction)")
    add("--instruction", metavar="TEXT", help="query instruction or task name; implies --kind query")
    add("--dim", type=int, metavar="N", help="keep the first N dimensions (Matryoshka)")
    add("--dtype", choices=["float32", "float16", "bfloat16"], help="compute dtype")
    add("--text-column", default="text", metavar="NAME", help="column or JSON field of the texts (default: text)")
    add("--id-column", metavar="NAME", help="column of the row ids (default: FILE:ROW)")
    add("--keep-text", action="store_true", help="write the texts next to the vectors")
    add("--shard-rows", type=int, default=10_000, metavar="N", help="rows per Parquet shard (default: 10000)")
    add("--batch-size", type=int, default=32, metavar="N", help="texts per encoder batch (default: 32)")
    add("--skip-bad-rows", action="store_true", help="skip and count unreadable rows instead of failing")
    add("--force", action="store_true", help="start over when OUT holds a different job")
    add("-q", "--quiet", action="store_true", help="no progress bar and no summary")
    add("--ray", nargs="?", const="", metavar="ADDRESS",
        help="run on Ray Data: a cluster's address, or none for RAY_ADDRESS or a local cluster")
    add("--actors", type=int, default=1, metavar="N", help="with --ray: actors per model (default: 1)")
    add("--num-cpus", type=float, default=1.0, help="with --ray: CPUs per actor (default: 1)")
    add("--num-gpus", type=float, default=0.0, help="with --ray: GPUs per actor (default: 0)")


def run_index(args: argparse.Namespace) -> int:
    """``kalm-mlx index``: embed a corpus into Parquet shards, here or on Ray Data."""
    if args.ray is None and (args.actors, args.num_cpus, args.num_gpus) != (1, 1.0, 0.0):
        raise ValueError("--actors, --num-cpus and --num-gpus need --ray")
    options = {
        "models": args.model, "kind": args.kind or ("query" if args.instruction is not None else "document"),
        "instruction": args.instruction, "dim": args.dim, "dtype": args.dtype, "keep_text": args.keep_text,
        "shard_rows": args.shard_rows, "text_column": args.text_column, "id_column": args.id_column,
        "skip_bad_rows": args.skip_bad_rows, "force": args.force, "batch_size": args.batch_size,
        "progress": not args.quiet,
    }
    if args.ray is None:
        from .corpus import embed_corpus  # pyarrow: loaded only for this command

        embed_corpus(args.inputs, args.output, **options)
    else:
        from .ray import embed_corpus as embed_corpus_on_ray  # the ray extra

        embed_corpus_on_ray(args.inputs, args.output, address=args.ray or None, concurrency=args.actors,
                            num_cpus=args.num_cpus, num_gpus=args.num_gpus, **options)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
