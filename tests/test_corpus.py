"""The corpus job on real files (JSONL, Parquet, CSV, TSV, text) with tiny converted models and MiniLM."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pa_dataset
import pyarrow.parquet as pq
import pytest

import kalm_mlx
from convert import convert
from kalm_mlx.cli import main as cli_main
from kalm_mlx.corpus import (
    MANIFEST,
    BadRowError,
    embed_corpus,
    embed_texts,
    find_inputs,
    read_manifest,
)
from kalm_mlx.corpus.manifest import job_difference
from kalm_mlx.corpus.readers import count_records
from tests.helpers import make_qwen2_checkpoint

pytestmark = [pytest.mark.filterwarnings("ignore::kalm_mlx.TruncationWarning"),
              pytest.mark.filterwarnings("ignore::kalm_mlx.EmptyTextWarning")]

ROOT = Path(__file__).resolve().parent.parent
MAX_TOKENS = 32
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()


def corpus_texts(count: int, seed: int = 0) -> list[str]:
    """``count`` texts of varied length, with unicode, one longer than MAX_TOKENS and one empty."""
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 12)))) for _ in range(count)]
    texts[1] = "Bonjour le monde, 你好，世界。 " + texts[1]
    texts[2] = " ".join(WORDS * 4)  # truncated
    texts[3] = ""  # no tokens: a zero vector
    return texts


def write_corpus(folder: Path, texts: list[str]) -> list[tuple[str, str]]:
    """Spread ``texts`` over five files in ``folder``; returns the expected (id, text) in job order.

    The folder order is: a.jsonl, b.parquet, d.tsv, e.txt, then sub/c.csv.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sub").mkdir(exist_ok=True)
    parts = np.array_split(np.arange(len(texts)), 5)
    a, b, c, d, e = ([texts[i] for i in part] for part in parts)
    expected = []
    with open(folder / "a.jsonl", "w", encoding="utf-8") as out:  # a blank line at line 3
        line = 0
        for i, text in enumerate(a):
            line += 1
            if i == 2:
                out.write("\n")
                line += 1
            out.write(json.dumps({"text": text, "n": i}, ensure_ascii=False) + "\n")
            expected.append((f"a.jsonl:{line}", text))
    pq.write_table(pa.table({"text": b, "n": list(range(len(b)))}), folder / "b.parquet", row_group_size=3)
    expected += [(f"b.parquet:{i + 1}", t) for i, t in enumerate(b)]
    with open(folder / "d.tsv", "w", encoding="utf-8") as out:
        out.write("n\ttext\n" + "".join(f"{i}\t{t}\n" for i, t in enumerate(d)))
    expected += [(f"d.tsv:{i + 1}", t) for i, t in enumerate(d)]
    (folder / "e.txt").write_text("".join(t + "\n" for t in e), encoding="utf-8")
    expected += [(f"e.txt:{i + 1}", t) for i, t in enumerate(e)]
    c = [c[0] + "\nsecond line, \"quoted\""] + c[1:]  # a quoted field across lines
    pa_csv_rows = "text,n\n" + "".join('"' + t.replace('"', '""') + f'",{i}\n' for i, t in enumerate(c))
    (folder / "sub" / "c.csv").write_text(pa_csv_rows, encoding="utf-8")
    expected += [(f"sub/c.csv:{i + 1}", t) for i, t in enumerate(c)]
    return expected


def tiny_model(root: Path, name: str, seed: int) -> Path:
    """A tiny random Qwen2 (64 wide, one layer, 32 tokens) converted into ``root/name-mlx``."""
    source = root / name
    make_qwen2_checkpoint(source, hidden=64, heads=2, kv_heads=1, layers=1, intermediate=128,
                          max_seq_length=MAX_TOKENS, seed=seed)
    convert(source, root / f"{name}-mlx", progress=False)
    return root / f"{name}-mlx"


def read_index(folder: Path) -> pa.Table:
    """The output folder read as one pyarrow dataset."""
    return pa_dataset.dataset(folder, format="parquet").to_table()


