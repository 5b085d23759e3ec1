"""The real Qwen2 tokenizer (vendored in tests/fixtures/qwen2-tokenizer) as KaLM uses it."""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

import kalm_mlx
from kalm_mlx.embedder import load_tokenizer
from kalm_mlx.registry import KALM_DEFAULT_INSTRUCTION, KALM_QUERY_TEMPLATE
from tests.helpers import QWEN2_TOKENIZER, torch_qwen2_embed

ENDOFTEXT = 151643


def test_known_ids():
    tokenizer = load_tokenizer(QWEN2_TOKENIZER / "tokenizer.json", max_tokens=512)
    assert tokenizer.encode("Hello world").ids == [9707, 1879]
    assert tokenizer.get_vocab_size() == 151646


def test_nothing_added_around_text():
    tokenizer = load_tokenizer(QWEN2_TOKENIZER / "tokenizer.json", max_tokens=512)
    raw = Tokenizer.from_file(str(QWEN2_TOKENIZER / "tokenizer.json"))
    text = "Hello world"
    assert tokenizer.encode(text, add_special_tokens=True).ids == raw.encode(text, add_special_tokens=False).ids
    assert ENDOFTEXT not in tokenizer.encode(text).ids


def test_special_token_in_user_text_is_encoded_as_special():
    tokenizer = load_tokenizer(QWEN2_TOKENIZER / "tokenizer.json", max_tokens=512)
    assert ENDOFTEXT in tokenizer.encode("before <|endoftext|> after", add_special_tokens=False).ids


def test_truncation_keeps_the_first_tokens():
    tokenizer = load_tokenizer(QWEN2_TOKENIZER / "tokenizer.json", max_tokens=5)
    full = load_tokenizer(QWEN2_TOKENIZER / "tokenizer.json", max_tokens=10_000)
    text = "The quick brown fox jumps over the lazy dog"
    encoding = tokenizer.encode(text)
    assert encoding.ids == full.encode(text).ids[:5]
    assert encoding.overflowing


def test_query_prompt_is_tokenised_with_the_text(qwen2_real_tokenizer):
    folder, reference = qwen2_real_tokenizer
    model = kalm_mlx.load(folder)
    prompt = KALM_QUERY_TEMPLATE.format(instruction=KALM_DEFAULT_INSTRUCTION)
    ids = model.tokenize([prompt + "什么是 MLX？"])[0]
    raw = Tokenizer.from_file(str(QWEN2_TOKENIZER / "tokenizer.json"))
    assert ids == raw.encode(prompt + "什么是 MLX？", add_special_tokens=False).ids
    assert raw.decode(ids) == prompt + "什么是 MLX？"
    got = model.encode_queries(["什么是 MLX？"])
    assert np.abs(got - torch_qwen2_embed(reference, [ids])).max() <= 1e-4
