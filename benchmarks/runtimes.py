"""The runtimes under test, each loaded in its own worker process.

``kalm-mlx``: :func:`kalm_mlx.load` on the folder, then the Embedder's own batching and
forward on the given token ids.

``torch``: for BERT and NomicBERT folders, sentence-transformers itself
(``SentenceTransformer(folder)``, its modules called on each batch of ids, as its
``encode`` does after tokenising). For a Qwen2 encoder, what sentence-transformers does made
bidirectional: transformers' ``Qwen2Model`` in float32 with a 4-D additive padding mask (the
reference of kalm-mlx's parity tests, ``tests/helpers.torch_qwen2_embed``), mean pooling;
sentence-transformers itself would run this folder's Qwen2Model with a causal mask (it is a
decoder to transformers), so it would not compute KaLM's vectors. Both sort texts longest
first, batch them and pad each batch to its longest text, as ``encode`` does.

``onnx``: ONNX Runtime on the same weights exported with ``torch.onnx`` (opset 17, the
TorchScript exporter, dynamic batch and length; cached under the benchmark cache), the CPU
execution provider with every graph optimisation, the same batching, pooling and
normalisation in numpy: what fastembed, Infinity's optimum backend and TEI's CPU path run.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

GEMM_SHAPES = ((4096, 896, 4864), (4096, 4864, 896), (4096, 896, 896))
"""(M, K, N) float32 matmuls at KaLM's layer shapes (32 x 128 tokens), for the GEMM peak."""


def peak_rss_bytes() -> int:
    """The process's peak resident set so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_rss_bytes() -> int | None:
    """The process's resident set now (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def best_gflops(matmul, repeats: int = 3) -> float:
    """Best float32 GFLOP/s of ``matmul(m, k, n) -> seconds`` over :data:`GEMM_SHAPES`."""
    best = 0.0
    for m, k, n in GEMM_SHAPES:
        matmul(m, k, n)  # warm-up
        seconds = min(matmul(m, k, n) for _ in range(repeats))
        best = max(best, 2 * m * k * n / seconds / 1e9)
    return best


class MLXRuntime:
    """kalm-mlx on a folder, in the given compute dtype (and quantized-layer choice)."""

    def __init__(self, folder: str, dtype: str = "float32", quantized: str | None = None):
        import kalm_mlx

        self.folder, self.dtype, self.quantized = folder, dtype, quantized
        kwargs = {"quantized": quantized} if quantized else {}
        self.embedder = kalm_mlx.load(folder, dtype=dtype, **kwargs)

    def embed(self, token_ids: list[list[int]], batch_size: int) -> np.ndarray:
        """Normalised vectors for the given ids, batched by the Embedder's own policy."""
        from kalm_mlx.pooling import normalize

        return normalize(self.embedder._embed_ids(token_ids, batch_size, False))

    def gemm_gflops(self) -> float:
        """MLX's best float32 matmul rate on this machine's default device."""
        import mlx.core as mx

        def matmul(m, k, n):
            a, b = mx.random.normal((m, k)), mx.random.normal((k, n))
            mx.eval(a, b)
            start = time.perf_counter()
            mx.eval(a @ b)
            return time.perf_counter() - start

        return best_gflops(matmul)

    def memory(self) -> dict:
        """MLX allocator figures (active, peak, cache) and the weights' bytes."""
        import mlx.core as mx

        return {
            "weights_bytes": int(self.embedder.nbytes),
            "mlx_active_bytes": int(mx.get_active_memory()),
            "mlx_peak_bytes": int(mx.get_peak_memory()),
        }

    def info(self) -> dict:
        """Backend details: MLX version, device, the BLAS loaded for it and its threads."""
        import mlx.core as mx

        from kalm_mlx import __version__, _backend

        info = {
            "kalm_mlx": __version__,
            "mlx": mx.__version__,
            "device": str(mx.default_device()),
            "blas": _backend.blas_library or "MLX's bundled BLAS (Accelerate on macOS)",
        }
        info.update(openblas_details(_backend.blas_library))
        return info


