"""The runtimes under test, each loaded in its own worker process.

``kalm-mlx``: :func:`kalm_mlx.load` on the folder, then the Embedder's own batching and
forward on the given token ids. ``torch``: what sentence-transformers does with a Qwen2
encoder, made bidirectional: transformers' ``Qwen2Model`` in float32 with a 4-D additive
padding mask (the reference of kalm-mlx's parity tests, ``tests/helpers.torch_qwen2_embed``),
texts sorted longest first in batches of 32 and padded to the longest of each batch, mean
pooling, L2 normalisation. sentence-transformers itself would run this folder's Qwen2Model
with a causal mask (it is a decoder to transformers), so it would not compute KaLM's vectors.
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
import time

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
    """OpenBLAS's build string and thread count, when ``path`` is an OpenBLAS already loaded.

    The count is kalm-mlx's budget (:func:`kalm_mlx._backend.blas_thread_budget`): the
    current setting changes per batch while two streams share the threads out.
    """
    if not path:
        return {}
    import ctypes

    from kalm_mlx._backend import blas_thread_budget

    try:
        lib = ctypes.CDLL(path)
        lib.openblas_get_config.restype = ctypes.c_char_p
        return {"blas_config": lib.openblas_get_config().decode(),
                "blas_threads": blas_thread_budget()}
    except (OSError, AttributeError):
        return {}


class TorchRuntime:
    """The sentence-transformers-equivalent bidirectional reference on PyTorch (see module doc)."""

    def __init__(self, folder: str):
        import torch
        from transformers import Qwen2Model

        self.torch = torch
        self.model = Qwen2Model.from_pretrained(folder, dtype=torch.float32).eval()

    def embed(self, token_ids: list[list[int]], batch_size: int) -> np.ndarray:
        """Normalised vectors: longest first, ``batch_size`` texts a batch, as sentence-transformers does."""
        from tests.helpers import torch_qwen2_embed  # the parity tests' reference forward

        order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
        out = np.zeros((len(token_ids), self.model.config.hidden_size), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            out[rows] = torch_qwen2_embed(self.model, [token_ids[i] for i in rows])
        return out

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


def make_runtime(kind: str, folder: str):
    """Build the runtime named ``kind``: ``torch``, ``mlx-<dtype>`` or ``mlx-<dtype>-<quantized>``."""
    if kind == "torch":
        return TorchRuntime(folder)
    if kind.startswith("mlx-"):
        parts = kind.split("-")[1:]
        return MLXRuntime(folder, dtype=parts[0], quantized=parts[1] if len(parts) > 1 else None)
    raise ValueError(f"unknown runtime {kind!r}: expected torch, mlx-<dtype> or mlx-<dtype>-<quantized>")


def machine_info() -> dict:
    """What the numbers were measured on: CPU model, cores, memory, OS, Python, load."""
    cpu = platform.processor() or platform.machine()
    try:
        if sys.platform == "darwin":
            cpu = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                 text=True, check=True).stdout.strip()
        else:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        cpu = line.split(":", 1)[1].strip()
                        break
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_bytes": memory,
        "os": platform.platform(),
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
