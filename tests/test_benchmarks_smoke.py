"""The benchmark scripts keep working: every workload once, on a tiny model. No timing is asserted."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks import checkpoint, report, runtimes, workloads
from benchmarks.cli import main as bench_main
from benchmarks.cli import results_folder
from benchmarks.run import RuntimeSpec, Settings, _timed_runs, run_benchmarks

TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "intermediate_size": 128}
TINY_BERT = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}


@pytest.fixture(scope="module")
def tiny_kalm(tmp_path_factory):
    """A tiny KaLM-shaped checkpoint (real Qwen2 tokenizer, full vocabulary, 2 layers)."""
    return checkpoint.make_kalm_shaped(tmp_path_factory.mktemp("bench") / "tiny", **TINY)


@pytest.fixture(scope="module")
def smoke_results(tiny_kalm, bench_cache):
    return run_benchmarks(Settings.smoke(), tiny_kalm, progress=lambda message: None)


@pytest.fixture(scope="module")
def bench_cache(tmp_path_factory):
    """An empty benchmark cache (ONNX exports, tiny BERT-family checkpoints) for this module."""
    cache = tmp_path_factory.mktemp("bench-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KALM_MLX_BENCH_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="module")
def tiny_bert_family(bench_cache):
    """Tiny random checkpoints of the bge-base, gte-base and nomic layouts, by name."""
    return {name: checkpoint.bert_family_checkpoint(name, **TINY_BERT) for name in checkpoint.BERT_FAMILY_SHAPES}


@pytest.fixture(scope="module")
def bert_smoke_results(tiny_bert_family):
    return run_benchmarks(Settings.smoke(), tiny_bert_family["bge-base"], with_quantized=False,
                          progress=lambda message: None)


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
    assert [r["kind"] for r in main] == ["mlx-float32", "torch", "onnx"]
    for runtime in main:
        assert runtime["short"]["runs"] == Settings.smoke().short_runs
        assert runtime["short_batch"]["texts"] == Settings.smoke().short_batch_texts
        assert len(runtime["short_batch"]["seconds"]) == Settings.smoke().short_batch_runs
        assert runtime["fixed"]["tokens"] == 4 * 16
        assert set(runtime["batch_scaling"]) == {"1", "4"}
        assert set(runtime["length_scaling"]) == {"8", "32"}
        assert runtime["mixed"]["texts"] == 12
        assert len(runtime["mixed"]["seconds"]) == Settings.smoke().mixed_repeats
        assert runtime["memory"]["peak_rss_bytes"] > runtime["memory"]["weights_bytes"] > 0
        assert runtime["gemm_gflops"] > 0 and 0 < runtime["fixed"]["mfu"]
    ratio_keys = {"mixed_throughput", "fixed_throughput", "short_batch_throughput",
                  "short_p50_latency", "start_to_ready"}
    assert set(smoke_results["ratios"]) == ratio_keys
    assert set(smoke_results["ratios_vs"]["ONNX Runtime float32"]) == ratio_keys
    # Same weights, same ids: kalm-mlx, the torch reference and ONNX Runtime give the same vectors.
    assert smoke_results["parity"]["max_abs_diff"] < 1e-4
    for runtime in main[1:]:
        assert runtime["parity"]["max_abs_diff"] < 1e-4
    variants = [name for name in runtimes if not runtimes[name]["main"]]
    assert {"kalm-mlx q8 (auto)", "kalm-mlx q8 (keep)"} <= set(variants)
    for name in variants:
        assert "error" not in runtimes[name], runtimes[name].get("error")
        assert runtimes[name]["short"]["p50_ms"] > 0


def test_timed_runs_alternate_and_stop_at_the_budget():
    specs = [RuntimeSpec("a", "mlx-float32", Path(".")), RuntimeSpec("b", "torch", Path("."))]
    order = []

    def run(spec):
        order.append(spec.name)
        time.sleep(0.02)
        return 0.02

    assert _timed_runs(specs, run, 3, pause=0.0) == {"a": [0.02] * 3, "b": [0.02] * 3}
    assert order == ["a", "b"] * 3
    order.clear()
    # One round takes at least 0.04 s: a budget of 0.05 s leaves no room for a second.
    assert _timed_runs(specs, run, 3, pause=0.0, budget_s=0.05) == {"a": [0.02], "b": [0.02]}
    assert order == ["a", "b"]


def test_report_writes_json_markdown_and_plots(smoke_results, tmp_path):
    paths = report.write(smoke_results, tmp_path)
    assert sorted(p.name for p in paths) == ["latency.png", "results.json", "results.md",
                                             "throughput_vs_length.png"]
    assert json.loads((tmp_path / "results.json").read_text())["ratios"] == smoke_results["ratios"]
    text = (tmp_path / "results.md").read_text()
    assert report.SPEED_NOTE in text and "| mixed corpus throughput, kalm-mlx / torch |" in text
    assert f"best of {Settings.smoke().mixed_repeats} passes" in text
    assert smoke_results["machine"]["cpu"] in text
    for name in ("latency.png", "throughput_vs_length.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rejects_a_folder_without_config(tmp_path, capsys):
    assert bench_main(["--model", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "config.json" in capsys.readouterr().err
    assert bench_main(["--model", "no-such-model", "--out", str(tmp_path / "out")]) == 2
    assert "minilm" in capsys.readouterr().err


def test_results_go_to_a_folder_per_family():
    assert results_folder("kalm-v2") == results_folder("kalm-v2").parent / "results"
    assert results_folder("minilm").name == "minilm" and results_folder("minilm").parent.name == "results"
    assert results_folder("nomic", quick=True).parent.name == "tmp"


def test_bert_family_checkpoints_have_their_models_layout(tiny_bert_family):
    import kalm_mlx

    expected = {"bge-base": ("bert", "cls"), "gte-base": ("bert", "mean"), "nomic": ("nomic_bert", "mean")}
    for name, folder in tiny_bert_family.items():
        config = json.loads((folder / "config.json").read_text())
        model = kalm_mlx.load(folder)
        assert (config["model_type"], model.pooling) == expected[name]
        assert model.dim == 64 and model.tokenizer.get_vocab_size() == 30522
        assert "not quality" in (folder / "README.md").read_text()
    shape = workloads.EncoderShape.from_config(json.loads((tiny_bert_family["nomic"] / "config.json").read_text()))
    assert (shape.mlp_matrices, shape.intermediate_size) == (3, 128)
    assert checkpoint.bert_family_checkpoint("nomic", **TINY_BERT) == tiny_bert_family["nomic"]
    with pytest.raises(ValueError, match="bge-base"):
        checkpoint.bert_family_checkpoint("bert-large")


def test_benchmark_folder_choices(tiny_bert_family):
    assert checkpoint.benchmark_folder("minilm") == checkpoint.minilm_folder()
    assert (checkpoint.minilm_folder() / "config.json").exists()
    assert checkpoint.benchmark_folder(str(tiny_bert_family["gte-base"])) == tiny_bert_family["gte-base"]
    with pytest.raises(ValueError, match="kalm-v2"):
        checkpoint.benchmark_folder("no-such-model")


def test_flops_of_the_bert_base_shape():
    shape = workloads.EncoderShape.from_config({"model_type": "bert", **checkpoint.BERT_BASE_SHAPE})
    # q, k, v, o: 4 x 768^2; the MLP: 2 x 768 x 3072 (no gate).
    assert shape.text_flops(1) == 2 * (4 * 768 * 768 + 2 * 768 * 3072) * 12 + 4 * 768 * 12


def test_short_texts_workload():
    ids = workloads.short_texts(64, vocab_size=30522, seed=1)
    assert ids == workloads.short_texts(64, vocab_size=30522, seed=1)
    assert len(ids) == 64 and {len(seq) for seq in ids} <= set(range(8, 25))
    assert all(0 <= i < 30522 for seq in ids for i in seq)


def test_nomic_torch_and_onnx_runtimes_agree_with_kalm_mlx(tiny_bert_family):
    """NomicBERT through sentence-transformers (transformers' own NomicBertModel) and its ONNX export."""
    folder = str(tiny_bert_family["nomic"])
    ids = workloads.mixed_corpus(9, vocab_size=30522, seed=4, high=40)
    mine = runtimes.make_runtime("mlx-float32", folder).embed(ids, 4)
    for kind in ("torch", "onnx"):
        other = runtimes.make_runtime(kind, folder).embed(ids, 4)
        assert other.shape == mine.shape == (9, 64)
        assert np.abs(other - mine).max() < 1e-4, kind


def test_bert_family_smoke_run(bert_smoke_results, tmp_path):
    runtimes_ = bert_smoke_results["runtimes"]
    assert list(runtimes_) == ["kalm-mlx float32", "sentence-transformers float32", "ONNX Runtime float32"]
    assert bert_smoke_results["model"]["family"] == "bert"
    for runtime in runtimes_.values():
        assert runtime["short_batch"]["texts_per_s"] > 0 and runtime["mixed"]["texts"] == 12
    # CLS pooling on all three sides.
    for name in list(runtimes_)[1:]:
        assert runtimes_[name]["parity"]["max_abs_diff"] < 1e-4
    report.write(bert_smoke_results, tmp_path)
    text = (tmp_path / "results.md").read_text()
    assert "bge-base's shape" in text and "kalm-mlx / ONNX Runtime float32" in text


def test_machine_info_names_the_cpu_and_what_chooses_openblas_kernels(monkeypatch):
    monkeypatch.setenv("OPENBLAS_TEST_MARKER", "1")  # an OPENBLAS_* variable OpenBLAS ignores
    machine = runtimes.machine_info()
    assert machine["openblas_environment"]["OPENBLAS_TEST_MARKER"] == "1"
    assert all(key.startswith("OPENBLAS_") for key in machine["openblas_environment"])
    if Path("/proc/cpuinfo").exists() and machine["cpu_family"] is not None:
        assert machine["cpu_family"].isdigit() and machine["avx512"] in (True, False)


def test_stamp_names_the_kernels_and_a_forced_kernel_choice():
    results = {
        "machine": {"cpu": "AMD EPYC", "cpu_family": "26", "cpu_model": "2", "avx512": True, "cores": 2,
                    "openblas_environment": {"OPENBLAS_CORETYPE": "Haswell"}},
        "runtimes": {"kalm-mlx float32": {"kind": "mlx-float32", "info": {
            "mlx": "0.32.4", "device": "Device(cpu, 0)", "blas": "/usr/lib/libopenblas.so.0",
            "blas_kernels": "Haswell", "blas_threads": 2}}},
        "date": "2026-12-02T06:00:00+00:00",
    }
    line = report.stamp(results)
    assert line.startswith("AMD EPYC (family 26, model 2), AVX-512, 2 cores; ")
    assert "with libopenblas.so.0 (Haswell kernels), 2 threads" in line
    assert "OPENBLAS_CORETYPE=Haswell" in line and line.endswith("2026-12-02")
    results["machine"]["openblas_environment"] = {}
    assert "OPENBLAS_CORETYPE" not in report.stamp(results)
