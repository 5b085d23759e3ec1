"""benchmarks/index.py runs end to end on a few texts (its numbers are for people, not asserted)."""

from __future__ import annotations

import pytest

from benchmarks import index


def test_index_benchmark_runs_and_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    texts = index.corpus(50, seed=1)
    assert len(texts) == 50 and all(4 <= len(t.split()) <= 120 for t in texts)
    assert index.main(["--texts", "40", "--rounds", "1", "--no-ray", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "index.md").read_text()
    assert "corpus job (JSONL -> Parquet" in table and "40 texts" in table
    assert '"job_vs_encode"' in (tmp_path / "index.json").read_text()
    with pytest.raises(SystemExit):
        index.main(["--texts", "0"])
