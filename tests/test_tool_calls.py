"""OpenAI tool calls (server/tool_calls.py): a named function or "required" make the reply calls whose
arguments match the tools' schemas, through the openai client, streamed and not; the tools reach the chat
template; what cannot be served is a 400 naming the field."""
from __future__ import annotations

import json
import shutil

import httpx
import openai
import pytest

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "today's weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["paris", "rome"]}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"],
    "additionalProperties": False}}}
ARGS = {"get_weather": ({"city", "unit"}, {"paris", "rome", "c", "f"}), "get_time": ({"zone"}, {"utc", "cet"})}
CHAT = [{"role": "user", "content": "What is the weather in Paris?"}]


def valid(name: str, arguments: str) -> bool:
    keys, values = ARGS[name]
    args = json.loads(arguments)
    return set(args) == keys and set(args.values()) <= values


@pytest.fixture(scope="module", params=[0, 4], ids=["plain", "drafts"])
def live(tiny_llama_dir, tmp_path_factory, request):
    """The tiny model with a template that renders the tools and the tool turns (as real ones do); with and
    without speculative decoding (a call's grammar then drafts the tokens it forces: name, braces, keys)."""
    from tests.live_server import engine_server
    model = tmp_path_factory.mktemp("tools") / "model"
    shutil.copytree(tiny_llama_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% if tools %}<s>tools {% for t in tools %}{{ t.function.name }} {% endfor %}</s>"
                               "{% endif %}{% for m in messages %}<s>{{ m.role }} {{ m.content }}"
                               "{% for c in m.tool_calls or [] %}call {{ c.function.name }}{% endfor %}"
                               "{{ m.tool_call_id or '' }}</s>{% endfor %}<s>assistant\n")
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    with engine_server(model, num_speculative_tokens=request.param) as s:
        yield s


@pytest.fixture()
def client(live):
    with openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def test_a_named_function_is_called_with_arguments_matching_its_schema(client):
    r = client.chat.completions.create(model=client.models.list().data[0].id, messages=CHAT,
                                       tools=[WEATHER, TIME], max_tokens=40, n=2, temperature=1.0, seed=1,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}})
    for choice in r.choices:
        calls = choice.message.tool_calls
        assert choice.finish_reason == "tool_calls" and choice.message.content is None and len(calls) == 1
        assert calls[0].function.name == "get_time" and valid("get_time", calls[0].function.arguments)
        assert calls[0].id.startswith("call_") and calls[0].type == "function"


def test_required_calls_one_of_the_tools_and_streams(client, live):
    counters = live.engine.engine.counters
    kept_before = counters.accepted_draft_tokens
    first = None
    for seed in range(3):
        r = client.chat.completions.create(model=client.models.list().data[0].id, messages=CHAT, max_tokens=60,
                                           tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False,
                                           temperature=1.0, seed=seed)
        calls = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and len(calls) == 1
        assert valid(calls[0].function.name, calls[0].function.arguments)
        first = first or calls[0]
    stream = client.chat.completions.create(model=client.models.list().data[0].id, messages=CHAT, max_tokens=60,
                                            tools=[WEATHER, TIME], tool_choice="required", stream=True,
                                            parallel_tool_calls=False, temperature=1.0, seed=0)
    chunks = list(stream)
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert not any(c.choices[0].delta.content for c in chunks)  # the call's JSON is not sent as text
    assert chunks[-1].choices[0].finish_reason == "tool_calls" and len(deltas) == 1
    assert deltas[0].index == 0 and valid(deltas[0].function.name, deltas[0].function.arguments)
    assert (first.function.name, first.function.arguments) == (deltas[0].function.name,
                                                                deltas[0].function.arguments)  # seed 0 again
    drafting = live.engine.config.num_speculative_tokens > 0
    assert (counters.accepted_draft_tokens > kept_before) == drafting  # the calls' forced tokens, as drafts


# pydantic's model_json_schema() puts nested models under $defs; a recursive schema refers to its root
LOCATED = {"type": "object", "properties": {"loc": {"$ref": "#/$defs/Loc"}}, "required": ["loc"],
           "additionalProperties": False, "$defs": {"Loc": {
               "type": "object", "properties": {"city": {"enum": ["paris", "rome"]}}, "required": ["city"],
               "additionalProperties": False}}}
TREE = {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#"}, "maxItems": 2}},
        "required": ["kids"], "additionalProperties": False}


