"""Ensemble: environment parsing, size-aware LRU, threads, fusion. Tiny real models, no mocks."""

from __future__ import annotations

import re
import threading
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np
import pytest

import kalm_mlx
from convert import convert
from kalm_mlx import Ensemble
from kalm_mlx.ensemble import (
    KINDS,
    MemoryBudgetWarning,
    canonical_model_name,
    check_kind,
    competition_ranks,
    fuse_rrf,
    fuse_scores,
    parse_byte_size,
)
from kalm_mlx.registry import list_models
from kalm_mlx.settings import Settings
from tests.helpers import TEXTS, make_qwen2_checkpoint

# Three tiny Qwen2 encoders of different sizes, converted under registry names into a
# kalm-mlx home, so that the ensemble loads them through kalm_mlx.load's real resolution.
SMALL, MEDIUM, LARGE = "minilm", "bge-base", "gte-base"
LAYERS = {SMALL: 1, MEDIUM: 2, LARGE: 3}
QUERIES = ["what runs on apple silicon", "greeting"]


@pytest.fixture(scope="session")
def tiny_home(tmp_path_factory):
    """A KALM_MLX_HOME holding the three tiny models; returns (home, {name: Embedder.nbytes})."""
    root = tmp_path_factory.mktemp("ensemble")
    home = root / "home"
    home.mkdir()
    for name, layers in LAYERS.items():
        source = root / f"source-{name}"
        make_qwen2_checkpoint(source, hidden=64, heads=2, kv_heads=1, layers=layers,
                              intermediate=128, seed=layers)
        convert(source, home / name)
    sizes = {name: kalm_mlx.load(home / name).nbytes for name in LAYERS}
    assert sizes[SMALL] < sizes[MEDIUM] < sizes[LARGE] < sizes[SMALL] + sizes[MEDIUM]
    return home, sizes


@pytest.fixture
def home(tiny_home, tmp_path, monkeypatch):
    """Point kalm-mlx at the tiny models, offline, with an empty Hugging Face cache."""
    folder, sizes = tiny_home
    monkeypatch.setenv("KALM_MLX_HOME", str(folder))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    return sizes


def direct(name: str, kind: str, texts=TEXTS) -> np.ndarray:
    """The vectors a single model gives on its own, outside any ensemble."""
    model = kalm_mlx.load(name)
    return model.encode_queries(texts) if kind == "query" else model.encode_documents(texts)


# --- environment ----------------------------------------------------------------------------


def env_ensemble(**variables) -> Ensemble:
    return Ensemble.from_env(environ=variables)


def test_env_defaults_to_bge_base_and_loads_nothing():
    ens = env_ensemble()
    assert ens.models == ("bge-base",)
    assert ens.default_model == "bge-base"
    assert ens.weights == {"bge-base": 1.0}
    assert ens.memory_budget is None and ens.max_loaded is None
    assert ens.loaded == {} and ens.load_counts == {}
    assert env_ensemble(EMBED_MODELS="  ").models == ("bge-base",)  # empty means unset


def test_env_reads_os_environ(monkeypatch):
    monkeypatch.setenv("EMBED_MODELS", "gte,kalm")
    monkeypatch.setenv("EMBED_MEMORY_BUDGET", "3GB")
    ens = Ensemble.from_env()
    assert ens.models == ("gte-base", "kalm-v2")
    assert ens.memory_budget == 3 * 10**9


def test_env_model_list_canonicalises_names_and_keeps_order():
    names = " KaLM , bge-base-en-v1.5,sentence-transformers/all-MiniLM-L6-v2, kalm-v2.5-q8"
    ens = env_ensemble(EMBED_MODELS=names)
    assert ens.models == ("kalm-v2", "bge-base", "minilm", "kalm-v2.5-q8")
    assert ens.default_model == "kalm-v2"


@pytest.mark.parametrize("wildcard", ["all", "*", "ALL"])
def test_env_all_means_every_model_not_opt_in(wildcard):
    defaults = [e.name for e in list_models() if not e.opt_in]
    assert "bge-base" in defaults and "kalm-v2" not in defaults
    assert env_ensemble(EMBED_MODELS=wildcard).models == tuple(defaults)
    # Named models keep their place; the wildcard adds the others where it stands.
    ens = env_ensemble(EMBED_MODELS=f"kalm-v2:2,{wildcard},minilm:0.5")
    rest = [name for name in defaults if name != "minilm"]
    assert ens.models == ("kalm-v2", *rest, "minilm")
    assert ens.weights["kalm-v2"] == 2.0 and ens.weights["minilm"] == 0.5
    assert ens.weights["bge-base"] == 1.0


