"""End to end with the real AsyncEngine on the tiny random LLaMA (CPU, float32, greedy): real uvicorn,
real clients (openai, huggingface_hub, httpx), batching invariance, disconnects, SIGTERM drain."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from server.app import create_app
from server.config import ServerConfig
from server.engine_config import EngineConfig
from tests.live_server import LiveServer, metric
from tests.test_server_robustness import wait_freed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    from server.async_engine import AsyncEngine
    engine = AsyncEngine(EngineConfig(model=str(tiny_llama_dir), device="cpu", dtype="float32", max_num_seqs=64,
                                      kv_cache_memory="16MiB"))
    with LiveServer(create_app(engine, ServerConfig(stats_log_interval_s=0))) as s:
        yield s


def greedy(prompt: str, n: int) -> dict:
    return {"inputs": prompt, "parameters": {"max_new_tokens": n, "temperature": 0, "details": True}}


def test_32_concurrent_streams_match_solo_runs(server):
    prompts = [f"{word} " * (1 + i) for i, word in enumerate(
        ["ROMEO:", "To be", "What light", "First Citizen:", "O", "Now is the winter", "Friends,", "KING:"])]
    solo = {}
    for p in prompts:
        r = httpx.post(server.url + "/generate", json=greedy(p, 8), timeout=60).json()
        solo[p] = [t["id"] for t in r["details"]["tokens"]]

    async def one(client: httpx.AsyncClient, prompt: str) -> list[int]:
        ids = []
        async with client.stream("POST", "/generate_stream", json=greedy(prompt, 8)) as r:
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    event = json.loads(line[5:])
                    ids.append(event["token"]["id"])
        return ids

    async def all_clients() -> list[list[int]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return await asyncio.gather(*(one(client, prompts[i % 8]) for i in range(32)))

    results = asyncio.run(all_clients())
    for i, ids in enumerate(results):
        assert ids == solo[prompts[i % 8]], f"client {i} diverged from its solo run"


def test_openai_client_chat_and_completions(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as oai:
        model = oai.models.list().data[0].id
        msgs = [{"role": "user", "content": "Speak, friend"}]
        full = oai.chat.completions.create(model=model, messages=msgs, max_tokens=6, temperature=0)
        streamed = oai.chat.completions.create(model=model, messages=msgs, max_tokens=6, temperature=0,
                                               stream=True, stream_options={"include_usage": True})
        chunks = list(streamed)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
            full.choices[0].message.content
        assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
        comp = oai.completions.create(model=model, prompt="To be or", max_tokens=4, logprobs=3, n=2, seed=1)
        assert len(comp.choices) == 2 and len(comp.choices[0].logprobs.top_logprobs[0]) == 3
        assert all(lp <= 0 for lp in comp.choices[0].logprobs.token_logprobs)


def test_huggingface_hub_client(server):
    from huggingface_hub import InferenceClient
    client = InferenceClient(model=server.url, token="unused")
    out = client.text_generation("ROMEO:", max_new_tokens=5, details=True)
    assert out.details.generated_tokens == 5 or out.details.finish_reason == "eos_token"
    assert "".join(client.text_generation("ROMEO:", max_new_tokens=5, stream=True)) == out.generated_text


def test_dropped_requests_free_blocks_at_once(server):
    body = {"inputs": "x", "parameters": {"max_new_tokens": 400, "temperature": 0}}
    before = metric(server.url, "gqaserve_generation_tokens_total")
    with httpx.stream("POST", server.url + "/generate_stream", json=body, timeout=60) as r:
        lines = r.iter_lines()
        next(lines)
        assert metric(server.url, "gqaserve_kv_cache_usage_ratio") > 0
    wait_freed(server.url, before, 400)
    before = metric(server.url, "gqaserve_generation_tokens_total")
    host, port = server.url.removeprefix("http://").split(":")
    raw = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(f"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
    deadline = time.monotonic() + 10
    while metric(server.url, "gqaserve_num_requests_running") == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert metric(server.url, "gqaserve_kv_cache_usage_ratio") > 0
    sock.close()
    wait_freed(server.url, before, 400)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_in_a_process(model_dir, *flags: str) -> tuple[subprocess.Popen, str]:
    """`gqa-serve serve` on the model, once /health says 200."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", str(model_dir), "--device", "cpu",
           "--dtype", "float32", "--port", str(port), "--kv-cache-memory", "8MiB", *flags]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 90
    while True:
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read())
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("server never became healthy")
        time.sleep(0.1)


