"""Parity of the MLX bidirectional Qwen2 encoder with transformers' Qwen2Model."""

from __future__ import annotations

import json
import warnings

import mlx.core as mx
import numpy as np
import pytest

import kalm_mlx
from kalm_mlx.models.qwen2 import Model, ModelArgs
from tests.helpers import TEXTS, make_qwen2_checkpoint, torch_qwen2_embed

LONG_TEXT = "Embedding models map text to vectors; similar texts get similar vectors. " * 12


@pytest.mark.parametrize("fixture", ["qwen2_gqa7", "qwen2_gqa2", "qwen2_real_tokenizer"])
def test_float32_parity_with_padding(fixture, request):
    folder, reference = request.getfixturevalue(fixture)
    model = kalm_mlx.load(folder, dtype="float32")
    got = model.encode(TEXTS, batch_size=len(TEXTS))
    expected = torch_qwen2_embed(reference, model.tokenize(TEXTS))
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), model.dim)
    assert np.abs(got - expected).max() <= 1e-4


def test_float32_parity_single_text(qwen2_gqa7):
    folder, reference = qwen2_gqa7
    model = kalm_mlx.load(folder, dtype="float32")
    got = model.encode("A single short text.")
    expected = torch_qwen2_embed(reference, model.tokenize(["A single short text."]))
    assert got.shape == (1, model.dim)
    assert np.abs(got - expected).max() <= 1e-4


def test_float32_parity_texts_longer_than_max_tokens(tmp_path):
    reference = make_qwen2_checkpoint(tmp_path, hidden=256, heads=4, kv_heads=2, intermediate=512,
                                      max_seq_length=24, seed=3)
    model = kalm_mlx.load(tmp_path)
    assert model.max_tokens == 24
    texts = [LONG_TEXT, "short one", LONG_TEXT[:90]]
    with pytest.warns(kalm_mlx.TruncationWarning):
        got = model.encode(texts)
    ids = model.tokenize(texts)
    assert [len(seq) for seq in ids][0] == 24
    assert np.abs(got - torch_qwen2_embed(reference, ids)).max() <= 1e-4


@pytest.mark.parametrize("fixture", ["qwen2_gqa7", "qwen2_gqa2"])
def test_float16_cosine(fixture, request):
    folder, reference = request.getfixturevalue(fixture)
    model = kalm_mlx.load(folder, dtype="float16")
    got = model.encode(TEXTS)
    expected = torch_qwen2_embed(reference, model.tokenize(TEXTS))
    cosines = (got * expected).sum(axis=1)
    assert cosines.min() >= 0.999


def test_bfloat16_cosine(qwen2_gqa2):
    folder, reference = qwen2_gqa2
    model = kalm_mlx.load(folder, dtype="bfloat16")
    got = model.encode(TEXTS)
    expected = torch_qwen2_embed(reference, model.tokenize(TEXTS))
    assert (got * expected).sum(axis=1).min() >= 0.99


def test_attention_is_bidirectional(qwen2_gqa2):
    """The first token's state must depend on later tokens (it would not under a causal mask)."""
    folder, _ = qwen2_gqa2
    model = kalm_mlx.load(folder)
    tokens = model.tokenize("one two three four")[0]
    ids = mx.array([tokens])
    changed = mx.array([tokens[:-1] + [(tokens[-1] + 1) % 384]])
    first = model.model(ids)[0, 0]
    first_changed = model.model(changed)[0, 0]
    assert ids.shape == changed.shape
    assert mx.abs(first - first_changed).max().item() > 1e-3


# --- config reading ------------------------------------------------------------------------

BASE_CONFIG = {
    "model_type": "qwen2",
    "hidden_size": 256,
    "num_hidden_layers": 2,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 384,
    "rms_norm_eps": 1e-6,
}


def test_rope_theta_read_from_either_location():
    top_level = ModelArgs.from_config({**BASE_CONFIG, "rope_theta": 1_000_000.0})
    nested = ModelArgs.from_config(
        {**BASE_CONFIG, "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0}}
    )
    assert top_level.rope_theta == nested.rope_theta == 1_000_000.0
    assert top_level.head_dim == 64


def test_missing_rope_theta_warns():
    with pytest.warns(UserWarning, match="rope_theta"):
        assert ModelArgs.from_config(BASE_CONFIG).rope_theta == 10000.0


def test_rope_theta_changes_vectors(tmp_path):
    make_qwen2_checkpoint(tmp_path, hidden=256, heads=4, kv_heads=2, intermediate=512, seed=4)
    base = kalm_mlx.load(tmp_path).encode(TEXTS)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("rope_theta", None)
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 500.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    other = kalm_mlx.load(tmp_path).encode(TEXTS)
    assert np.abs(base - other).max() > 1e-3


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
        ({"hidden_size": 250}, "multiple of"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ({"head_dim": 32}, "head_dim"),
    ],
)
def test_bad_configs_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        ModelArgs.from_config({**BASE_CONFIG, "rope_theta": 1e6, **change})


def test_missing_config_key_is_named():
    config = {k: v for k, v in BASE_CONFIG.items() if k != "intermediate_size"}
    with pytest.raises(ValueError, match="intermediate_size"):
        ModelArgs.from_config(config)


# --- sanitize ------------------------------------------------------------------------------


def _hf_weights(model: Model, prefix: str) -> dict:
    from mlx.utils import tree_flatten

    return {prefix + name: value for name, value in tree_flatten(model.parameters())}


def test_sanitize_accepts_prefix_and_drops_lm_head_and_rotary():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = Model(ModelArgs.from_config(BASE_CONFIG))
    weights = _hf_weights(model, "model.")
    weights["lm_head.weight"] = mx.zeros((384, 256))
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = mx.zeros((32,))
    cleaned = model.sanitize(weights)
    assert set(cleaned) == set(_hf_weights(model, ""))
    assert model.sanitize(_hf_weights(model, "")).keys() == cleaned.keys()


def test_sanitize_rejects_unexpected_and_misshapen_tensors():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = Model(ModelArgs.from_config(BASE_CONFIG))
    weights = _hf_weights(model, "")
    with pytest.raises(ValueError, match="layers.0.self_attn.q_norm.weight"):
        model.sanitize({**weights, "layers.0.self_attn.q_norm.weight": mx.zeros((64,))})
    bad = dict(weights)
    bad["layers.1.mlp.up_proj.weight"] = mx.zeros((512, 128))
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.up_proj\.weight.*\(512, 128\)"):
        model.sanitize(bad)
    missing = dict(weights)
    del missing["norm.weight"]
    with pytest.raises(ValueError, match="missing tensor 'norm.weight'"):
        model.sanitize(missing)
