"""tool_choice "auto" (server/tool_parsers.py, tool_calls.ChoiceReply): calls found in a model's free text in
its family's syntax, streamed with only a possible call opening held back; anything that is not wholly
calls is content. Parsers on their own, then through the openai client against a server whose stand-in
engine writes a scripted reply (tests/fake_engine.py: SAY<<text>>)."""
from __future__ import annotations

import json
import random

import openai
import pytest

from server.config import ServerConfig
from server.schemas_openai import ChatCompletionRequest
from server.tool_calls import ChoiceReply
from server.tool_parsers import HermesParser, Llama3JsonParser, MistralParser, detect_parser

NAMES = {"get_weather", "get_time"}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
CALL_W = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALL_T = '<tool_call>{"name": "get_time", "arguments": "{\\"zone\\": \\"utc\\"}"}</tool_call>'
# Mistral: [TOOL_CALLS] is a special token, then a JSON array (v0.3, Nemo), or name[ARGS]{...} per call (v11+)
TC = "[TOOL_CALLS]"
MISTRAL = TC + ' [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]'
MISTRAL_ARGS = TC + 'get_weather[ARGS]{"city": "Paris"}' + TC + 'get_time[ARGS]{}'


def test_hermes_finds_each_call_and_the_content_before_them():
    got = HermesParser().parse("Let me look.\n" + CALL_W + "\n" + CALL_T, NAMES)
    assert got.content == "Let me look."
    assert [(n, json.loads(a)) for n, a in got.calls] == [("get_weather", {"city": "Paris"}),
                                                          ("get_time", {"zone": "utc"})]
    assert HermesParser().parse(CALL_W, NAMES).content is None
    # the last block may be cut before its closing tag (the model stopped at eos)
    assert HermesParser().parse(CALL_W.removesuffix("</tool_call>"), NAMES).calls[0][0] == "get_weather"


def test_hermes_reads_a_closing_tag_inside_an_argument_string_as_part_of_the_argument():
    """The block is read as JSON: a model writing about tool calls (an argument holding "</tool_call>") used
    to have its call cut there, and the whole reply turned into content."""
    call = '<tool_call>{"name": "get_time", "arguments": {"note": "ends with </tool_call> here"}}</tool_call>'
    got = HermesParser().parse("Sure.\n" + call + "\n" + CALL_W, NAMES)
    assert [(n, json.loads(a)) for n, a in got.calls] == [("get_time", {"note": "ends with </tool_call> here"}),
                                                          ("get_weather", {"city": "Paris"})]
    assert got.content == "Sure."
    # between and after the blocks any whitespace, as before; a block's END is missing only at the very end
    assert len(HermesParser().parse(CALL_W + "\u00a0" + CALL_T + "\u3000", NAMES).calls) == 2
    assert HermesParser().parse(CALL_W.removesuffix("</tool_call>") + CALL_T, NAMES) is None


@pytest.mark.parametrize("text", [
    "no call here",
    CALL_W.replace("get_weather", "get_stock"),                       # not one of the tools
    CALL_W.replace('{"city": "Paris"}', '["Paris"]'),                 # arguments not an object
    CALL_W.replace('"Paris"}}', '"Paris"'),                           # not JSON
    CALL_T.replace('\\"utc\\"}', 'utc'),                               # arguments a string, not JSON
    CALL_W + " and then some prose",                                  # a reply is all calls or none
    CALL_W + "words" + CALL_T,
])
def test_hermes_text_that_is_not_wholly_calls_is_none(text):
    assert HermesParser().parse(text, NAMES) is None


DEEP = "[" * 3000  # a degenerate model writing brackets until max_tokens: past the recursion limit
BIG = "9" * 5000   # past int()'s digit limit
BAD_CALLS = [  # (parser, text): none is a call, each used to raise out of parse (a 500, or a dead stream)
    (HermesParser, '<tool_call>{"name": ["get_time"], "arguments": {}}</tool_call>'),
    (Llama3JsonParser, '{"name": {"f": 1}, "parameters": {}}'),
    (MistralParser, TC + '[{"name": ["get_time"], "arguments": {}}]'),
    (HermesParser, "<tool_call>" + DEEP), (MistralParser, TC + DEEP), (Llama3JsonParser, '{"a":' + DEEP),
    (HermesParser, '<tool_call>{"name": "get_time", "arguments": {"x": ' + BIG + "}}</tool_call>"),
    (HermesParser, '<tool_call>{"name": "get_time", "arguments": "{\\"x\\": ' + BIG + '}"}</tool_call>'),
    # arguments that would be written back as NaN / Infinity, which is not JSON
    (HermesParser, '<tool_call>{"name": "get_time", "arguments": {"x": NaN}}</tool_call>'),
    (Llama3JsonParser, '{"name": "get_time", "parameters": {"x": -Infinity}}'),
    (MistralParser, TC + 'get_time[ARGS]{"x": 1e999}'),
]


