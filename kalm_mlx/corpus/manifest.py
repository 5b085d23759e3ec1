"""The output folder's ``_manifest.json``: what the job is, which shards are done, the totals.

The manifest has two halves. ``job`` says what the output is made of (inputs with their
size and modification time, models with their dims and prompts, the options that change
a vector or a row); a rerun compares it with its own and refuses to mix two different
jobs in one folder. ``shards`` lists the finished shards, each with the resume position
it ends at and its counts, so that a killed run loses at most the shard it was writing.
The file is rewritten whole, to a temporary name and renamed, after each shard.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST = "_manifest.json"
"""The leading underscore makes pyarrow and pandas skip it when they read the folder as a dataset."""
FORMAT = "kalm-mlx-corpus/1"
SHARD_PATTERN = "part-{:05d}.parquet"


@dataclass
class Shard:
    """A finished shard: its file, rows, resume position and counts."""

    file: str
    rows: int
    end: tuple[int, int]
    """(input index, records of that input consumed): where the next shard starts reading."""
    tokens: dict[str, int] = field(default_factory=dict)
    """Tokens encoded per model (prompt and special tokens included, after truncation)."""
    truncated: dict[str, int] = field(default_factory=dict)
    empty: int = 0
    """Texts with no tokens for some model (all-zero vectors, as ``encode()`` gives them)."""
    bad_rows: int = 0
    """Rows skipped as unreadable (``skip_bad_rows``)."""

    def to_json(self) -> dict:
        """The shard as manifest JSON."""
        return {"file": self.file, "rows": self.rows, "end": list(self.end), "tokens": self.tokens,
                "truncated": self.truncated, "empty": self.empty, "bad_rows": self.bad_rows}

    @classmethod
    def from_json(cls, data: dict) -> Shard:
        """A shard read back from manifest JSON."""
        return cls(data["file"], int(data["rows"]), tuple(data["end"]), dict(data["tokens"]),
                   dict(data["truncated"]), int(data["empty"]), int(data["bad_rows"]))


@dataclass
class Manifest:
    """The job description plus its progress."""

    job: dict
    shards: list[Shard] = field(default_factory=list)
    complete: bool = False
    trailing_bad_rows: int = 0
    """Bad rows after the last shard's end (counted once the job is complete)."""

    def totals(self) -> dict:
        """Rows, tokens, truncated, empty and bad rows over the finished shards."""
        models = [m["column"] for m in self.job.get("models", [])]
        return {
            "rows": sum(s.rows for s in self.shards),
            "tokens": {m: sum(s.tokens.get(m, 0) for s in self.shards) for m in models},
            "truncated": {m: sum(s.truncated.get(m, 0) for s in self.shards) for m in models},
            "empty": sum(s.empty for s in self.shards),
            "bad_rows": sum(s.bad_rows for s in self.shards) + self.trailing_bad_rows,
        }

    def to_json(self) -> dict:
        """The manifest as JSON (the format tag, the job, the shards, the totals)."""
        return {"format": FORMAT, **self.job, "shards": [s.to_json() for s in self.shards],
                "shards_done": len(self.shards), "complete": self.complete,
                "trailing_bad_rows": self.trailing_bad_rows, "totals": self.totals()}

    def write(self, folder: Path) -> None:
        """Write ``folder/manifest.json`` atomically."""
        write_atomic(Path(folder) / MANIFEST, json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n")


JOB_KEYS = ("kalm_mlx_version", "kind", "instruction", "dim", "dtype", "models", "options", "inputs")


def read_manifest(folder: Path) -> Manifest | None:
    """The manifest in ``folder``, or None if there is none; ValueError if it is unreadable."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT!r}")
        job = {key: data[key] for key in JOB_KEYS}
        shards = [Shard.from_json(s) for s in data["shards"]]
        return Manifest(job, shards, bool(data["complete"]), int(data.get("trailing_bad_rows", 0)))
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a kalm-mlx corpus manifest ({err}); use --force to start over") from None


def job_difference(old: dict, new: dict) -> str | None:
    """The first way two job descriptions differ, in words, or None when they are the same job.

    The kalm-mlx version is recorded but not compared (vectors do not depend on it).
    """
    old_inputs = {i["path"]: i for i in old["inputs"]}
    new_inputs = {i["path"]: i for i in new["inputs"]}
    for path in new_inputs.keys() - old_inputs.keys():
        return f"input {path} is new"
    for path in old_inputs.keys() - new_inputs.keys():
        return f"input {path} is no longer an input"
    if list(old_inputs) != list(new_inputs):
        return "the inputs are in a different order"
    for path, was in old_inputs.items():
        for key, what in (("size", "size"), ("mtime_ns", "modification time"), ("format", "format")):
            if was[key] != new_inputs[path][key]:
                return f"input {path} changed: {what} {was[key]} -> {new_inputs[path][key]}"
    old_models = [m["model"] for m in old["models"]]
    new_models = [m["model"] for m in new["models"]]
    if old_models != new_models:
        return f"models {', '.join(old_models)} -> {', '.join(new_models)}"
    for was, now in zip(old["models"], new["models"]):
        for key in now.keys() & was.keys():
            if was[key] != now[key]:
                return f"model {now['model']}: {key} {was[key]!r} -> {now[key]!r}"
    for option in sorted(old["options"].keys() | new["options"].keys()):
        if old["options"].get(option) != new["options"].get(option):
            return f"option {option}: {old['options'].get(option)!r} -> {new['options'].get(option)!r}"
    for key in ("kind", "instruction", "dim", "dtype"):
        if old[key] != new[key]:
            return f"{key}: {old[key]!r} -> {new[key]!r}"
    return None


def replace_atomically(path: Path, write: Callable[[str], None]) -> None:
    """Make ``path`` by ``write(temporary path)`` in the same folder, synced, then renamed over ``path``.

    A crash at any point leaves ``path`` as it was (or absent) and at most a ``.NAME.*.tmp`` file.
    """
    path = Path(path)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(temp)
        with open(temp, "rb") as written:
            os.fsync(written.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`replace_atomically`)."""
    replace_atomically(path, lambda temp: Path(temp).write_text(text, encoding="utf-8"))
