"""The Embedder API: shapes, prompts, batching, truncation and bad input."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest

import kalm_mlx
from kalm_mlx import _backend, embedder
from kalm_mlx.embedder import Embedder, plan_batches, split_by_padded_tokens, stream_groups
from kalm_mlx.registry import KALM_DEFAULT_INSTRUCTION, KALM_QUERY_TEMPLATE
from tests.helpers import TEXTS, torch_qwen2_embed

KALM_QUERY = KALM_QUERY_TEMPLATE.format(instruction=KALM_DEFAULT_INSTRUCTION)


def test_shapes_single_and_empty(small_model):
    assert small_model.encode([]).shape == (0, small_model.dim)
    assert small_model.encode([]).dtype == np.float32
    assert small_model.encode("hello").shape == (1, small_model.dim)
    assert small_model.encode(("a", "b")).shape == (2, small_model.dim)


def test_vectors_are_unit_length_unless_asked(small_model):
    assert np.allclose(np.linalg.norm(small_model.encode(TEXTS), axis=1), 1.0, atol=1e-5)
    raw = small_model.encode(TEXTS, normalize=False)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-3)
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    assert np.abs(unit - small_model.encode(TEXTS)).max() < 1e-6


@pytest.mark.parametrize("bad", [None, 3, b"bytes", ["ok", None], ["ok", 5], [b"x"]])
def test_non_strings_raise_type_error(small_model, bad):
    with pytest.raises(TypeError):
        small_model.encode(bad)


def test_kalm_prompts(small_model, qwen2_gqa2):
    _, reference = qwen2_gqa2
    assert small_model.prompts == {"query": KALM_QUERY, "document": ""}
    queries = small_model.encode_queries(["what is mlx?"])
    assert np.array_equal(queries, small_model.encode(["what is mlx?"], prompt=KALM_QUERY))
    assert np.array_equal(queries, small_model.encode(["what is mlx?"], prompt_name="query"))
    # The prompt is tokenised with the text and its tokens are part of the mean pool.
    ids = small_model.tokenize([KALM_QUERY + "what is mlx?"])
    assert np.abs(queries - torch_qwen2_embed(reference, ids)).max() <= 1e-4
    assert np.array_equal(small_model.encode_documents(TEXTS), small_model.encode(TEXTS))


def test_instruction_overrides_the_task(small_model):
    custom = small_model.encode_queries(["mlx"], instruction="Retrieve code")
    expected = small_model.encode(["mlx"], prompt="Instruct: Retrieve code \n Query: ")
    assert np.array_equal(custom, expected)
    assert not np.allclose(custom, small_model.encode_queries(["mlx"]))
    assert small_model.query_prompt("retrieval") == KALM_QUERY


def test_no_eos_is_appended(small_model):
    ids = small_model.tokenize("hello")[0]
    assert small_model.tokenizer.token_to_id("<|endoftext|>") not in ids
    assert ids == small_model.tokenizer.encode("hello", add_special_tokens=False).ids


def test_prompt_argument_errors(small_model):
    with pytest.raises(ValueError, match="not both"):
        small_model.encode("x", prompt="a", prompt_name="query")
    with pytest.raises(ValueError, match="prompt_name 'nope'.*document, query"):
        small_model.encode("x", prompt_name="nope")
    with pytest.raises(TypeError):
        small_model.encode("x", prompt=3)
    with pytest.raises(ValueError, match="batch_size"):
        small_model.encode("x", batch_size=0)


def test_batch_invariance_and_order(small_model):
    alone = np.concatenate([small_model.encode(text) for text in TEXTS])
    mixed = small_model.encode(TEXTS, batch_size=4)
    assert np.abs(alone - mixed).max() <= 1e-5
    order = [3, 0, 5, 1, 4, 2]
    shuffled = small_model.encode([TEXTS[i] for i in order], batch_size=2)
    assert np.abs(shuffled - mixed[order]).max() <= 1e-5


def test_token_budget_splits_batches_without_changing_vectors(qwen2_gqa2):
    model = kalm_mlx.load(qwen2_gqa2[0])
    full = model.encode(TEXTS)
    model.max_batch_tokens = 8
    assert np.abs(model.encode(TEXTS) - full).max() <= 1e-5


def test_plan_batches_longest_first_within_bounds():
    lengths = [5, 50, 7, 30, 30, 1, 12]
    batches = plan_batches(lengths, batch_size=3, max_batch_tokens=100)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
    for batch in batches:
        assert len(batch) <= 3
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 100
    assert plan_batches([500], batch_size=8, max_batch_tokens=100) == [[0]]
    assert plan_batches([], batch_size=8, max_batch_tokens=100) == []


@pytest.mark.parametrize("streams", [2, 3])
def test_parallel_streams_give_the_single_stream_vectors(qwen2_gqa2, streams):
    model = kalm_mlx.load(qwen2_gqa2[0])
    model.parallel_streams = 1
    texts = TEXTS + [text.upper() for text in TEXTS[:3]]  # 9 texts of uneven lengths
    single = model.encode(texts)
    model.parallel_streams = streams
    # Halves of a batch are padded to their own longest text: equal up to rounding.
    assert np.abs(model.encode(texts) - single).max() <= 1e-5
    assert np.abs(model.encode(texts, batch_size=4) - single).max() <= 1e-5
    assert np.abs(model.encode(texts[:1]) - single[:1]).max() <= 1e-5


def test_progress_bar_counts_every_batch(qwen2_gqa2, capsys):
    model = kalm_mlx.load(qwen2_gqa2[0])
    model.parallel_streams = 2
    quiet = model.encode(TEXTS, batch_size=2)
    shown = model.encode(TEXTS, batch_size=2, show_progress_bar=True)
    assert np.abs(shown - quiet).max() <= 1e-5
    assert "3/3" in capsys.readouterr().err  # 6 texts in batches of 2, some of them run two at once


def test_stream_groups_pair_batches_that_fit_a_stream():
    # Four small batches: two groups of two, one batch a stream.
    assert stream_groups([100, 90, 80, 60], streams=2, stream_budget=128) == [[0, 1], [2, 3]]
    # A batch over one stream's budget runs alone (split over the streams), and so does the
    # last one, with no partner.
    assert stream_groups([300, 100, 90, 80, 60], streams=2, stream_budget=128) == [[0], [1, 2], [3, 4]]
    assert stream_groups([100, 90, 80], streams=2, stream_budget=128) == [[0, 1], [2]]
    # A partner under half the size would leave its stream idle: each runs alone.
    assert stream_groups([100, 40, 30], streams=2, stream_budget=128) == [[0], [1, 2]]
    assert stream_groups([60, 50, 40], streams=3, stream_budget=64) == [[0, 1, 2]]
    # One stream (a GPU, or streams turned off): every batch alone.
    assert stream_groups([10, 10, 10], streams=1, stream_budget=10) == [[0], [1], [2]]
    assert stream_groups([], streams=2, stream_budget=10) == []


def test_grouped_batches_give_the_single_stream_vectors(qwen2_gqa2, monkeypatch):
    model = kalm_mlx.load(qwen2_gqa2[0])
    texts = TEXTS + [text.upper() for text in TEXTS] + [text[::-1] for text in TEXTS]  # 18 texts
    model.parallel_streams = 1
    single = model.encode(texts, batch_size=3)
    calls = []
    forward = Embedder._forward

    def recording_forward(self, batches):
        calls.append([len(batch) for batch in batches])
        return forward(self, batches)

    monkeypatch.setattr(Embedder, "_forward", recording_forward)
    model.parallel_streams = 2
    grouped = model.encode(texts, batch_size=3)
    assert [3, 3] in calls  # two whole batches ran at once, one on each stream
    assert sum(map(sum, calls)) == len(texts)
    assert np.abs(grouped - single).max() <= 1e-5


@pytest.mark.skipif(_backend.blas_thread_budget() is None, reason="needs OpenBLAS")
def test_blas_threads_are_shared_out_between_streams(qwen2_gqa2):
    model = kalm_mlx.load(qwen2_gqa2[0])
    budget = _backend.blas_thread_budget()
    model.parallel_streams = 2
    try:
        model.encode(TEXTS[:2])
        assert _backend.blas_threads() == max(1, budget // 2)
        model.encode(TEXTS[:1])  # a lone text gets every thread
        assert _backend.blas_threads() == budget
    finally:
        _backend.set_blas_threads(budget)


def test_default_parallel_streams(monkeypatch):
    for budget, expected in ((None, 1), (1, 1), (2, 2), (16, 2)):
        monkeypatch.setattr(embedder, "blas_thread_budget", lambda budget=budget: budget)
        assert embedder.default_parallel_streams() == expected


def test_split_by_padded_tokens_balances_the_padded_work():
    assert split_by_padded_tokens([4, 4, 4, 4, 4], 2) == [range(0, 3), range(3, 5)]
    assert split_by_padded_tokens([5] * 6, 3) == [range(0, 2), range(2, 4), range(4, 6)]
    assert split_by_padded_tokens([7], 1) == [range(0, 1)]
    # Longest first: the part with the long texts gets fewer of them.
    assert split_by_padded_tokens([24, 22, 20, 18, 10, 9, 8, 8], 2) == [range(0, 3), range(3, 8)]
    assert split_by_padded_tokens([100, 1, 1], 2) == [range(0, 1), range(1, 3)]
    # Never more parts than asked, each non-empty, together every text once and in order.
    for lengths in ([9, 8, 8, 3, 3, 3, 3, 1], [50, 49, 2, 2, 2, 2, 2, 2, 2, 2], [3, 3]):
        for parts in range(1, len(lengths) + 1):
            ranges = split_by_padded_tokens(lengths, parts)
            assert 1 <= len(ranges) <= parts and all(len(r) for r in ranges)
            assert [i for r in ranges for i in r] == list(range(len(lengths)))
            worst = max(len(r) * lengths[r.start] for r in ranges)
            assert worst <= max(len(r) * lengths[r.start]
                                for r in _equal_count_split(len(lengths), len(ranges)))


def _equal_count_split(count, parts):
    size, extra = divmod(count, parts)
    bounds = [0]
    for part in range(parts):
        bounds.append(bounds[-1] + size + (part < extra))
    return [range(start, stop) for start, stop in zip(bounds, bounds[1:])]


def test_split_by_padded_tokens_refuses_bad_input():
    for lengths, parts in (([3, 2], 0), ([3, 2], 3)):
        with pytest.raises(ValueError, match="cannot split"):
            split_by_padded_tokens(lengths, parts)
    with pytest.raises(ValueError, match="longest first"):
        split_by_padded_tokens([2, 3], 2)


def test_shared_cpu_streams_are_reused():
    first = embedder.shared_cpu_streams(2)
    assert len(first) == 2 and first[0] != first[1]
    assert embedder.shared_cpu_streams(2) == first
    assert embedder.shared_cpu_streams(1) == first[:1]


def test_truncation_is_counted(small_model):
    model = copy.copy(small_model)
    model.truncated_texts = 0
    long = "word " * 2000
    with pytest.warns(kalm_mlx.TruncationWarning, match="1 of 2"):
        model.encode([long, "short"])
    assert model.truncated_texts == 1
    assert len(model.tokenize(long)[0]) == model.max_tokens


def test_tokenize_with_truncation_flags_each_text(small_model):
    model = copy.copy(small_model)
    model.truncated_texts = 0
    long = "word " * 2000
    exact = model.tokenize(long)[0]  # max_tokens ids of a text that was cut
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the caller counts: no TruncationWarning
        ids, cut = model.tokenize_with_truncation(["short", long, "short again"])
    assert cut == [False, True, False] and ids == model.tokenize(["short", long, "short again"])
    assert len(ids[1]) == len(exact) == model.max_tokens
    assert model.truncated_texts == 3  # counted like encode(): once here, twice by tokenize above
    assert model.tokenize_with_truncation([]) == ([], [])


def test_empty_text_gives_zero_vector_and_warning(small_model):
    with pytest.warns(kalm_mlx.EmptyTextWarning):
        vectors = small_model.encode(["hello", "", "world"])
    assert np.all(vectors[1] == 0)
    assert np.abs(vectors[[0, 2]] - small_model.encode(["hello", "world"])).max() <= 1e-5
    with pytest.warns(kalm_mlx.EmptyTextWarning):
        assert np.all(small_model.encode([""]) == 0)


def test_lone_surrogates_are_replaced_with_a_warning(small_model):
    with pytest.warns(UnicodeWarning):
        got = small_model.encode(["bad \ud800 text"])
    assert np.array_equal(got, small_model.encode(["bad \ufffd text"]))


def test_truncate_dim(small_model):
    model = copy.copy(small_model)
    model.meta = {**small_model.meta, "matryoshka_dims": [256, 128, 64]}
    raw = model.encode(TEXTS, normalize=False)
    short = model.encode(TEXTS, truncate_dim=64)
    expected = raw[:, :64] / np.linalg.norm(raw[:, :64], axis=1, keepdims=True)
    assert short.shape == (len(TEXTS), 64)
    assert np.abs(short - expected).max() < 1e-6
    assert np.array_equal(model.encode(TEXTS, truncate_dim=64, normalize=False), raw[:, :64])
    with pytest.raises(ValueError, match="trained for dims 256, 128, 64"):
        model.encode(TEXTS, truncate_dim=100)
    assert model.encode(TEXTS, truncate_dim=100, allow_untrained_dim=True).shape == (6, 100)
    with pytest.raises(ValueError, match="outside"):
        model.encode(TEXTS, truncate_dim=999, allow_untrained_dim=True)
    with pytest.raises(TypeError):
        model.encode(TEXTS, truncate_dim=64.0)


def test_bad_dtype_is_refused(qwen2_gqa2):
    with pytest.raises(ValueError, match="float64"):
        kalm_mlx.load(qwen2_gqa2[0], dtype="float64")


def test_description(small_model):
    assert small_model.dim == 256
    assert small_model.max_tokens == 512
    assert small_model.pooling == "mean"
    assert small_model.nbytes > 0
    assert "dim=256" in repr(small_model)


def test_truncate_dim_with_nomic_layer_norm(small_model):
    """nomic's recipe: layer norm over the full vector, then truncate, then normalise."""
    model = copy.copy(small_model)
    model.meta = {**small_model.meta, "matryoshka_dims": [256, 64], "matryoshka_layer_norm": True}
    raw = model.encode(TEXTS, normalize=False)
    centered = raw - raw.mean(axis=1, keepdims=True)
    normed = centered / np.sqrt((centered**2).mean(axis=1, keepdims=True) + 1e-5)
    expected = normed[:, :64] / np.linalg.norm(normed[:, :64], axis=1, keepdims=True)
    assert np.abs(model.encode(TEXTS, truncate_dim=64) - expected).max() < 1e-6
    plain = small_model.encode(TEXTS, truncate_dim=64, allow_untrained_dim=True)
    assert np.abs(plain - expected).max() > 1e-3
    assert np.array_equal(model.encode(TEXTS), small_model.encode(TEXTS))


def test_as_text_list():
    from kalm_mlx.embedder import as_text_list

    assert as_text_list("one") == ["one"]
    assert as_text_list(("a", "b")) == ["a", "b"]
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        as_text_list(["a", 1])
