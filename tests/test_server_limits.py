"""The server's limits: API key, input count, memory budget under 32 concurrent threads, a full
queue (503 + Retry-After), --preload, and SIGTERM during a long request (it finishes, exit 0)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

import kalm_mlx
from kalm_mlx import Ensemble
from kalm_mlx.server import ServerConfig, create_app
from kalm_mlx.server.auth import bearer_token, key_matches
from kalm_mlx.server.catalog import Catalog, UnknownModelError
from kalm_mlx.server.config import parse_switch
from tests.server_helpers import ServerProcess, make_tiny_home, offline_environ

pytestmark = pytest.mark.filterwarnings("ignore::kalm_mlx.TruncationWarning")

KEY = "s3cret-key"
PAIR = ("kalm-v2", "bge-base")


@pytest.fixture(scope="module")
def tiny_home(tmp_path_factory):
    return make_tiny_home(tmp_path_factory.mktemp("limits-models"))


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("hf")


@pytest.fixture(scope="module")
def library(tiny_home, hf_cache):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_HUB_CACHE", str(hf_cache / "hub"))
        patch.setenv("KALM_MLX_HOME", str(tiny_home))
        yield {name: kalm_mlx.load(name) for name in (*PAIR, "minilm")}


@pytest.fixture(scope="module")
def strict_server(tiny_home, hf_cache, library):
    """Two tiny models under a budget that holds only one of them, an API key, 8 inputs at most."""
    budget = max(library[name].nbytes for name in PAIR) + 1
    env = offline_environ(tiny_home, hf_cache, EMBED_MODELS=",".join(PAIR), EMBED_API_KEY=KEY,
                          EMBED_MEMORY_BUDGET=str(budget), EMBED_MAX_INPUTS="8")
    with ServerProcess(env) as process:
        yield process
    assert process.returncode == 0


def auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_api_key_is_required_everywhere_but_health(strict_server):
    url = strict_server.url
    body = {"input": "x"}
    for headers in ({}, auth("wrong"), {"Authorization": KEY}, {"Authorization": "Basic " + KEY}):
        response = httpx.post(f"{url}/v1/embeddings", json=body, headers=headers)
        assert response.status_code == 401, headers
        assert response.json()["error"]["type"] == "authentication_error"
    for path in ("/v1/models", "/metrics", "/openapi.json"):
        assert httpx.get(url + path).status_code == 401, path
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.post(f"{url}/v1/embeddings", json=body, headers=auth()).status_code == 200
    assert httpx.get(f"{url}/v1/models", headers=auth()).status_code == 200


def test_input_count_limit(strict_server):
    response = httpx.post(f"{strict_server.url}/v1/embeddings", json={"input": ["a"] * 9}, headers=auth())
    assert response.status_code == 413 and "limit is 8" in response.json()["error"]["message"]


def test_32_threads_over_two_models_under_a_budget_for_one(strict_server, library):
    texts = [f"concurrent text number {i}" for i in range(64)]
    expected = {name: library[name].encode_documents(texts) for name in PAIR}

    def one(i: int) -> tuple[int, str, int, np.ndarray | None]:
        model = PAIR[i % 2]
        response = httpx.post(f"{strict_server.url}/v1/embeddings", json={"input": texts[i], "model": model},
                              headers=auth(), timeout=120)
        vector = None
        if response.status_code == 200:
            vector = np.array(response.json()["data"][0]["embedding"], dtype=np.float32)
        return i, model, response.status_code, vector

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(64)))
    assert all(status == 200 for _, _, status, _ in results), [r[2] for r in results]
    for i, model, _, vector in results:
        assert np.abs(vector - expected[model][i]).max() < 1e-6
    snapshot = httpx.get(f"{strict_server.url}/metrics", headers={**auth(), "Accept": "application/json"}).json()
    loaded = {s["labels"]["model"] for s in snapshot["kalm_mlx_loaded_bytes"]["samples"]}
    assert len(loaded) <= 1  # the budget holds one model at a time
    evictions = sum(s["value"] for s in snapshot["kalm_mlx_model_evictions"]["samples"])
    assert evictions >= 1


# --- in process, without the worker: a full queue -------------------------------------------


def test_full_queue_answers_503_with_retry_after(tiny_home):
    ensemble = Ensemble(list(PAIR))
    app = create_app(ensemble, ServerConfig(max_queued_texts=2))  # lifespan not run: nothing is encoded

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            waiting = asyncio.ensure_future(client.post("/v1/embeddings", json={"input": ["a", "b"]}))
            for _ in range(100):
                if app.state.server.batcher.queued_texts:
                    break
                await asyncio.sleep(0.01)
            full = await client.post("/v1/embeddings", json={"input": "c"})
            waiting.cancel()
            return full

    response = asyncio.run(scenario())
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "queue_full"


# --- small pieces -----------------------------------------------------------------------------


def test_catalog_names_only_enabled_models():
    catalog = Catalog(["minilm", "kalm-v2-q8"])
    assert catalog.resolve(None) == catalog.resolve("") == "minilm"
    assert catalog.resolve("All-MiniLM-L6-v2") == catalog.resolve("sentence-transformers/all-MiniLM-L6-v2") == "minilm"
    assert catalog.resolve("kalm") == "kalm-v2-q8"  # an alias names the enabled quantized copy
    with pytest.raises(UnknownModelError, match="not enabled.*Enabled models: minilm, kalm-v2-q8"):
        catalog.resolve("bge-base-en-v1.5")
    with pytest.raises(UnknownModelError, match="different model"):
        catalog.resolve("gte-base-en-v1.5")
    with pytest.raises(UnknownModelError, match="not served here"):
        catalog.resolve("/tmp")
    assert catalog.facts("minilm").dimensions == 384


def test_config_from_env_and_flags():
    config = ServerConfig.from_env({"PORT": "9000", "EMBED_BATCHING": "off", "EMBED_MAX_BODY_BYTES": "2MB",
                                    "EMBED_LOG_FORMAT": "json"}, port=9001, batch_wait_ms=None)
    assert (config.port, config.batching, config.max_body_bytes, config.log_format) == (9001, False, 2 * 10**6, "json")
    assert config.loopback and not ServerConfig(host="0.0.0.0").loopback
    with pytest.raises(ValueError, match="EMBED_MAX_INPUTS='0'"):
        ServerConfig.from_env({"EMBED_MAX_INPUTS": "0"})
    with pytest.raises(ValueError, match="EMBED_BATCHING='maybe'"):
        ServerConfig.from_env({"EMBED_BATCHING": "maybe"})
    assert parse_switch("ON") and not parse_switch("0")


def test_bearer_token_and_key_comparison():
    assert bearer_token("Bearer abc") == "abc" and bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None and bearer_token("Bearer") is None and bearer_token(None) is None
    assert key_matches("abc", "abc") and not key_matches("abd", "abc") and not key_matches(None, "abc")


# --- a server of its own: --preload, JSON logs, SIGTERM ---------------------------------------


def test_sigterm_lets_a_long_request_finish_and_exits_0(tiny_home, hf_cache, library, tmp_path):
    env = offline_environ(tiny_home, hf_cache, EMBED_MODELS="minilm", EMBED_LOG_FORMAT="json")
    process = ServerProcess(env, args=["--preload", "--no-batching"], log_path=tmp_path / "server.log")
    texts = [f"text {i} " + "a long text to keep the server busy for a while " * 6 for i in range(128)]
    try:
        process.start()
        health = httpx.get(f"{process.url}/health").json()
        assert health["models"][0]["loaded"]  # --preload: loaded before the port opened
        outcome = {}

        def long_request():
            outcome["response"] = httpx.post(f"{process.url}/v1/embeddings", json={"input": texts},
                                             timeout=120)

        thread = threading.Thread(target=long_request)
        thread.start()
        deadline = time.monotonic() + 30
        while httpx.get(f"{process.url}/health").json()["in_flight_requests"] == 0:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.01)
        process.stop()  # SIGTERM while the request is in flight
        thread.join(60)
    finally:
        process.stop()
    assert process.returncode == 0, process.read_log()[-2000:]
    records = process.log_records()
    shutdown = next(i for i, r in enumerate(records) if r["msg"] == "Shutting down")
    served = next(i for i, r in enumerate(records) if r.get("path") == "/v1/embeddings")
    assert served > shutdown and records[served]["status"] == 200  # answered after SIGTERM
    response = outcome["response"]
    assert response.status_code == 200
    got = np.array([item["embedding"] for item in response.json()["data"]], dtype=np.float32)
    assert np.abs(got - library["minilm"].encode(texts)).max() < 1e-6


def test_a_model_that_cannot_be_loaded_answers_503_saying_why(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("KALM_MLX_HOME", str(tmp_path / "empty-home"))
    app = create_app(Ensemble(["gte-base"]))
    batcher = app.state.server.batcher
    batcher.start()

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            first = await client.post("/v1/embeddings", json={"input": "x", "model": "gte"})
            health = await client.get("/health")
            return first, health

    try:
        response, health = asyncio.run(scenario())
    finally:
        batcher.stop()
    assert response.status_code == 503 and response.headers["retry-after"]
    error = response.json()["error"]
    assert error["code"] == "model_unavailable" and "gte-base cannot be loaded" in error["message"]
    assert "offline" in error["message"].lower() or "HF_HUB_OFFLINE" in error["message"]
    assert health.status_code == 200


def test_a_host_beyond_loopback_without_a_key_is_warned_about(offline_env, capfd):
    """The warning comes before anything binds: here --preload fails (offline, nothing cached)."""
    from kalm_mlx.server.config import ServerConfig
    from kalm_mlx.server.run import serve
    from kalm_mlx.settings import Settings

    settings = Settings(models=("bge-base",), weights={"bge-base": 1.0})
    assert ServerConfig(host="127.0.0.2").loopback and ServerConfig(host="localhost").loopback
    assert serve(ServerConfig(host="0.0.0.0", port=0, preload=True), settings) == 2
    log = capfd.readouterr().err
    assert "listening on 0.0.0.0 without an API key" in log and "model not found" in log
    assert serve(ServerConfig(host="0.0.0.0", port=0, preload=True, api_key="k"), settings) == 2
    assert "without an API key" not in capfd.readouterr().err
