"""TGI-compatible routes against the fake engine: raw httpx (JSON + SSE framing) and huggingface_hub."""
from __future__ import annotations

import json

import httpx
import pytest

from tests.live_server import fake_server


@pytest.fixture(scope="module")
def server():
    with fake_server() as s:
        yield s


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def sse_events(text: str) -> list[dict]:
    assert text.endswith("\n\n")
    blocks = [b for b in text.split("\n\n") if b]
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks), blocks
    return [json.loads(b[len("data: "):]) for b in blocks]


def test_generate_with_details(client):
    r = client.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 5, "details": True,
                                                                          "decoder_input_details": True}})
    assert r.status_code == 200
    body = r.json()
    d = body["details"]
    assert d["finish_reason"] == "length" and d["generated_tokens"] == 5 and d["seed"] is None
    assert "".join(t["text"] for t in d["tokens"]) == body["generated_text"]
    assert all(set(t) == {"id", "text", "logprob", "special"} for t in d["tokens"])
    assert [p["id"] for p in d["prefill"]][0] == 1 and d["prefill"][0]["logprob"] is None


def test_generate_batched_list_returns_list(client):
    r = client.post("/generate", json={"inputs": ["a", "b", "c"], "parameters": {"max_new_tokens": 3}})
    assert r.status_code == 200
    out = r.json()
    assert isinstance(out, list) and len(out) == 3 and all(len(o["generated_text"]) == 3 for o in out)


def test_greedy_is_deterministic_and_sampling_reports_seed(client):
    req = {"inputs": "same", "parameters": {"max_new_tokens": 6, "temperature": 0}}
    assert client.post("/generate", json=req).json() == client.post("/generate", json=req).json()
    r = client.post("/generate", json={"inputs": "x", "parameters": {"do_sample": True, "max_new_tokens": 2,
                                                                      "details": True, "top_p": 1.0}})
    assert isinstance(r.json()["details"]["seed"], int)
    seeded = {"inputs": "x", "parameters": {"do_sample": True, "seed": 7, "max_new_tokens": 8}}
    assert client.post("/generate", json=seeded).json() == client.post("/generate", json=seeded).json()
    # TGI's seeds are u64: one past int64 is served (it was a 422) and reported as sent
    big = {"inputs": "x", "parameters": {"do_sample": True, "seed": 2**64 - 1, "max_new_tokens": 4, "details": True}}
    r = client.post("/generate", json=big)
    assert r.status_code == 200 and r.json()["details"]["seed"] == 2**64 - 1


def test_finish_reasons_map_to_tgi_names(client):
    eos = client.post("/generate", json={"inputs": "EOS please", "parameters": {"max_new_tokens": 9,
                                                                                 "details": True}}).json()
    assert eos["details"]["finish_reason"] == "eos_token" and eos["details"]["tokens"][-1]["special"]
    greedy = client.post("/generate", json={"inputs": "stop", "parameters": {"max_new_tokens": 8}}).json()
    stop = greedy["generated_text"][2:4]
    r = client.post("/generate", json={"inputs": "stop", "parameters": {"max_new_tokens": 8, "stop": [stop],
                                                                        "details": True}}).json()
    # the stop sequence stays at the end, as TGI keeps it (OpenAI cuts it), in the text and the last token's
    assert r["details"]["finish_reason"] == "stop_sequence" and r["generated_text"] == greedy["generated_text"][:4]
    assert "".join(t["text"] for t in r["details"]["tokens"]) == r["generated_text"]
    events = sse_events(client.post("/generate_stream", json={"inputs": "stop", "parameters": {
        "max_new_tokens": 8, "stop": [stop], "details": True}}).text)
    assert events[-1]["generated_text"] == "".join(e["token"]["text"] for e in events) == r["generated_text"]


def test_return_full_text_and_truncate(client):
    r = client.post("/generate", json={"inputs": "abcdef", "parameters": {"max_new_tokens": 2,
                                                                           "return_full_text": True}}).json()
    assert r["generated_text"].startswith("abcdef")
    r = client.post("/generate_stream", json={"inputs": "abcdef", "parameters": {"max_new_tokens": 2,
                                                                                  "truncate": 3, "details": True}})
    assert sse_events(r.text)[-1]["details"]["input_length"] == 3