def test_env_weights_inline_plain_and_json():
    ens = env_ensemble(EMBED_MODELS="bge-base:0.25,kalm-v2")
    assert ens.weights == {"bge-base": 0.25, "kalm-v2": 1.0}
    plain = env_ensemble(EMBED_MODELS="bge-base,kalm-v2", EMBED_WEIGHTS="kalm:0.8, bge-base:1")
    assert plain.weights == {"bge-base": 1.0, "kalm-v2": 0.8}
    as_json = env_ensemble(EMBED_MODELS="bge-base,kalm-v2", EMBED_WEIGHTS='{"bge-base": 1.0, "kalm-v2": 0.8}')
    assert as_json.weights == plain.weights
    # The same weight given in both places is fine.
    same = env_ensemble(EMBED_MODELS="bge-base:2,kalm-v2", EMBED_WEIGHTS='{"bge-base": 2}')
    assert same.weights == {"bge-base": 2.0, "kalm-v2": 1.0}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3GB", 3 * 10**9),
        ("750MB", 750 * 10**6),
        ("1.5 GiB", int(1.5 * 2**30)),
        ("2kib", 2048),
        ("123456", 123456),
        ("10 B", 10),
        (" 0.5TB ", 5 * 10**11),
    ],
)
def test_env_memory_budget_units(text, expected):
    assert parse_byte_size(text) == expected
    assert env_ensemble(EMBED_MEMORY_BUDGET=text).memory_budget == expected


def test_env_max_loaded():
    assert env_ensemble(EMBED_MAX_LOADED="2").max_loaded == 2


@pytest.mark.parametrize(
    ("variable", "value", "reason"),
    [
        ("EMBED_MODELS", "bge-base,nope", "unknown model 'nope'.*bge-base.*kalm-v2"),
        ("EMBED_MODELS", "bge-base,,minilm", "empty item"),
        ("EMBED_MODELS", "bge-base,", "empty item"),
        ("EMBED_MODELS", "bge-base,BGE-BASE-EN-V1.5", "listed twice"),
        ("EMBED_MODELS", "bge-base:heavy", "weight 'heavy' is not a number"),
        ("EMBED_MODELS", "bge-base:0", "positive"),
        ("EMBED_MODELS", "bge-base:-1", "positive"),
        ("EMBED_MODELS", "bge-base:nan", "positive finite"),
        ("EMBED_MODELS", "all:2", "cannot be given"),
        ("EMBED_MODELS", "all,*", "twice"),
        ("EMBED_WEIGHTS", "bge-base=0.5", "not name:weight"),
        ("EMBED_WEIGHTS", "bge-base:x", "not a number"),
        ("EMBED_WEIGHTS", "bge-base:1,", "empty item"),
        ("EMBED_WEIGHTS", '{"bge-base": 0.5', "malformed JSON"),
        ("EMBED_WEIGHTS", "[0.5]", "not name:weight"),
        ("EMBED_WEIGHTS", '{"bge-base": "high"}', "not a number"),
        ("EMBED_WEIGHTS", '{"bge-base": true}', "not a number"),
        ("EMBED_WEIGHTS", '{"bge-base": -2}', "positive"),
        ("EMBED_WEIGHTS", '{"bge-base-en-v1.5": 1, "bge-base": 2}', "two weights"),
        ("EMBED_WEIGHTS", "minilm:0.5", "not in EMBED_MODELS"),
        ("EMBED_WEIGHTS", "zzz:0.5", "unknown model 'zzz'"),
        ("EMBED_MEMORY_BUDGET", "3 parsecs", "units"),
        ("EMBED_MEMORY_BUDGET", "3G", "units"),
        ("EMBED_MEMORY_BUDGET", "GB", "units"),
        ("EMBED_MEMORY_BUDGET", "-1GB", "units"),
        ("EMBED_MEMORY_BUDGET", "0", "positive"),
        ("EMBED_MEMORY_BUDGET", "1.5", "whole number"),
        ("EMBED_MAX_LOADED", "two", "not a whole number"),
        ("EMBED_MAX_LOADED", "1.5", "not a whole number"),
        ("EMBED_MAX_LOADED", "0", "at least one"),
        ("EMBED_MAX_LOADED", "-3", "at least one"),
    ],
)
def test_env_errors_name_the_variable_and_value(variable, value, reason):
    with pytest.raises(ValueError) as caught:
        env_ensemble(**{variable: value})
    message = str(caught.value)
    assert message.startswith(f"{variable}={value!r}")
    assert re.search(reason, message), message


