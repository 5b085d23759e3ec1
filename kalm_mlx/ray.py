"""Ray Data: :class:`Embed`, an actor that embeds batches, and the corpus job on a Ray cluster.

``Embed`` is for your own pipelines::

    ds = ray.data.read_parquet("corpus/")
    ds = ds.map_batches(kalm_mlx.ray.Embed, fn_constructor_kwargs={"model": "kalm-v2"},
                        concurrency=4, batch_size=256)

Each actor loads its model once, in ``__init__``. :func:`embed_corpus` is
:func:`kalm_mlx.corpus.embed_corpus` on Ray Data: the inputs are read by Ray tasks (one
per file, so every machine must see the files at the same path), embedded by an actor
pool per model, and streamed back in order to this process, which writes the same
shards and manifest as the single-machine job and resumes the same way. Ray is an
optional extra: ``pip install 'kalm-mlx[ray]'``.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator, Sequence

import numpy as np

from . import load
from .corpus.encoding import embed_texts, job_prompt
from .corpus.job import JobPlan, ShardSink, run_job
from .corpus.manifest import Manifest
from .corpus.readers import BATCH_ROWS, Bad, BadRowError, read_records
from .corpus.shards import Embedded

__all__ = ["Embed", "embed_corpus"]

RAY_BATCH_ROWS = 512
"""Rows per actor call: smaller than the single-machine job's calls (which pad less) so
that a few thousand rows already keep several actors busy."""
INPUT, ROW, BAD = "_input", "_row", "_bad"
"""Bookkeeping columns of the job's dataset: input index, record number, unreadable row."""


