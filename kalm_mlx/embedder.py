"""Embedder: texts -> token ids -> batches -> encoder -> pooled, normalised vectors."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from tokenizers import Tokenizer

from ._backend import blas_thread_budget, set_blas_threads, tune_malloc
from .pooling import normalize as l2_normalize
from .pooling import pool, truncate

DEFAULT_MAX_BATCH_TOKENS = 16384
"""Padded tokens per batch on a GPU, which wants large batches (not measured on a Mac yet)."""
CPU_MAX_BATCH_TOKENS = 1024
"""Padded tokens per batch and per CPU stream (a batch split over two streams holds twice
as many): as fast per token as larger batches (OpenBLAS is at full rate from about 512
rows on), friendlier to the caches, and a long-tailed corpus sorted by length wastes far
less on padding (16 % against 134 % at 16384 in the benchmarks' mixed corpus, which runs
2.9x faster)."""


def default_max_batch_tokens() -> int:
    """The padded-token budget of a batch on the default device (see the constants above)."""
    if mx.default_device() == mx.gpu:
        return DEFAULT_MAX_BATCH_TOKENS
    return CPU_MAX_BATCH_TOKENS * default_parallel_streams()


def default_parallel_streams() -> int:
    """How many CPU streams an encode runs on: 2 where OpenBLAS's threads can be shared out.

    MLX's CPU backend runs a stream's elementwise kernels on one thread, so with one
    stream a core idles whenever the encoder is not in a matmul. Two streams, each on
    half the batch with half of OpenBLAS's threads, keep both busy (KaLM, 2 cores:
    ~1.2x the throughput, with the malloc tuning). 1 on a GPU, without OpenBLAS
    (macOS's Accelerate), or with a single BLAS thread.
    """
    budget = blas_thread_budget()
    if mx.default_device() != mx.cpu or budget is None or budget < 2:
        return 1
    return 2


_shared_streams: list = []
_shared_streams_lock = threading.Lock()


def shared_cpu_streams(count: int) -> list:
    """``count`` CPU streams shared by every embedder, made on first use.

    Thread-local streams: MLX ties a stream to the thread that made it, and each
    thread that encodes gets its own streams behind these handles. MLX keeps a stream
    (and its worker thread) for the life of the process, as it does each thread's default
    stream, so encode from long-lived threads (a pool), not a new thread per call.
    """
    with _shared_streams_lock:
        while len(_shared_streams) < count:
            _shared_streams.append(mx.new_thread_local_stream(mx.cpu))
        return _shared_streams[:count]


def split_by_padded_tokens(lengths: Sequence[int], parts: int) -> list[range]:
    """Split a batch's texts, longest first, into at most ``parts`` contiguous ranges whose
    largest padded size (texts x its longest text) is as small as it can be.

    ``lengths`` must not increase (the order :func:`plan_batches` gives); ``parts`` must be
    1..len(lengths). Equal counts would leave the part holding the longest texts with the
    most work: 32 texts of 8-24 tokens split 16/16 pad to 384 and 240 tokens, split 13/19 to
    312 and 304.
    """
    count = len(lengths)
    if not 1 <= parts <= count:
        raise ValueError(f"cannot split {count} texts into {parts} parts")
    if any(later > earlier for earlier, later in zip(lengths, lengths[1:])):
        raise ValueError("lengths must be sorted longest first")
    if parts == 1:
        return [range(count)]

    def greedy_bounds(limit: int) -> list[int]:
        bounds = [0]
        while bounds[-1] < count:
            start = stop = bounds[-1]
            stop += 1
            while stop < count and (stop + 1 - start) * lengths[start] <= limit:
                stop += 1
            bounds.append(stop)
        return bounds

    low, high = lengths[0], count * lengths[0]  # the largest part costs at least its longest text
    while low < high:
        middle = (low + high) // 2
        if len(greedy_bounds(middle)) - 1 <= parts:
            high = middle
        else:
            low = middle + 1
    bounds = greedy_bounds(low)
    return [range(start, stop) for start, stop in zip(bounds, bounds[1:])]


def stream_groups(padded_sizes: Sequence[int], streams: int, stream_budget: int) -> list[list[int]]:
    """Group consecutive batches (indices into ``padded_sizes``, each a batch's texts x its longest
    text) to run at once, one batch on each of ``streams`` CPU streams.

    ``streams`` batches in a row form a group when each fits one stream's budget of padded
    tokens and the smallest is at least half the largest (a group lasts as long as its
    largest batch). Every other batch is a group alone, which the Embedder splits over the
    streams instead. Whole batches on the streams give each matmul all of a batch's rows:
    batches capped by their count of short texts, split in halves, leave OpenBLAS fewer rows
    than it needs for its full rate (MiniLM in interleaved A/Bs: 128 texts of 8-24 tokens in
    batches of 32, 1.00-1.09x; the benchmarks' mixed corpus, 1.02-1.03x).

    A group is one evaluation, so its streams wait for each other at its end (both cores are
    busy ~93 % of the mixed corpus's time). Measured and not kept: building the next group's
    graph while one runs (``mx.async_eval``, 1.00x); more batches per evaluation, assigned to the
    least-loaded stream (1.00-1.05x with two a stream, 0.55-0.97x beyond: MLX orders a graph
    with many outputs breadth-first only 20 arrays wide, and the streams then run in turn).
    """
    groups: list[list[int]] = []
    start = 0
    while start < len(padded_sizes):
        candidates = padded_sizes[start:start + streams]
        if (streams > 1 and len(candidates) == streams and max(candidates) <= stream_budget
                and 2 * min(candidates) >= max(candidates)):
            groups.append(list(range(start, start + streams)))
            start += streams
        else:
            groups.append([start])
            start += 1
    return groups


class TruncationWarning(UserWarning):
    """Some texts were longer than the model's token limit and were cut on the right."""


class EmptyTextWarning(UserWarning):
    """Some texts had no tokens at all; their vectors are all zeros."""


def load_tokenizer(path: Path, max_tokens: int) -> Tokenizer:
    """Load ``tokenizer.json`` with kalm-mlx's settings: right truncation at ``max_tokens``, no padding."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: tokenizer.json not found (kalm-mlx needs the fast tokenizer file)")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:
        raise ValueError(f"{path}: cannot read tokenizer: {err}") from None
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_tokens, strategy="longest_first", direction="right")
    return tokenizer


def as_text_list(texts: str | Sequence[str]) -> list[str]:
    """Return ``texts`` as a list of strings (a single string becomes a one-item list).

    Raises TypeError naming the first item that is not a string.
    """
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, (Sequence, np.ndarray)):
        raise TypeError(f"texts must be a string or a sequence of strings, not {type(texts).__name__}")
    out = list(texts)
    for i, text in enumerate(out):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str")
    return out


def _replace_lone_surrogates(texts: list[str]) -> list[str]:
    """Replace lone UTF-16 surrogates (which tokenizers rejects) with U+FFFD, with a warning."""
    fixed = 0
    out = []
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            # A valid surrogate pair becomes its character; a lone one becomes U+FFFD.
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            fixed += 1
        out.append(text)
    if fixed:
        warnings.warn(
            f"{fixed} text(s) held lone surrogate code points; replaced them with U+FFFD",
            UnicodeWarning,
            stacklevel=4,
        )
    return out


def plan_batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """Group text indices into batches, longest first, bounded by count and padded tokens.

    Each batch holds at most ``batch_size`` texts and at most ``max_batch_tokens`` tokens
    once padded to its longest text (a single longer text still gets a batch of its own).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        longest = lengths[current[0]] if current else lengths[index]
        if current and (len(current) >= batch_size or (len(current) + 1) * longest > max_batch_tokens):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


class Embedder:
    """A loaded embedding model with sentence-transformers-style ``encode``.

    Build one with :func:`kalm_mlx.load`.
    """

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, meta: dict, dtype: mx.Dtype):
        self.model = model
        self.tokenizer = tokenizer
        self.meta = meta
        self.dtype = dtype
        self.max_batch_tokens = default_max_batch_tokens()
        self.parallel_streams = default_parallel_streams()
        """CPU streams an encode runs on, a whole batch or part of one each (see
        :func:`default_parallel_streams` and :func:`stream_groups`); 1 turns it off."""
        if mx.default_device() == mx.cpu:
            tune_malloc()
        self.truncated_texts = 0
        """How many texts were cut to ``max_tokens`` since loading (a running count)."""
        self._lock = threading.Lock()

    # --- description ---------------------------------------------------------------------

    @property
    def name(self) -> str:
        """Registry name of the model, or the folder name for an unregistered one."""
        return self.meta["name"]

    @property
    def dim(self) -> int:
        """Full embedding dimension."""
        return int(self.meta["dim"])

    @property
    def max_tokens(self) -> int:
        """Token limit per text, prompt included; longer texts are truncated on the right."""
        return int(self.meta["max_tokens"])

    @property
    def pooling(self) -> str:
        """Pooling method: ``mean``, ``cls`` or ``last``."""
        return self.meta["pooling"]

    @property
    def prompts(self) -> dict[str, str]:
        """Named prompts, at least ``query`` and ``document`` (a copy: edit ``meta`` to change them)."""
        return dict(self.meta["prompts"])

    @property
    def matryoshka_dims(self) -> tuple[int, ...]:
        """Dimensions the model was trained to be truncated to (empty when none)."""
        return tuple(self.meta.get("matryoshka_dims") or ())

    @property
    def nbytes(self) -> int:
        """Bytes held by the loaded weights."""
        return sum(v.nbytes for _, v in tree_flatten(self.model.parameters()))

    def __repr__(self) -> str:
        return (
            f"Embedder(name={self.name!r}, dim={self.dim}, max_tokens={self.max_tokens}, "
            f"pooling={self.pooling!r}, dtype={str(self.dtype).split('.')[-1]})"
        )

    # --- prompts -------------------------------------------------------------------------

    def query_prompt(self, instruction: str | None = None) -> str:
        """The query prompt, with ``instruction`` (or a task name such as ``sts``) in its slot."""
        if instruction is None:
            return self.meta["prompts"].get("query", "")
        template = self.meta.get("query_template")
        if not template:
            raise ValueError(f"{self.name} takes no instruction: its query prompt is fixed")
        if not isinstance(instruction, str):
            raise TypeError(f"instruction must be a string, not {type(instruction).__name__}")
        tasks = self.meta.get("task_instructions") or {}
        text = tasks.get(instruction, instruction)
        # An empty instruction (KaLM's "sts" task) means the query is embedded bare.
        return template.format(instruction=text) if text else ""

    # --- encoding ------------------------------------------------------------------------

    def encode(
        self,
        texts: str | Sequence[str],
        prompt: str | None = None,
        prompt_name: str | None = None,
        batch_size: int = 32,
        normalize: bool = True,
        truncate_dim: int | None = None,
        show_progress_bar: bool | None = None,
        allow_untrained_dim: bool = False,
    ) -> np.ndarray:
        """Embed texts into a float32 array of shape (n, dim).

        ``prompt`` is prepended verbatim to every text; ``prompt_name`` picks one of
        :attr:`prompts` instead (not both). A single string gives a (1, dim) array, an
        empty list a (0, dim) one. ``truncate_dim`` keeps the first dims (Matryoshka),
        then renormalises; dims the model was not trained for need ``allow_untrained_dim``.
        """
        text_list = as_text_list(texts)
        prefix = self._resolve_prompt(prompt, prompt_name)
        dim = self._check_truncate_dim(truncate_dim, allow_untrained_dim)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, not {batch_size!r}")
        if not text_list:
            return np.zeros((0, dim), dtype=np.float32)
        if prefix:
            text_list = [prefix + text for text in text_list]
        vectors = self._embed_ids(self._tokenize(text_list), batch_size, show_progress_bar)
        return self.finish(vectors, normalize, dim)

    def encode_tokens(
        self,
        token_ids: Sequence[Sequence[int]],
        batch_size: int = 32,
        normalize: bool = True,
        truncate_dim: int | None = None,
        show_progress_bar: bool | None = None,
        allow_untrained_dim: bool = False,
    ) -> np.ndarray:
        """Embed texts already turned into token ids (as :meth:`tokenize` gives them), exactly
        as :meth:`encode` embeds them: same batching, pooling, Matryoshka and normalisation.

        Ids are fed as given (no prompt, no truncation); each must be in the vocabulary.
        """
        dim = self._check_truncate_dim(truncate_dim, allow_untrained_dim)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, not {batch_size!r}")
        ids = self.check_token_ids(token_ids)
        if not ids:
            return np.zeros((0, dim), dtype=np.float32)
        return self.finish(self._embed_ids(ids, batch_size, show_progress_bar), normalize, dim)

    def finish(self, pooled: np.ndarray, normalize: bool = True, truncate_dim: int | None = None) -> np.ndarray:
        """Pooled vectors -> what :meth:`encode` returns: Matryoshka truncation, then normalisation.

        ``truncate_dim`` is not checked here (see :meth:`encode`); None keeps every dim.
        """
        if truncate_dim is not None and truncate_dim != self.dim:
            return truncate(pooled, truncate_dim, renormalize=normalize,
                            pre_layer_norm=bool(self.meta.get("matryoshka_layer_norm")))
        return l2_normalize(pooled) if normalize else pooled

    def encode_queries(self, texts: str | Sequence[str], instruction: str | None = None,
                       **kwargs) -> np.ndarray:
        """Embed search queries with the model's query prompt (``instruction`` replaces its task text)."""
        return self.encode(texts, prompt=self.query_prompt(instruction), **kwargs)

    def encode_documents(self, texts: str | Sequence[str], **kwargs) -> np.ndarray:
        """Embed documents with the model's document prompt (none for KaLM)."""
        return self.encode(texts, prompt=self.meta["prompts"].get("document", ""), **kwargs)

    def tokenize(self, texts: str | Sequence[str]) -> list[list[int]]:
        """Token ids exactly as :meth:`encode` feeds them to the model (truncated, no padding)."""
        text_list = as_text_list(texts)
        return self._tokenize(text_list) if text_list else []

    def tokenize_with_truncation(self, texts: str | Sequence[str]) -> tuple[list[list[int]], list[bool]]:
        """Token ids as :meth:`tokenize` gives them, and for each text whether it was cut to
        :attr:`max_tokens`; for callers that count truncation themselves (no TruncationWarning)."""
        text_list = as_text_list(texts)
        encodings = self._encode_batch(text_list) if text_list else []
        return [enc.ids for enc in encodings], [bool(enc.overflowing) for enc in encodings]

    # --- internals -----------------------------------------------------------------------

    def _resolve_prompt(self, prompt: str | None, prompt_name: str | None) -> str:
        if prompt is not None and prompt_name is not None:
            raise ValueError("give prompt or prompt_name, not both")
        if prompt_name is not None:
            prompts = self.meta["prompts"]
            if prompt_name not in prompts:
                raise ValueError(
                    f"prompt_name {prompt_name!r} is not one of {self.name}'s prompts: "
                    f"{', '.join(sorted(prompts))}"
                )
            return prompts[prompt_name]
        if prompt is not None and not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, not {type(prompt).__name__}")
        return prompt or ""

    def _check_truncate_dim(self, truncate_dim: int | None, allow_untrained: bool) -> int:
        if truncate_dim is None:
            return self.dim
        if isinstance(truncate_dim, bool) or not isinstance(truncate_dim, (int, np.integer)):
            raise TypeError(f"truncate_dim must be an integer, not {type(truncate_dim).__name__}")
        truncate_dim = int(truncate_dim)
        if not 1 <= truncate_dim <= self.dim:
            raise ValueError(f"truncate_dim {truncate_dim} is outside 1..{self.dim}")
        trained = self.matryoshka_dims or (self.dim,)
        if truncate_dim not in trained and not allow_untrained:
            raise ValueError(
                f"{self.name} was trained for dims {', '.join(map(str, trained))}, not "
                f"{truncate_dim}; pass allow_untrained_dim=True to truncate anyway"
            )
        return truncate_dim

    def check_token_ids(self, token_ids: Sequence[Sequence[int]]) -> list[list[int]]:
        """``token_ids`` as lists of Python ints; TypeError for a non-integer item, ValueError
        (naming the list and the id) for an id outside the tokenizer's vocabulary."""
        if isinstance(token_ids, (str, bytes)) or not isinstance(token_ids, (Sequence, np.ndarray)):
            raise TypeError(f"token_ids must be a sequence of id lists, not {type(token_ids).__name__}")
        vocab = self.tokenizer.get_vocab_size(with_added_tokens=True)
        out = []
        for i, seq in enumerate(token_ids):
            if isinstance(seq, (str, bytes)) or not isinstance(seq, (Sequence, np.ndarray)):
                raise TypeError(f"token_ids[{i}] is {type(seq).__name__}, expected a list of ints")
            ids = np.asarray(seq)
            if ids.size and (ids.ndim != 1 or ids.dtype.kind not in "iu"):
                raise TypeError(f"token_ids[{i}] must be a flat list of ints")
            if ids.size and (ids.min() < 0 or ids.max() >= vocab):
                bad = ids[(ids < 0) | (ids >= vocab)][0]
                raise ValueError(f"token_ids[{i}] holds id {bad}, outside the vocabulary 0..{vocab - 1}")
            out.append(ids.astype(np.int64).tolist())
        return out

    def _encode_batch(self, texts: list[str]) -> list:
        """The tokenizer's encodings of ``texts`` (truncated to max_tokens); counts truncated texts."""
        encodings = self.tokenizer.encode_batch(_replace_lone_surrogates(texts), add_special_tokens=True)
        self.truncated_texts += sum(1 for enc in encodings if enc.overflowing)
        return encodings

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        encodings = self._encode_batch(texts)
        truncated = sum(1 for enc in encodings if enc.overflowing)
        if truncated:
            warnings.warn(
                f"{truncated} of {len(texts)} text(s) exceeded {self.max_tokens} tokens "
                f"and were truncated",
                TruncationWarning,
                stacklevel=3,
            )
        return [enc.ids for enc in encodings]

    def _embed_ids(self, token_ids: list[list[int]], batch_size: int,
                   show_progress_bar: bool | None) -> np.ndarray:
        out = np.zeros((len(token_ids), self.dim), dtype=np.float32)
        lengths = [len(ids) for ids in token_ids]
        nonempty = [i for i, n in enumerate(lengths) if n > 0]
        if len(nonempty) < len(token_ids):
            warnings.warn(
                f"{len(token_ids) - len(nonempty)} text(s) have no tokens; their vectors are zeros",
                EmptyTextWarning,
                stacklevel=3,
            )
        kept_lengths = [lengths[i] for i in nonempty]
        batches = plan_batches(kept_lengths, batch_size, self.max_batch_tokens)
        streams = self._streams()
        padded_sizes = [len(batch) * max(kept_lengths[i] for i in batch) for batch in batches]
        groups = stream_groups(padded_sizes, streams, self.max_batch_tokens // streams)
        progress = None
        if show_progress_bar:
            from tqdm.auto import tqdm

            progress = tqdm(total=len(batches), desc=f"{self.name}", unit="batch")
        try:
            with self._lock:
                for group in groups:
                    parts = [[nonempty[i] for i in batches[index]] for index in group]
                    out[[row for part in parts for row in part]] = self._forward(
                        [[token_ids[row] for row in part] for part in parts])
                    if progress is not None:
                        progress.update(len(group))
        finally:
            if progress is not None:
                progress.close()
        return out

    def _streams(self) -> int:
        """CPU streams an encode runs on: :attr:`parallel_streams` on the CPU, 1 on a GPU."""
        return self.parallel_streams if mx.default_device() == mx.cpu else 1

    def _forward(self, batches: list[list[list[int]]]) -> np.ndarray:
        """Encode batches of token id lists at once and pool; returns (texts, dim) float32, in order.

        On the CPU several batches run one on each stream (see :func:`stream_groups`); a lone
        batch is split over :attr:`parallel_streams` streams (parts of equal padded size,
        :func:`split_by_padded_tokens`). OpenBLAS's threads are shared out between the
        streams; a lone text gets them all.
        """
        if len(batches) == 1:
            batch_ids = batches[0]
            parts = min(self._streams(), len(batch_ids))
            ranges = split_by_padded_tokens([len(ids) for ids in batch_ids], parts)
            batches = [[batch_ids[i] for i in rows] for rows in ranges]
        budget = blas_thread_budget()
        if budget is not None:
            set_blas_threads(max(1, budget // len(batches)))
        if len(batches) < 2:
            return np.array(self._pooled(batches[0]), dtype=np.float32)
        pooled = []
        for batch_ids, stream in zip(batches, shared_cpu_streams(len(batches))):
            with mx.stream(stream):
                pooled.append(self._pooled(batch_ids))
        mx.eval(pooled)
        return np.concatenate([np.array(part, dtype=np.float32) for part in pooled])

    def _pooled(self, batch_ids: list[list[int]]) -> mx.array:
        """The pooled (B, dim) vectors of a batch, padded to its longest text; not yet evaluated."""
        longest = max(len(ids) for ids in batch_ids)
        ids = np.zeros((len(batch_ids), longest), dtype=np.int32)
        mask = np.zeros((len(batch_ids), longest), dtype=bool)
        for row, seq in enumerate(batch_ids):
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = True
        mask_mx = mx.array(mask)
        padded = not mask.all()
        if self.pooling == "cls" and getattr(self.model, "supports_first_token_only", False):
            # CLS pooling reads the first token only: the encoder skips the rest of its last layer.
            hidden = self.model(mx.array(ids), mask_mx if padded else None, first_token_only=True)
        else:
            hidden = self.model(mx.array(ids), mask_mx if padded else None)
        return pool(hidden, mask_mx, self.pooling)
