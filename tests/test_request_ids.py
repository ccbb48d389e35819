"""Request ids (X-Request-Id), the per-request log line, and TGI's timing headers on /generate."""
from __future__ import annotations

import asyncio
import logging
import re
import shlex

import httpx
import pytest

from server.config import ServerConfig
from server.request_log import engine_ids
from tests.live_server import fake_server

HEX32 = re.compile(r"[0-9a-f]{32}")


@pytest.fixture(scope="module")
def server():
    with fake_server(ServerConfig(stats_log_interval_s=0, api_key="k")) as s:
        yield s


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=30, headers={"Authorization": "Bearer k"}) as c:
        yield c


def chat(max_tokens: int = 4, **extra) -> dict:
    return {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
            **extra}


def log_fields(record: logging.LogRecord) -> tuple[str, dict[str, str]]:
    """The engine id and the key=value fields of a request log line."""
    _, engine_id, *pairs = shlex.split(record.getMessage())
    return engine_id, dict(pair.split("=", 1) for pair in pairs)


def test_a_usable_client_id_is_echoed_and_any_other_is_replaced(client):
    assert client.get("/health", headers={"X-Request-Id": "edge-7f3a:1"}).headers["x-request-id"] == "edge-7f3a:1"
    made = {client.get("/health").headers["x-request-id"] for _ in range(3)}
    assert len(made) == 3 and all(HEX32.fullmatch(m) for m in made)
    # no quote, space or "=": an id cannot break or forge a field of the logfmt request line
    for bad in ("has space", "x" * 129, "tab\there", "", 'a"b', "x-finish=error", "back\\slash"):
        got = client.get("/health", headers={"X-Request-Id": bad}).headers["x-request-id"]
        assert HEX32.fullmatch(got), (bad, got)
    assert client.get("/health", headers={"X-Request-Id": "x" * 128}).headers["x-request-id"] == "x" * 128


def test_every_answer_carries_the_id_errors_and_the_gates_refusals_included(server, client):
    rid = {"X-Request-Id": "err-1"}
    refused = httpx.post(server.url + "/generate", json={"inputs": "a"}, headers=rid)  # no api key
    assert refused.status_code == 401 and refused.headers["x-request-id"] == "err-1"
    invalid = client.post("/v1/chat/completions", json=chat(max_tokens=-1), headers=rid)
    assert invalid.status_code == 400 and invalid.headers["x-request-id"] == "err-1"
    missing = client.get("/nowhere", headers=rid)
    assert missing.status_code == 404 and missing.headers["x-request-id"] == "err-1"
    streamed = client.post("/generate_stream", json={"inputs": "a", "parameters": {"max_new_tokens": 2}},
                           headers=rid)
    assert streamed.status_code == 200 and streamed.headers["x-request-id"] == "err-1"
    assert len(streamed.headers.get_list("x-request-id")) == 1


def test_an_unexpected_500_carries_the_id_too(server, client, monkeypatch):
    """Starlette answers an unhandled exception outside every middleware, RequestIdMiddleware included."""
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")
    monkeypatch.setattr(server.engine, "add_request", broken)
    r = client.post("/generate", json={"inputs": "a"}, headers={"X-Request-Id": "bug-1"})
    assert r.status_code == 500 and r.headers["x-request-id"] == "bug-1"
    assert r.json()["error"] == "internal error: RuntimeError"


def test_openai_ids_are_built_from_the_request_id(client):
    body = client.post("/v1/chat/completions", json=chat(n=2), headers={"X-Request-Id": "trace-9"}).json()
    assert body["id"] == "chatcmpl-trace-9"
    with client.stream("POST", "/v1/completions", json={"model": "fake-model", "prompt": "x", "max_tokens": 3,
                                                        "stream": True}) as r:
        rid = r.headers["x-request-id"]
        ids = {line for line in r.iter_lines() if line.startswith("data: {")}
    assert ids and all(f'"id":"cmpl-{rid}"' in line for line in ids)


def test_requests_sent_with_one_id_at_once_are_all_served(server, client):
    """A proxy fanning one id out: the engine ids differ, so none collides with another in flight."""
    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30,
                                     headers={"Authorization": "Bearer k", "X-Request-Id": "same"}) as c:
            return await asyncio.gather(*(c.post("/v1/chat/completions", json=chat(max_tokens=8, n=2))
                                          for _ in range(6)))
    replies = asyncio.run(send_all())
    assert [r.status_code for r in replies] == [200] * 6
    assert all(r.json()["id"] == "chatcmpl-same" and len(r.json()["choices"]) == 2 for r in replies)
    ids = engine_ids("chatcmpl-same", 3) + engine_ids("chatcmpl-same", 3)
    assert len(set(ids)) == 6 and all(i.startswith("chatcmpl-same-") for i in ids)


