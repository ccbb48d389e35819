"""OpenAI-compatible routes against the fake engine, through the official openai client and raw httpx."""
from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.live_server import fake_server

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def server():
    with fake_server() as s:
        yield s


@pytest.fixture()
def oai(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def test_models(oai):
    models = oai.models.list()
    assert [m.id for m in models.data] == ["fake-model"]
    assert oai.models.retrieve("fake-model").id == "fake-model"  # GET /v1/models/{id}: it used to be a 404
    with pytest.raises(openai.NotFoundError, match="not served here"):
        oai.models.retrieve("other/model")


def test_huggingface_hubs_placeholder_model_names_are_served(server):
    """huggingface_hub's InferenceClient(base_url=...).chat_completion() sends model "dummy" (older versions
    "tgi"): TGI serves whatever is asked, and we answered 404."""
    for name in ("dummy", "tgi"):
        r = httpx.post(server.url + "/v1/chat/completions", json={"model": name, "messages": CHAT, "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] == "fake-model"


def test_a_json_object_format_with_tgis_schema_value_follows_the_schema(server):
    """huggingface_hub's chat_completion turns a json_schema response_format into TGI's shape,
    {"type": "json_object", "value": <schema>}; it was refused as an unknown field."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}
    from server.openai_common import _grammar
    from server.schemas_openai import ChatCompletionRequest
    req = ChatCompletionRequest(messages=CHAT, response_format={"type": "json_object", "value": schema})
    assert _grammar(req) == {"type": "json", "value": json.dumps(schema)}  # the schema, not any object
    r = httpx.post(server.url + "/v1/chat/completions", json={
        "messages": CHAT, "max_tokens": 4, "response_format": {"type": "json_object", "value": schema}})
    assert r.status_code == 200
    r = httpx.post(server.url + "/v1/chat/completions", json={
        "messages": CHAT, "response_format": {"type": "text", "value": schema}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format.value"


def test_continuous_usage_stats_puts_the_usage_so_far_on_every_chunk(server):
    body = {"prompt": "Once upon", "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    chunks = [json.loads(b[6:]) for b in httpx.post(server.url + "/v1/completions", json=body).text.split("\n\n")
              if b.startswith("data: {")]
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 4 and all(c["usage"]["prompt_tokens"] == 10 for c in chunks)
    assert len([c for c in chunks if c["choices"]]) == 4  # each token's chunk carries it, not only the last
    body["stream_options"] = {"include_usage": True}
    chunks = [json.loads(b[6:]) for b in httpx.post(server.url + "/v1/completions", json=body).text.split("\n\n")
              if b.startswith("data: {")]
    assert [c["usage"] is None for c in chunks] == [True] * 4 + [False]


def test_openai_fields_with_nothing_to_do_here_are_accepted(server):
    body = {"messages": CHAT, "max_tokens": 2, "prompt_cache_key": "k", "safety_identifier": "u1",
            "modalities": ["text"], "stream": True, "stream_options": {"include_obfuscation": False}}
    assert httpx.post(server.url + "/v1/chat/completions", json=body).status_code == 200
    r = httpx.post(server.url + "/v1/chat/completions", json={**body, "modalities": ["text", "audio"]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("modalities")


def test_completion_non_streaming_and_streaming_agree(oai):
    full = oai.completions.create(model="fake-model", prompt="Once upon", max_tokens=6, temperature=0)
    assert full.choices[0].finish_reason == "length" and len(full.choices[0].text) == 6
    assert full.usage.completion_tokens == 6 and full.usage.prompt_tokens == len("Once upon") + 1
    chunks = list(oai.completions.create(model="fake-model", prompt="Once upon", max_tokens=6, temperature=0,
                                         stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens and chunks[-1].choices == []
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_completion_n_logprobs_echo_and_token_prompts(oai):
    r = oai.completions.create(model="fake-model", prompt=["ab", "cd"], max_tokens=3, n=2, logprobs=2, seed=5)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 3 and len(lp.top_logprobs[0]) == 2 and lp.text_offset == [0, 1, 2]
    assert r.choices[0].text != r.choices[1].text  # same seed, distinct per choice
    e = oai.completions.create(model="fake-model", prompt=[1, 100, 101], max_tokens=2, echo=True)
    assert e.choices[0].text.startswith("<s>ab")


def test_chat_non_streaming_streaming_n_and_logprobs(oai):
    r = oai.chat.completions.create(model="fake-model", messages=CHAT, max_completion_tokens=5, temperature=0,
                                    logprobs=True, top_logprobs=2)
    msg = r.choices[0].message
    assert msg.role == "assistant" and len(msg.content) == 5 and r.choices[0].finish_reason == "length"
    content = r.choices[0].logprobs.content
    assert len(content) == 5 and len(content[0].top_logprobs) == 2 and content[0].bytes
    stream = oai.chat.completions.create(model="fake-model", messages=CHAT, max_tokens=5, temperature=0,
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == msg.content
    assert chunks[-1].usage.completion_tokens == 5
    many = oai.chat.completions.create(model="fake-model", messages=CHAT, max_tokens=3, n=3, stream=True)
    texts = {}
    for c in many:
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
    assert sorted(texts) == [0, 1, 2] and all(len(t) == 3 for t in texts.values())


def test_chat_extensions_accepted(server):
    body = {"messages": CHAT, "max_tokens": 3, "ignore_eos": True, "top_k": 5, "min_p": 0.1,
            "repetition_penalty": 1.1, "stop": "zzz"}
    r = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"


def test_raw_sse_framing_ends_with_done(server):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 3, "stream": True})
    blocks = [b for b in r.text.split("\n\n") if b]
    assert blocks[-1] == "data: [DONE]" and all(b.startswith("data: ") for b in blocks)
    assert all(json.loads(b[6:])["object"] == "text_completion" for b in blocks[:-1])


@pytest.mark.parametrize("body, status, param", [
    ({"model": "other", "prompt": "x"}, 404, "model"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "logit_bias": {"one": 2.0}}, 400, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"1": 101.0}}, 400, "logit_bias"),
    ({"prompt": "x", "n": 99}, 400, "n"),
    ({"prompt": [], "max_tokens": 1}, 400, "prompt"),
    ({"prompt": [10**7]}, 400, "prompt"),
    ({"prompt": "x", "stop": [""]}, 400, "stop"),
])
def test_completion_errors_in_openai_shape(server, body, status, param):
    r = httpx.post(server.url + "/v1/completions", json=body)
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param


@pytest.mark.parametrize("extra, param", [
    ({"chat_template": "{{ messages }}"}, "chat_template"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto"}, "tool_choice"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),  # json_schema missing
    ({"messages": []}, "messages"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream (OpenAI and vLLM refuse)
])
def test_chat_refusals(server, extra, param):
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": CHAT, **extra})
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_openai_client_raises_on_bad_request(oai):
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model="fake-model", prompt="x", max_tokens=10**6)
    assert "max_model_len" in str(info.value)


def test_the_default_models_directory_is_a_name_it_serves_by():
    """Served without `model` (the default model, converted into the model cache), the directory's path was
    a 404 as `model` and null as /info's model_path; with `--model <that path>` both worked."""
    from server.engine_config import EngineConfig
    config = EngineConfig(model=None, max_model_len=1024, device="cpu", dtype="float32")
    with fake_server(engine_config=config) as s:
        s.engine.model_dir = "/cache/gqa-serve/models/smollm2-135m"
        assert httpx.get(s.url + "/info").json()["model_path"] == s.engine.model_dir
        r = httpx.post(s.url + "/v1/completions", json={"model": s.engine.model_dir, "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200, r.text
        r = httpx.post(s.url + "/v1/completions", json={"model": "/elsewhere", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 404
