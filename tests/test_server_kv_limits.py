"""A KV cache smaller than max_model_len (start-up warns, and serves): what one request may use is the cache,
and the HTTP routes say so in their own words.

The real engine on the tiny model (2 layers x 2 kv heads x head_dim 16 in float32: 512 bytes a token), with
64 KiB of KV cache (128 tokens) under max_model_len 512.
"""
from __future__ import annotations

import httpx
import pytest

CACHE_TOKENS, MAX_MODEL_LEN = 128, 512


@pytest.fixture(scope="module")
def live(tiny_llama_dir):
    from tests.live_server import engine_server
    with engine_server(tiny_llama_dir, kv_cache_memory="64KiB", max_model_len=MAX_MODEL_LEN) as s:
        yield s


def test_info_reports_the_cache_as_the_longest_request(live):
    info = httpx.get(live.url + "/info").json()
    assert info["max_model_len"] == MAX_MODEL_LEN
    assert info["max_total_tokens"] == CACHE_TOKENS and info["max_input_tokens"] == CACHE_TOKENS - 1


def test_chat_without_max_tokens_fills_what_the_cache_leaves(live):
    """OpenAI's max_tokens is optional: the default is the room left, which is the cache's, not
    max_model_len's (that default was refused with a 400 naming max_new_tokens)."""
    body = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "ignore_eos": True}
    r = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == CACHE_TOKENS
    assert r.json()["choices"][0]["finish_reason"] == "length"
    r = httpx.post(live.url + "/v1/completions", json={"prompt": "hi", "max_tokens": None, "ignore_eos": True},
                   timeout=120)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]  # an explicit null: the room left (left out, completions' default is OpenAI's 16)
    assert usage["prompt_tokens"] + usage["completion_tokens"] == CACHE_TOKENS


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 200}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 200},
     "max_completion_tokens"),
    ("/v1/completions", {"prompt": "hi " * 150, "max_tokens": 1}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 150}], "max_tokens": 1}, "messages"),
])
def test_openai_refusals_name_openai_fields_and_the_cache(live, path, body, param):
    r = httpx.post(live.url + path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"].startswith(param), err
    assert "KV cache" in err["message"] and f"{CACHE_TOKENS:,}" in err["message"], err


def test_tgi_refusal_names_the_cache(live):
    r = httpx.post(live.url + "/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 200}})
    assert r.status_code == 422
    assert r.json()["error"].startswith("parameters.max_new_tokens") and "KV cache" in r.json()["error"]


@pytest.mark.parametrize("field, path, body, param", [
    ("inputs", "/v1/completions", {"prompt": "hi", "max_tokens": 2}, "prompt"),
    ("max_new_tokens", "/v1/completions", {"prompt": "hi", "max_tokens": 2}, "max_tokens"),
    ("inputs", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "messages"),
    ("max_new_tokens", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 2}, "max_completion_tokens"),
])
def test_an_engine_refusal_names_the_routes_own_field(field, path, body, param):
    """The scheduler's refusals (server/scheduler.py: the KV-cache check) speak TGI's words, `inputs` and
    `max_new_tokens`; past the routes' own checks (a race with the cache, another engine), the OpenAI
    routes answer with their field names."""
    from server.outputs import AdmissionError
    from tests.live_server import fake_server

    def refuse(*_args):
        raise AdmissionError(f"{field}: refused by the engine", field)
    with fake_server() as s:
        s.engine.add_request = refuse
        r = httpx.post(s.url + path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] == f"{param}: refused by the engine", err
