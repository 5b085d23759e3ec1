"""The benchmark run: workers, workloads, interleaved timings, one results dict.

Every runtime lives in its own worker process (:mod:`benchmarks.worker`). The main runtimes
(kalm-mlx in its default dtype, the torch baseline and ONNX Runtime) are measured
interleaved, one repetition of one runtime after the other, so that a change in the
machine's load hits all alike. Variants (quantized folders) are measured afterwards, each alone.
"""

from __future__ import annotations

import base64
import datetime
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import workloads
from .runtimes import bench_cache_dir, machine_info

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Settings:
    """Sizes of every workload; :meth:`full`, :meth:`quick` and :meth:`smoke` are the presets."""

    mode: str
    short_length: int = 16
    short_warmup: int = 3
    short_runs: int = 40
    short_batch_texts: int = 32
    """The short-text batch: this many texts of 8-24 tokens (queries, memories) in one call."""
    short_batch_runs: int = 10
    fixed_texts: int = 32
    fixed_length: int = 128
    fixed_repeats: int = 3
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    lengths: tuple[int, ...] = (16, 32, 64, 128, 256, 512)
    tokens_per_length_point: int = 2048
    scaling_repeats: int = 2
    mixed_texts: int = 512
    mixed_repeats: int = 3
    """Timed passes over the mixed corpus (one pass moves by up to 30 % run to run) ..."""
    mixed_budget_s: float = 300.0
    """... unless another round of passes would take the runtimes past this many seconds."""
    batch_size: int = 32
    variant_short_runs: int = 10
    variant_budget_s: float = 120.0
    """A variant skips a workload its short-text speed says would take longer than this."""
    quantized: tuple[str, ...] = ("q8", "q4")
    quantized_modes: tuple[str, ...] = ("auto", "keep")
    seed: int = 0

    @classmethod
    def full(cls) -> "Settings":
        """Every workload at the issue's sizes: about 13 minutes on a quiet 2-core x86."""
        return cls(mode="full")

    @classmethod
    def quick(cls) -> "Settings":
        """A few minutes: fewer repeats, points and texts (128 in the mixed corpus)."""
        return cls(mode="quick", short_runs=20, short_batch_runs=5, fixed_repeats=1, scaling_repeats=1,
                   batch_sizes=(1, 4, 16, 32), lengths=(32, 128, 512), tokens_per_length_point=1024,
                   mixed_texts=128, mixed_repeats=2, mixed_budget_s=120.0, variant_short_runs=3,
                   variant_budget_s=45.0)

    @classmethod
    def smoke(cls) -> "Settings":
        """Seconds on a tiny model: every workload once, for the smoke test."""
        return cls(mode="smoke", short_length=8, short_warmup=1, short_runs=3, short_batch_texts=6,
                   short_batch_runs=2, fixed_texts=4,
                   fixed_length=16, fixed_repeats=1, scaling_repeats=1, batch_sizes=(1, 4),
                   lengths=(8, 32), tokens_per_length_point=64, mixed_texts=12, mixed_repeats=2,
                   variant_short_runs=2, quantized=("q8",), variant_budget_s=30.0)


class WorkerError(RuntimeError):
    """A worker answered a request with an error."""


class Worker:
    """A runtime in a child process, answering JSON requests (see :mod:`benchmarks.worker`)."""

    def __init__(self, name: str, kind: str, folder: Path, log_dir: Path):
        self.name, self.kind, self.folder = name, kind, folder
        self.log_path = log_dir / f"{name.replace(' ', '_').replace('/', '_')}.log"
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.worker", kind, str(folder)],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
        )

    def request(self, op: str, **fields) -> dict:
        """Send one request and wait for its answer; WorkerError if the worker failed."""
        self.process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise WorkerError(f"{self.name}: worker exited (see {self.log_path})")
        answer = json.loads(line)
        if "error" in answer:
            raise WorkerError(f"{self.name}: {answer['error']}")
        return answer

    def embed(self, ids: list[list[int]], batch_size: int, vectors: bool = False):
        """Seconds to embed ``ids`` (and the vectors, when asked)."""
        answer = self.request("embed", ids=ids, batch_size=batch_size, vectors=vectors)
        if not vectors:
            return answer["seconds"]
        array = np.frombuffer(base64.b64decode(answer["vectors"]), dtype="<f4").reshape(answer["shape"])
        return answer["seconds"], array

    def close(self) -> None:
        """Ask the worker to exit, and make sure it does."""
        try:
            if self.process.poll() is None:
                self.request("exit")
            self.process.wait(timeout=30)
        except (WorkerError, OSError, subprocess.TimeoutExpired, ValueError):
            self.process.kill()
        finally:
            self._log.close()