def test_env_conflicting_weights_name_both_variables():
    with pytest.raises(ValueError, match=r"EMBED_WEIGHTS=.*'bge-base' has weight 3.0 but EMBED_MODELS="):
        env_ensemble(EMBED_MODELS="bge-base:2", EMBED_WEIGHTS="bge-base:3")


def test_env_accepts_a_folder(tmp_path):
    ens = env_ensemble(EMBED_MODELS=f"{tmp_path}:0.5,bge-base")
    assert ens.models == (str(tmp_path), "bge-base")
    assert ens.weights[str(tmp_path)] == 0.5


# --- constructor ----------------------------------------------------------------------------


def test_constructor_checks_its_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"unknown model 'nope'.*bge-base, minilm"):
        Ensemble(["nope"])
    with pytest.raises(ValueError, match="at least one model"):
        Ensemble([])
    with pytest.raises(ValueError, match="listed twice"):
        Ensemble(["kalm", "kalm-v2"])
    with pytest.raises(TypeError, match="model name must be a string"):
        Ensemble([3])
    with pytest.raises(ValueError, match="not one of the ensemble's models"):
        Ensemble(["bge-base"], weights={"minilm": 1.0})
    with pytest.raises(ValueError, match="2 weights for 1 models"):
        Ensemble(["bge-base"], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="positive"):
        Ensemble(["bge-base"], weights=[0.0])
    with pytest.raises(ValueError, match="positive"):
        Ensemble(["bge-base"], memory_budget=0)
    with pytest.raises(TypeError, match="memory_budget"):
        Ensemble(["bge-base"], memory_budget=1.5e9)
    with pytest.raises(ValueError, match="at least 1"):
        Ensemble(["bge-base"], max_loaded=0)
    ens = Ensemble(["kalm", tmp_path], weights={"KaLM-embedding-v2": 0.5}, memory_budget="1.5 GiB")
    assert ens.models == ("kalm-v2", str(tmp_path))
    assert ens.weights == {"kalm-v2": 0.5, str(tmp_path): 1.0}
    assert ens.memory_budget == 3 * 2**29
    assert Ensemble("minilm", weights=[2]).weights == {"minilm": 2.0}
    assert repr(Ensemble(["minilm", "kalm"], weights=[2, 0.5], max_loaded=1)) == (
        "Ensemble(minilm=2, kalm-v2=0.5; memory_budget=None, max_loaded=1, loaded=[])"
    )
    assert canonical_model_name(tmp_path) == str(tmp_path)


# --- loading, eviction, memory --------------------------------------------------------------


def test_encode_is_lazy_and_matches_each_model_alone(home):
    ens = Ensemble([SMALL, MEDIUM, LARGE])
    assert ens.loaded == {}
    out = ens.encode(TEXTS, kind="document", models=[MEDIUM])
    assert list(out) == [MEDIUM] and list(ens.loaded) == [MEDIUM]
    for kind in ("query", "document"):
        out = ens.encode(TEXTS, kind=kind)
        assert list(out) == [SMALL, MEDIUM, LARGE]  # the ensemble's order, whatever ran first
        for name in out:
            np.testing.assert_array_equal(out[name], direct(name, kind))
    # Each model's own prompts: a query and a document embed differently for these models.
    assert not np.allclose(out[SMALL], direct(SMALL, "query"))
    assert ens.load_counts == {SMALL: 1, MEDIUM: 1, LARGE: 1}
    assert ens.loaded == home  # real sizes: Embedder.nbytes
    assert ens.encode("one text")[SMALL].shape == (1, 64)
    assert ens.encode([])[LARGE].shape == (0, 64)


def test_encode_checks_its_arguments_before_loading(home):
    ens = Ensemble([SMALL, MEDIUM])
    with pytest.raises(ValueError, match="kind must be one of query, document"):
        ens.encode(TEXTS, kind="passage")
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        ens.encode(["ok", 3])
    with pytest.raises(ValueError, match="not one of the ensemble's models"):
        ens.encode(TEXTS, models=[LARGE])
    assert ens.load_counts == {}