def openblas_details(path: str | None) -> dict:
    """OpenBLAS's build string, kernel set and thread count, when ``path`` is an OpenBLAS already loaded.

    The count is kalm-mlx's budget (:func:`kalm_mlx._backend.blas_thread_budget`): the
    current setting changes per batch while two streams share the threads out.
    """
    if not path:
        return {}
    import ctypes

    from kalm_mlx._backend import blas_thread_budget, openblas_kernels

    try:
        lib = ctypes.CDLL(path)
        lib.openblas_get_config.restype = ctypes.c_char_p
        return {"blas_config": lib.openblas_get_config().decode(),
                "blas_kernels": openblas_kernels(),
                "blas_threads": blas_thread_budget()}
    except (OSError, AttributeError):
        return {}


def bench_cache_dir() -> Path:
    """Where benchmark checkpoints and exports are cached: ``$KALM_MLX_BENCH_CACHE`` or ``~/.cache/kalm-mlx-bench``."""
    explicit = os.environ.get("KALM_MLX_BENCH_CACHE")
    return Path(explicit).expanduser() if explicit else Path.home() / ".cache" / "kalm-mlx-bench"


def read_config(folder: str | Path) -> dict:
    """A folder's ``config.json``."""
    return json.loads((Path(folder) / "config.json").read_text())


def folder_pooling(folder: str | Path) -> str:
    """``cls`` or ``mean``, from sentence-transformers' ``1_Pooling/config.json`` (mean without one)."""
    path = Path(folder) / "1_Pooling" / "config.json"
    if path.exists() and json.loads(path.read_text()).get("pooling_mode_cls_token"):
        return "cls"
    return "mean"