def stream_in_a_thread(url: str, max_new_tokens: int) -> tuple[threading.Thread, list[dict], threading.Event]:
    """A /generate_stream request in a thread: its events (data lines) and an event set at the first."""
    events: list[dict] = []
    started = threading.Event()

    def stream() -> None:
        body = {"inputs": "ROMEO:", "parameters": {"max_new_tokens": max_new_tokens, "temperature": 0,
                                                  "details": True}}
        with httpx.stream("POST", url + "/generate_stream", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
                    started.set()

    worker = threading.Thread(target=stream)
    worker.start()
    return worker, events, started


def test_sigterm_drains_in_flight_request_and_exits_zero(tiny_llama_dir):
    proc, url = serve_in_a_process(tiny_llama_dir, "--drain-timeout-s", "60")
    try:
        worker, events, started = stream_in_a_thread(url, 16)
        assert started.wait(60)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        try:
            refused = httpx.post(url + "/generate", json={"inputs": "late"}, timeout=10)
            assert refused.status_code == 503
            assert httpx.get(url + "/health").status_code == 503
        except httpx.TransportError:
            pass  # already closed: the in-flight request finished first
        worker.join(120)
        assert events and events[-1].get("details", {}) and events[-1]["details"]["generated_tokens"] == 16
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("how", ["timeout", "second_sigterm"])
def test_requests_a_drain_cannot_wait_for_are_answered_not_cut(tiny_llama_dir, how):
    """When the drain ends before the requests do (its timeout, or a second SIGTERM), each is aborted
    through the engine: a stream ends with an error event, not a cut connection (uvicorn's own timeout
    cancelled the handlers: "incomplete chunked read"), and the server still exits 0."""
    timeout = "0" if how == "timeout" else "600"
    proc, url = serve_in_a_process(tiny_llama_dir, "--drain-timeout-s", timeout, "--max-num-seqs", "1")
    try:
        worker, events, started = stream_in_a_thread(url, 400)  # long enough to outlast the signal
        assert started.wait(60)
        proc.send_signal(signal.SIGTERM)
        if how == "second_sigterm":
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
        worker.join(120)
        assert not worker.is_alive()
        assert "error" in events[-1] and "aborted by the server" in events[-1]["error"], events[-1]
        assert len(events) < 400
        assert proc.wait(60) == 0
        log = proc.stdout.read()
        assert "aborting the 1 requests in flight" in log and "Traceback" not in log and "Cancel" not in log, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_real_engine_reports_queue_time_in_the_log_line_and_tgis_headers(server, caplog):
    caplog.set_level(logging.INFO, logger="gqa_serve.requests")
    r = httpx.post(server.url + "/generate", json=greedy("To be or not", 6), headers={"X-Request-Id": "e2e-q"},
                   timeout=60)
    assert r.status_code == 200 and r.headers["x-request-id"] == "e2e-q"
    assert int(r.headers["x-generated-tokens"]) == r.json()["details"]["generated_tokens"] == 6
    assert int(r.headers["x-queue-time"]) >= 0 and r.headers["x-compute-type"] == "cpu"
    [line] = [x.getMessage() for x in caplog.records if "e2e-q" in x.getMessage()]
    fields = dict(pair.split("=", 1) for pair in line.split()[2:])
    assert fields["finish"] == "length" and fields["output_tokens"] == "6"
    assert 0 <= float(fields["queue_s"]) <= float(fields["ttft_s"]) <= float(fields["e2e_s"])


def test_a_priority_under_fcfs_is_a_400_naming_it(server):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "To be", "max_tokens": 2,
                                                        "priority": 2}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "priority", r.text
    assert "scheduling_policy" in r.json()["error"]["message"]
    ok = httpx.post(server.url + "/v1/completions", json={"prompt": "To be", "max_tokens": 2,
                                                         "priority": 0}, timeout=60)
    assert ok.status_code == 200