@pytest.mark.parametrize("parameters", [LOCATED, TREE, {"$id": "https://example.com/located", **LOCATED}],
                         ids=["defs", "recursive", "own-id"])
def test_tool_schemas_with_references_hold_under_required_and_named(client, parameters):
    """"required" wraps the tools' schemas in one array schema; their own references ("#/$defs/Loc", "#")
    must still resolve against the tool's schema (they resolved against the wrapper: a 400, or calls nested
    in calls). Checked with the jsonschema package against the tool's own schema."""
    import jsonschema
    tool = {"type": "function", "function": {"name": "f", "parameters": parameters}}
    for choice in ("required", {"type": "function", "function": {"name": "f"}}):
        for seed in range(2):
            r = client.chat.completions.create(model=client.models.list().data[0].id, messages=CHAT,
                                               max_tokens=200, tools=[tool, TIME], tool_choice=choice,
                                               parallel_tool_calls=False, temperature=1.0, seed=seed)
            calls = r.choices[0].message.tool_calls
            assert r.choices[0].finish_reason == "tool_calls" and calls, r
            for call in calls:
                schema = parameters if call.function.name == "f" else TIME["function"]["parameters"]
                jsonschema.validate(json.loads(call.function.arguments), schema)


def test_a_call_cut_by_max_tokens_comes_back_as_text(client):
    r = client.chat.completions.create(model=client.models.list().data[0].id, messages=CHAT, max_tokens=3,
                                       tools=[WEATHER], tool_choice="required")
    choice = r.choices[0]
    assert choice.finish_reason == "length" and choice.message.tool_calls is None
    assert choice.message.content.startswith("[")


def test_tools_and_tool_turns_reach_the_template(live):
    base = {"messages": CHAT, "max_tokens": 1}
    plain = httpx.post(live.url + "/v1/chat/completions", json=base).json()["usage"]["prompt_tokens"]
    with_tools = httpx.post(live.url + "/v1/chat/completions", json={**base, "tools": [WEATHER, TIME],
                                                                     "tool_choice": "none"}).json()
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    turns = CHAT + [{"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    bare = CHAT + [{"role": "assistant", "content": None}, {"role": "tool", "content": "sunny"}]
    count = [httpx.post(live.url + "/v1/chat/completions", json={"messages": m, "max_tokens": 1}).json()
             ["usage"]["prompt_tokens"] for m in (turns, bare)]
    assert with_tools["usage"]["prompt_tokens"] > plain and with_tools["choices"][0]["message"]["tool_calls"] is None
    assert count[0] > count[1]  # "call get_weather" and "call_1" were rendered


BAD_SCHEMA = {"type": "function", "function": {"name": "bad", "parameters": {"type": "wrong"}}}


@pytest.mark.parametrize("extra, param", [
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tools": [WEATHER, BAD_SCHEMA], "tool_choice": "required"}, "tools"),  # (it was "response_format")
    ({"tools": [WEATHER, BAD_SCHEMA], "tool_choice": {"type": "function", "function": {"name": "bad"}}},
     "tools.1.function.parameters"),
])
def test_tool_requests_that_cannot_be_served_are_400s(live, extra, param):
    body = {"messages": CHAT, "tools": [WEATHER], **extra}
    r = httpx.post(live.url + "/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param
    r = httpx.post(live.url + "/v1/chat/completions", json={"messages": CHAT, "tool_choice": "required"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"  # no tools to call


def test_required_calls_keep_their_arguments_as_the_model_wrote_them():
    """A grammar-valid number like 9E999 must not come back as Infinity (not JSON) nor 9e+96 as rewritten:
    the arguments are the text the model wrote, whatever the spacing and key order."""
    from server.schemas_openai import ChatCompletionRequest
    from server.tool_calls import tool_calls
    req = ChatCompletionRequest(model="m", messages=CHAT, tools=[WEATHER, TIME], tool_choice="required")
    text = ' [ {"name" : "get_time", "parameters": {"x": 9E999, "y": [1, 2e5]}} ,{"parameters":{"z":"a,}"},"name":"f"}]'
    calls = tool_calls(req, text)
    assert [(c.function.name, c.function.arguments) for c in calls] == [
        ("get_time", '{"x": 9E999, "y": [1, 2e5]}'), ("f", '{"z":"a,}"}')]
