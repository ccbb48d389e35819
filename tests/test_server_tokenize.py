"""POST /tokenize and /detokenize in vLLM's shapes (fake engine: one token per byte, id = byte + 3, <s> = 1):
a text or a chat in, ids and counts out, and back."""
from __future__ import annotations

import httpx
import pytest

from tests.live_server import fake_server


@pytest.fixture(scope="module")
def client():
    with fake_server() as s, httpx.Client(base_url=s.url, timeout=30) as c:
        yield c


def test_a_text_as_vllm_and_tgi_clients_send_it(client):
    r = client.post("/tokenize", json={"model": "fake-model", "prompt": "ab"})
    assert r.status_code == 200, r.text
    assert r.json() == {"count": 3, "max_model_len": 1024, "tokens": [1, 100, 101], "token_strs": None}
    r = client.post("/tokenize", json={"inputs": "ab", "add_special_tokens": False, "return_token_strs": True})
    assert r.json()["tokens"] == [100, 101] and r.json()["token_strs"] == ["a", "b"]


def test_a_chat_counts_as_the_chat_route_counts_its_prompt(client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    r = client.post("/tokenize", json={"messages": messages}).json()
    chat = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1}).json()
    assert r["count"] == chat["usage"]["prompt_tokens"] == len(r["tokens"])
    assert r["tokens"][0] != 1  # the template writes its own special tokens: no <s> by default
    plain = client.post("/detokenize", json={"tokens": r["tokens"]}).json()["prompt"]
    assert plain == "<|system|>be brief\n<|user|>hi there\n<|assistant|>"
    no_turn = client.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert no_turn["count"] == r["count"] - len("<|assistant|>")
    with_bos = client.post("/tokenize", json={"messages": messages, "add_special_tokens": True}).json()
    assert with_bos["tokens"] == [1] + r["tokens"]


def test_detokenize_keeps_special_tokens_unless_asked(client):
    assert client.post("/detokenize", json={"tokens": [1, 100, 101, 2]}).json() == {"prompt": "<s>ab</s>"}
    r = client.post("/detokenize", json={"tokens": [1, 100, 101, 2], "skip_special_tokens": True})
    assert r.json() == {"prompt": "ab"}


@pytest.mark.parametrize("route, body, field", [
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "messages"),
    ("/tokenize", {"prompt": "a", "inputs": "a"}, "inputs"),
    ("/tokenize", {"prompt": "a", "tools": []}, "tools"),
    ("/tokenize", {"prompt": "a", "chat_template_kwargs": {"x": 1}}, "chat_template_kwargs"),
    ("/tokenize", {"messages": []}, "messages"),
    ("/tokenize", {"messages": [{"role": "user", "content": "b"}], "chat_template_kwargs": {"messages": 1}},
     "chat_template_kwargs.messages"),
    ("/tokenize", {"prompt": "a", "model": "other"}, "model"),
    ("/tokenize", {"prompt": "a", "return_token_strs": 1}, "return_token_strs"),
    ("/detokenize", {"tokens": [10**6]}, "tokens"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/detokenize", {"tokens": ["1"]}, "tokens.0"),  # read as token 1 (pydantic's lax mode inside a list)
    ("/detokenize", {"tokens": [True]}, "tokens.0"),
    ("/detokenize", {"ids": [5]}, "tokens"),
    ("/detokenize", {"tokens": [5], "model": "other"}, "model"),
])
def test_bad_requests_name_their_field(client, route, body, field):
    r = client.post(route, json=body)
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"].startswith(field), r.json()