@pytest.mark.parametrize("parser, text", BAD_CALLS)
def test_text_that_only_looks_like_a_call_is_content_and_never_raises(parser, text):
    assert parser().parse(text, NAMES) is None


def test_a_lone_surrogate_in_arguments_stays_escaped():
    """"\\ud83d" (half an emoji pair) is valid JSON text, but written back unescaped it cannot be encoded:
    the response raised UnicodeEncodeError (a 500) or broke the stream."""
    got = HermesParser().parse('<tool_call>{"name": "get_time", "arguments": {"e": "\\ud83d \u00e9"}}</tool_call>',
                               NAMES)
    name, arguments = got.calls[0]
    arguments.encode("utf-8")
    assert name == "get_time" and json.loads(arguments) == {"e": "\ud83d \u00e9"}


def test_llama3_json_calls_with_or_without_the_python_tag():
    p = Llama3JsonParser()
    one = '{"name": "get_weather", "parameters": {"city": "Rome"}}'
    assert p.parse(one, NAMES).calls == [("get_weather", '{"city": "Rome"}')]
    two = p.parse('<|python_tag|>' + one + '; {"name": "get_time", "parameters": {}}', NAMES)
    assert [n for n, _ in two.calls] == ["get_weather", "get_time"] and two.content is None
    assert p.parse("The weather is " + one, NAMES) is None
    assert p.parse(one + " trailing words", NAMES) is None
    assert p.parse(one.replace("get_weather", "nope"), NAMES) is None
    assert p.parse(one[:-1], NAMES) is None                          # cut short: not JSON


def test_split_holds_back_only_what_may_open_a_call():
    h = HermesParser()
    assert h.split("Sure, ") == (6, None)
    assert h.split("Sure, <tool") == (6, None)          # "<tool" may become "<tool_call>"
    assert h.split("Sure, <tool_call>{") == (6, 6)
    assert h.split("a < b") == (5, None)
    j = Llama3JsonParser()
    assert j.split("  ") == (0, None) and j.split("<|python") == (0, None)
    assert j.split(' {"name"') == (0, 0)
    assert j.split("Hello {") == (7, None)              # content: calls only ever open the reply


def test_the_parser_is_detected_from_the_chat_template():
    assert detect_parser("{% for t in tools %}<tool_call>{{ t }}</tool_call>{% endfor %}") == "hermes"
    assert detect_parser("Environment: ipython ... <|python_tag|>") == "llama3_json"
    assert detect_parser("<|im_start|>{{ m.content }}") is None and detect_parser(None) is None
    assert detect_parser("{{ '[AVAILABLE_TOOLS] ' + tools|tojson + '[/AVAILABLE_TOOLS]' }}") == "mistral"
    assert detect_parser("{%- elif m.tool_calls %}{{ '[TOOL_CALLS] [' }}") == "mistral"


@pytest.mark.parametrize("calls", [MISTRAL, MISTRAL_ARGS, MISTRAL_ARGS.replace("[ARGS]", ""),
                                   TC + MISTRAL[len(TC):].replace("}}, {", "}}]" + TC + "[{")])
def test_mistral_finds_each_call_and_the_content_before_them(calls):
    got = MistralParser().parse("Let me look.\n" + calls, NAMES)
    assert got.content == "Let me look."
    assert [(n, json.loads(a)) for n, a in got.calls] == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert MistralParser().parse(calls + "\n", NAMES).content is None
    one = MistralParser().parse(TC + '{"name": "get_time", "arguments": "{\\"zone\\": \\"utc\\"}"}', NAMES)
    assert one.calls == [("get_time", '{"zone": "utc"}')]  # one call, not in an array; arguments as a string


