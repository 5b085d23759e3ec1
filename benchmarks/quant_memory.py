"""Disk size and peak memory of a full-size KaLM-V2-shaped model: float16, q8 and q4.

    python benchmarks/quant_memory.py [--cache-dir DIR] [--texts 8] [--words 24]

Takes the random checkpoint of KaLM-Embedding-V2's shape that benchmarks/checkpoint.py
makes and caches (Qwen2-0.5B: hidden 896, 24 layers, 14 heads over 2 KV heads,
intermediate 4864, vocabulary 151,936; float16 safetensors, about 1 GB), converts it with
``python -m convert --quantize q8|q4`` beside it, then loads and encodes each variant in
a fresh subprocess, so that no peak mixes with another, and prints a markdown table:
bytes on disk, bytes of the loaded weights, and the peaks of MLX's allocator
(``mx.get_peak_memory``) and of the process's resident set (VmHWM) while loading and
while encoding. The random weights say nothing about real quality; the cosines the
conversion prints are reported for what they are.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kalm_mlx  # noqa: E402  (OpenBLAS before mlx.core)
import mlx.core as mx  # noqa: E402

from benchmarks.checkpoint import bench_cache_dir, kalm_shaped_checkpoint  # noqa: E402
from benchmarks.runtimes import peak_rss_bytes  # noqa: E402

# (row label, folder name, load dtype, quantized mode)
ROWS = [
    ("float16 folder, float32 compute (CPU default)", "float16", "float32", "auto"),
    ("float16 folder, float16 compute", "float16", "float16", "auto"),
    ("q8, keep (all layers quantized)", "q8", "float32", "keep"),
    ("q8, auto (CPU: float Linear, quantized embedding)", "q8", "float32", "auto"),
    ("q4, keep (all layers quantized)", "q4", "float32", "keep"),
    ("q4, auto (CPU: float Linear, quantized embedding)", "q4", "float32", "auto"),
]
WORDS = ("memory model vector search query document embedding token layer weight "
         "apple silicon metal quantized float cosine retrieval ranking language text").split()


def sample_texts(count: int, words: int) -> list[str]:
    """``count`` different texts of ``words`` words each (deterministic)."""
    return [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(words)) for i in range(count)]


def _proc_status(field: str) -> int:
    """A memory field of /proc/self/status in bytes (Linux), or -1."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return -1


def _reset_rss_peak() -> bool:
    """Reset the process's peak resident set (VmHWM) on Linux; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_peak() -> int:
    peak = _proc_status("VmHWM")
    return peak if peak >= 0 else peak_rss_bytes()


def measure(folder: Path, dtype: str, quantized: str, texts: int, words: int) -> dict:
    """Load and encode in this process; returns bytes and peaks (run it in a fresh process)."""
    batch = sample_texts(texts, words)
    rss_before = _proc_status("VmRSS")
    _reset_rss_peak()
    mx.reset_peak_memory()
    start = time.perf_counter()
    model = kalm_mlx.load(folder, dtype=dtype, quantized=quantized)
    load_s = time.perf_counter() - start
    result = {
        "weight_bytes": model.nbytes,
        "rss_before_load": rss_before,
        "load_mlx_peak": mx.get_peak_memory(),
        "load_rss_peak": _rss_peak(),
        "load_s": load_s,
    }
    rss_peak_reset = _reset_rss_peak()
    mx.reset_peak_memory()
    start = time.perf_counter()
    vectors = model.encode(batch, batch_size=len(batch))
    result.update({
        "encode_mlx_peak": mx.get_peak_memory(),
        "encode_rss_peak": _rss_peak() if rss_peak_reset else -1,
        "encode_s": time.perf_counter() - start,
        "tokens": sum(len(ids) for ids in model.tokenize(batch)),
        "finite": bool(vectors.size and (abs(vectors) < 2).all()),
    })
    return result


def folder_bytes(folder: Path) -> int:
    """Bytes of the safetensors files of a folder."""
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _gb(n: int) -> str:
    return "n/a" if n < 0 else f"{n / 1e9:.2f}"


def table(rows: list[dict]) -> str:
    """The markdown table of measured rows."""
    lines = [
        "| variant | on disk (GB) | loaded weights (GB) | load peak MLX / RSS (GB) "
        "| encode peak MLX / RSS (GB) | encode peak RSS / weights | same, above the RSS before loading "
        "| encode (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        peak, weights = r["encode_rss_peak"], r["weight_bytes"]
        ratio = f"{peak / weights:.2f}x" if peak > 0 else "n/a"
        above = f"{(peak - r['rss_before_load']) / weights:.2f}x" if peak > 0 else "n/a"
        lines.append(
            f"| {r['label']} | {_gb(r['disk_bytes'])} | {_gb(weights)} "
            f"| {_gb(r['load_mlx_peak'])} / {_gb(r['load_rss_peak'])} "
            f"| {_gb(r['encode_mlx_peak'])} / {_gb(peak)} | {ratio} | {above} | {r['encode_s']:.1f} |"
        )
    return "\n".join(lines)


def _run(args: list[str]) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def main(argv: list[str] | None = None) -> int:
    """Generate, convert, measure each variant in its own process, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where the ~1.8 GB of checkpoints are kept for reruns "
                             "(default: $KALM_MLX_BENCH_CACHE or ~/.cache/kalm-mlx-bench)")
    parser.add_argument("--texts", type=int, default=8, help="texts encoded in one batch")
    parser.add_argument("--words", type=int, default=24, help="words per text")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--quantized", default="auto", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:  # the child process: one load and one encode
        print(json.dumps(measure(args.measure, args.dtype, args.quantized, args.texts, args.words)))
        return 0

    cache = args.cache_dir or bench_cache_dir()
    print(f"the random KaLM-V2-shaped float16 checkpoint (made once, in {cache})", file=sys.stderr)
    source = kalm_shaped_checkpoint(cache)
    folders = {"float16": source}
    for name in ("q8", "q4"):
        folders[name] = source.with_name(f"{source.name}-{name}")
        if not (folders[name] / "config.json").exists():
            print(_run(["-m", "convert", str(source), "-o", str(folders[name]), "--quantize", name]),
                  file=sys.stderr)
    rows = []
    for label, folder_name, dtype, quantized in ROWS:
        print(f"measuring: {label}", file=sys.stderr)
        out = _run([str(Path(__file__).resolve()), "--measure", str(folders[folder_name]),
                    "--dtype", dtype, "--quantized", quantized,
                    "--texts", str(args.texts), "--words", str(args.words)])
        row = json.loads(out.strip().splitlines()[-1])
        rows.append({"label": label, "disk_bytes": folder_bytes(folders[folder_name]), **row})
    print(f"{args.texts} texts, {rows[0]['tokens']} tokens in one batch; "
          f"{platform.machine()}, {platform.system()}, MLX {mx.__version__}, "
          f"device {mx.default_device()}, {time.strftime('%Y-%m-%d')}\n")
    print(table(rows))
    print("\n" + json.dumps(rows, indent=1), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