@dataclass
class RuntimeSpec:
    """A row of the results: display name, worker kind, folder, and whether it is measured interleaved."""

    name: str
    kind: str
    folder: Path
    main: bool = True
    results: dict = field(default_factory=dict)


class Progress:
    """Timestamped progress lines on stderr."""

    def __init__(self, quiet: bool = False):
        self.start = time.perf_counter()
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.start:7.1f}s] {message}", file=sys.stderr, flush=True)


def _warm_page_cache(folder: Path) -> None:
    """Read the weights once so that no runtime's load time pays for the disk."""
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def quantized_folder(source: Path, quantize: str) -> Path:
    """``source`` converted with ``--quantize`` (q8 or q4), cached beside it (in the benchmark
    cache when ``source`` lies elsewhere, such as an installed package)."""
    cache = bench_cache_dir().resolve()
    inside = cache in Path(source).resolve().parents
    out = (source.with_name(f"{source.name}-{quantize}") if inside
           else cache / "quantized" / f"{source.name}-{quantize}")
    if not (out / "config.json").exists():
        from kalm_mlx.api import convert

        out.parent.mkdir(parents=True, exist_ok=True)
        convert(source, out, quantize=quantize)
    return out


def _timed_runs(specs: list[RuntimeSpec], run, repeats: int, pause: float,
                budget_s: float | None = None) -> dict[str, list[float]]:
    """``run(spec) -> seconds`` ``repeats`` times, alternating between runtimes.

    With ``budget_s``, stops early (after at least one round) when one more round, as
    long as the last, would end past ``budget_s`` seconds.
    """
    times = {spec.name: [] for spec in specs}
    started = time.perf_counter()
    for _ in range(repeats):
        round_started = time.perf_counter()
        for spec in specs:
            if pause:
                time.sleep(pause)  # let the other process's BLAS threads go idle
            times[spec.name].append(run(spec))
        now = time.perf_counter()
        if budget_s is not None and (now - started) + (now - round_started) > budget_s:
            break
    return times


def _model_max_tokens(folder: Path, config: dict) -> int:
    """The folder's token limit: sentence-transformers' max_seq_length, else its positions, at most 512."""
    st_config = folder / "sentence_bert_config.json"
    if st_config.exists() and json.loads(st_config.read_text()).get("max_seq_length"):
        return min(512, int(json.loads(st_config.read_text())["max_seq_length"]))
    return min(512, int(config.get("max_position_embeddings") or 512))


