"""vLLM's request extensions on the OpenAI routes: continue_final_message (chat and /tokenize's chat form) and
guided decoding (guided_json, guided_regex, guided_choice, structured_outputs) on the grammar machinery.

The request plumbing and the 400s run on the fake engine (raw httpx); what the output is runs on the real tiny
random model (greedy and seeded sampling), and continue_final_message's rendering is checked against
transformers' own apply_chat_template.
"""
from __future__ import annotations

import json
import re

import httpx
import pytest

from model.chat_template import ChatTemplate, ContinuationError
from tests.fake_engine import FakeTokenizer
from tests.live_server import engine_server, fake_server
from tests.tiny_models import CHAT_TEMPLATE

# the fake tokenizer's chat format (`<|role|>content\n` per message), as a Jinja template: rendered by
# model/chat_template.py, so continue_final_message goes through the real code on the fake engine too
FAKE_TEMPLATE = ChatTemplate("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                             "{% if add_generation_prompt %}<|assistant|>{% endif %}")
PREFILL = [{"role": "user", "content": "SAY<<xyz>>"}, {"role": "assistant", "content": "Sure, "}]


class TemplatedFakeTokenizer(FakeTokenizer):
    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **extra) -> str:
        return FAKE_TEMPLATE.render(messages, add_generation_prompt=add_generation_prompt, **extra)


@pytest.fixture(scope="module")
def fake():
    with fake_server() as s:
        s.engine.tokenizer = TemplatedFakeTokenizer()
        with httpx.Client(base_url=s.url, timeout=30) as client:
            client.engine = s.engine
            yield client


def error_param(r: httpx.Response) -> str:
    """The field an error names: OpenAI's shape (400, param), or the ops routes' TGI shape (422, a message that
    starts with the field)."""
    if r.status_code == 422:
        return r.json()["error"].split(":")[0]
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["message"].startswith(err["param"]), err
    return err["param"]


# continue_final_message ----------------------------------------------------------------------------------
def test_continue_final_message_leaves_the_final_message_open(fake):
    body = {"messages": PREFILL, "add_generation_prompt": False, "continue_final_message": True}
    r = fake.post("/tokenize", json=body)
    assert r.status_code == 200, r.text
    text = fake.post("/detokenize", json={"tokens": r.json()["tokens"]}).json()["prompt"]
    assert text == "<|user|>SAY<<xyz>>\n<|assistant|>Sure, "  # no newline closing the final message
    closed = fake.post("/tokenize", json={**body, "continue_final_message": False}).json()
    assert closed["count"] == r.json()["count"] + 1
    chat = fake.post("/v1/chat/completions", json={**body, "max_tokens": 8}).json()
    assert chat["usage"]["prompt_tokens"] == r.json()["count"]
    assert chat["choices"][0]["message"]["content"] == "xyz"  # the new text only, as vLLM answers


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/tokenize"])
def test_continue_final_message_needs_add_generation_prompt_false(fake, route):
    for extra in ({}, {"add_generation_prompt": True}):  # true by default, as in vLLM
        r = fake.post(route, json={"messages": PREFILL, "continue_final_message": True, **extra})
        assert error_param(r) == "continue_final_message"
    r = fake.post(route, json={"messages": PREFILL, "add_generation_prompt": False,
                               "chat_template_kwargs": {"continue_final_message": True}})
    assert error_param(r) == "chat_template_kwargs.continue_final_message"  # it has its own field


def test_continue_final_message_on_tokenize_needs_messages(fake):
    r = fake.post("/tokenize", json={"prompt": "abc", "continue_final_message": True})
    assert error_param(r) == "continue_final_message"
    assert fake.post("/tokenize", json={"prompt": "abc", "continue_final_message": False}).status_code == 200


def test_a_template_that_drops_the_final_message_cannot_continue_it():
    dropping = ChatTemplate("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}"
                            "{% endfor %}")
    with pytest.raises(ContinuationError, match="does not appear"):
        dropping.render(PREFILL, add_generation_prompt=False, continue_final_message=True)
    with pytest.raises(ContinuationError, match="not compatible"):
        FAKE_TEMPLATE.render(PREFILL, add_generation_prompt=True, continue_final_message=True)
    # through the chat route's rendering: a 400 naming the field, not "messages: the chat template refused them"
    from types import SimpleNamespace

    from server.api_openai import chat_text
    from server.http_errors import ApiError
    from server.schemas_openai import ChatCompletionRequest
    tokenizer = SimpleNamespace(has_chat_template=True, apply_chat_template=dropping.render)
    state = SimpleNamespace(engine=SimpleNamespace(tokenizer=tokenizer), prompt_char_limit=10_000)
    req = ChatCompletionRequest(messages=PREFILL, add_generation_prompt=False, continue_final_message=True)
    with pytest.raises(ApiError) as caught:
        chat_text(state, req)
    assert caught.value.param == "continue_final_message"
    assert caught.value.message.startswith("continue_final_message: the final message does not appear")


