"""The servers the load benchmark measures, each a child process on 127.0.0.1.

:class:`ServerProcess` starts a command, waits until its health route answers 200 and
stops it on exit (SIGTERM, then SIGKILL after a timeout), whatever happened in between.
The commands: kalm-mlx's own ``serve`` (batched, or ``--no-batching``: one request at a
time per model, engram-embed's design) and Infinity's ``infinity_emb v2`` on the torch
engine, from a virtualenv of its own (it pins its own torch, transformers and numpy).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
INFINITY_ENV = "KALM_MLX_BENCH_INFINITY"
"""Environment variable naming the ``infinity_emb`` executable (else it is looked up on PATH)."""


class ServerError(RuntimeError):
    """A server did not come up (its log's last lines are in the message)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def offline_env(**extra: str) -> dict:
    """This process's environment, offline for Hugging Face, without telemetry, plus ``extra``."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1",
                "INFINITY_ANONYMOUS_USAGE_STATS": "0", "TOKENIZERS_PARALLELISM": "false"})
    env.update(extra)
    return env


class ServerProcess:
    """A server child process: ``with ServerProcess(...) as server:`` starts it, waits for health, stops it."""

    def __init__(self, name: str, command: list[str], port: int, log_path: Path, *,
                 health_path: str = "/health", env: dict | None = None,
                 startup_timeout_s: float = 600.0, stop_timeout_s: float = 30.0):
        self.name, self.command, self.port = name, command, port
        self.log_path = Path(log_path)
        self.health_path, self.env = health_path, env
        self.startup_timeout_s, self.stop_timeout_s = startup_timeout_s, stop_timeout_s
        self.process: subprocess.Popen | None = None
        self.ready_s: float | None = None

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{HOST}:{self.port}"

    def __enter__(self) -> "ServerProcess":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """Start the command and wait until ``GET health_path`` answers 200 (ServerError if not)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT)
        started = time.perf_counter()
        deadline = started + self.startup_timeout_s
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            while True:
                if self.process.poll() is not None:
                    raise ServerError(f"{self.name} exited with status {self.process.returncode} "
                                      f"before answering:\n{self.log_tail()}")
                try:
                    if client.get(self.base_url + self.health_path).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.perf_counter() > deadline:
                    raise ServerError(f"{self.name} did not answer {self.health_path} within "
                                      f"{self.startup_timeout_s:.0f} s:\n{self.log_tail()}")
                time.sleep(0.25)
        self.ready_s = round(time.perf_counter() - started, 2)

    def stop(self) -> int | None:
        """SIGTERM, wait, SIGKILL after ``stop_timeout_s``; return the exit status (None if never started)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=self.stop_timeout_s)
        return self.process.returncode

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def model_id(self, models_path: str = "/v1/models") -> str:
        """The id of the first model the server lists (what a request's ``model`` names)."""
        response = httpx.get(self.base_url + models_path, timeout=30.0, trust_env=False)
        response.raise_for_status()
        return response.json()["data"][0]["id"]


def batch_counters(base_url: str) -> dict | None:
    """kalm-mlx's texts and encoder batches so far (summed over models) from ``GET /metrics``; None if absent."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        response = httpx.get(base_url + "/metrics", timeout=30.0, trust_env=False)
        response.raise_for_status()
        totals = {"kalm_mlx_texts_total": 0.0, "kalm_mlx_batches_total": 0.0}
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                if sample.name in totals:
                    totals[sample.name] += sample.value
    except (httpx.HTTPError, ValueError):
        return None
    return {"texts": totals["kalm_mlx_texts_total"], "batches": totals["kalm_mlx_batches_total"]}


def kalm_server(name: str, model: str, log_dir: Path, *, batching: bool = True) -> ServerProcess:
    """``kalm-mlx serve`` (run as ``python -m kalm_mlx.cli serve``) for one model, preloaded,
    batched or ``--no-batching``."""
    port = free_port()
    command = [sys.executable, "-m", "kalm_mlx.cli", "serve", "--host", HOST, "--port", str(port),
               "--models", str(model), "--preload"]
    if not batching:
        command.append("--no-batching")
    return ServerProcess(name, command, port, log_dir / f"{_file_name(name)}.log", env=offline_env())


def find_infinity(explicit: str | Path | None = None) -> Path | None:
    """The ``infinity_emb`` executable: ``explicit``, else ``$KALM_MLX_BENCH_INFINITY``, else PATH."""
    candidate = explicit or os.environ.get(INFINITY_ENV) or shutil.which("infinity_emb")
    if not candidate:
        return None
    path = Path(candidate).expanduser()
    return path if path.is_file() and os.access(path, os.X_OK) else None


def infinity_server(executable: Path, folder: Path, log_dir: Path, *, batch_size: int = 32) -> ServerProcess:
    """Infinity (``infinity_emb v2``) on ``folder``, torch engine on the CPU; its API under /v1, health at /health."""
    port = free_port()
    command = [str(executable), "v2", "--model-id", str(folder), "--served-model-name", "minilm",
               "--engine", "torch", "--device", "cpu", "--batch-size", str(batch_size),
               "--host", HOST, "--port", str(port), "--url-prefix", "/v1"]
    return ServerProcess("infinity", command, port, log_dir / "infinity.log",
                         health_path="/health", env=offline_env())


def infinity_versions(executable: Path) -> dict:
    """infinity-emb, torch and transformers versions and torch's threads, from Infinity's own interpreter.

    The keys follow :func:`benchmarks.runtimes.TorchRuntime.info`, so the report's stamp names them.
    """
    python = Path(executable).parent / "python"
    script = ("import json, importlib.metadata as m, torch, transformers; print(json.dumps({"
              "'infinity_emb': m.version('infinity-emb'), 'torch': torch.__version__, "
              "'transformers': transformers.__version__, 'torch_threads': torch.get_num_threads()}))")
    try:
        out = subprocess.run([str(python), "-c", script], capture_output=True, text=True, timeout=120,
                             check=True, env=offline_env()).stdout
        return json.loads(out.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as err:
        return {"error": f"{type(err).__name__}: {err}"}


def _file_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in name)