def test_eviction_is_least_recently_used_by_bytes(home):
    sizes = home
    budget = sizes[LARGE] + sizes[MEDIUM] + sizes[SMALL] // 2  # any two fit, not all three
    ens = Ensemble([SMALL, MEDIUM, LARGE], memory_budget=budget)
    ens.encode(TEXTS, models=SMALL)
    ens.encode(TEXTS, models=MEDIUM)
    assert list(ens.loaded) == [SMALL, MEDIUM]
    ens.encode(TEXTS, models=SMALL)  # SMALL becomes the most recently used
    assert list(ens.loaded) == [MEDIUM, SMALL]
    ens.encode(TEXTS, models=LARGE)  # room for LARGE: only the least recently used goes
    assert list(ens.loaded) == [SMALL, LARGE]
    ens.encode(TEXTS, models=MEDIUM)  # evicting SMALL alone makes room
    assert list(ens.loaded) == [LARGE, MEDIUM]
    assert ens.loaded_bytes == sizes[LARGE] + sizes[MEDIUM] <= budget
    assert ens.peak_loaded_bytes <= budget
    assert ens.load_counts == {SMALL: 1, MEDIUM: 2, LARGE: 1}


def test_max_loaded_bounds_the_count(home):
    ens = Ensemble([SMALL, MEDIUM, LARGE], max_loaded=2)
    ens.encode(TEXTS)
    assert list(ens.loaded) == [MEDIUM, LARGE]
    ens.encode(TEXTS, models=SMALL)
    assert list(ens.loaded) == [LARGE, SMALL]


def test_a_model_larger_than_the_budget_is_served_alone_and_released(home):
    sizes = home
    ens = Ensemble([SMALL, LARGE], memory_budget=(sizes[SMALL] + sizes[LARGE]) // 2)
    ens.encode(TEXTS, models=SMALL)
    assert list(ens.loaded) == [SMALL]
    with pytest.warns(MemoryBudgetWarning, match=f"{LARGE} takes {sizes[LARGE]} bytes"):
        out = ens.encode(TEXTS, models=LARGE)
    np.testing.assert_array_equal(out[LARGE], direct(LARGE, "query"))
    assert ens.loaded == {}  # SMALL made way; LARGE was released after use
    assert ens.peak_loaded_bytes == sizes[LARGE]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ens.encode(TEXTS, models=SMALL)  # a model within the budget loads without a word
    assert list(ens.loaded) == [SMALL]


def test_eviction_returns_the_memory(home, monkeypatch):
    ens = Ensemble([LARGE])
    ens.encode(TEXTS)
    active = mx.get_active_memory()
    trims = []
    monkeypatch.setattr(kalm_mlx.loading, "trim_malloc", lambda: trims.append(1) or True)
    assert ens.unload() == [LARGE]
    assert ens.loaded == {}
    assert active - mx.get_active_memory() >= home[LARGE]
    assert mx.get_cache_memory() == 0
    assert trims == [1]  # the C heap's free pages go back too (glibc keeps them otherwise)


def test_a_failed_load_raises_for_every_caller_and_can_be_retried(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    ens = Ensemble([broken])
    barrier = threading.Barrier(4)

    def call():
        barrier.wait()
        ens.encode(TEXTS)

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(call) for _ in range(4)]
    for future in futures:
        assert isinstance(future.exception(), (ValueError, FileNotFoundError))
    with pytest.raises((ValueError, FileNotFoundError)):
        ens.encode(TEXTS)  # tried again, not stuck behind the failed load
    assert ens.loaded == {} and ens.load_counts == {}


def test_timings_are_per_model_and_per_thread(home):
    ens = Ensemble([SMALL, MEDIUM])
    ens.encode(TEXTS)
    first = ens.timings
    assert list(first) == [SMALL, MEDIUM]
    assert all(set(t) == {"wait", "load", "encode"} for t in first.values())
    assert all(value >= 0 for t in first.values() for value in t.values())
    ens.encode(TEXTS, models=MEDIUM)
    assert list(ens.timings) == [MEDIUM]
    assert ens.timings[MEDIUM]["load"] == 0.0  # already loaded: nothing to load
    other = threading.Thread(target=ens.encode, args=(TEXTS,), kwargs={"models": SMALL})
    other.start()
    other.join()
    assert list(ens.timings) == [MEDIUM]  # another thread's call does not overwrite ours


# --- threads --------------------------------------------------------------------------------


class WatchedLoader:
    """kalm_mlx.load, recording anything the ensemble must never do: a model loaded twice at
    once or while already loaded, and a model evicted (or reloaded) while it encodes."""

    def __init__(self):
        self.ensemble: Ensemble | None = None
        self.problems: list[str] = []
        self.in_flight: Counter[str] = Counter()
        self.lock = threading.Lock()

    def __call__(self, name: str):
        with self.lock:
            self.in_flight[name] += 1
            if self.in_flight[name] > 1:
                self.problems.append(f"{name} loaded by two threads at once")
        if name in self.ensemble.loaded:
            self.problems.append(f"{name} loaded while already loaded")
        try:
            embedder = kalm_mlx.load(name)
        finally:
            with self.lock:
                self.in_flight[name] -= 1
        for method in ("encode_queries", "encode_documents"):
            setattr(embedder, method, self._watch(name, getattr(embedder, method)))
        return embedder

    def _watch(self, name, encode):
        def watched(*args, **kwargs):
            loads = self.ensemble.load_counts.get(name)
            out = encode(*args, **kwargs)
            if name not in self.ensemble.loaded or self.ensemble.load_counts.get(name) != loads:
                self.problems.append(f"{name} evicted while encoding")
            return out

        return watched


def run_threads(ens: Ensemble, threads: int = 8, rounds: int = 3) -> list[tuple[str, dict]]:
    """Every thread encodes TEXTS ``rounds`` times, alternating queries and documents."""
    barrier = threading.Barrier(threads)

    def work(worker: int):
        barrier.wait()
        kinds = [("query", "document")[(worker + r) % 2] for r in range(rounds)]
        return [(kind, ens.encode(TEXTS, kind=kind)) for kind in kinds]

    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(work, worker) for worker in range(threads)]
        return [item for future in futures for item in future.result()]


