"""Bad inputs get a 4xx that names the field, limits hold, auth and CORS gate, lifecycle states show in
/health, and a client that goes away frees its request at once (fake engine, real uvicorn)."""
from __future__ import annotations

import asyncio
import socket
import time

import httpx
import pytest

from server.config import ServerConfig
from server.engine_config import EngineConfig
from tests.live_server import fake_server, metric
from tests.test_sse import scripted_client

LONG = 1024  # the fake engine's max_model_len; its tokenizer is one token per byte plus <s>


@pytest.fixture(scope="module")
def server():
    with fake_server() as s:
        yield s


def post_raw(url: str, path: str, body: str | bytes) -> httpx.Response:
    return httpx.post(url + path, content=body, headers={"content-type": "application/json"}, timeout=30)


BAD_TGI = [
    ("malformed json", '{"inputs": "x",', "body"),
    ("array body", '["x"]', "body"),
    ("string body", '"x"', "body"),
    ("empty body", "", "body"),
    ("missing inputs", '{"parameters": {}}', "inputs"),
    ("wrong type", '{"inputs": 5}', "inputs"),
    ("unknown field", '{"inputs": "x", "parameters": {"foo": 1}}', "parameters.foo"),
    ("negative temperature", '{"inputs": "x", "parameters": {"temperature": -1}}', "parameters.temperature"),
    ("top_p zero", '{"inputs": "x", "parameters": {"top_p": 0}}', "parameters.top_p"),
    ("string number", '{"inputs": "x", "parameters": {"max_new_tokens": "5"}}', "parameters.max_new_tokens"),
    ("boolean number", '{"inputs": "x", "parameters": {"seed": true, "do_sample": true}}', "parameters.seed"),
    ("number boolean", '{"inputs": "x", "parameters": {"details": 1}}', "parameters.details"),
    ("top_p above one", '{"inputs": "x", "parameters": {"top_p": 1.5}}', "parameters.top_p"),
    ("zero new tokens", '{"inputs": "x", "parameters": {"max_new_tokens": 0}}', "parameters.max_new_tokens"),
    ("negative seed", '{"inputs": "x", "parameters": {"seed": -3}}', "parameters.seed"),
    ("NaN", '{"inputs": "x", "parameters": {"temperature": NaN}}', "parameters.temperature"),
    ("Infinity", '{"inputs": "x", "parameters": {"top_p": Infinity}}', "parameters.top_p"),
    ("overflow to inf", '{"inputs": "x", "parameters": {"temperature": 1e400}}', "parameters.temperature"),
    ("huge integer", '{"inputs": "x", "parameters": {"max_new_tokens": 1' + "0" * 5000 + '}}', "body"),
    ("lone surrogate", '{"inputs": "a\\ud800b"}', "inputs"),
    ("surrogate in stop", '{"inputs": "x", "parameters": {"stop": ["\\udfff"]}}', "parameters.stop"),
    ("empty prompt", '{"inputs": ""}', "inputs"),
    ("empty batch", '{"inputs": []}', "inputs"),
    ("prompt too long", '{"inputs": "' + "a" * 2000 + '"}', "inputs"),
    ("prompt over char limit", '{"inputs": "' + "a" * 20000 + '"}', "inputs"),
    ("new tokens beyond context", '{"inputs": "x", "parameters": {"max_new_tokens": 5000}}',
     "parameters.max_new_tokens"),
    ("too many stops", '{"inputs": "x", "parameters": {"stop": [' + ",".join(['"s"'] * 17) + "]}}",
     "parameters.stop"),
    ("empty stop", '{"inputs": "x", "parameters": {"stop": [""]}}', "parameters.stop"),
    ("deep nesting", '{"inputs": ' + "[" * 100000 + "]" * 100000 + "}", "body"),
    ("not UTF-8", b'{"inputs": "\xff\xfe"}', "body"),
]


@pytest.mark.parametrize("body, field", [(b, f) for _, b, f in BAD_TGI], ids=[n for n, _, _ in BAD_TGI])
def test_bad_tgi_input_is_4xx_naming_field(server, body, field):
    r = post_raw(server.url, "/generate", body)
    assert r.status_code == 422, r.text  # TGI's status for every validation error, undecodable bodies too
    err = r.json()
    assert err["error_type"] == "validation" and err["error"].startswith(field), err


