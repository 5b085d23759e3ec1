"""The conversion CLI: output layout, round trip, atomic writing and bad input."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

import kalm_mlx
from convert import ConversionError, convert
from convert.cli import main as convert_main
from tests.helpers import TEXTS, make_qwen2_checkpoint


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    make_qwen2_checkpoint(folder, hidden=128, heads=2, kv_heads=1, intermediate=256,
                          torch_dtype="bfloat16", max_seq_length=64, seed=5)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 128, "pooling_mode_mean_tokens": True}))
    (folder / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": "Q: ", "document": ""}, "default_prompt_name": None}))
    return folder


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_round_trip_and_layout(hf_folder, tmp_path):
    out = tmp_path / "out"
    report = convert(hf_folder, out)
    assert report["tensors"] == 2 * 12 + 2 and report["dtype"] == "bfloat16"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
    assert oct(os.stat(out).st_mode & 0o777) == "0o755"
    meta = json.loads((out / "config.json").read_text())["kalm_mlx"]
    assert meta["family"] == "qwen2" and meta["pooling"] == "mean"
    assert meta["max_tokens"] == 64 and meta["prompts"] == {"query": "Q: ", "document": ""}
    assert meta["source"] == str(hf_folder)
    stored = mx.load(str(out / "model.safetensors"))
    assert stored["embed_tokens.weight"].dtype == mx.bfloat16
    assert np.array_equal(kalm_mlx.load(out).encode(TEXTS), kalm_mlx.load(hf_folder).encode(TEXTS))


def test_dtype_option_casts_stored_weights(hf_folder, tmp_path):
    convert(hf_folder, tmp_path / "f32", dtype="float32")
    stored = mx.load(str(tmp_path / "f32" / "model.safetensors"))
    assert all(v.dtype == mx.float32 for v in stored.values())
    with pytest.raises(ConversionError, match="float64"):
        convert(hf_folder, tmp_path / "x", dtype="float64")
    assert not (tmp_path / "x").exists()


def test_sharded_checkpoint(tmp_path):
    model = make_qwen2_checkpoint(tmp_path / "src", hidden=128, heads=2, kv_heads=1, intermediate=256, seed=6)
    model.save_pretrained(tmp_path / "src", max_shard_size="100KB")
    assert (tmp_path / "src" / "model.safetensors.index.json").exists()
    (tmp_path / "src" / "model.safetensors").unlink(missing_ok=True)
    convert(tmp_path / "src", tmp_path / "out")
    assert np.abs(kalm_mlx.load(tmp_path / "out").encode(TEXTS)
                  - kalm_mlx.load(tmp_path / "src").encode(TEXTS)).max() == 0


def test_existing_output_needs_force(hf_folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="--force"):
        convert(hf_folder, out)
    assert (out / "keep.txt").read_text() == "mine"
    convert(hf_folder, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_interrupted_conversion_leaves_nothing(hf_folder, tmp_path, monkeypatch):
    def interrupted(folder, weights):
        (folder / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module("kalm_mlx.conversion.core"), "save_weights", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(hf_folder, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    # An existing output survives a failed --force conversion untouched.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(KeyboardInterrupt):
        convert(hf_folder, tmp_path / "out", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_missing_weights(hf_folder, tmp_path):
    src = _copy(hf_folder, tmp_path / "src")
    (src / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no safetensors"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_weights_name_the_file(hf_folder, tmp_path):
    src = _copy(hf_folder, tmp_path / "src")
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors.*(incomplete|offsets|exceed)"):
        convert(src, tmp_path / "out")
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        kalm_mlx.load(src)
    assert not (tmp_path / "out").exists()


def test_other_architecture_is_refused(hf_folder, tmp_path):
    src = _copy(hf_folder, tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "llama"
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_type 'llama'.*not supported"):
        convert(src, tmp_path / "out")


def test_malformed_config_names_the_file(hf_folder, tmp_path):
    src = _copy(hf_folder, tmp_path / "src")
    (src / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: malformed JSON"):
        kalm_mlx.load(src)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda w: w.pop("norm.weight"), "missing tensor 'norm.weight'"),
        (lambda w: w.__setitem__("layers.0.mlp.up_proj.weight", mx.zeros((256, 64))),
         r"'layers\.0\.mlp\.up_proj\.weight' has shape \(256, 64\)"),
        (lambda w: w.__setitem__("model.extra.weight", mx.zeros((2,))), "unexpected tensor 'extra.weight'"),
    ],
)
def test_bad_tensors_are_named(hf_folder, tmp_path, edit, message):
    src = _copy(hf_folder, tmp_path / "src")
    weights = mx.load(str(src / "model.safetensors"))
    edit(weights)
    mx.save_safetensors(str(src / "model.safetensors"), weights)
    with pytest.raises(ValueError, match=message):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_output_inside_source_is_refused(hf_folder, tmp_path):
    src = _copy(hf_folder, tmp_path / "src")
    with pytest.raises(ConversionError, match="inside"):
        convert(src, src / "out")


def test_hub_id_offline_fails_clearly(offline_env, tmp_path):
    with pytest.raises(FileNotFoundError, match="someone/missing-model"):
        convert("someone/missing-model", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli(hf_folder, tmp_path, capsys):
    assert convert_main([str(hf_folder), "-o", str(tmp_path / "out")]) == 0
    assert "26 tensors" in capsys.readouterr().out
    assert convert_main([str(hf_folder), "-o", str(tmp_path / "out")]) == 2
    assert "--force" in capsys.readouterr().err


def test_python_dash_m(hf_folder, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "convert", str(hf_folder), "-o", str(tmp_path / "out"), "--dtype", "float16"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["kalm_mlx"]["dtype"] == "float16"


def test_loading_float16_in_float32_never_holds_both_copies(tmp_path):
    make_qwen2_checkpoint(tmp_path, hidden=512, heads=8, kv_heads=2, intermediate=1024,
                          layers=4, torch_dtype="float16", seed=7)
    mx.clear_cache()
    already_active = mx.get_active_memory()  # other tests' models still alive
    mx.reset_peak_memory()
    model = kalm_mlx.load(tmp_path, dtype="float32")
    # Cast tensor by tensor, freeing each float16 source: the peak stays near the float32
    # weights (casting everything first would peak at 1.5x).
    assert mx.get_peak_memory() - already_active <= 1.15 * model.nbytes


def test_build_model_leaves_the_checkpoint_alone_unless_told(tmp_path):
    from kalm_mlx.loading import build_model, read_checkpoint

    make_qwen2_checkpoint(tmp_path, hidden=128, heads=2, kv_heads=1, intermediate=256, seed=8)
    checkpoint = read_checkpoint(tmp_path)
    count = len(checkpoint.weights)
    build_model(checkpoint, mx.float16)
    assert len(checkpoint.weights) == count
    build_model(checkpoint, mx.float16, consume=True)
    assert checkpoint.weights == {}


def test_convert_folder_takes_a_folder_and_records_the_source(hf_folder, tmp_path):
    from kalm_mlx.conversion import check_options, convert_folder
    from kalm_mlx.registry import get_model

    report = convert_folder(hf_folder, tmp_path / "out", entry=get_model("gte-base"), source="thenlper/gte-base")
    meta = json.loads((tmp_path / "out" / "config.json").read_text())["kalm_mlx"]
    assert (meta["name"], meta["source"], report["output"]) == ("gte-base", "thenlper/gte-base",
                                                                 str(tmp_path / "out"))
    assert check_options(None, "q4", 32) == (4, 32) and check_options("float16", None, None) is None
    for options, message in [(("float64", None, None), "--dtype"), ((None, None, 64), "--group-size"),
                             ((None, "q3", None), "--quantize"), ((None, "q8", 48), "--group-size")]:
        with pytest.raises(ConversionError, match=message):
            check_options(*options)
    with pytest.raises(ConversionError, match="must not be the source folder"):
        convert_folder(hf_folder, hf_folder / "inside")