def _prepare_onnx(folder: Path, progress) -> str | None:
    """Export ``folder`` to ONNX in a child process (cached); None when done, else why not."""
    progress("ONNX export (torch.onnx, opset 17; cached after the first run)")
    script = ("import sys; from benchmarks.runtimes import export_onnx; "
              "print(export_onnx(sys.argv[1]))")
    done = subprocess.run([sys.executable, "-c", script, str(folder)], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        return f"ONNX Runtime: not measured, the export failed ({last[:300]})"
    return None


def _throughput(seconds: list[float], ids: list[list[int]], shape: workloads.EncoderShape) -> dict:
    best = min(seconds)
    tokens = sum(len(seq) for seq in ids)
    return {
        "seconds": [round(s, 4) for s in seconds],
        "best_s": round(best, 4),
        "texts": len(ids),
        "tokens": tokens,
        "flops": shape.workload_flops(ids),
        "tokens_per_s": round(tokens / best, 2),
        "texts_per_s": round(len(ids) / best, 2),
    }


def run_benchmarks(settings: Settings, folder: Path, *, with_torch: bool = True,
                   with_onnx: bool = True, with_quantized: bool = True,
                   progress: Progress | None = None) -> dict:
    """Run every workload and return the results dict that :mod:`benchmarks.report` writes out."""
    progress = progress or Progress()
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    shape = workloads.EncoderShape.from_config(config)
    vocab = shape.vocab_size
    seed = settings.seed

    import kalm_mlx  # noqa: F401  (OpenBLAS before mlx.core)
    import mlx.core as mx

    on_gpu = mx.default_device() == mx.gpu
    main_dtype = "float16" if on_gpu else "float32"
    family = config.get("model_type")
    specs = [RuntimeSpec(f"kalm-mlx {main_dtype}", f"mlx-{main_dtype}", folder)]
    if with_torch:
        torch_name = ("torch float32 (ST-equivalent)" if family == "qwen2"
                      else "sentence-transformers float32")
        specs.append(RuntimeSpec(torch_name, "torch", folder))
    variants: list[RuntimeSpec] = []
    notes: list[str] = []
    if with_onnx:
        failed = _prepare_onnx(folder, progress)
        if failed:
            notes.append(failed)
            progress(f"  {failed}")
        else:
            specs.append(RuntimeSpec("ONNX Runtime float32", "onnx", folder))
    if on_gpu:
        variants.append(RuntimeSpec("kalm-mlx float32", "mlx-float32", folder, main=False))
    if with_quantized:
        for quantize in settings.quantized:
            try:
                progress(f"preparing the {quantize} folder (converted once, then cached)")
                qfolder = quantized_folder(folder, quantize)
            except Exception as err:  # conversion not available: report, do not fail the run
                notes.append(f"{quantize}: not measured, conversion failed ({type(err).__name__}: {err})")
                continue
            for mode in settings.quantized_modes:
                variants.append(RuntimeSpec(f"kalm-mlx {quantize} ({mode})",
                                            f"mlx-{main_dtype}-{mode}", qfolder, main=False))

    results = {
        "settings": asdict(settings),
        "model": {"folder": str(folder), "family": family, "shape": asdict(shape),
                  "flops_per_token_128": shape.text_flops(128) // 128},
        "machine": machine_info(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "notes": notes,
        "runtimes": {},
        "workloads": {},
    }
    log_dir = Path(tempfile.mkdtemp(prefix="kalm-mlx-bench-logs-"))
    progress(f"worker logs in {log_dir}")
    for spec in specs + variants:
        _warm_page_cache(spec.folder)

    short_ids = workloads.random_ids([settings.short_length], vocab, seed)
    fixed_ids = workloads.fixed_batch(settings.fixed_texts, settings.fixed_length, vocab, seed + 1)
    short_batch_ids = workloads.short_texts(settings.short_batch_texts, vocab, seed + 3)
    mixed_ids = workloads.mixed_corpus(settings.mixed_texts, vocab, seed + 2,
                                       high=min(_model_max_tokens(folder, config), max(settings.lengths)))
    results["workloads"]["mixed"] = {"lengths": workloads.length_distribution(mixed_ids)}

    workers: dict[str, Worker] = {}
    try:
        progress("loading the main runtimes: " + ", ".join(spec.name for spec in specs))
        for spec in specs:
            workers[spec.name] = _start(spec, log_dir, progress)
        _measure_main(specs, workers, settings, shape, short_ids, short_batch_ids, fixed_ids, mixed_ids,
                      results, progress)
        for spec in specs:
            spec.results["memory"] = workers[spec.name].request("memory")
            workers.pop(spec.name).close()
        for spec in variants:
            progress(f"variant {spec.name}")
            try:
                workers[spec.name] = _start(spec, log_dir, progress)
                _measure_variant(spec, workers[spec.name], settings, shape, short_ids, fixed_ids, progress)
                spec.results["memory"] = workers[spec.name].request("memory")
            except WorkerError as err:
                spec.results["error"] = str(err)
                progress(f"  {spec.name} failed: {err}")
            finally:
                if spec.name in workers:
                    workers.pop(spec.name).close()
    finally:
        for worker in workers.values():
            worker.close()
    for spec in specs + variants:
        results["runtimes"][spec.name] = {"kind": spec.kind, "folder": str(spec.folder),
                                          "main": spec.main, **spec.results}
    _derive(results, specs, shape)
    progress("done")
    return results


def _start(spec: RuntimeSpec, log_dir: Path, progress: Progress) -> Worker:
    started = time.perf_counter()
    worker = Worker(spec.name, spec.kind, spec.folder, log_dir)
    load = worker.request("load")
    spec.results["load_s"] = round(load["seconds"], 3)
    spec.results["start_to_ready_s"] = round(time.perf_counter() - started, 3)
    spec.results["rss_after_load_bytes"] = load["rss_bytes"]
    spec.results["info"] = worker.request("info")
    spec.results["gemm_gflops"] = round(worker.request("gemm")["gflops"], 1)
    progress(f"  {spec.name}: loaded in {load['seconds']:.1f}s, "
             f"float32 GEMM peak {spec.results['gemm_gflops']:.0f} GFLOP/s")
    return worker


def _latency(specs, workers, ids, warmup, runs, progress) -> None:
    for spec in specs:
        for _ in range(warmup):
            workers[spec.name].embed(ids, 1)
    times = _timed_runs(specs, lambda spec: workers[spec.name].embed(ids, 1), runs, pause=0.2)
    for spec in specs:
        ms = np.array(times[spec.name]) * 1000
        spec.results["short"] = {"tokens": len(ids[0]), "runs": len(ms),
                                 "p50_ms": round(float(np.percentile(ms, 50)), 2),
                                 "p95_ms": round(float(np.percentile(ms, 95)), 2),
                                 "min_ms": round(float(ms.min()), 2)}
        progress(f"  {spec.name}: p50 {spec.results['short']['p50_ms']:.1f} ms, "
                 f"p95 {spec.results['short']['p95_ms']:.1f} ms")


def _measure_main(specs, workers, settings, shape, short_ids, short_batch_ids, fixed_ids, mixed_ids,
                  results, progress):
    batch = settings.batch_size
    progress(f"short text ({settings.short_length} tokens): {settings.short_runs} runs each, interleaved")
    _latency(specs, workers, short_ids, settings.short_warmup, settings.short_runs, progress)

    progress(f"short batch ({len(short_batch_ids)} texts of 8-24 tokens): "
             f"{settings.short_batch_runs} runs each, interleaved")
    for spec in specs:
        workers[spec.name].embed(short_batch_ids, batch)
    times = _timed_runs(specs, lambda spec: workers[spec.name].embed(short_batch_ids, batch),
                        settings.short_batch_runs, pause=0.2)
    for spec in specs:
        result = _throughput(times[spec.name], short_batch_ids, shape)
        result["p50_ms"] = round(float(np.percentile(times[spec.name], 50)) * 1000, 2)
        spec.results["short_batch"] = result
        progress(f"  {spec.name}: {result['texts_per_s']:.0f} texts/s (best), p50 {result['p50_ms']:.1f} ms")

    progress(f"fixed batch ({settings.fixed_texts} x {settings.fixed_length} tokens): "
             f"1 warm-up + {settings.fixed_repeats} runs each")
    vectors = {}
    for spec in specs:
        _, vectors[spec.name] = workers[spec.name].embed(fixed_ids, batch, vectors=True)
    times = _timed_runs(specs, lambda spec: workers[spec.name].embed(fixed_ids, batch),
                        settings.fixed_repeats, pause=0.2)
    for spec in specs:
        spec.results["fixed"] = _throughput(times[spec.name], fixed_ids, shape)
        progress(f"  {spec.name}: {spec.results['fixed']['tokens_per_s']:.0f} tokens/s")
    mine = vectors[specs[0].name]
    for spec in specs[1:]:
        reference = vectors[spec.name]
        parity = {"max_abs_diff": float(np.abs(mine - reference).max()),
                  "min_cosine": float((mine * reference).sum(axis=1).min())}
        spec.results["parity"] = parity
        if spec is specs[1]:
            results["parity"] = parity
        progress(f"  same vectors as {spec.name}? max |diff| {parity['max_abs_diff']:.2e}, "
                 f"min cosine {parity['min_cosine']:.6f}")

    progress(f"scaling with batch size at {settings.fixed_length} tokens: {settings.batch_sizes}")
    for spec in specs:
        spec.results["batch_scaling"] = {}
    for size in settings.batch_sizes:
        if size == settings.fixed_texts:
            for spec in specs:
                spec.results["batch_scaling"][str(size)] = spec.results["fixed"]
            continue
        ids = fixed_ids[:size] if size <= len(fixed_ids) else workloads.fixed_batch(
            size, settings.fixed_length, shape.vocab_size, settings.seed + 1)
        times = _timed_runs(specs, lambda spec: workers[spec.name].embed(ids, batch),
                            settings.scaling_repeats, pause=0.2)
        for spec in specs:
            spec.results["batch_scaling"][str(size)] = _throughput(times[spec.name], ids, shape)

    progress(f"scaling with length: {settings.lengths}, ~{settings.tokens_per_length_point} tokens each")
    for spec in specs:
        spec.results["length_scaling"] = {}
    for length in settings.lengths:
        count = max(1, settings.tokens_per_length_point // length)
        ids = workloads.fixed_batch(count, length, shape.vocab_size, settings.seed + length)
        times = _timed_runs(specs, lambda spec: workers[spec.name].embed(ids, batch),
                            settings.scaling_repeats, pause=0.2)
        for spec in specs:
            spec.results["length_scaling"][str(length)] = _throughput(times[spec.name], ids, shape)
        progress("  " + ", ".join(f"{spec.name} {spec.results['length_scaling'][str(length)]['tokens_per_s']:.0f}"
                                  for spec in specs) + f" tokens/s at {length}")

    stats = results["workloads"]["mixed"]["lengths"]
    progress(f"mixed corpus: {stats['texts']} texts, {stats['tokens']} tokens "
             f"(mean {stats['mean']}, p90 {stats['p90']}, max {stats['max']}), batch_size {batch}")
    warm = mixed_ids[:8]
    for spec in specs:
        workers[spec.name].embed(warm, batch)
    times = _timed_runs(specs, lambda spec: workers[spec.name].embed(mixed_ids, batch),
                        settings.mixed_repeats, pause=0.2, budget_s=settings.mixed_budget_s)
    for spec in specs:
        spec.results["mixed"] = _throughput(times[spec.name], mixed_ids, shape)
        progress(f"  {spec.name}: {spec.results['mixed']['tokens_per_s']:.0f} tokens/s, "
                 f"{spec.results['mixed']['texts_per_s']:.1f} texts/s (best of "
                 f"{len(times[spec.name])} passes)")


def _measure_variant(spec, worker, settings, shape, short_ids, fixed_ids, progress):
    _latency([spec], {spec.name: worker}, short_ids, 1, settings.variant_short_runs, progress)
    tokens_per_s = settings.short_length / (spec.results["short"]["p50_ms"] / 1000)
    fixed_tokens = settings.fixed_texts * settings.fixed_length
    estimate = fixed_tokens / tokens_per_s
    if estimate > settings.variant_budget_s:
        spec.results["fixed"] = {"skipped": f"estimated {estimate:.0f} s at {tokens_per_s:.1f} tokens/s "
                                            f"(short text), over the {settings.variant_budget_s:.0f} s budget"}
        progress(f"  fixed batch skipped: {spec.results['fixed']['skipped']}")
        return
    times = _timed_runs([spec], lambda s: worker.embed(fixed_ids, settings.batch_size), 1, pause=0.0)
    spec.results["fixed"] = _throughput(times[spec.name], fixed_ids, shape)
    progress(f"  fixed batch: {spec.results['fixed']['tokens_per_s']:.0f} tokens/s")


def _mfu(result: dict, peak_gflops: float) -> float | None:
    if not peak_gflops or "best_s" not in result:
        return None
    return round(result["flops"] / result["best_s"] / (peak_gflops * 1e9), 3)


def _derive(results: dict, specs: list[RuntimeSpec], shape: workloads.EncoderShape) -> None:
    """Add MFU to every throughput result and the kalm-mlx / torch ratios of the main pair."""
    for runtime in results["runtimes"].values():
        peak = runtime.get("gemm_gflops")
        for key in ("fixed", "mixed"):
            if isinstance(runtime.get(key), dict) and "best_s" in runtime[key]:
                runtime[key]["mfu"] = _mfu(runtime[key], peak)
        for key in ("batch_scaling", "length_scaling"):
            for point in runtime.get(key, {}).values():
                point["mfu"] = _mfu(point, peak)
    if len(specs) < 2:
        return
    mine = results["runtimes"][specs[0].name]
    for spec in specs[1:]:
        other = results["runtimes"][spec.name]
        ratios = {
            "mixed_throughput": round(mine["mixed"]["tokens_per_s"] / other["mixed"]["tokens_per_s"], 3),
            "fixed_throughput": round(mine["fixed"]["tokens_per_s"] / other["fixed"]["tokens_per_s"], 3),
            "short_batch_throughput": round(mine["short_batch"]["texts_per_s"]
                                            / other["short_batch"]["texts_per_s"], 3),
            "short_p50_latency": round(mine["short"]["p50_ms"] / other["short"]["p50_ms"], 3),
            "start_to_ready": round(mine["start_to_ready_s"] / other["start_to_ready_s"], 3),
        }
        if spec.kind == "torch":
            results["ratios"] = ratios
        else:
            results.setdefault("ratios_vs", {})[spec.name] = ratios
