"""Requests that once failed a whole engine step, or got a 500, on the real engine behind the app (an
HTTP fuzzer found them): a step fails every request in it, and three failed steps in a row mark the engine
dead, so one client could take the server down.

- top_k past int64 (1e20) overflowed the sampling tensors; a top_k past the vocabulary now keeps every token.
- stop_token_ids outside the vocabulary indexed past the logits under min_tokens; now a 400 naming the field.
- an admitted request could still be refused by the scheduler's own queue bound when a preemption or the
  engine thread's timing moved the queue between the check and the add: a 500 instead of a 429.
"""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from server.engine import LLMEngine
from tests.live_server import engine_server

HUGE = 10 ** 20


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with engine_server(tiny_llama_dir) as s:
        yield s


def test_top_k_past_the_vocabulary_keeps_every_token(server):
    def tgi(top_k):
        params = {"max_new_tokens": 8, "do_sample": True, "seed": 3, "temperature": 0.9}
        if top_k is not None:
            params["top_k"] = top_k
        r = httpx.post(server.url + "/generate", json={"inputs": "Hello there", "parameters": params}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["generated_text"]

    assert tgi(HUGE) == tgi(None) == tgi(384 + 17)  # the tiny model's vocabulary is 384
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "top_k": HUGE,
                                                         "seed": 1}, timeout=60)
    assert r.status_code == 200, r.text


def test_stop_token_ids_outside_the_vocabulary_are_refused(server):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 5, "min_tokens": 2,
                                                         "stop_token_ids": [3, 1000]}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "stop_token_ids" and "1000" in err["message"]
    ok = httpx.post(server.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 5, "min_tokens": 2,
                                                          "stop_token_ids": [3, 383]}, timeout=60)
    assert ok.status_code == 200, ok.text


def test_the_engine_survives_what_once_poisoned_its_steps(server):
    """Each of these once failed its step (and its neighbours); three in a row killed the engine."""
    bodies = [("/generate", {"inputs": "a", "parameters": {"max_new_tokens": 3, "top_k": HUGE}}),
              ("/v1/completions", {"prompt": "a", "max_tokens": 3, "top_k": HUGE, "temperature": 0}),
              ("/v1/completions", {"prompt": "a", "max_tokens": 3, "min_tokens": 1, "stop_token_ids": [HUGE]})]
    for _ in range(2):
        for path, body in bodies:
            assert httpx.post(server.url + path, json=body, timeout=60).status_code in (200, 400)  # no 500
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_an_admitted_request_is_never_refused_later(tiny_llama_dir, monkeypatch):
    """The engine thread is slowed between taking an add off its queue and queueing it (the window a
    preemption or a thread switch opens): every request gets 200 or 429, never a 500."""
    real_add = LLMEngine.add_request

    def slow_add(self, *args, **kwargs):
        time.sleep(0.05)
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(LLMEngine, "add_request", slow_add)

    async def burst(url: str) -> list[int]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            async def one(i: int) -> int:
                await asyncio.sleep(0.01 * i)
                body = {"inputs": "Hello there", "parameters": {"max_new_tokens": 20}}
                return (await client.post("/generate", json=body)).status_code
            return await asyncio.gather(*[one(i) for i in range(12)])

    with engine_server(tiny_llama_dir, max_waiting_requests=2, max_num_seqs=1) as s:
        codes = asyncio.run(burst(s.url))
    assert set(codes) <= {200, 429} and 200 in codes and 429 in codes, codes
