"""One runtime in its own process, driven by the benchmark over stdin/stdout.

    python -m benchmarks.worker RUNTIME FOLDER

Each request is one JSON line on stdin, each answer one JSON line on stdout (anything a
library prints goes to stderr). Requests: ``{"op": "load"}``, ``{"op": "embed", "ids":
[[...], ...], "batch_size": 32, "vectors": false}``, ``{"op": "gemm"}``, ``{"op": "memory"}``,
``{"op": "info"}``, ``{"op": "exit"}``. Times are measured here, around the call alone.
Separate processes keep each runtime's threads, BLAS and memory peak to itself.
"""

from __future__ import annotations

import base64
import json
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def serve(kind: str, folder: str, requests, answers) -> None:
    """Answer ``requests`` (an iterable of JSON lines) on ``answers`` until ``exit``."""
    from benchmarks import runtimes

    runtime = None
    for line in requests:
        request = json.loads(line)
        op = request["op"]
        try:
            if op == "exit":
                answer = {}
            elif op == "load":
                start = time.perf_counter()
                runtime = runtimes.make_runtime(kind, folder)
                answer = {"seconds": time.perf_counter() - start,
                          "rss_bytes": runtimes.current_rss_bytes(),
                          "peak_rss_bytes": runtimes.peak_rss_bytes()}
            elif op == "embed":
                start = time.perf_counter()
                vectors = runtime.embed(request["ids"], int(request.get("batch_size", 32)))
                answer = {"seconds": time.perf_counter() - start}
                if request.get("vectors"):
                    answer["vectors"] = base64.b64encode(vectors.astype("<f4").tobytes()).decode()
                    answer["shape"] = list(vectors.shape)
            elif op == "gemm":
                answer = {"gflops": runtime.gemm_gflops()}
            elif op == "memory":
                answer = {**runtime.memory(), "rss_bytes": runtimes.current_rss_bytes(),
                          "peak_rss_bytes": runtimes.peak_rss_bytes()}
            elif op == "info":
                answer = runtime.info()
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception as err:  # reported to the parent, which decides what to skip
            traceback.print_exc(file=sys.stderr)
            answer = {"error": f"{type(err).__name__}: {err}"}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()
        if op == "exit":
            return


def main() -> None:
    """Entry point: ``python -m benchmarks.worker RUNTIME FOLDER``."""
    kind, folder = sys.argv[1], sys.argv[2]
    sys.path.insert(0, str(ROOT))
    if kind.startswith("mlx"):
        import kalm_mlx  # noqa: F401  (OpenBLAS before mlx.core)
    answers = sys.stdout
    sys.stdout = sys.stderr  # keep stdout for the protocol alone
    serve(kind, folder, sys.stdin, answers)


if __name__ == "__main__":
    main()
