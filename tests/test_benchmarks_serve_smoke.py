"""The server benchmark keeps working: the load generator on a mock transport, and the whole
run on a tiny converted model with real ``kalm-mlx serve`` processes. No timing is asserted."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from benchmarks import checkpoint, serve, serve_servers
from benchmarks.serve_load import (
    closed_loop,
    embeddings_body,
    latency_stats,
    make_client,
    priority_run,
    short_texts,
)

TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "intermediate_size": 128}


def _embedding_server(log: list | None = None, fail_every: int = 0):
    """A MockTransport answering /v1/embeddings with one vector per input (every ``fail_every``-th a 503)."""
    count = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        count["n"] += 1
        body = json.loads(request.content)
        if log is not None:
            log.append((body, request.headers.get("x-priority")))
        if fail_every and count["n"] % fail_every == 0:
            return httpx.Response(503, json={"error": {"message": "busy"}})
        texts = [body["input"]] if isinstance(body["input"], str) else body["input"]
        return httpx.Response(200, json={"object": "list", "data": [
            {"object": "embedding", "index": i, "embedding": [0.0]} for i in range(len(texts))]})

    return httpx.MockTransport(handler)


def _run(coroutine):
    return asyncio.run(coroutine)


def test_short_texts_are_reproducible_distinct_and_short():
    texts = short_texts(50, seed=3)
    assert texts == short_texts(50, seed=3) and texts != short_texts(50, seed=4)
    assert len(set(texts)) == 50
    assert all(9 <= len(text.split()) <= 16 for text in texts)


def test_embeddings_body_sends_one_text_as_a_bare_string():
    assert embeddings_body("m", ["a"]) == {"input": "a", "model": "m", "encoding_format": "float"}
    assert embeddings_body("m", ["a", "b"])["input"] == ["a", "b"]


def test_latency_stats_in_milliseconds():
    stats = latency_stats([0.001 * n for n in range(1, 101)])
    assert stats["p50_ms"] == pytest.approx(50.5)
    assert stats["p99_ms"] == pytest.approx(99.01)
    assert stats["max_ms"] == 100.0 and stats["mean_ms"] == pytest.approx(50.5)
    assert latency_stats([])["p50_ms"] is None


def test_closed_loop_counts_requests_and_leaves_warm_up_out():
    log = []

    async def go():
        async with httpx.AsyncClient(transport=_embedding_server(log)) as client:
            bodies = [embeddings_body("m", [f"t{i}", f"u{i}"]) for i in range(3)]
            return await closed_loop(client, "http://127.0.0.1:1/v1/embeddings", bodies, concurrency=4,
                                     requests=10, time_cap_s=60.0, warmup_per_client=2)

    result = _run(go())
    row = result.summary()
    assert len(log) == 2 * 4 + 10  # two warm-up rounds of 4, then the 10 timed requests
    assert (row["requests"], row["texts"], row["texts_per_request"], row["errors"]) == (10, 20, 2, {})
    assert not row["hit_time_cap"] and row["texts_per_s"] == pytest.approx(2 * row["requests_per_s"], rel=0.01)
    assert 1 <= row["window_requests"] <= 10
    assert {body["input"][0] for body, _ in log} == {"t0", "t1", "t2"}  # the bodies are cycled


def test_closed_loop_counts_errors_and_stops_at_the_time_cap():
    async def go(**kwargs):
        async with httpx.AsyncClient(transport=_embedding_server(fail_every=3)) as client:
            return await closed_loop(client, "http://127.0.0.1:1/v1/embeddings",
                                     [embeddings_body("m", ["x"])], concurrency=2,
                                     warmup_per_client=0, **kwargs)

    row = _run(go(requests=9, time_cap_s=60.0)).summary()
    assert row["requests"] == 6 and row["errors"] == {"503": 3}
    capped = _run(go(requests=10**6, time_cap_s=0.0)).summary()
    assert capped["hit_time_cap"] and capped["requests"] == 1  # the first, then the cap
    with pytest.raises(ValueError, match="concurrency"):
        _run(closed_loop(None, "", [], concurrency=0, requests=1, time_cap_s=1.0))


def test_priority_run_sends_the_same_probes_with_and_without_the_header():
    log = []

    async def go():
        async with httpx.AsyncClient(transport=_embedding_server(log)) as client:
            return await priority_run(client, "http://127.0.0.1:1/v1/embeddings",
                                      [embeddings_body("m", ["b"] * 5)], [embeddings_body("m", ["p"])],
                                      bulk_clients=2, probes=4, time_cap_s=60.0, settle_s=0.0)

    row = _run(go())
    assert row["recall"]["requests"] == row["normal"]["requests"] == 4
    assert row["bulk_clients"] == 2 and row["bulk_texts_per_request"] == 5 and row["bulk_requests"] >= 1
    probes = [priority for body, priority in log if body["input"] == "p"]
    assert probes.count("recall") == probes.count(None) == 4 and len(probes) == 8
    assert all(priority is None for body, priority in log if body["input"] != "p")


def test_make_client_holds_a_connection_per_client():
    async def go():
        async with make_client(16) as client:
            return client._transport._pool._max_connections, client.timeout.read

    assert _run(go()) == (20, 300.0)


def test_server_process_reports_a_server_that_dies_and_stops_one_that_runs(tmp_path):
    dead = serve_servers.ServerProcess("dead", [sys.executable, "-c", "print('no luck'); raise SystemExit(3)"],
                                       serve_servers.free_port(), tmp_path / "dead.log")
    with pytest.raises(serve_servers.ServerError, match=r"status 3(.|\n)*no luck"), dead:
        pass
    port = serve_servers.free_port()
    script = ("import http.server as h, sys\n"
              "class H(h.BaseHTTPRequestHandler):\n"
              "    def do_GET(self):\n"
              "        self.send_response(200); self.end_headers()\n"
              "        self.wfile.write(b'{\"data\": [{\"id\": \"x\"}]}')\n"
              f"h.HTTPServer(('127.0.0.1', {port}), H).serve_forever()\n")
    with serve_servers.ServerProcess("http", [sys.executable, "-c", script], port, tmp_path / "ok.log") as server:
        assert server.ready_s is not None and server.model_id() == "x"
    assert server.process.returncode is not None  # stopped on exit
    assert serve_servers.batch_counters(server.base_url) is None  # nothing listens any more
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_commands_use_loopback_and_infinity_is_optional(tmp_path, monkeypatch):
    kalm = serve_servers.kalm_server("k", "minilm", tmp_path, batching=False)
    assert kalm.command[1:4] == ["-m", "kalm_mlx.cli", "serve"] and "--no-batching" in kalm.command
    assert kalm.command[kalm.command.index("--host") + 1] == "127.0.0.1" and "--preload" in kalm.command
    fake = tmp_path / "infinity_emb"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    infinity = serve_servers.infinity_server(fake, tmp_path, tmp_path)
    assert infinity.command[infinity.command.index("--host") + 1] == "127.0.0.1"
    assert infinity.command[infinity.command.index("--engine") + 1] == "torch"
    monkeypatch.delenv(serve_servers.INFINITY_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert serve_servers.find_infinity() is None
    assert serve_servers.find_infinity(tmp_path / "missing") is None
    assert serve_servers.find_infinity(fake) == fake
    monkeypatch.setenv(serve_servers.INFINITY_ENV, str(fake))
    assert serve_servers.find_infinity() == fake
    assert "error" in serve_servers.infinity_versions(fake)  # no python beside it
    assert serve_servers.offline_env()["HF_HUB_OFFLINE"] == "1"


def test_cli_refuses_bad_arguments(tmp_path, capsys):
    from benchmarks.cli import main as bench_main

    assert bench_main(["serve", "--kalm", str(tmp_path), "--only", "kalm"]) == 2
    assert "config.json" in capsys.readouterr().err
    assert serve.main(["--infinity", str(tmp_path / "nope"), "--only", "minilm"]) == 2
    assert "not an executable" in capsys.readouterr().err
    assert serve.main(["--rounds", "0"]) == 2


@pytest.fixture(scope="module")
def tiny_converted(tmp_path_factory):
    """A tiny KaLM-shaped checkpoint (real Qwen2 tokenizer), converted with ``python -m convert``."""
    root = tmp_path_factory.mktemp("serve-bench")
    source = checkpoint.make_kalm_shaped(root / "hf", **TINY)
    out = root / "converted"
    subprocess.run([sys.executable, "-m", "convert", str(source), "-o", str(out)], check=True,
                   cwd=Path(__file__).resolve().parents[1], capture_output=True)
    return out


@pytest.fixture(scope="module")
def smoke_results(tiny_converted, tmp_path_factory):
    """The whole benchmark with smoke settings: both groups on the tiny model, and an Infinity that fails."""
    broken = tmp_path_factory.mktemp("broken-infinity") / "infinity_emb"
    broken.write_text("#!/bin/sh\necho 'no torch here' >&2\nexit 1\n")
    broken.chmod(0o755)
    return serve.run_serve_benchmark(serve.Settings.smoke(), kalm_folder=tiny_converted,
                                     minilm=str(tiny_converted), minilm_folder=tiny_converted,
                                     infinity=broken, progress=lambda message: None)


def test_smoke_run_measures_every_point_with_real_servers(smoke_results):
    settings = serve.Settings.smoke()
    points = smoke_results["points"]
    expected = {("kalm", server, "single", c) for server in (serve.BATCHED, serve.UNBATCHED)
                for c in settings.concurrencies}
    expected |= {("minilm", server, payload, c) for server in (serve.BATCHED, serve.UNBATCHED)
                 for payload in settings.minilm_payloads for c in settings.concurrencies}
    assert {(r["group"], r["server"], r["payload"], r["concurrency"]) for r in points} == expected
    for row in points:
        size = serve.PAYLOADS[row["payload"]]
        assert (row["requests"], row["texts"], row["errors"]) == (settings.max_requests,
                                                                  settings.max_requests * size, {}), row
        assert row["texts_per_s"] > 0 and row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"] <= row["max_ms"]
        assert 1 <= row["window_requests"] <= row["requests"]
        assert 1 <= row["texts_per_batch"] <= max(size, row["concurrency"] * size)  # from /metrics
    kalm = smoke_results["groups"]["kalm"]
    assert kalm["encode"]["ceiling"][0]["texts"] == settings.text_pool  # the whole pool, in batches of 4
    assert kalm["encode"]["direct"][0]["runs"] == settings.direct_runs
    priority = kalm["priority"]
    assert priority["recall"]["requests"] == priority["normal"]["requests"] == settings.priority_probes
    assert priority["bulk_requests"] >= 1 and not priority["bulk_errors"]
    assert "priority" not in smoke_results["groups"]["minilm"]


def test_smoke_run_stops_every_server(smoke_results):
    servers = smoke_results["servers"]
    assert len(servers) == 4 and all(s["ready_s"] > 0 for s in servers.values())
    for server in servers.values():
        assert "127.0.0.1" in server["command"]
        port = int(server["command"][server["command"].index("--port") + 1])
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_smoke_ratios_and_report(smoke_results, tmp_path):
    ratios = smoke_results["ratios"]
    assert set(ratios) == set(serve.TARGETS)
    assert ratios["minilm_c16_vs_infinity"] is None  # Infinity did not start: the rest was measured
    assert all(ratios[key] > 0 for key in ratios if key != "minilm_c16_vs_infinity")
    assert any("Infinity not measured" in note and "no torch here" in note for note in smoke_results["notes"])
    paths = serve.write(smoke_results, tmp_path)
    assert [p.name for p in paths] == ["serve.json", "serve.md", "serve.png"]
    assert json.loads((tmp_path / "serve.json").read_text())["ratios"] == ratios
    text = (tmp_path / "serve.md").read_text()
    assert smoke_results["machine"]["cpu"] in text and "MLX" in text
    assert "| MiniLM, 16 clients x 1 text: texts/s, kalm-mlx / Infinity | - | >= 1.5 | not measured |" in text
    assert text.count("| kalm-mlx --no-batching | single | 16 |") == 2  # both groups
    assert (tmp_path / "serve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically, nothing left over