CASES = [PREFILL, [{"role": "user", "content": "hi hi"}, {"role": "assistant", "content": "hi"}],
         [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}],
         [{"role": "system", "content": "be brief"}, {"role": "user", "content": "tell me  "}],
         [{"role": "user", "content": "x"}, {"role": "assistant", "content": [
             {"type": "text", "text": "a "}, {"type": "text", "text": "b c "}]}]]
TEMPLATES = [CHAT_TEMPLATE, FAKE_TEMPLATE.source,
             "{% for m in messages %}<|{{ m.role }}|>{{ m.content | trim }}<|end|>\n{% endfor %}"]


@pytest.mark.parametrize("source", TEMPLATES)
def test_continue_final_message_renders_as_transformers_does(source):
    render_jinja_template = pytest.importorskip("transformers.utils.chat_template_utils").render_jinja_template
    ours = ChatTemplate(source, (("bos_token", "<s>"), ("eos_token", "</s>")))
    for messages in CASES:
        [expected], _ = render_jinja_template(conversations=[json.loads(json.dumps(messages))],
                                              chat_template=source, continue_final_message=True,
                                              bos_token="<s>", eos_token="</s>")
        assert ours.render(messages, add_generation_prompt=False, continue_final_message=True) == expected


# guided decoding: plumbing -------------------------------------------------------------------------------
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "b": {"enum": ["x", "y"]}, "c": {"type": "boolean"}},
          "required": ["a", "b", "c"], "additionalProperties": False}
REGEX = r"[a-c]{2,5}-[0-9]{3}"  # not \d: llguidance's \d is any Unicode digit (newer than Python's tables)
CHOICES = ["yes", "no", "maybe so", "a|b (c)*", "<tag> 1.5$"]


@pytest.fixture()
def grammars(fake, monkeypatch):
    """The SamplingParams.grammar of each request the fake engine is given."""
    seen, add = [], fake.engine.add_request

    def recording(request_id, prompt, params):
        seen.append(None if params.grammar is None else params.grammar.model_dump())
        return add(request_id, prompt, params)
    monkeypatch.setattr(fake.engine, "add_request", recording)
    return seen


def choice_regex_of(choices: list[str]) -> str:
    from server.openai_common import choice_regex
    return choice_regex(choices)


@pytest.mark.parametrize("route, base", [("/v1/completions", {"prompt": "hi"}),
                                         ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})])
@pytest.mark.parametrize("fields, grammar", [
    ({"guided_json": SCHEMA}, {"type": "json", "value": json.dumps(SCHEMA)}),
    ({"guided_json": '{"type": "object"}'}, {"type": "json", "value": '{"type": "object"}'}),
    ({"guided_regex": REGEX}, {"type": "regex", "value": REGEX}),
    ({"guided_choice": CHOICES}, {"type": "regex", "value": choice_regex_of(CHOICES)}),
    ({"structured_outputs": {"json": SCHEMA}}, {"type": "json", "value": json.dumps(SCHEMA)}),
    ({"structured_outputs": {"regex": REGEX}}, {"type": "regex", "value": REGEX}),
    ({"structured_outputs": {"choice": ["a", "b"]}}, {"type": "regex", "value": "(a|b)"}),
    ({"guided_regex": REGEX, "response_format": {"type": "text"}}, {"type": "regex", "value": REGEX}),
])
def test_guided_fields_become_the_engines_grammar(fake, grammars, route, base, fields, grammar):
    r = fake.post(route, json={**base, "max_tokens": 2, "n": 2, **fields})
    assert r.status_code == 200, r.text
    assert grammars == [grammar, grammar]


def test_choice_regex_matches_each_string_and_nothing_else():
    pattern = re.compile(choice_regex_of(CHOICES + ["", "\\d+", "[x]{2}", "a.b", "~#&-"]))
    for s in CHOICES + ["", "\\d+", "[x]{2}", "a.b", "~#&-"]:
        assert pattern.fullmatch(s)
    for s in ("7", "xx", "aXb", "a", "yes no", "maybe"):
        assert not pattern.fullmatch(s)


@pytest.mark.parametrize("route, base", [("/v1/completions", {"prompt": "hi"}),
                                         ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})])
@pytest.mark.parametrize("fields, param, why", [
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex", "cannot be combined"),
    ({"guided_json": SCHEMA, "guided_choice": ["a"]}, "guided_choice", "cannot be combined"),
    ({"guided_regex": "a", "structured_outputs": {"choice": ["a"]}}, "structured_outputs.choice", "cannot be"),
    ({"structured_outputs": {"json": SCHEMA, "regex": "a"}}, "structured_outputs.regex", "cannot be combined"),
    ({"structured_outputs": {"grammar": "start: 'a'"}}, "structured_outputs.grammar", "Extra inputs"),
    ({"structured_outputs": {}}, "structured_outputs", "give one of"),  # was accepted, the output unconstrained
    ({"guided_choice": []}, "guided_choice", "at least 1 item"),
    ({"guided_choice": "yes"}, "guided_choice", "valid list"),
    ({"guided_regex": ""}, "guided_regex", "at least 1 character"),
])
def test_guided_fields_refused_name_the_field(fake, grammars, route, base, fields, param, why):
    r = fake.post(route, json={**base, **fields})
    assert error_param(r) == param and why in r.json()["error"]["message"]
    assert grammars == []