@pytest.mark.parametrize("path", ["/generate", "/v1/completions"])
@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain"])
def test_a_body_that_is_not_json_is_415_naming_the_content_type(server, path, content_type):
    """curl -d without -H sends a form type: the valid JSON in it was a 422 about a dictionary."""
    body = '{"inputs": "x"}' if path == "/generate" else '{"prompt": "x", "max_tokens": 1}'
    r = httpx.post(server.url + path, content=body, headers={"content-type": content_type}, timeout=30)
    assert r.status_code == 415, r.text
    text = r.text
    assert "content-type" in text and content_type in text and "application/json" in text
    for ok in ("application/json; charset=utf-8", "Application/JSON"):
        r = httpx.post(server.url + path, content=body, headers={"content-type": ok}, timeout=30)
        assert r.status_code == 200, r.text
    r = httpx.post(server.url + path, content=body, timeout=30)
    assert r.status_code == 415 and "none sent" in r.text


def test_length_errors_name_both_numbers(server):
    r = post_raw(server.url, "/generate", '{"inputs": "' + "a" * 2000 + '"}').json()["error"]
    assert "2,001" in r and "1,024" in r
    r = post_raw(server.url, "/generate", '{"inputs": "x", "parameters": {"max_new_tokens": 5000}}').json()
    assert "5,000" in r["error"] and "1,024" in r["error"]


BAD_OPENAI = [
    ("/v1/completions", '{"prompt": "x", "temperature": NaN}', "temperature"),
    ("/v1/completions", '{"prompt": "\\ud800"}', "prompt"),
    ("/v1/completions", '{"prompt": ""}', "prompt"),
    ("/v1/completions", '{"prompt": "x", "stop": ["a","b","c","d","e","f","g","h","i","j","k","l","m","n","o","p",'
                        '"q"]}', "stop"),
    ("/v1/completions", '{"prompt": "x", "max_tokens": 4000}', "max_tokens"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 4000}',
     "max_completion_tokens"),
    ("/v1/chat/completions", '{"messages": [{"role": "wizard", "content": "x"}]}', "messages.0.role"),
    ("/v1/chat/completions", '[]', "body"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "top_k": -5}', "top_k"),
    # JSON of another type that pydantic's lax mode converted ("2" or true as 2 or 1): OpenAI refuses them
    ("/v1/completions", '{"prompt": "x", "max_tokens": "2"}', "max_tokens"),
    ("/v1/completions", '{"prompt": "x", "max_tokens": true}', "max_tokens"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "n": true}', "n"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "stream"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "logprobs": 1}', "logprobs"),
    ("/v1/completions", '{"prompt": "x", "temperature": "0.5"}', "temperature"),
    # inside lists too, where that check did not reach: [1, "2"] and [true] were read as token ids
    ("/v1/completions", '{"prompt": [1, "2"]}', "prompt"),
    ("/v1/completions", '{"prompt": [true]}', "prompt"),
    ("/v1/completions", '{"prompt": "x", "stop_token_ids": ["2"]}', "stop_token_ids.0"),
]


