"""The corpus job: embed every text of a set of files into Parquet shards with a manifest.

``embed_corpus(inputs, output, models)`` is ``kalm-mlx index``; the job is resumable and
refuses to mix different jobs in one folder. See :mod:`kalm_mlx.corpus.job`.
"""

from .encoding import embed_texts, job_prompt
from .job import CorpusSummary, JobPlan, embed_corpus
from .manifest import MANIFEST, Manifest, read_manifest
from .readers import BadRowError, InputFile, find_inputs, read_records

__all__ = [
    "MANIFEST",
    "BadRowError",
    "CorpusSummary",
    "InputFile",
    "JobPlan",
    "Manifest",
    "embed_corpus",
    "embed_texts",
    "find_inputs",
    "job_prompt",
    "read_manifest",
    "read_records",
]