def test_threads_never_load_a_model_twice(home):
    loader = WatchedLoader()
    ens = loader.ensemble = Ensemble([SMALL, MEDIUM, LARGE], loader=loader)
    run_threads(ens)
    assert loader.problems == []
    assert ens.load_counts == {SMALL: 1, MEDIUM: 1, LARGE: 1}


def test_threads_with_a_budget_for_one_model(home):
    sizes = home
    budget = sizes[LARGE] + sizes[SMALL] // 4  # every model fits alone, no two together
    single = Ensemble([SMALL, MEDIUM, LARGE], memory_budget=budget)
    expected = {kind: single.encode(TEXTS, kind=kind) for kind in ("query", "document")}

    loader = WatchedLoader()
    ens = loader.ensemble = Ensemble([SMALL, MEDIUM, LARGE], memory_budget=budget, loader=loader)
    results = run_threads(ens, threads=8, rounds=3)
    assert loader.problems == []
    assert len(results) == 24
    for kind, vectors in results:
        assert list(vectors) == [SMALL, MEDIUM, LARGE]
        for name in vectors:
            np.testing.assert_array_equal(vectors[name], expected[kind][name])
    assert ens.peak_loaded_bytes <= budget
    assert len(ens.loaded) == 1
    assert sum(ens.load_counts.values()) >= 3


# --- fusion ---------------------------------------------------------------------------------


def test_competition_ranks():
    assert competition_ranks(np.array([0.2, 0.9, 0.5])).tolist() == [3, 1, 2]
    assert competition_ranks(np.array([0.5, 0.5, 0.1, 0.7])).tolist() == [2, 2, 4, 1]


def test_fuse_rrf_by_hand():
    scores = {"a": np.array([0.9, 0.5, 0.7]), "b": np.array([0.2, 0.8, 0.6])}
    # ranks: a -> 1, 3, 2; b -> 3, 1, 2
    fused = fuse_rrf(scores, {"a": 1.0, "b": 0.5})
    expected = [1 / 61 + 0.5 / 63, 1 / 63 + 0.5 / 61, 1 / 62 + 0.5 / 62]
    np.testing.assert_allclose(fused, expected, rtol=1e-12)
    np.testing.assert_allclose(fuse_rrf(scores, {"a": 1.0, "b": 1.0}, k=0), [1 + 1 / 3, 1 / 3 + 1, 1])
    tied = fuse_rrf({"a": np.array([0.5, 0.5, 0.1])}, {"a": 1.0})
    np.testing.assert_allclose(tied, [1 / 61, 1 / 61, 1 / 63])


