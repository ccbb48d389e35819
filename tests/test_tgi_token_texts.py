"""TGI's token.text is each token's own text, on /generate's details and on /generate_stream's events,
whatever the stop strings: the engine holds text back while it may begin a stop string and credits it to a
later token, which misaligned the texts with their ids and logprobs (a token's text showing up on the next).

The real engine on the tiny model, greedy: the same request with and without a stop string that the first
tokens begin but the output never completes must give the same tokens with the same texts.
"""
from __future__ import annotations

import json

import httpx
import pytest

PROMPT = "Once upon a time"  # the tiny model's greedy tokens after it are whole characters each


@pytest.fixture(scope="module")
def live(tiny_llama_dir):
    from tests.live_server import engine_server
    with engine_server(tiny_llama_dir) as s:
        yield s


def generate(live, stop: list[str]) -> dict:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 8, "details": True,
                                                                 "stop": stop}}
    r = httpx.post(live.url + "/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def stream(live, stop: list[str]) -> list[dict]:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 8, "stop": stop}}
    with httpx.stream("POST", live.url + "/generate_stream", json=body, timeout=60) as r:
        return [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]


def test_token_texts_do_not_move_under_a_stop_string(live):
    plain = generate(live, [])
    texts = [t["text"] for t in plain["details"]["tokens"]]
    assert texts[0] and texts[1], "the case needs two tokens with text of their own"
    assert "".join(texts) == plain["generated_text"]
    held = texts[0] + texts[1] + "\u2603 never written"  # the first two tokens' text begins it: held back
    got = generate(live, [held])
    assert got["generated_text"] == plain["generated_text"]
    assert [t["id"] for t in got["details"]["tokens"]] == [t["id"] for t in plain["details"]["tokens"]]
    assert [t["text"] for t in got["details"]["tokens"]] == texts
    events = stream(live, [held])
    assert [e["token"]["text"] for e in events] == texts
    assert events[-1]["generated_text"] == plain["generated_text"]