class Embed:
    """A Ray Data callable class: adds a vector column to each batch (``map_batches``).

    ``model`` is anything :func:`kalm_mlx.load` takes (loaded once per actor, with
    ``dtype``); ``kind`` picks the document or query prompt (``instruction`` for
    queries); ``dim`` truncates (Matryoshka). The texts are read from ``text_column``;
    the vectors, an (n, dim) float32 array, go to ``column`` (default: the model's name).
    With ``token_counts``, two more columns say how many tokens each text had and whether
    it was truncated: ``{column}.tokens`` and ``{column}.truncated``.
    """

    def __init__(self, model: str, *, kind: str = "document", instruction: str | None = None,
                 dim: int | None = None, dtype: str | None = None, batch_size: int = 32,
                 text_column: str = "text", column: str | None = None, token_counts: bool = False):
        self.embedder = load(model, dtype=dtype)
        self.prompt = job_prompt(self.embedder, kind, instruction)
        self.embedder.encode([], truncate_dim=dim)  # a ValueError now for a dim it lacks
        self.dim = dim
        self.batch_size = batch_size
        self.text_column = text_column
        self.column = column or self.embedder.name
        self.token_counts = token_counts

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``batch`` (numpy format) with the vector column (and the counts) added."""
        texts = batch[self.text_column]
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"{self.text_column}[{i}] is {type(text).__name__}, expected str")
        vectors, tokens, truncated = embed_texts(self.embedder, list(texts), self.prompt, self.dim,
                                                 self.batch_size)
        out = dict(batch)
        out[self.column] = vectors
        if self.token_counts:
            out[f"{self.column}.tokens"] = tokens
            out[f"{self.column}.truncated"] = truncated
        return out


def embed_corpus(inputs, output, models: str | Sequence[str] = "minilm", *, address: str | None = None,
                 concurrency: int = 1, num_cpus: float = 1.0, num_gpus: float = 0.0,
                 progress: bool = True, **options):
    """:func:`kalm_mlx.corpus.embed_corpus` on Ray Data; same output, same resuming.

    ``address`` is a Ray cluster's (``auto``, ``ray://...``, ``host:port``); without one,
    an already initialised Ray is used, else ``RAY_ADDRESS``'s cluster is joined, else a
    local one is started (and shut down at the end). Each model gets ``concurrency``
    actors with ``num_cpus`` CPUs and ``num_gpus`` GPUs each. ``options`` are
    :func:`~kalm_mlx.corpus.embed_corpus`'s keyword options.
    """
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency must be a positive integer, not {concurrency!r}")
    if num_cpus < 0 or num_gpus < 0:
        raise ValueError("num_cpus and num_gpus must not be negative")
    runner = functools.partial(run_on_ray, address=address, concurrency=concurrency,
                               num_cpus=num_cpus, num_gpus=num_gpus)
    return run_job(inputs, output, models, runner, progress=progress, **options)


def run_on_ray(plan: JobPlan, manifest: Manifest, progress: bool, *, address: str | None,
               concurrency: int, num_cpus: float, num_gpus: float) -> None:
    """The Ray Data runner of :func:`~kalm_mlx.corpus.job.run_job`."""
    try:
        import ray
    except ImportError:
        raise RuntimeError("--ray needs Ray Data: pip install 'kalm-mlx[ray]'") from None

    plan.ensemble.unload()  # the models were loaded here only to describe them
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, log_to_driver=False, include_dashboard=False)
    try:
        check_resources(concurrency * len(plan.models), num_cpus, num_gpus)
        dataset = _job_dataset(plan, manifest, concurrency, num_cpus, num_gpus)
        with ShardSink(plan, manifest, progress) as sink:
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
                for part in _embedded_parts(plan, batch):
                    sink.add(part)
    finally:
        if started:
            ray.shutdown()


def check_resources(actors: int, num_cpus: float, num_gpus: float) -> None:
    """Raise ValueError where Ray would wait for ever instead of running the job.

    That is when no node has ``num_cpus`` CPUs and ``num_gpus`` GPUs for an actor, or when
    the ``actors`` together would hold every CPU of the cluster: Ray Data's own tasks (which
    cut the rows into blocks for the actors) need one more.
    """
    import ray

    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    if not any(r.get("CPU", 0) >= num_cpus and r.get("GPU", 0) >= num_gpus for r in nodes):
        have = ", ".join(f"{r.get('CPU', 0):g} CPU/{r.get('GPU', 0):g} GPU" for r in nodes)
        raise ValueError(f"no Ray node has {num_cpus:g} CPUs and {num_gpus:g} GPUs for an actor "
                         f"(nodes: {have or 'none'})")
    total = sum(r.get("CPU", 0) for r in nodes)
    if actors * num_cpus > total - 1:
        raise ValueError(f"{actors} actor(s) x {num_cpus:g} CPU would leave none of the cluster's "
                         f"{total:g} CPUs to Ray Data's own tasks, which need one: use fewer actors "
                         "or a smaller --num-cpus")


def _job_dataset(plan: JobPlan, manifest: Manifest, concurrency: int, num_cpus: float, num_gpus: float):
    import ray.data

    # Settings of this process's current DataContext, which later datasets keep.
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # rows come back in input order
    context.enable_progress_bars = False  # the job has its own
    first, consumed = plan.start(manifest)
    tasks = [{"input": i, "start": consumed if i == first else 0}
             for i in range(first, len(plan.inputs))]
    read = functools.partial(_read_input, plan.inputs, plan.options["text_column"],
                             plan.options["id_column"], plan.options["skip_bad_rows"])
    dataset = ray.data.from_items(tasks, override_num_blocks=max(len(tasks), 1))
    # Reading takes no CPU of its own: an actor pool holding every CPU must not starve it.
    dataset = dataset.map_batches(read, batch_size=1, num_cpus=0)
    # A file's rows arrive as one block, which one actor would embed alone: cut it up (streaming).
    dataset = dataset.repartition(target_num_rows_per_block=RAY_BATCH_ROWS)
    for model in plan.models:
        dataset = dataset.map_batches(
            Embed, batch_size=RAY_BATCH_ROWS, compute=ray.data.ActorPoolStrategy(size=concurrency),
            num_cpus=num_cpus, num_gpus=num_gpus,
            fn_constructor_kwargs={"model": model["model"], "kind": plan.kind,
                                   "instruction": plan.instruction, "dim": plan.dim, "dtype": plan.dtype,
                                   "batch_size": plan.batch_size, "column": model["column"],
                                   "token_counts": True})
    return dataset


def _read_input(inputs, text_column: str, id_column: str | None, skip_bad_rows: bool,
                task: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
    """A Ray task: the records of one input as batches; unreadable rows flagged in ``_bad``."""
    index, start = int(task["input"][0]), int(task["start"][0])
    source = inputs[index]
    rows = {"id": [], "text": [], ROW: [], BAD: []}
    for number, text, ident in read_records(source, text_column, id_column, start=start):
        bad = isinstance(text, Bad)
        if bad and not skip_bad_rows:
            raise BadRowError.at(source, number, text)
        rows["id"].append("" if bad else ident)
        rows["text"].append("" if bad else text)  # embedded for nothing, then dropped
        rows[ROW].append(number)
        rows[BAD].append(bad)
        if len(rows["id"]) >= BATCH_ROWS:
            yield _read_batch(index, rows)
            rows = {key: [] for key in rows}
    if rows["id"]:
        yield _read_batch(index, rows)


def _read_batch(index: int, rows: dict[str, list]) -> dict[str, np.ndarray]:
    batch = {key: np.array(values, dtype=object) for key, values in rows.items() if key in ("id", "text")}
    batch[INPUT] = np.full(len(rows["id"]), index, dtype=np.int64)
    batch[ROW] = np.array(rows[ROW], dtype=np.int64)
    batch[BAD] = np.array(rows[BAD], dtype=bool)
    return batch


def _embedded_parts(plan: JobPlan, batch: dict[str, np.ndarray]) -> Iterator[Embedded]:
    """A batch from the dataset as :class:`Embedded` parts, one per run of rows of one input."""
    inputs = batch[INPUT]
    bounds = [0, *(np.flatnonzero(inputs[1:] != inputs[:-1]) + 1), len(inputs)]
    columns = [m["column"] for m in plan.models]
    for lo, hi in itertools.pairwise(bounds):
        bad = batch[BAD][lo:hi]
        good = np.flatnonzero(~bad) + lo
        rows = batch[ROW][lo:hi]
        yield Embedded(
            int(inputs[lo]), [str(i) for i in batch["id"][good]], [str(t) for t in batch["text"][good]],
            [int(r) for r in batch[ROW][good]],
            {c: np.asarray(batch[c][good], dtype=np.float32) for c in columns},
            {c: np.asarray(batch[f"{c}.tokens"][good]) for c in columns},
            {c: np.asarray(batch[f"{c}.truncated"][good]) for c in columns},
            [int(r) for r in rows[bad]], int(rows.max()))