def test_fuse_scores_by_hand():
    scores = {"a": np.array([0.9, 0.5, 0.7]), "b": np.array([0.2, 0.8, 0.6])}
    fused = fuse_scores(scores, {"a": 1.0, "b": 0.5})
    np.testing.assert_allclose(fused, [(0.9 + 0.1) / 1.5, (0.5 + 0.4) / 1.5, (0.7 + 0.3) / 1.5])


def test_fusion_errors():
    with pytest.raises(ValueError, match="one length"):
        fuse_scores({"a": np.zeros(3), "b": np.zeros(2)}, {"a": 1, "b": 1})
    with pytest.raises(ValueError, match="no weight for b"):
        fuse_rrf({"a": np.zeros(3), "b": np.zeros(3)}, {"a": 1})
    with pytest.raises(ValueError, match="non-negative"):
        fuse_rrf({"a": np.zeros(3)}, {"a": 1}, k=-1)
    with pytest.raises(ValueError, match="no scores"):
        fuse_scores({}, {})


def documents_with_cosines(query: np.ndarray, cosines: list[float], seed: int) -> np.ndarray:
    """Unit vectors whose cosine with the unit vector ``query`` is exactly each of ``cosines``."""
    rng = np.random.default_rng(seed)
    other = rng.standard_normal(query.shape[0])
    other -= (other @ query) * query
    other /= np.linalg.norm(other)
    return np.array([c * query + np.sqrt(1 - c * c) * other for c in cosines], dtype=np.float32)


def test_rank_fuses_hand_checkable_rankings(home):
    ens = Ensemble([SMALL, MEDIUM], weights={SMALL: 2.0, MEDIUM: 1.0})
    query = "which document?"
    query_vectors = ens.encode(query, kind="query")
    cosines = {SMALL: [0.9, 0.1, 0.5], MEDIUM: [-0.9, 0.8, 0.7]}
    documents = {
        name: documents_with_cosines(query_vectors[name][0].astype(np.float64), cosines[name], seed)
        for seed, name in enumerate(cosines)
    }
    # RRF: SMALL ranks 1, 3, 2 and MEDIUM 3, 1, 2.
    rrf = ens.rank(query, documents, fusion="rrf")
    assert [index for index, _ in rrf] == [0, 2, 1]
    by_index = dict(rrf)
    assert by_index[0] == pytest.approx(2 / 61 + 1 / 63, rel=1e-12)
    assert by_index[1] == pytest.approx(2 / 63 + 1 / 61, rel=1e-12)
    assert by_index[2] == pytest.approx(3 / 62, rel=1e-12)
    # Score fusion: weighted mean cosines 0.3, 0.333.., 0.5667.
    score = ens.rank(query, documents, fusion="score")
    assert [index for index, _ in score] == [2, 1, 0]
    np.testing.assert_allclose([s for _, s in sorted(score)], [0.9 / 3, 1.0 / 3, 1.7 / 3], atol=1e-6)
    assert ens.rank(query, documents, top_k=1, fusion="score") == score[:1]
    assert ens.rank(query, documents, k=0)[0] == (0, pytest.approx(2 / 1 + 1 / 3))


def test_rank_on_texts_equals_rank_on_precomputed_vectors(home):
    ens = Ensemble([SMALL, MEDIUM, LARGE], weights=[1.0, 0.5, 2.0])
    documents = TEXTS
    precomputed = ens.encode(documents, kind="document")
    for fusion in ("rrf", "score"):
        from_texts = ens.rank("quick brown fox", documents, fusion=fusion)
        assert from_texts == ens.rank("quick brown fox", precomputed, fusion=fusion)
        assert sorted(index for index, _ in from_texts) == list(range(len(documents)))
        fused = [score for _, score in from_texts]
        assert fused == sorted(fused, reverse=True)
    assert len(ens.rank("quick brown fox", precomputed, top_k=2)) == 2