def test_guided_fields_are_refused_with_a_tool_choice_that_forces_a_call(fake, grammars):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    for fields, param in (({"guided_choice": ["a", "b"]}, "guided_choice"),
                          ({"structured_outputs": {"regex": "a"}}, "structured_outputs.regex")):
        for choice in ("required", {"type": "function", "function": {"name": "f"}}):
            r = fake.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "tools": tools,
                                                        "tool_choice": choice, **fields})
            assert error_param(r) == param and "tool_choice" in r.json()["error"]["message"]
    r = fake.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "tools": tools,
                                                "tool_choice": "none", "guided_choice": ["a", "b"], "max_tokens": 2})
    assert r.status_code == 200 and grammars[-1]["type"] == "regex"


# on the real tiny model ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live(tiny_llama_dir):
    with engine_server(tiny_llama_dir) as s, httpx.Client(base_url=s.url, timeout=60) as client:
        yield client


def outputs(client: httpx.Client, route: str, **body) -> list[str]:
    base = {"prompt": "To be"} if route == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    r = client.post(route, json={**base, "max_tokens": 40, **body})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert all(c["finish_reason"] == "stop" for c in choices)
    return [c["text"] if route == "/v1/completions" else c["message"]["content"] for c in choices]


ROUTES = ["/v1/completions", "/v1/chat/completions"]
SAMPLING = [{"temperature": 0}, {"temperature": 1.0, "seed": 7, "n": 4}]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("sampling", SAMPLING)
def test_guided_choice_output_is_one_of_the_choices(live, route, sampling):
    for field in ({"guided_choice": CHOICES}, {"structured_outputs": {"choice": CHOICES}}):
        got = outputs(live, route, **sampling, **field)
        assert got and all(text in CHOICES for text in got), got


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("sampling", SAMPLING)
def test_guided_regex_output_matches_the_regex(live, route, sampling):
    got = outputs(live, route, guided_regex=REGEX, **sampling)
    assert all(re.fullmatch(REGEX, text) for text in got), got


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("sampling", SAMPLING)
def test_guided_json_output_matches_the_schema(live, route, sampling):
    for schema in (SCHEMA, json.dumps(SCHEMA)):
        for text in outputs(live, route, guided_json=schema, **sampling):
            value = json.loads(text)
            assert set(value) == {"a", "b", "c"} and value["b"] in ("x", "y") and isinstance(value["c"], bool)
            assert type(value["a"]) is int and 0 <= value["a"] <= 99


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("fields, param, why", [
    ({"guided_regex": "(ab"}, "guided_regex", "not a valid regex"),
    ({"guided_json": "{nope"}, "guided_json", "does not parse"),
    ({"guided_json": "[1]"}, "guided_json", "must be an object"),
    ({"guided_json": {"type": "wrong"}}, "guided_json", "not a valid json"),
    ({"structured_outputs": {"json": {"type": "wrong"}}}, "structured_outputs.json", "not a valid json"),
    ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs.regex", "not a valid regex"),
])
def test_a_bad_guided_schema_or_regex_names_its_field(live, route, fields, param, why):
    base = {"prompt": "x"} if route == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]}
    r = live.post(route, json={**base, **fields})
    assert error_param(r) == param and why in r.json()["error"]["message"]


def test_continue_final_message_on_the_real_model(live):
    messages = [{"role": "user", "content": "Tell a tale"}, {"role": "assistant", "content": "Once upon a "}]
    body = {"messages": messages, "add_generation_prompt": False, "continue_final_message": True}
    tokens = live.post("/tokenize", json=body).json()["tokens"]
    # the tiny template (tests/tiny_models.py) cut right after the final message's content
    rendered = "<s>user\nTell a tale</s>\n<s>assistant\nOnce upon a "
    assert tokens == live.post("/tokenize", json={"prompt": rendered, "add_special_tokens": False}).json()["tokens"]
    chat = live.post("/v1/chat/completions", json={**body, "max_tokens": 12, "temperature": 0}).json()
    assert chat["usage"]["prompt_tokens"] == len(tokens)
    plain = live.post("/v1/completions", json={"prompt": tokens, "max_tokens": 12, "temperature": 0}).json()
    assert chat["choices"][0]["message"]["content"] == plain["choices"][0]["text"]
    assert chat["choices"][0]["message"]["content"]  # something new, not the prefill again