@pytest.mark.parametrize("path, body, param", BAD_OPENAI)
def test_bad_openai_input_is_400_naming_param(server, path, body, param):
    r = post_raw(server.url, path, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_engine_keeps_serving_after_bad_inputs(server):
    for _, body, _ in BAD_TGI[:6]:
        post_raw(server.url, "/generate", body)
    assert httpx.post(server.url + "/generate", json={"inputs": "ok"}).status_code == 200


def test_payload_limit_declared_and_streamed():
    with fake_server(ServerConfig(max_payload_bytes=2048, stats_log_interval_s=0)) as s:
        big = '{"inputs": "' + "a" * 4000 + '"}'
        r = post_raw(s.url, "/generate", big)
        assert r.status_code == 413 and r.json()["error"].startswith("body")

        def chunks():
            for _ in range(10):
                yield b" " * 500
        r = httpx.post(s.url + "/generate", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert post_raw(s.url, "/generate", '{"inputs": "small"}').status_code == 200


def _send_headers_then_body(url: str, headers: str, body: bytes) -> bytes:
    """As most clients send a request: the headers, then the body, here after the server has had time to
    answer. Returns the status line, or the name of the socket error the client met."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        try:
            sock.sendall(f"POST /generate HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
            time.sleep(0.05)
            sock.sendall(body)
            return sock.recv(4096).split(b"\r\n")[0]
        except OSError as err:
            return type(err).__name__.encode()


def test_a_refused_body_still_being_sent_reads_its_4xx_not_a_reset():
    """The 413 (and 415) went out, and the socket closed, while the client was still sending its body: the
    kernel resets a socket closed with unread bytes, and the client met a broken pipe or a reset instead of
    the error. A refused body is now read and dropped (up to 16x the limit) before the answer. The body is
    larger than the loopback socket's buffers, or the answer arrives before the reset."""
    limit = 256 * 1024
    with fake_server(ServerConfig(max_payload_bytes=limit, stats_log_interval_s=0)) as s:
        body = b'{"inputs": "' + b"a" * (8 * limit) + b'"}'
        declared = f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        chunked = "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:limit // 2], body[limit // 2:]))
        as_text = f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
        for _ in range(3):
            assert _send_headers_then_body(s.url, declared, body) == b"HTTP/1.1 413 Request Entity Too Large"
            assert _send_headers_then_body(s.url, chunked, chunks + b"0\r\n\r\n").startswith(b"HTTP/1.1 413")
            assert _send_headers_then_body(s.url, as_text, body).startswith(b"HTTP/1.1 415")
        assert post_raw(s.url, "/generate", '{"inputs": "small"}').status_code == 200


def test_a_body_over_the_limit_behind_expect_100_continue_is_refused_before_it_is_sent():
    """A client that asks `Expect: 100-continue` sends its body only after a 100; reading the refused body
    would make the server send that 100 and wait for the whole body. The 413 comes at once instead."""
    limit = 2048
    with fake_server(ServerConfig(max_payload_bytes=limit, stats_log_interval_s=0)) as s:
        host, port = s.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(f"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {4 * limit}\r\nExpect: 100-continue\r\n\r\n".encode())
            assert sock.recv(4096).split(b"\r\n")[0] == b"HTTP/1.1 413 Request Entity Too Large"


def test_auth_default_deny_except_health_and_metrics():
    with fake_server(ServerConfig(api_key="s3cret", stats_log_interval_s=0)) as s:
        assert httpx.get(s.url + "/health").status_code == 200
        assert httpx.get(s.url + "/metrics").status_code == 200
        assert httpx.get(s.url + "/ping").status_code == 200 == httpx.post(s.url + "/ping").status_code
        for path in ("/info", "/version", "/v1/models", "/openapi.json", "/docs", "/nope"):
            assert httpx.get(s.url + path).status_code == 401, path
        r = httpx.post(s.url + "/generate", json={"inputs": "x"}, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error_type"] == "unauthorized"
        r = httpx.get(s.url + "/v1/models")
        assert r.json()["error"]["type"] == "authentication_error"
        ok = httpx.post(s.url + "/generate", json={"inputs": "x"}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200


def test_a_stalled_engine_is_unhealthy_and_refuses_requests():
    """A step that never returns (a hung GPU, a stopped engine process) left /health at 200 and new requests
    waiting forever."""
    with fake_server(ServerConfig(engine_stall_timeout_s=60, stats_log_interval_s=0)) as s:
        s.engine.stalled_seconds = 61.0
        health = httpx.get(s.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "stalled"
        r = httpx.post(s.url + "/generate", json={"inputs": "x"})
        assert r.status_code == 503 and "no step has finished for 61 s" in r.json()["error"]
        s.engine.stalled_seconds = 59.0
        assert httpx.get(s.url + "/health").status_code == 200
    with fake_server(ServerConfig(engine_stall_timeout_s=0, stats_log_interval_s=0)) as s:  # 0: never
        s.engine.stalled_seconds = 1e6
        assert httpx.get(s.url + "/health").status_code == 200


def test_every_response_is_counted_by_route_and_status():
    """4xx rates had no metric: validation errors, 401 and 413 were counted nowhere."""
    with fake_server(ServerConfig(api_key="k", max_payload_bytes=1024, stats_log_interval_s=0)) as s:
        auth = {"Authorization": "Bearer k"}
        assert httpx.post(s.url + "/generate", json={"inputs": "x"}, headers=auth).status_code == 200
        assert httpx.post(s.url + "/generate", json={"inputs": 5}, headers=auth).status_code == 422
        bad = {"prompt": "x", "max_tokens": -1}
        assert httpx.post(s.url + "/v1/completions", json=bad, headers=auth).status_code == 400
        assert httpx.post(s.url + "/generate", json={"inputs": "x"}).status_code == 401
        assert httpx.post(s.url + "/generate", json={"inputs": "x" * 2000}, headers=auth).status_code == 413
        assert httpx.get(s.url + "/nope", headers=auth).status_code == 404
        text = httpx.get(s.url + "/metrics").text
    for route, status in (("/generate", 200), ("/generate", 422), ("/v1/completions", 400), ("/generate", 401),
                          ("/generate", 413), ("unmatched", 404)):
        assert f'gqaserve_http_responses_total{{route="{route}",status="{status}"}} 1.0' in text, (route, status)


def test_cors_closed_unless_configured(server):
    pre = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    r = httpx.options(server.url + "/generate", headers=pre)
    assert "access-control-allow-origin" not in r.headers
    with fake_server(ServerConfig(cors_origins=("https://ok.example",), stats_log_interval_s=0)) as s:
        r = httpx.options(s.url + "/generate", headers={**pre, "Origin": "https://ok.example"})
        assert r.headers["access-control-allow-origin"] == "https://ok.example"
        sdk = {**pre, "Origin": "https://ok.example", "Access-Control-Request-Headers": "x-stainless-os,authorization"}
        r = httpx.options(s.url + "/v1/chat/completions", headers=sdk)  # the openai JS SDK's preflight
        assert r.status_code == 200 and "x-stainless-os" in r.headers["access-control-allow-headers"].lower()
        r = httpx.options(s.url + "/generate", headers=pre)
        assert r.headers.get("access-control-allow-origin") != "https://evil.example"


def test_health_loading_then_ready_then_dead():
    srv = fake_server(load_delay=1.0)
    srv.wait_ready = False
    with srv as s:
        r = httpx.get(s.url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "loading" and r.headers["retry-after"] == "5"
        for probe in (httpx.get, httpx.post):  # /ping, SageMaker's and vLLM's name for it, answers the same
            r = probe(s.url + "/ping")
            assert r.status_code == 503 and r.json()["status"] == "loading"
        r = httpx.post(s.url + "/generate", json={"inputs": "x"})
        assert r.status_code == 503 and r.headers["retry-after"] == "5"  # clients wait that long to retry
        assert httpx.get(s.url + "/metrics").status_code == 200
        s.wait_healthy()
        s.app.state.server.engine.kill()
        r = httpx.get(s.url + "/health")
        assert r.json()["status"] == "dead" and "retry-after" not in r.headers
        assert httpx.get(s.url + "/ping").json()["status"] == "dead"
        r = httpx.post(s.url + "/generate", json={"inputs": "x"})
        assert r.status_code == 503 and "retry-after" not in r.headers  # retrying a dead engine cannot help


def test_start_up_objects_are_frozen_out_of_the_gc_until_shutdown():
    import gc
    gc.unfreeze()  # the freeze is process-wide: this module's shared server may hold one
    with fake_server() as s:
        assert gc.get_freeze_count() > 1000  # this test process's imports at least
        assert s.app.state.server._froze_gc
    assert gc.get_freeze_count() == 0
    with fake_server(ServerConfig(gc_freeze=False, stats_log_interval_s=0)):
        assert gc.get_freeze_count() == 0


def test_explain_enabled_answers_503_while_the_model_loads():
    srv = fake_server(ServerConfig(enable_explain=True, stats_log_interval_s=0), load_delay=1.0)
    srv.wait_ready = False
    with srv as s:
        r = httpx.post(s.url + "/explain/attention", json={"prompt": "hello"})
        assert r.status_code == 503 and "still loading" in r.json()["error"]


def test_queue_full_is_429_at_once():
    cfg = EngineConfig(model="fake", max_model_len=1024, max_num_seqs=1, max_waiting_requests=1)

    async def run(url: str) -> list[int]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            body = {"inputs": "x", "parameters": {"max_new_tokens": 200}}
            first = asyncio.ensure_future(c.post("/generate", json=body))
            await asyncio.sleep(0.1)
            second = asyncio.ensure_future(c.post("/generate", json=body))
            await asyncio.sleep(0.1)
            third = await c.post("/generate", json=body)
            oai = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 5})
            assert third.headers["retry-after"] == oai.headers["retry-after"] == "1"  # the SDKs' retries wait
            refused_while_busy = not first.done() and not second.done()  # at once, not queued behind them
            statuses = [third.status_code, oai.status_code, (await first).status_code, (await second).status_code]
            # a batch: the 3rd prompt at the latest is refused, and those admitted before it are aborted
            batch = await c.post("/generate", json={"inputs": ["a", "b", "c"], "parameters": {"max_new_tokens": 9}})
            return [refused_while_busy, batch.status_code, *statuses]

    with fake_server(engine_config=cfg, step_delay=0.01) as s:
        assert asyncio.run(run(s.url)) == [True, 429, 429, 429, 200, 200]
        # the batch's admitted prompts ended as aborts (their streams never started, so nothing counted them)
        aborts = [line for line in httpx.get(s.url + "/metrics").text.splitlines()
                  if line.startswith('gqaserve_request_success_total{finished_reason="abort"}')]
        assert aborts and float(aborts[0].split()[1]) >= 1


def wait_freed(url: str, tokens_before: float, max_new_tokens: int) -> None:
    """Wait until nothing runs and no KV block is held, then check that the request was aborted, not run to its
    end: fewer than max_new_tokens were generated since tokens_before (no timing: a slow machine cannot fail it)."""
    deadline = time.monotonic() + 60  # a hang, not a slow abort
    while metric(url, "gqaserve_num_requests_running") or metric(url, "gqaserve_kv_cache_usage_ratio"):
        assert time.monotonic() < deadline, "request still running a minute after the client left"
        time.sleep(0.02)
    generated = metric(url, "gqaserve_generation_tokens_total") - tokens_before
    assert generated < max_new_tokens, f"the request ran to its end ({generated:.0f} tokens): it was not aborted"


def test_dropped_stream_frees_at_once(server):
    body = {"inputs": "x", "parameters": {"max_new_tokens": 1000}}
    before = metric(server.url, "gqaserve_generation_tokens_total")
    with httpx.stream("POST", server.url + "/generate_stream", json=body) as r:
        lines = r.iter_lines()  # keep a reference: a collected iterator closes the response
        next(lines)
        assert metric(server.url, "gqaserve_num_requests_running") == 1
    wait_freed(server.url, before, 1000)


def test_dropped_non_streaming_request_frees_at_once(server):
    chat = b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1000}'
    for path, body in (("/generate", b'{"inputs": "x", "parameters": {"max_new_tokens": 1000}}'),
                       ("/v1/chat/completions", chat),
                       ("/v1/responses", b'{"input": "x", "max_output_tokens": 1000}')):
        before = metric(server.url, "gqaserve_generation_tokens_total")
        host, port = server.url.removeprefix("http://").split(":")
        sock = socket.create_connection((host, int(port)))
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(0.2)
        assert metric(server.url, "gqaserve_num_requests_running") == 1
        sock.close()
        wait_freed(server.url, before, 1000)


STREAMS = [
    ("/generate_stream", b'{"inputs": "x", "parameters": {"max_new_tokens": 1000}}'),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 1000, "stream": true}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1000, "stream": true}'),
    ("/v1/responses", b'{"input": "x", "max_output_tokens": 1000, "stream": true}'),
]


@pytest.mark.parametrize("path, body", STREAMS)
def test_a_stream_whose_client_left_before_it_began_is_aborted(server, path, body):
    """The client sends its request and leaves at once, before any event: every streaming route aborts its
    request (through its stream's `finally`, or EventStreamResponse's on_abandoned, next test)."""
    before = metric(server.url, "gqaserve_generation_tokens_total")
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    wait_freed(server.url, before, 1000)


@pytest.mark.parametrize("path, body", STREAMS)
def test_a_stream_abandoned_before_its_body_started_aborts_its_request(server, path, body):
    """The same under a server whose send() is a checkpoint (hypercorn's; uvicorn's while a socket's buffer is
    full): the disconnect cancels the response at its first send, before the body's first step, so the body's
    `finally` (where the request is aborted) never runs. The request ran to its end; now the route's
    on_abandoned aborts it. The app is called in the server's own loop, with the fake engine."""
    receive, send, _ = scripted_client([{"type": "http.request", "body": body, "more_body": False},
                                        {"type": "http.disconnect"}])
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    before = len(server.engine.aborted)
    asyncio.run_coroutine_threadsafe(server.app(scope, receive, send), server.engine._loop).result(30)
    assert len(server.engine.aborted) == before + 1