def pad_numpy(token_ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded (ids, mask) int64 arrays of shape (B, longest)."""
    longest = max(len(seq) for seq in token_ids)
    ids = np.zeros((len(token_ids), longest), dtype=np.int64)
    mask = np.zeros((len(token_ids), longest), dtype=np.int64)
    for row, seq in enumerate(token_ids):
        ids[row, :len(seq)] = seq
        mask[row, :len(seq)] = 1
    return ids, mask


def pool_numpy(hidden: np.ndarray, mask: np.ndarray, pooling: str) -> np.ndarray:
    """CLS or masked-mean pooling of (B, L, H) hidden states, then L2 normalisation, in float32."""
    if pooling == "cls":
        pooled = hidden[:, 0]
    else:
        weights = mask[..., None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / weights.sum(axis=1)
    pooled = pooled.astype(np.float32)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def embed_sorted(token_ids: list[list[int]], batch_size: int, dim: int, embed_batch) -> np.ndarray:
    """``embed_batch(ids) -> (B, dim)`` over batches of ``batch_size`` texts, longest first, as
    sentence-transformers' ``encode`` forms them; rows come back in the caller's order."""
    order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
    out = np.zeros((len(token_ids), dim), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        out[rows] = embed_batch([token_ids[i] for i in rows])
    return out


class TorchRuntime:
    """sentence-transformers (BERT family) or its bidirectional Qwen2 equivalent on PyTorch (see module doc)."""

    def __init__(self, folder: str):
        import torch

        self.torch = torch
        self.model_type = read_config(folder).get("model_type")
        if self.model_type == "qwen2":
            from transformers import Qwen2Model

            self.model = Qwen2Model.from_pretrained(folder, dtype=torch.float32).eval()
            self.dim = self.model.config.hidden_size
        else:
            from sentence_transformers import SentenceTransformer

            self.st = SentenceTransformer(str(folder), device="cpu")
            self.model = self.st[0].auto_model
            dimension = getattr(self.st, "get_embedding_dimension", None)  # sentence-transformers >= 6
            self.dim = (dimension or self.st.get_sentence_embedding_dimension)()

    def _embed_batch(self, ids: list[list[int]]) -> np.ndarray:
        if self.model_type == "qwen2":
            from tests.helpers import torch_qwen2_embed  # the parity tests' reference forward

            return torch_qwen2_embed(self.model, ids)
        torch = self.torch
        input_ids, mask = (torch.from_numpy(a) for a in pad_numpy(ids))
        features = {"input_ids": input_ids, "attention_mask": mask,
                    "token_type_ids": torch.zeros_like(input_ids)}
        with torch.inference_mode():
            pooled = self.st(features)["sentence_embedding"]
        return torch.nn.functional.normalize(pooled, dim=1).numpy()

    def embed(self, token_ids: list[list[int]], batch_size: int) -> np.ndarray:
        """Normalised vectors: longest first, ``batch_size`` texts a batch, as sentence-transformers does."""
        return embed_sorted(token_ids, batch_size, self.dim, self._embed_batch)

    def gemm_gflops(self) -> float:
        """torch's best float32 matmul rate on the CPU."""
        torch = self.torch

        def matmul(m, k, n):
            a, b = torch.randn(m, k), torch.randn(k, n)
            start = time.perf_counter()
            torch.mm(a, b)
            return time.perf_counter() - start

        with torch.no_grad():
            return best_gflops(matmul)

    def memory(self) -> dict:
        """Bytes of the float32 parameters."""
        return {"weights_bytes": int(sum(p.numel() * p.element_size() for p in self.model.parameters()))}

    def info(self) -> dict:
        """torch and transformers versions, threads, and the BLAS torch was built with."""
        import transformers

        torch = self.torch
        config = torch.__config__.show()
        blas = [line.strip() for line in config.splitlines() if "BLAS_INFO" in line or "LAPACK_INFO" in line]
        info = {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(),
            "blas": "; ".join(blas) or "see torch.__config__.show()",
            "mkldnn": bool(torch.backends.mkldnn.is_available()),
            "attention": getattr(self.model.config, "_attn_implementation", "unknown"),
        }
        try:
            import sentence_transformers

            info["sentence_transformers"] = sentence_transformers.__version__
        except ImportError:
            pass
        return info


def onnx_path(folder: str | Path) -> Path:
    """Where :func:`export_onnx` caches ``folder``'s export (keyed by its path and weights' mtimes)."""
    folder = Path(folder).resolve()
    stamps = [str(folder)] + [f"{p.name}:{p.stat().st_mtime_ns}" for p in sorted(folder.glob("*.safetensors"))]
    digest = hashlib.sha256("|".join(stamps).encode()).hexdigest()[:10]
    return bench_cache_dir() / "onnx" / f"{folder.name}-{digest}" / "model.onnx"


def export_onnx(folder: str | Path) -> Path:
    """Export ``folder``'s transformer (ids, mask -> last hidden states) to ONNX once; return the file.

    ``torch.onnx.export`` with the TorchScript exporter (``dynamo=False``), opset 17, dynamic
    batch and length axes, float32. BERT gets token type 0; Qwen2 gets the 4-D additive
    bidirectional mask of the torch reference. Weights over 2 GB go to external data files
    beside the model. Written to a temporary folder and renamed into place.
    """
    import shutil
    import tempfile

    import torch

    out = onnx_path(folder)
    if out.exists():
        return out
    model_type = read_config(folder).get("model_type")
    if model_type == "qwen2":
        from transformers import Qwen2Model

        model = Qwen2Model.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    else:
        from transformers import AutoModel

        model = AutoModel.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    model.eval()

    class LastHiddenState(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            if model_type == "qwen2":
                keep = attention_mask[:, None, None, :].to(torch.float32)
                additive = (1.0 - keep) * torch.finfo(torch.float32).min
                length = input_ids.shape[1]
                additive = additive.expand(-1, 1, length, length)
                return self.model(input_ids=input_ids, attention_mask=additive).last_hidden_state
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=torch.zeros_like(input_ids)).last_hidden_state

    out.parent.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent.parent))
    try:
        example = torch.ones((2, 8), dtype=torch.long)
        with torch.no_grad():
            torch.onnx.export(
                LastHiddenState(), (example, example), str(tmp / out.name),
                input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                dynamic_axes={"input_ids": {0: "batch", 1: "length"},
                              "attention_mask": {0: "batch", 1: "length"},
                              "last_hidden_state": {0: "batch", 1: "length"}},
                opset_version=17, dynamo=False,
            )
        os.chmod(tmp, 0o755)
        if out.parent.exists():
            shutil.rmtree(out.parent)
        tmp.rename(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


class OnnxRuntime:
    """ONNX Runtime on :func:`export_onnx`'s file: CPU provider, every graph optimisation (see module doc)."""

    def __init__(self, folder: str):
        import onnxruntime as ort

        self.ort = ort
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(export_onnx(folder)), options,
                                            providers=["CPUExecutionProvider"])
        config = read_config(folder)
        self.dim = int(config.get("n_embd") or config["hidden_size"])
        self.pooling = folder_pooling(folder)
        self.folder = folder

    def _embed_batch(self, ids: list[list[int]]) -> np.ndarray:
        input_ids, mask = pad_numpy(ids)
        (hidden,) = self.session.run(None, {"input_ids": input_ids, "attention_mask": mask})
        return pool_numpy(hidden, mask, self.pooling)

    def embed(self, token_ids: list[list[int]], batch_size: int) -> np.ndarray:
        """Normalised vectors, batched as sentence-transformers does."""
        return embed_sorted(token_ids, batch_size, self.dim, self._embed_batch)

    def gemm_gflops(self) -> float:
        """ONNX Runtime's own float32 MatMul rate (its MLAS GEMM), from a one-node graph per shape
        run on the CPU provider with the model's thread settings."""
        from onnx import TensorProto, helper

        sessions = {}

        def matmul(m, k, n):
            if (m, k, n) not in sessions:
                graph = helper.make_graph(
                    [helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
                    [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k]),
                     helper.make_tensor_value_info("b", TensorProto.FLOAT, [k, n])],
                    [helper.make_tensor_value_info("c", TensorProto.FLOAT, [m, n])])
                model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                sessions[m, k, n] = self.ort.InferenceSession(
                    model.SerializeToString(), self.session.get_session_options(),
                    providers=["CPUExecutionProvider"])
            inputs = {"a": np.random.standard_normal((m, k)).astype(np.float32),
                      "b": np.random.standard_normal((k, n)).astype(np.float32)}
            start = time.perf_counter()
            sessions[m, k, n].run(None, inputs)
            return time.perf_counter() - start

        return best_gflops(matmul)

    def memory(self) -> dict:
        """Bytes of the exported model files (the weights, in float32)."""
        path = export_onnx(self.folder)
        return {"weights_bytes": int(sum(p.stat().st_size for p in path.parent.iterdir()))}

    def info(self) -> dict:
        """ONNX Runtime version, provider and threads."""
        options = self.session.get_session_options()
        return {"onnxruntime": self.ort.__version__, "providers": self.session.get_providers(),
                "intra_op_threads": options.intra_op_num_threads or "default (one per core)",
                "graph_optimization": "ORT_ENABLE_ALL", "export": "torch.onnx, opset 17, dynamo=False"}