def test_rank_checks_its_arguments(home):
    ens = Ensemble([SMALL, MEDIUM])
    vectors = ens.encode(TEXTS, kind="document")
    with pytest.raises(ValueError, match="fusion must be one of rrf, score"):
        ens.rank("q", vectors, fusion="max")
    with pytest.raises(ValueError, match="missing for bge-base"):
        ens.rank("q", {SMALL: vectors[SMALL]})
    with pytest.raises(ValueError, match="one row per document"):
        ens.rank("q", {SMALL: vectors[SMALL], MEDIUM: vectors[MEDIUM][:2]})
    with pytest.raises(ValueError, match="dims"):
        ens.rank("q", {SMALL: vectors[SMALL][:, :8], MEDIUM: vectors[MEDIUM]})
    with pytest.raises(ValueError, match="top_k"):
        ens.rank("q", vectors, top_k=0)
    with pytest.raises(TypeError, match="query must be a string"):
        ens.rank(["q"], vectors)


def test_encode_fused_dot_products_are_weighted_mean_cosines(home):
    weights = {SMALL: 1.0, MEDIUM: 0.8, LARGE: 0.3}
    ens = Ensemble([SMALL, MEDIUM, LARGE], weights=weights)
    queries = ens.encode_fused(QUERIES, kind="query")
    documents = ens.encode_fused(TEXTS, kind="document")
    assert queries.dtype == np.float32 and queries.shape == (len(QUERIES), 3 * 64)
    np.testing.assert_allclose(np.linalg.norm(documents, axis=1), 1.0, atol=1e-6)
    per_query = ens.encode(QUERIES, kind="query")
    per_document = ens.encode(TEXTS, kind="document")
    expected = sum(weights[m] * (per_query[m] @ per_document[m].T) for m in weights) / sum(weights.values())
    np.testing.assert_allclose(queries @ documents.T, expected, atol=1e-6)
    # The fused dot products order documents exactly as score fusion does.
    fused_order = np.argsort(-(queries[0] @ documents.T), kind="stable").tolist()
    assert fused_order == [index for index, _ in ens.rank(QUERIES[0], per_document, fusion="score")]


# --- from_settings, use(), eviction counts --------------------------------------------------


def test_from_settings_equals_from_env():
    env = {"EMBED_MODELS": "minilm:2,bge-base", "EMBED_MEMORY_BUDGET": "1GB", "EMBED_MAX_LOADED": "1"}
    settings = Settings.from_env(env)
    assert settings == Settings(models=("minilm", "bge-base"), weights={"minilm": 2.0, "bge-base": 1.0},
                                memory_budget=10**9, max_loaded=1)
    for ens in (Ensemble.from_settings(settings), Ensemble.from_env(environ=env)):
        assert (ens.models, ens.weights, ens.memory_budget, ens.max_loaded) == (
            settings.models, dict(settings.weights), settings.memory_budget, settings.max_loaded)


def test_use_holds_the_model_and_counts_evictions(home):
    sizes = home
    ens = Ensemble([SMALL, MEDIUM, LARGE], memory_budget=sizes[LARGE])  # one model at a time
    with ens.use(SMALL) as embedder:
        assert list(ens.loaded) == [SMALL]
        np.testing.assert_allclose(embedder.encode_queries(TEXTS), direct(SMALL, "query"), atol=1e-6)
    assert ens.eviction_counts == {}
    ens.encode(TEXTS, models=LARGE)
    ens.encode(TEXTS, models=MEDIUM)
    ens.encode(TEXTS, models=SMALL)
    assert list(ens.loaded) == [SMALL]
    assert ens.eviction_counts == {SMALL: 1, LARGE: 1, MEDIUM: 1}
    assert ens.unload() == [SMALL] and ens.eviction_counts[SMALL] == 2
    with pytest.raises(ValueError, match="not one of the ensemble's models"):
        with ens.use("nomic"):
            pass


def test_a_model_in_use_is_not_evicted_by_another_thread(home):
    sizes = home
    ens = Ensemble([SMALL, LARGE], memory_budget=sizes[LARGE])  # one at a time
    inside, other_done = threading.Event(), threading.Event()
    order = []

    def other():
        inside.wait()
        ens.encode(TEXTS, models=LARGE)  # must wait for SMALL to be released
        order.append("large")
        other_done.set()

    thread = threading.Thread(target=other)
    thread.start()
    with ens.use(SMALL):
        inside.set()
        assert not other_done.wait(0.5)
        assert list(ens.loaded) == [SMALL]
        order.append("small released")
    thread.join(60)
    assert order == ["small released", "large"]
    assert list(ens.loaded) == [LARGE]


def test_check_kind_names_the_choices():
    assert [check_kind(kind) for kind in KINDS] == ["query", "document"]
    with pytest.raises(ValueError, match="kind must be one of query, document, not 'passage'"):
        check_kind("passage")