@pytest.mark.parametrize("text", [
    "no call here [TOOL_CALL] [{}]",
    MISTRAL.replace("get_time", "get_stock"),                         # one call is not one of the tools
    MISTRAL_ARGS.replace("get_weather", "get_stock"),
    MISTRAL.replace('"Paris"}}', '"Paris"}'),                         # malformed JSON
    MISTRAL_ARGS.replace('"Paris"}', '"Paris"'),
    MISTRAL.replace('{"city": "Paris"}', '"Paris"'),                  # arguments not an object
    MISTRAL + " and then some prose",                                 # a reply is all calls or none
    MISTRAL_ARGS + " done",
    TC + " []", TC, "Hello " + TC + " get_weather",                  # no call after the marker
])
def test_mistral_text_that_is_not_wholly_calls_is_none(text):
    assert MistralParser().parse(text, NAMES) is None


def test_mistral_split_holds_back_only_what_may_open_a_call():
    m = MistralParser()
    assert m.split("Sure, ") == (6, None)
    assert m.split("Sure, [TOOL_CA") == (6, None)       # may become [TOOL_CALLS] (as text, not the token)
    assert m.split("Sure, [") == (6, None)
    assert m.split("Sure, " + TC) == (6, 6) and m.split("Sure, " + TC + " [{") == (6, 6)
    assert m.split("a [b]") == (5, None) and m.split("[TOOLS") == (6, None)


def stream(reply: ChoiceReply, text: str, pieces: list[int], reason: str = "eos_token"):
    """Feed text in pieces of the given sizes; the deltas' content joined, and the last delta."""
    content, i, last = [], 0, None
    for k, size in enumerate(pieces):
        piece, i = text[i:i + size], i + size
        delta, _ = reply.delta(piece, reason if k == len(pieces) - 1 else None)
        if delta is not None:
            content.append(delta.content or "")
            last = delta
    return "".join(content), last


def request(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], tools=[WEATHER, TIME], **kw)


@pytest.mark.parametrize("seed", range(4))
def test_a_streamed_reply_sends_the_content_and_then_the_calls(seed):
    rng = random.Random(seed)
    text = "Checking the weather <now>.\n" + CALL_W + CALL_T
    sizes = []
    while sum(sizes) < len(text):
        sizes.append(rng.randint(1, 9))
    content, last = stream(ChoiceReply(request(tool_choice="auto"), False, HermesParser()), text, sizes)
    assert content == "Checking the weather <now>.\n"       # all of it, and no byte of a call
    assert [c.function.name for c in last.tool_calls] == ["get_weather", "get_time"]
    assert [c.index for c in last.tool_calls] == [0, 1]


FRAGMENTS = {"hermes": ["<tool_call>", "</tool_call>", "<tool", "_call>", CALL_W, CALL_T, "<", "\n"],
             "mistral": [TC, "[TOOL_CA", "[", MISTRAL, MISTRAL_ARGS, 'get_time[ARGS]{}'],
             "llama3_json": ["<|python_tag|>", "<|py", '{"name": "get_time", "parameters": {}}', "; ", "{"]}
CALLS = {"hermes": [CALL_W, CALL_T], "mistral": [MISTRAL, MISTRAL_ARGS], "llama3_json": [
    '{"name": "get_time", "parameters": {}}; ', '<|python_tag|>{"name": "get_weather", "parameters": {"city": "X"}}']}
PARSER = {"hermes": HermesParser, "mistral": MistralParser, "llama3_json": Llama3JsonParser}


@pytest.mark.parametrize("seed", range(200))
def test_a_stream_in_random_pieces_sends_what_the_whole_reply_holds(seed):
    """The parser is asked about the text not yet sent only (each delta costs what it brings): whatever the
    pieces, the deltas' content is the whole reply's, and the last delta carries its calls."""
    rng = random.Random(seed)
    name = rng.choice(sorted(FRAGMENTS))
    text = "".join(rng.choice(FRAGMENTS[name] + [" ", "ok", "It is"]) for _ in range(rng.randint(1, 8)))
    if seed % 2:  # half are calls, after some content or none
        text = rng.choice(["", "ok ", "It is\n"]) + "".join(rng.choice(CALLS[name]) for _ in range(rng.randint(1, 3)))
    sizes = []
    while sum(sizes) < len(text):
        sizes.append(rng.randint(1, 12))
    content, last = stream(ChoiceReply(request(tool_choice="auto"), False, PARSER[name]()), text, sizes)
    whole, _ = ChoiceReply(request(tool_choice="auto"), False, PARSER[name]()).message(text, "eos_token")
    calls = [(c.function.name, c.function.arguments) for c in (last.tool_calls if last else None) or []]
    assert calls == [(c.function.name, c.function.arguments) for c in whole.tool_calls or []], text
    if whole.tool_calls:  # the whole reply strips the content before the calls; the stream sent it as it came
        assert content.strip() == (whole.content or ""), text
    else:
        assert content == whole.content, text


