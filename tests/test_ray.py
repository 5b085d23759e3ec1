"""The corpus job on a real local Ray cluster (two CPUs), and kalm_mlx.ray.Embed in a user's pipeline."""

from __future__ import annotations

import json
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import kalm_mlx
from kalm_mlx.corpus import MANIFEST, embed_corpus, read_manifest
from tests.test_corpus import (
    corpus_texts,
    read_index,
    tiny_model,
    vectors,
    write_corpus,
)

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.filterwarnings("ignore::kalm_mlx.TruncationWarning"),
              pytest.mark.filterwarnings("ignore::kalm_mlx.EmptyTextWarning")]


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module, shut down (with its processes) at the end."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("ray-models"), "tiny-a", 3)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray-corpus") / "data"
    expected = write_corpus(folder, corpus_texts(40, seed=1))
    (folder / "bad.jsonl").write_bytes(b'{"text": "fine"}\n{"text": 3}\nnot json\n{"text": "also fine"}\n')
    return folder, expected


OPTIONS = {"keep_text": True, "shard_rows": 6, "batch_size": 4, "skip_bad_rows": True, "progress": False}


def test_ray_output_equals_the_single_machine_output(cluster, model, corpus, tmp_path):
    from kalm_mlx.ray import embed_corpus as embed_corpus_on_ray

    folder, _ = corpus
    single = embed_corpus(folder, tmp_path / "single", str(model), **OPTIONS)
    on_ray = embed_corpus_on_ray(folder, tmp_path / "ray", str(model), concurrency=1, **OPTIONS)
    a, b = read_index(tmp_path / "single"), read_index(tmp_path / "ray")
    assert a.schema == b.schema
    assert a["id"].to_pylist() == b["id"].to_pylist()
    assert a["id"].to_pylist()[:2] == ["a.jsonl:1", "a.jsonl:2"] and "bad.jsonl:4" in a["id"].to_pylist()
    assert a["text"].to_pylist() == b["text"].to_pylist()
    assert np.abs(vectors(a, "tiny-a") - vectors(b, "tiny-a")).max() < 1e-6
    single_manifest = json.loads((tmp_path / "single" / MANIFEST).read_text())
    ray_manifest = json.loads((tmp_path / "ray" / MANIFEST).read_text())
    assert ray_manifest == single_manifest  # same shards, positions, counts and totals
    assert (on_ray.texts, on_ray.bad_rows, on_ray.tokens, on_ray.truncated) == (
        single.texts, single.bad_rows, single.tokens, single.truncated) == (42, 2, single.tokens, single.truncated)

    # Resuming on Ray: drop the last three shards from the manifest and run again.
    manifest = read_manifest(tmp_path / "ray")
    manifest.shards, manifest.complete = manifest.shards[:-3], False
    manifest.write(tmp_path / "ray")
    resumed = embed_corpus_on_ray(folder, tmp_path / "ray", str(model), **OPTIONS)
    assert resumed.resumed_shards == len(manifest.shards) and resumed.texts == 42
    assert read_index(tmp_path / "ray")["id"].to_pylist() == a["id"].to_pylist()
    assert json.loads((tmp_path / "ray" / MANIFEST).read_text()) == single_manifest


def test_embed_in_a_users_pipeline_matches_encode(cluster, model, tmp_path):
    from kalm_mlx.ray import Embed

    texts = corpus_texts(30, seed=2)
    pq.write_table(pa.table({"text": texts, "n": list(range(30))}), tmp_path / "in.parquet")
    dataset = ray.data.read_parquet(str(tmp_path / "in.parquet")).map_batches(
        Embed, fn_constructor_kwargs={"model": str(model), "kind": "query", "column": "vec"},
        compute=ray.data.ActorPoolStrategy(size=1), batch_size=8)
    rows = sorted(dataset.take_all(), key=lambda row: row["n"])
    got = np.stack([row["vec"] for row in rows])
    assert got.dtype == np.float32 and got.shape == (30, 64)
    assert np.abs(got - kalm_mlx.load(model).encode_queries(texts)).max() < 1e-6
    assert [row["text"] for row in rows] == texts


def test_actors_the_cluster_cannot_run_are_refused(cluster, model, tmp_path):
    from kalm_mlx.ray import embed_corpus as embed_corpus_on_ray

    (tmp_path / "in.txt").write_text("one\n")
    with pytest.raises(ValueError, match=r"no Ray node has 3 CPUs and 0 GPUs for an actor \(nodes: 2 CPU/0 GPU\)"):
        embed_corpus_on_ray(tmp_path / "in.txt", tmp_path / "out", str(model), num_cpus=3, progress=False)
    with pytest.raises(ValueError, match=r"2 actor\(s\) x 1 CPU would leave none of the cluster's 2 CPUs"):
        embed_corpus_on_ray(tmp_path / "in.txt", tmp_path / "out", str(model), concurrency=2, progress=False)


def test_without_ray_the_error_says_what_to_install(model, tmp_path, monkeypatch):
    from kalm_mlx.ray import embed_corpus as embed_corpus_on_ray

    (tmp_path / "in.txt").write_text("one\n")
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(RuntimeError, match=r"pip install 'kalm-mlx\[ray\]'"):
        embed_corpus_on_ray(tmp_path / "in.txt", tmp_path / "out", str(model), progress=False)
