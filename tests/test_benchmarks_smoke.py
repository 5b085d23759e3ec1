"""The benchmark scripts keep working: every workload once, on a tiny model. No timing is asserted."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import checkpoint, report, workloads
from benchmarks.cli import main as bench_main
from benchmarks.run import Settings, run_benchmarks

TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "intermediate_size": 128}


@pytest.fixture(scope="module")
def tiny_kalm(tmp_path_factory):
    """A tiny KaLM-shaped checkpoint (real Qwen2 tokenizer, full vocabulary, 2 layers)."""
    return checkpoint.make_kalm_shaped(tmp_path_factory.mktemp("bench") / "tiny", **TINY)


@pytest.fixture(scope="module")
def smoke_results(tiny_kalm):
    return run_benchmarks(Settings.smoke(), tiny_kalm, progress=lambda message: None)


def test_generated_checkpoint_loads_as_kalm_would(tiny_kalm):
    import kalm_mlx

    model = kalm_mlx.load(tiny_kalm)
    assert (model.dim, model.max_tokens, model.pooling) == (64, 512, "mean")
    config = json.loads((tiny_kalm / "config.json").read_text())
    assert config["vocab_size"] == 151936 and config["rope_theta"] == 1_000_000.0
    assert json.loads((tiny_kalm / "modules.json").read_text())[1]["path"] == "1_Pooling"
    assert "not quality" in (tiny_kalm / "README.md").read_text()


def test_generated_checkpoint_refuses_bad_arguments(tiny_kalm, tmp_path):
    with pytest.raises(FileExistsError):
        checkpoint.make_kalm_shaped(tiny_kalm, **TINY)
    with pytest.raises(ValueError, match="num_attention_heads"):
        checkpoint.make_kalm_shaped(tmp_path / "bad", **{**TINY, "num_attention_heads": 3})
    with pytest.raises(ValueError, match="dtype"):
        checkpoint.make_kalm_shaped(tmp_path / "bad", dtype="int8", **TINY)
    assert not (tmp_path / "bad").exists()


def test_cached_checkpoint_is_made_once(tmp_path):
    first = checkpoint.kalm_shaped_checkpoint(tmp_path, **TINY)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    again = checkpoint.kalm_shaped_checkpoint(tmp_path, **TINY)
    other_seed = checkpoint.kalm_shaped_checkpoint(tmp_path, seed=1, **TINY)
    assert again == first and (again / "model.safetensors").stat().st_mtime_ns == stamp
    assert other_seed != first


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("KALM_MLX_BENCH_CACHE", str(tmp_path))
    assert checkpoint.bench_cache_dir() == tmp_path


def test_workloads_are_deterministic_and_long_tailed():
    lengths = workloads.long_tailed_lengths(512, seed=0)
    assert lengths == workloads.long_tailed_lengths(512, seed=0)
    assert min(lengths) >= 8 and max(lengths) == 512
    assert np.median(lengths) < 64 < np.percentile(lengths, 95)
    ids = workloads.mixed_corpus(64, vocab_size=151936, seed=3)
    assert ids == workloads.mixed_corpus(64, vocab_size=151936, seed=3)
    assert all(0 <= i < workloads.FIRST_SPECIAL_ID for seq in ids for i in seq)
    assert [len(seq) for seq in workloads.fixed_batch(4, 16, 1000)] == [16] * 4


def test_flops_of_the_kalm_shape():
    shape = workloads.EncoderShape(**checkpoint.KALM_V2_SHAPE)
    # 14,909,440 projection weights a layer; 2 FLOPs each per token, 24 layers,
    # plus 4 * L^2 * hidden a layer for attention.
    assert shape.text_flops(1) == 2 * 14_909_440 * 24 + 4 * 896 * 24
    assert shape.workload_flops([[0] * 3, [0] * 5]) == shape.text_flops(3) + shape.text_flops(5)


def test_smoke_run_measures_every_workload(smoke_results):
    runtimes = smoke_results["runtimes"]
    main = [runtimes[name] for name in runtimes if runtimes[name]["main"]]
    assert [r["kind"] for r in main] == ["mlx-float32", "torch"]
    for runtime in main:
        assert runtime["short"]["runs"] == Settings.smoke().short_runs
        assert runtime["fixed"]["tokens"] == 4 * 16
        assert set(runtime["batch_scaling"]) == {"1", "4"}
        assert set(runtime["length_scaling"]) == {"8", "32"}
        assert runtime["mixed"]["texts"] == 12
        assert runtime["memory"]["peak_rss_bytes"] > runtime["memory"]["weights_bytes"] > 0
        assert runtime["gemm_gflops"] > 0 and 0 < runtime["fixed"]["mfu"]
    assert set(smoke_results["ratios"]) == {"mixed_throughput", "fixed_throughput",
                                            "short_p50_latency", "start_to_ready"}
    # Same weights, same ids: kalm-mlx and the torch reference give the same vectors.
    assert smoke_results["parity"]["max_abs_diff"] < 1e-4
    variants = [name for name in runtimes if not runtimes[name]["main"]]
    assert {"kalm-mlx q8 (auto)", "kalm-mlx q8 (keep)"} <= set(variants)
    for name in variants:
        assert "error" not in runtimes[name], runtimes[name].get("error")
        assert runtimes[name]["short"]["p50_ms"] > 0


def test_report_writes_json_markdown_and_plots(smoke_results, tmp_path):
    paths = report.write(smoke_results, tmp_path)
    assert sorted(p.name for p in paths) == ["latency.png", "results.json", "results.md",
                                             "throughput_vs_length.png"]
    assert json.loads((tmp_path / "results.json").read_text())["ratios"] == smoke_results["ratios"]
    text = (tmp_path / "results.md").read_text()
    assert report.SPEED_NOTE in text and "| mixed corpus throughput, kalm-mlx / torch |" in text
    assert smoke_results["machine"]["cpu"] in text
    for name in ("latency.png", "throughput_vs_length.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rejects_a_folder_without_config(tmp_path, capsys):
    assert bench_main(["--model", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "config.json" in capsys.readouterr().err