def vectors(table: pa.Table, column: str) -> np.ndarray:
    return np.asarray(table[column].combine_chunks().flatten()).reshape(len(table), -1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus-models")
    return {"tiny-a": tiny_model(root, "tiny-a", 3), "tiny-b": tiny_model(root, "tiny-b", 4)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus") / "data"
    texts = corpus_texts(60)
    return folder, write_corpus(folder, texts)


@pytest.fixture(scope="module")
def full_run(models, corpus, tmp_path_factory):
    """One uninterrupted run with both models, texts kept, 7 rows per shard."""
    folder, _ = corpus
    out = tmp_path_factory.mktemp("full") / "index"
    summary = embed_corpus([folder], out, [str(models["tiny-a"]), str(models["tiny-b"])], keep_text=True,
                           shard_rows=7, batch_size=4, progress=False)
    return out, summary


def test_vectors_equal_encode_in_input_order(models, corpus, full_run):
    _, expected = corpus
    out, summary = full_run
    table = read_index(out)
    assert table.schema.names == ["id", "text", "tiny-a", "tiny-b"]
    assert table.schema.field("tiny-a").type == pa.list_(pa.float32(), 64)
    assert list(zip(table["id"].to_pylist(), table["text"].to_pylist())) == expected
    texts = [text for _, text in expected]
    for column, folder in models.items():
        reference = kalm_mlx.load(folder).encode_documents(texts)
        assert np.abs(vectors(table, column) - reference).max() < 1e-6
    assert not vectors(table, "tiny-a")[texts.index("")].any()  # empty text: zeros, as encode() gives
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST] + [f"part-{i:05d}.parquet" for i in range(9)]
    assert summary.texts == len(texts) == 60 and summary.shards == 9 and summary.bad_rows == 0
    model = kalm_mlx.load(models["tiny-a"])
    with pytest.warns(kalm_mlx.TruncationWarning, match=r"(\d+) of 60 text"):
        token_ids = model.tokenize(texts)
    assert 0 < model.truncated_texts < 60 and summary.empty == 1
    assert summary.truncated == {"tiny-a": model.truncated_texts, "tiny-b": model.truncated_texts}
    assert summary.tokens["tiny-a"] == sum(len(ids) for ids in token_ids)


def test_manifest_describes_the_job(models, corpus, full_run):
    folder, _ = corpus
    out, _ = full_run
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["kalm_mlx_version"] == kalm_mlx.__version__ and manifest["complete"]
    assert [(m["column"], m["dim"], m["prompt"]) for m in manifest["models"]] == [
        ("tiny-a", 64, ""), ("tiny-b", 64, "")]
    assert [i["name"] for i in manifest["inputs"]] == ["a.jsonl", "b.parquet", "d.tsv", "e.txt", "sub/c.csv"]
    assert manifest["inputs"][0]["size"] == (folder / "a.jsonl").stat().st_size
    assert manifest["options"]["shard_rows"] == 7 and manifest["shards_done"] == 9
    assert [s["rows"] for s in manifest["shards"]] == [7] * 8 + [4]
    assert manifest["totals"]["rows"] == 60


def test_query_kind_and_instruction_use_the_query_prompt(models, corpus, tmp_path):
    _, expected = corpus
    texts = [text for _, text in expected][:12]
    source = tmp_path / "q.txt"
    source.write_text("".join(t + "\n" for t in texts))
    embed_corpus(source, tmp_path / "out", str(models["tiny-a"]), kind="query", instruction="sts",
                 progress=False)
    embed_corpus(source, tmp_path / "out2", str(models["tiny-a"]), kind="query", progress=False)
    model = kalm_mlx.load(models["tiny-a"])
    for out, instruction in ((tmp_path / "out", "sts"), (tmp_path / "out2", None)):
        got = vectors(read_index(out), "tiny-a")
        assert np.abs(got - model.encode_queries(texts, instruction=instruction)).max() < 1e-6
    prompts = [json.loads((o / MANIFEST).read_text())["models"][0]["prompt"]
               for o in (tmp_path / "out", tmp_path / "out2")]
    assert prompts == ["", model.query_prompt()]


def test_dim_truncates_every_model(models, corpus, tmp_path):
    # A copy of tiny-a that says it was trained for Matryoshka dims 64 and 32.
    folder = tmp_path / "tiny-m"
    shutil.copytree(models["tiny-a"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["kalm_mlx"].update(name="tiny-m", matryoshka_dims=[64, 32])
    (folder / "config.json").write_text(json.dumps(config))
    texts = [text for _, text in corpus[1]][:20]
    (tmp_path / "in.txt").write_text("".join(t + "\n" for t in texts))
    embed_corpus(tmp_path / "in.txt", tmp_path / "out", str(folder), dim=32, progress=False)
    table = read_index(tmp_path / "out")
    assert table.schema.field("tiny-m").type == pa.list_(pa.float32(), 32)
    reference = kalm_mlx.load(folder).encode_documents(texts, truncate_dim=32)
    assert np.abs(vectors(table, "tiny-m") - reference).max() < 1e-6
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["models"][0]["dim"] == 32


def test_id_column_and_read_back_with_duckdb_and_pandas(models, tmp_path):
    records = [{"doc": f"d{i}", "body": f"text number {i}"} for i in range(9)]
    (tmp_path / "in").mkdir()
    with open(tmp_path / "in" / "x.jsonl", "w") as out:
        out.writelines(json.dumps(r) + "\n" for r in records)
    pq.write_table(pa.table({"doc": [7, 8], "body": ["seven", "eight"]}), tmp_path / "in" / "y.parquet")
    out = tmp_path / "out"
    embed_corpus(tmp_path / "in", out, str(models["tiny-a"]), text_column="body", id_column="doc",
                 progress=False)
    frame = duckdb.sql(f"SELECT id, \"tiny-a\" AS v FROM read_parquet('{out}/*.parquet')").df()
    assert frame["id"].tolist() == [f"d{i}" for i in range(9)] + ["7", "8"]
    reference = kalm_mlx.load(models["tiny-a"]).encode_documents([r["body"] for r in records] + ["seven", "eight"])
    assert np.abs(np.stack(frame["v"].to_numpy()) - reference).max() < 1e-6
    import pandas as pd

    assert pd.read_parquet(out)["id"].tolist() == frame["id"].tolist()  # the manifest is skipped


def run_child_until(code: str, out: Path, shards: int) -> None:
    """Run ``code`` in a child interpreter and SIGKILL it once ``out`` holds ``shards`` shards."""
    child = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                             cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not (out / f"part-{shards - 1:05d}.parquet").exists():
            assert child.poll() is None, "the child ended before it was killed"
            assert time.monotonic() < deadline, "the child wrote too few shards"
            time.sleep(0.005)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()


def test_a_run_killed_twice_and_rerun_gives_the_uninterrupted_output(models, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    texts = corpus_texts(4000, seed=5)
    with open(folder / "a.jsonl", "w") as out:
        out.writelines(json.dumps({"text": t}) + "\n" for t in texts[:2500])
    (folder / "b.txt").write_text("".join(t + "\n" for t in texts[2500:]))
    options = {"keep_text": True, "shard_rows": 200, "progress": False}
    reference = tmp_path / "reference"
    embed_corpus(folder, reference, str(models["tiny-a"]), **options)
    out = tmp_path / "index"
    code = (f"from kalm_mlx.corpus import embed_corpus; embed_corpus({str(folder)!r}, {str(out)!r}, "
            f"{str(models['tiny-a'])!r}, **{options!r})")
    run_child_until(code, out, shards=2)
    first = read_manifest(out)
    assert first is not None and not first.complete and 1 <= len(first.shards) < 20
    run_child_until(code, out, shards=len(first.shards) + 3)
    second = read_manifest(out)
    assert not second.complete and len(second.shards) > len(first.shards)
    (out / ".part-00019.parquet.left.tmp").write_bytes(b"half a shard")
    (out / "part-00019.parquet").write_bytes(b"a shard the manifest does not list")
    summary = embed_corpus(folder, out, str(models["tiny-a"]), **options)
    assert summary.resumed_shards == len(second.shards) and summary.texts == 4000
    assert read_index(out).equals(read_index(reference))  # ids, texts and vectors, bit for bit
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    again = embed_corpus(folder, out, str(models["tiny-a"]), **options)
    assert again.texts_this_run == 0 and again.resumed_shards == 20


def test_a_different_job_is_refused_naming_the_difference(models, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("one\ntwo\nthree\n")
    out = tmp_path / "out"
    model = str(models["tiny-a"])
    embed_corpus(source, out, model, shard_rows=2, progress=False)
    with pytest.raises(ValueError, match="option shard_rows: 2 -> 3"):
        embed_corpus(source, out, model, shard_rows=3, progress=False)
    with pytest.raises(ValueError, match=r"models .*tiny-a-mlx -> .*tiny-b-mlx"):
        embed_corpus(source, out, str(models["tiny-b"]), shard_rows=2, progress=False)
    source.write_text("one\ntwo\nthree\nfour\n")
    with pytest.raises(ValueError, match=r"input .*in\.txt changed: size 14 -> 19"):
        embed_corpus(source, out, model, shard_rows=2, progress=False)
    stat = source.stat()
    summary = embed_corpus(source, out, model, shard_rows=2, force=True, progress=False)
    assert summary.texts == 4 and summary.resumed_shards == 0
    assert read_index(out)["id"].to_pylist() == [f"in.txt:{i}" for i in range(1, 5)]
    assert (source.stat().st_mtime_ns, source.stat().st_size) == (stat.st_mtime_ns, stat.st_size)
    assert source.read_bytes() == b"one\ntwo\nthree\nfour\n"  # the inputs are never written


BAD_FILES = [
    ("a.jsonl", b'{"text": "ok"}\n{"text": 7}\n', 2, "field 'text' is a number, not a string"),
    ("a.jsonl", b'{"text": "ok"}\n{"txt": "x"}\n', 2, "has no 'text' field"),
    ("a.jsonl", b'{"text": "ok"}\n{"text": null}\n', 2, "field 'text' is null, not a string"),
    ("a.jsonl", b'{"text": "ok"}\nnot json\n', 2, "not valid JSON"),
    ("a.jsonl", b'{"text": "ok"}\n{"text": "\xff"}\n', 2, "not valid UTF-8"),
    ("a.jsonl", b'{"text": "ok"}\n{"text": "\\ud800"}\n', 2, "lone surrogate"),
    ("a.txt", b"ok\nbad \xfe\n", 2, "not valid UTF-8"),
    ("a.csv", b"text,n\nok,1\ntoo,many,fields\n", 2, "has 3 fields, expected 2"),
    ("a.csv", b"text,n\nok,1\n\xfe\xff,2\n", 2, "column 'text' is not valid UTF-8"),
]


@pytest.mark.parametrize(("name", "content", "row", "reason"), BAD_FILES)
def test_a_bad_row_fails_naming_file_and_row(models, tmp_path, name, content, row, reason):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(BadRowError, match=rf"{name}: row {row}: .*{re.escape(reason)}"):
        embed_corpus(tmp_path / name, tmp_path / "out", str(models["tiny-a"]), progress=False)
    assert not list((tmp_path / "out").glob("part-*"))


def test_bad_rows_are_skipped_and_counted(models, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jsonl").write_bytes(b"".join(content for name, content, _, _ in BAD_FILES if name == "a.jsonl"))
    (folder / "b.csv").write_bytes(b"text,n\nfine,1\ntoo,many,fields\n\xfe\xff,3\nlast,4\n")
    pq.write_table(pa.table({"text": ["p", None, "q"]}), folder / "c.parquet")
    out = tmp_path / "out"
    summary = embed_corpus(folder, out, str(models["tiny-a"]), skip_bad_rows=True, shard_rows=2,
                           progress=False)
    jsonl_good = [f"a.jsonl:{i}" for i in range(1, 13, 2)]
    assert read_index(out)["id"].to_pylist() == jsonl_good + ["b.csv:1", "b.csv:4", "c.parquet:1", "c.parquet:3"]
    assert summary.bad_rows == 6 + 2 + 1 and read_manifest(out).totals()["bad_rows"] == 9


def test_whole_file_problems_are_named(models, tmp_path):
    pq.write_table(pa.table({"body": ["x"], "num": [1]}), tmp_path / "a.parquet")
    model = str(models["tiny-a"])
    with pytest.raises(ValueError, match=r"a\.parquet: no column 'text' \(columns: body, num\)"):
        embed_corpus(tmp_path / "a.parquet", tmp_path / "o1", model, progress=False)
    with pytest.raises(ValueError, match=r"column 'num' holds int64, not text"):
        embed_corpus(tmp_path / "a.parquet", tmp_path / "o2", model, text_column="num", progress=False)
    with pytest.raises(FileNotFoundError, match="nothing.jsonl: no such file"):
        embed_corpus(tmp_path / "nothing.jsonl", tmp_path / "o3", model, progress=False)
    with pytest.raises(ValueError, match="trained for dims 64, not 7"):
        embed_corpus(tmp_path / "a.parquet", tmp_path / "o4", model, text_column="body", dim=7, progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.md").write_text("someone else's file")
    with pytest.raises(ValueError, match="not empty and holds no _manifest.json"):
        embed_corpus(tmp_path / "a.parquet", tmp_path / "full", model, text_column="body", progress=False)
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3", "o4"))


def test_find_inputs_folders_globs_and_order(tmp_path):
    (tmp_path / "d" / "deep").mkdir(parents=True)
    for name in ("d/b.jsonl", "d/a.txt", "d/deep/c.csv", "d/skip.md", "d/.hidden.txt", "z.tsv"):
        (tmp_path / name).write_text("text\nx\n")
    found = find_inputs([tmp_path / "z.tsv", tmp_path / "d", str(tmp_path / "d" / "*.jsonl")])
    assert [(f.name, f.format) for f in found] == [
        ("z.tsv", "tsv"), ("d/a.txt", "text"), ("d/b.jsonl", "jsonl"), ("d/deep/c.csv", "csv")]
    assert [f.name for f in find_inputs(tmp_path / "d", exclude=tmp_path / "d" / "deep")] == ["a.txt", "b.jsonl"]
    with pytest.raises(ValueError, match="skip.md: unknown input format"):
        find_inputs(tmp_path / "d" / "skip.md")
    with pytest.raises(FileNotFoundError, match="no input files match"):
        find_inputs(str(tmp_path / "*.parquet"))
    assert [count_records(f) for f in found] == [1, 2, 2, 1]


def test_job_difference_names_what_changed():
    job = {"kalm_mlx_version": "1", "kind": "document", "instruction": None, "dim": None, "dtype": None,
           "models": [{"model": "m", "column": "m", "dim": 4, "prompt": ""}],
           "options": {"shard_rows": 5}, "inputs": [{"path": "/a", "size": 1, "mtime_ns": 2, "format": "text"}]}
    assert job_difference(job, {**job, "kalm_mlx_version": "2"}) is None
    assert job_difference(job, {**job, "kind": "query"}) == "kind: 'document' -> 'query'"
    assert job_difference(job, {**job, "models": [{**job["models"][0], "prompt": "Q: "}]}) == "model m: prompt '' -> 'Q: '"
    moved = [{**job["inputs"][0], "mtime_ns": 3}]
    assert job_difference(job, {**job, "inputs": moved}) == "input /a changed: modification time 2 -> 3"


def text_of_exactly_max_tokens(model) -> str:
    """A text the tokenizer gives exactly ``max_tokens`` ids without cutting it."""
    for words in range(1, 12):
        for extra in range(40):
            text = " ".join(WORDS[:words]) + " " + "x" * extra
            before = model.truncated_texts
            if len(model.tokenize(text)[0]) == model.max_tokens and model.truncated_texts == before:
                return text
    raise AssertionError("no text of exactly max_tokens tokens found")


def test_embed_texts_counts_tokens_and_truncation_exactly(models):
    model = kalm_mlx.load(models["tiny-a"])
    exact = text_of_exactly_max_tokens(model)
    texts = [exact, " ".join(WORDS * 3), "short", ""]
    got, tokens, truncated = embed_texts(model, texts, prompt="P: ", batch_size=2)
    assert truncated.tolist() == [True, True, False, False]  # "P: " + exact is one token too long
    assert tokens.tolist() == [len(ids) for ids in model.tokenize(["P: " + t for t in texts])]
    assert np.abs(got - model.encode(texts, prompt="P: ")).max() < 1e-6
    _, _, truncated = embed_texts(model, texts)
    assert truncated.tolist() == [False, True, False, False]  # exactly at the limit is not truncated


def test_cli_with_real_minilm_and_progress(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    texts = ["MLX runs on Apple Silicon.", "Paris is in France.", "a " * 300, "Embeddings map text to vectors."]
    with open(tmp_path / "docs.jsonl", "w") as out:
        out.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    assert cli_main(["index", str(tmp_path / "docs.jsonl"), "-o", str(tmp_path / "out"), "--model", "minilm",
                     "--shard-rows", "3"]) == 0
    err = capsys.readouterr().err
    assert "4 texts in 2 shard(s)" in err and "truncated texts: 1 (minilm)" in err and "texts/s" in err
    assert "4/4" in err and "tok/s" in err  # the progress bar, in texts, with tokens/s
    reference = kalm_mlx.load("minilm").encode_documents(texts)
    assert np.abs(vectors(read_index(tmp_path / "out"), "minilm") - reference).max() < 1e-6
    assert cli_main(["index", str(tmp_path / "docs.jsonl"), "-o", str(tmp_path / "out"), "--quiet",
                     "--shard-rows", "3"]) == 0
    assert capsys.readouterr().err == ""
    assert cli_main(["index", str(tmp_path / "docs.jsonl"), "-o", str(tmp_path / "out"), "-q",
                     "--shard-rows", "2"]) == 2
    assert "option shard_rows: 3 -> 2" in capsys.readouterr().err


def test_replace_atomically_keeps_the_old_file_when_writing_fails(tmp_path):
    from kalm_mlx.corpus.manifest import replace_atomically

    target = tmp_path / "part-00000.parquet"
    target.write_text("old")

    def half_written(temp):
        Path(temp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_atomically(target, half_written)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == [target.name]
    replace_atomically(target, lambda temp: Path(temp).write_text("new"))
    assert target.read_text() == "new" and oct(target.stat().st_mode & 0o777) == "0o644"