def test_a_streamed_reply_that_is_no_call_after_all_is_sent_whole():
    text = "I would call <tool_call>get_weather</tool_call> but no."
    reply = ChoiceReply(request(tool_choice="auto"), False, HermesParser())
    content, last = stream(reply, text, [3] * (len(text) // 3 + 1), reason="length")
    assert content == text and last.tool_calls is None
    assert reply.message(text, "length")[1] == "length"
    message, reason = ChoiceReply(request(tool_choice="auto"), False, HermesParser()).message(CALL_W, "eos_token")
    assert reason == "tool_calls" and message.content is None and message.tool_calls[0].id.startswith("call_")


@pytest.mark.parametrize("seed", range(4))
def test_a_streamed_mistral_reply_sends_the_content_and_then_the_calls(seed):
    rng = random.Random(seed)
    text = "Checking [the] weather.\n" + MISTRAL
    sizes = []
    while sum(sizes) < len(text):
        sizes.append(rng.randint(1, 9))
    content, last = stream(ChoiceReply(request(tool_choice="auto"), False, MistralParser()), text, sizes)
    assert content == "Checking [the] weather.\n"           # all of it, and no byte of the marker or calls
    assert [(c.index, c.function.name) for c in last.tool_calls] == [(0, "get_weather"), (1, "get_time")]


def test_a_mistral_reply_that_is_no_call_after_all_is_content_without_the_marker():
    text = "Hmm " + MISTRAL.replace("get_time", "get_stock")
    reply = ChoiceReply(request(tool_choice="auto"), False, MistralParser())
    content, last = stream(reply, text, [2] * (len(text) // 2 + 1))
    want = text.replace(TC, "")                                 # as a decode skipping special tokens shows it
    assert content == want and last.tool_calls is None
    message, reason = ChoiceReply(request(), False, MistralParser()).message(text, "eos_token")
    assert message.content == want and message.tool_calls is None and reason == "stop"


# ---- through the HTTP API -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client():
    from tests.live_server import fake_server
    with fake_server(ServerConfig(stats_log_interval_s=0, tool_call_parser="hermes")) as s, \
            openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def say(text: str) -> list[dict]:
    return [{"role": "user", "content": f"SAY<<{text}>>"}]


@pytest.mark.parametrize("tool_choice", ["auto", None])
def test_auto_returns_the_calls_the_model_wrote(client, tool_choice):
    kw = {} if tool_choice is None else {"tool_choice": tool_choice}  # tools without tool_choice: "auto"
    r = client.chat.completions.create(model="fake-model", messages=say("On it. " + CALL_W), tools=[WEATHER],
                                       max_tokens=200, **kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "On it."
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}


def test_auto_streams_the_content_then_one_delta_of_calls(client):
    chunks = list(client.chat.completions.create(model="fake-model", messages=say("Sure. " + CALL_W + CALL_T),
                                                 tools=[WEATHER, TIME], tool_choice="auto", max_tokens=200,
                                                 stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert content == "Sure. "
    assert [(tc.index, tc.function.name) for tc in calls] == [(0, "get_weather"), (1, "get_time")]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_auto_with_no_call_in_the_reply_is_plain_content(client):
    r = client.chat.completions.create(model="fake-model", messages=say("It is sunny <3"), tools=[WEATHER],
                                       tool_choice="auto", max_tokens=200)
    assert r.choices[0].message.content == "It is sunny <3" and r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason == "stop"


def test_auto_without_a_parser_is_a_400_naming_tool_choice():
    from tests.live_server import fake_server
    with fake_server() as s, openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0) as c:
        with pytest.raises(openai.BadRequestError) as err:
            c.chat.completions.create(model="fake-model", messages=say("x"), tools=[WEATHER], tool_choice="auto")
        assert err.value.body["param"] == "tool_choice" and "tool_call_parser" in err.value.body["message"]
        # no tool_choice and no parser: "none", the reply is text
        r = c.chat.completions.create(model="fake-model", messages=say(CALL_W), tools=[WEATHER], max_tokens=200)
        assert r.choices[0].message.content == CALL_W and r.choices[0].finish_reason == "stop"


def test_auto_without_tools_is_a_400_naming_tool_choice(client):
    import httpx
    r = httpx.post(str(client.base_url) + "chat/completions", json={
        "model": "fake-model", "messages": say("x"), "tool_choice": "auto"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    assert "needs tools" in r.json()["error"]["message"]


def test_auto_with_parallel_tool_calls_false_returns_the_first_call_only(client):
    r = client.chat.completions.create(model="fake-model", messages=say(CALL_W + CALL_T), tools=[WEATHER, TIME],
                                       tool_choice="auto", parallel_tool_calls=False, max_tokens=200)
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_weather"]


# ---- mistral: [TOOL_CALLS] is a special token, kept in the text only for requests that use the parser ----
@pytest.fixture(scope="module")
def mistral():
    from tests.live_server import fake_server
    with fake_server(ServerConfig(stats_log_interval_s=0, tool_call_parser="mistral")) as s, \
            openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.mark.parametrize("calls", [MISTRAL, MISTRAL_ARGS])
def test_mistral_auto_returns_the_calls_the_model_wrote(mistral, calls):
    r = mistral.chat.completions.create(model="fake-model", messages=say("On it. " + calls), tools=[WEATHER, TIME],
                                        max_tokens=200)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "On it."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {})]


def test_mistral_auto_streams_the_content_then_one_delta_of_calls(mistral):
    chunks = list(mistral.chat.completions.create(model="fake-model", messages=say("Sure. " + MISTRAL),
                                                  tools=[WEATHER, TIME], tool_choice="auto", max_tokens=200,
                                                  stream=True))
    contents = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert "".join(contents) == "Sure. "
    assert [(tc.index, tc.function.name) for tc in calls] == [(0, "get_weather"), (1, "get_time")]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_mistral_replies_that_are_no_call_show_neither_the_marker_nor_eos(mistral):
    bad = "Hmm " + MISTRAL.replace("get_time", "get_stock")  # a call naming no tool: all of it is content
    for stream_it in (False, True):
        for text in ("It is sunny", bad):
            r = mistral.chat.completions.create(model="fake-model", messages=say(text), tools=[WEATHER, TIME],
                                                max_tokens=200, stream=stream_it)
            if stream_it:
                chunks = list(r)
                content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                reason = chunks[-1].choices[0].finish_reason
            else:
                content, reason = r.choices[0].message.content, r.choices[0].finish_reason
            assert (content, reason) == (text.replace(TC, ""), "stop")


@pytest.mark.parametrize("kw", [{}, {"tools": [WEATHER], "tool_choice": "none"}])
def test_requests_without_the_parser_still_skip_special_tokens(mistral, kw):
    """No tools (or tool_choice none) on the mistral server: decoded as ever, the special token skipped."""
    r = mistral.chat.completions.create(model="fake-model", messages=say("a" + MISTRAL), max_tokens=200, **kw)
    assert r.choices[0].message.content == "a" + MISTRAL[len(TC):] and r.choices[0].finish_reason == "stop"
    # and skip_special_tokens false, asked for, keeps it
    r = mistral.chat.completions.create(model="fake-model", messages=say("a" + MISTRAL), max_tokens=200,
                                        extra_body={"skip_special_tokens": False}, **kw)
    assert r.choices[0].message.content == "a" + MISTRAL


def test_with_special_tokens_kept_the_real_engine_still_leaves_eos_out_of_the_text(tiny_llama_dir):
    """The real engine decides eos by token id, before detokenizing it: a mistral request with tools (decoded
    with special tokens kept) shows <s> (forced by logit_bias while min_tokens bars eos) but never </s>."""
    from tests.live_server import engine_server
    body = dict(model=None, messages=[{"role": "user", "content": "hi"}], temperature=0, max_tokens=6,
                logit_bias={"1": 50, "2": 100}, extra_body={"min_tokens": 2})
    with engine_server(tiny_llama_dir, server_config=ServerConfig(stats_log_interval_s=0,
                                                                  tool_call_parser="mistral")) as s, \
            openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0) as c:
        body["model"] = c.models.list().data[0].id
        r = c.chat.completions.create(tools=[WEATHER], **body)
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("<s><s>", "stop")
        chunks = list(c.chat.completions.create(tools=[WEATHER], stream=True, **body))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "<s><s>"
        r = c.chat.completions.create(**body)  # no tools: special tokens skipped, as ever
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("", "stop")