def make_runtime(kind: str, folder: str):
    """Build the runtime named ``kind``: ``torch``, ``onnx``, ``mlx-<dtype>`` or ``mlx-<dtype>-<quantized>``."""
    if kind == "torch":
        return TorchRuntime(folder)
    if kind == "onnx":
        return OnnxRuntime(folder)
    if kind.startswith("mlx-"):
        parts = kind.split("-")[1:]
        return MLXRuntime(folder, dtype=parts[0], quantized=parts[1] if len(parts) > 1 else None)
    raise ValueError(f"unknown runtime {kind!r}: expected torch, onnx, mlx-<dtype> or mlx-<dtype>-<quantized>")


def machine_info() -> dict:
    """What the numbers were measured on: CPU model (family, model number, AVX-512), cores,
    memory, OS, Python, load, and the ``OPENBLAS_*`` variables that choose OpenBLAS's kernels."""
    from kalm_mlx._backend import cpuinfo_fields, has_avx512

    cpu = platform.processor() or platform.machine()
    fields = cpuinfo_fields(("model name", "cpu family", "model", "flags"))
    cpu = fields.get("model name", cpu)
    if sys.platform == "darwin":
        try:
            cpu = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                 text=True, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = None
    flags = frozenset(fields.get("flags", "").split())
    return {
        "cpu": cpu,
        "cpu_family": fields.get("cpu family"),
        "cpu_model": fields.get("model"),
        "avx512": has_avx512(flags) if flags else None,
        "openblas_environment": {key: value for key, value in sorted(os.environ.items())
                                 if key.startswith("OPENBLAS_")},
        "cores": os.cpu_count(),
        "memory_bytes": memory,
        "os": platform.platform(),
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