def test_generate_stream_framing(client):
    with client.stream("POST", "/generate_stream", json={"inputs": "Hi", "parameters": {"max_new_tokens": 4,
                                                                                         "details": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())
    events = sse_events(text)
    assert len(events) == 4 and [e["index"] for e in events] == [1, 2, 3, 4]
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    last = events[-1]
    assert last["generated_text"] == "".join(e["token"]["text"] for e in events)
    assert last["details"] == {"finish_reason": "length", "generated_tokens": 4, "seed": None, "input_length": 3}
    # without details asked for, the last event has none (TGI's generate_stream: `false => None`)
    r = client.post("/generate_stream", json={"inputs": "Hi", "parameters": {"max_new_tokens": 4}})
    assert sse_events(r.text)[-1]["details"] is None and sse_events(r.text)[-1]["generated_text"] == last[
        "generated_text"]


def test_compat_root_route_dispatches_on_stream(client):
    # a list, as TGI answers it (text_generation.Client.generate reads [0]), for one prompt or several
    assert "generated_text" in client.post("/", json={"inputs": "a", "parameters": {"max_new_tokens": 1}}).json()[0]
    assert len(client.post("/", json={"inputs": ["a", "b"], "parameters": {"max_new_tokens": 1}}).json()) == 2
    r = client.post("/", json={"inputs": "a", "stream": True, "parameters": {"max_new_tokens": 2}})
    assert len(sse_events(r.text)) == 2


def test_error_after_stream_began_is_last_event(client):
    r = client.post("/generate_stream", json={"inputs": "FAIL now", "parameters": {"max_new_tokens": 8}})
    events = sse_events(r.text)
    assert "token" in events[0]
    assert events[-1]["error_type"] == "generation" and "simulated engine failure" in events[-1]["error"]
    r = client.post("/generate", json={"inputs": "FAIL now", "parameters": {"max_new_tokens": 8}})
    assert r.status_code == 500 and r.json()["error_type"] == "generation"


@pytest.mark.parametrize("params, field", [
    ({"typical_p": 0.5}, "parameters.typical_p"),
    ({"watermark": True}, "parameters.watermark"),
    ({"best_of": 2}, "parameters.best_of"),
    ({"grammar": {"type": "regex", "value": {}}}, "parameters.grammar"),  # a regex is a string
    ({"adapter_id": "x"}, "parameters.adapter_id"),
])
def test_unsupported_tgi_fields_refused(client, params, field):
    r = client.post("/generate", json={"inputs": "a", "parameters": params})
    assert r.status_code == 422 and r.json()["error"].startswith(field)
    ok = client.post("/generate", json={"inputs": "a", "parameters": {"typical_p": None, "watermark": False,
                                                                       "best_of": 1, "max_new_tokens": 1}})
    assert ok.status_code == 200


def test_huggingface_hub_client(server):
    from huggingface_hub import InferenceClient

    client = InferenceClient(model=server.url, token="unused")
    text = client.text_generation("Hello", max_new_tokens=5)
    assert isinstance(text, str) and len(text) == 5
    out = client.text_generation("Hello", max_new_tokens=5, details=True, decoder_input_details=True)
    assert out.generated_text == text and out.details.finish_reason == "length"
    assert len(out.details.tokens) == 5 and out.details.prefill
    pieces = list(client.text_generation("Hello", max_new_tokens=5, stream=True))
    assert "".join(pieces) == text
    events = list(client.text_generation("Hello", max_new_tokens=5, stream=True, details=True))
    assert events[-1].generated_text == text and events[-1].details.generated_tokens == 5
    seeded = client.text_generation("Hi", max_new_tokens=4, do_sample=True, seed=3, temperature=0.7)
    assert seeded == client.text_generation("Hi", max_new_tokens=4, do_sample=True, seed=3, temperature=0.7)


def test_info(client):
    info = client.get("/info").json()
    assert info["num_kv_heads"] == 2 and info["checkpoint_num_kv_heads"] == 2 and info["max_model_len"] == 1024
    assert info["kv_cache"]["tokens"] == 4096 and info["limits"]["max_payload_bytes"] == 1 << 20
    # TGI's Info schema, as its clients read it (they had none of these)
    assert info["model_dtype"] == f"torch.{info['dtype']}" and info["model_device_type"] == info["device"]
    assert info["max_input_tokens"] == 1023 and info["max_total_tokens"] == 1024 and info["max_best_of"] == 1
    assert info["max_stop_sequences"] == 16 and info["max_concurrent_requests"] > info["limits"]["max_num_seqs"]
    assert info["scheduling_policy"] == "fcfs" and info["rope_scaling"] is None and info["sliding_window"] is None
    assert info["version"] and info["router"] == "gqa-serve" and info["max_client_batch_size"] >= 1
    assert client.get("/version").json() == {"version": info["version"]}  # vLLM's route
    assert info["num_prediction_tokens"] == 8