def test_each_request_leaves_one_log_line_that_names_its_id(client, caplog):
    caplog.set_level(logging.INFO, logger="gqa_serve.requests")
    body = client.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 5, "details": True,
                                                                           "decoder_input_details": True}},
                       headers={"X-Request-Id": "log-me"}).json()
    lines = [r for r in caplog.records if r.name == "gqa_serve.requests" and "log-me" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    engine_id, fields = log_fields(lines[0])
    assert engine_id.startswith("tgi-log-me-0-")
    assert fields["finish"] == "length" and int(fields["output_tokens"]) == body["details"]["generated_tokens"]
    assert int(fields["prompt_tokens"]) == len(body["details"]["prefill"])
    assert 0 <= float(fields["ttft_s"]) <= float(fields["e2e_s"]) and float(fields["tpot_ms"]) >= 0


def test_a_failed_request_logs_a_warning_with_its_error(client, caplog):
    caplog.set_level(logging.INFO, logger="gqa_serve.requests")
    client.post("/generate", json={"inputs": "FAIL", "parameters": {"max_new_tokens": 5}},
                headers={"X-Request-Id": "will-fail"})
    [line] = [r for r in caplog.records if r.name == "gqa_serve.requests" and "will-fail" in r.getMessage()]
    assert line.levelno == logging.WARNING
    fields = log_fields(line)[1]
    assert fields["finish"] == "error" and fields["error"] == "simulated engine failure"
    assert fields["prompt_tokens"] == "5"  # <s> F A I L, as submitted: a dead engine's failure carries no count


def test_a_client_that_leaves_is_logged_as_an_abort(server, client, caplog):
    caplog.set_level(logging.INFO, logger="gqa_serve.requests")
    server.engine.step_delay = 0.02
    try:
        with client.stream("POST", "/generate_stream", json={"inputs": "a", "parameters": {"max_new_tokens": 500}},
                           headers={"X-Request-Id": "walks-away"}) as r:
            next(r.iter_lines())  # one token, then close the connection
        for _ in range(200):
            lines = [r for r in caplog.records if "walks-away" in r.getMessage()]
            if lines:
                break
            asyncio.run(asyncio.sleep(0.01))
    finally:
        server.engine.step_delay = 0.002
    [line] = lines
    fields = log_fields(line)[1]
    assert fields["finish"] == "abort" and 1 <= int(fields["output_tokens"]) < 500 and fields["prompt_tokens"] == "2"


def test_the_log_line_can_be_turned_off(caplog):
    caplog.set_level(logging.INFO, logger="gqa_serve.requests")
    with fake_server(ServerConfig(stats_log_interval_s=0, log_requests=False)) as quiet:
        r = httpx.post(quiet.url + "/generate", json={"inputs": "a", "parameters": {"max_new_tokens": 2}})
        assert r.status_code == 200
    assert not [r for r in caplog.records if r.name == "gqa_serve.requests"]


def test_generate_answers_tgis_timing_headers(client):
    r = client.post("/generate", json={"inputs": "Hello there", "parameters": {
        "max_new_tokens": 6, "details": True, "decoder_input_details": True}})
    h, details = r.headers, r.json()["details"]
    assert h["x-compute-type"] == "cpu" and int(h["x-compute-characters"]) == len("Hello there")
    assert int(h["x-prompt-tokens"]) == len(details["prefill"])
    assert int(h["x-generated-tokens"]) == details["generated_tokens"] == 6
    parts = [int(h[f"x-{name}-time"]) for name in ("validation", "queue", "inference")]
    assert all(p >= 0 for p in parts) and sum(parts) - 2 <= int(h["x-total-time"]) <= sum(parts) + 2
    assert abs(float(h["x-compute-time"]) * 1000 - int(h["x-total-time"])) <= 1
    assert int(h["x-time-per-token"]) <= int(h["x-inference-time"]) // 6 + 1
    batch = client.post("/generate", json={"inputs": ["a", "bb", "ccc"], "parameters": {"max_new_tokens": 4}})
    assert int(batch.headers["x-generated-tokens"]) == 12 and int(batch.headers["x-compute-characters"]) == 6


def test_generate_stream_answers_tgis_stream_headers(client):
    with client.stream("POST", "/generate_stream", json={"inputs": "Hello there",
                                                         "parameters": {"max_new_tokens": 3}}) as r:
        body = "".join(r.iter_text())
    assert r.status_code == 200 and body.count("data:") == 3
    assert r.headers["x-compute-type"] == "cpu" and r.headers["x-compute-characters"] == str(len("Hello there"))
    assert r.headers["x-accel-buffering"] == "no" and r.headers["x-request-id"]
