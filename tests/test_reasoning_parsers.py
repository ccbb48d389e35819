"""reasoning_parser deepseek_r1 (server/reasoning_parsers.py): a reasoning model's <think>...</think> goes to
reasoning_content, the answer after it to content, streamed or whole, on /v1/chat/completions only. The
parser on its own, then through the openai client against servers whose stand-in engine writes a scripted
reply (tests/fake_engine.py: SAY<<text>>): one whose tokenizer has the markers as plain text, one whose
tokenizer has them as special tokens and whose chat template opens the thinking, as R1 distills' do."""
from __future__ import annotations

import json
import random
import re

import httpx
import openai
import pytest

from server.config import ConfigError, ServerConfig, load_config
from server.reasoning_parsers import DeepSeekR1Parser, ReasoningStream, applies, make_parser
from server.schemas_openai import ChatCompletionRequest, CompletionRequest
from server.tool_calls import ChoiceReply
from server.tool_parsers import HermesParser
from tests.fake_engine import FakeTokenizer

R1 = DeepSeekR1Parser()
OPEN = "<|user|>hi\n<|assistant|><think>\n"   # a prompt whose template opened the thinking
PLAIN = "<|user|>hi\n<|assistant|>"            # one that did not
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}
CALL_W = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


# ---- the parser ----------------------------------------------------------------------------------------
def test_reasoning_then_the_answer():
    text = "The user asks 2+2. That is 4.\n</think>\n\nThe answer is 4.\n"
    assert R1.split(text, thinking=True) == ("The user asks 2+2. That is 4.", "The answer is 4.\n")


def test_the_prompt_opens_the_thinking_only_when_it_ends_with_think():
    assert R1.opens(OPEN) and R1.opens(OPEN.rstrip()) and R1.opens(OPEN + "\n  ")
    assert not R1.opens(PLAIN) and not R1.opens(PLAIN + "<think>\n\n</think>\n\n")
    assert not R1.opens("<|user|>what does <think> mean?\n<|assistant|>")


def test_without_end_marker_an_opened_reply_is_all_reasoning_and_any_other_all_content():
    cut = "Let me see. First, the weather in Paris"         # cut by max_tokens before </think>
    assert R1.split(cut, thinking=True) == (cut, None)
    assert R1.split("<think>" + cut, thinking=False) == (cut, None)
    assert R1.split(cut, thinking=False) == (None, cut)     # never opened: a plain answer
    # never opened: a later </think> is content as written too (the stream sent the first words as content)
    assert R1.split("Hi. </think> x", thinking=False) == (None, "Hi. </think> x")


def test_a_think_the_model_writes_is_dropped():
    text = "\n<think>\nHmm, rain.\n</think>\n\nTake an umbrella."
    assert R1.split(text, thinking=False) == ("Hmm, rain.", "Take an umbrella.")
    assert R1.split(text, thinking=True) == ("Hmm, rain.", "Take an umbrella.")  # also after the prompt's
    assert R1.split("<think>", thinking=False) == (None, None)


def test_empty_reasoning_or_answer_is_none():
    assert R1.split("<think>\n\n</think>\n\nHello!", thinking=False) == (None, "Hello!")
    assert R1.split("</think>Hello!", thinking=True) == (None, "Hello!")
    assert R1.split("Thought.</think>\n\n", thinking=True) == ("Thought.", None)
    assert R1.split("", thinking=True) == (None, None) and R1.split("", thinking=False) == (None, "")


def feed(stream: ReasoningStream, pieces: list[str]) -> tuple[str, str]:
    reasoning, content = [], []
    for k, piece in enumerate(pieces):
        r, c = stream.feed(piece, k == len(pieces) - 1)
        reasoning.append(r)
        content.append(c)
    return "".join(reasoning), "".join(content)


TEXTS = [(OPEN, "Rain at 3pm.\nSo: umbrella.\n</think>\n\nTake an umbrella </think> <b>now</b>."),
         (OPEN, "a < b </thin k> <\n</think>x"), (PLAIN, " <think> </ think> ok </think>\n\n\nDone"),
         (PLAIN, "<thinking> is not it </think> then"), (PLAIN, "<thi"), (OPEN, "x </thi"), (OPEN, "<think>")]


@pytest.mark.parametrize("prompt, text", TEXTS)
def test_an_end_marker_split_across_deltas_at_every_position(prompt, text):
    want = R1.split(text, R1.opens(prompt))
    for cut in range(len(text) + 1):
        for pieces in ([text[:cut], text[cut:]], [text[:cut], "", text[cut:], ""]):
            assert feed(ReasoningStream(R1, prompt), pieces) == (want[0] or "", want[1] or "")
    stream, sent = ReasoningStream(R1, prompt), ""
    for k, ch in enumerate(text):  # one character at a time: each delta extends what went before
        r, _ = stream.feed(ch, k == len(text) - 1)
        sent += r
        assert (want[0] or "").startswith(sent)  # never a byte of </think>, nor of space it may strip


PIECES = ["<think>", "</think>", "<th", "</thi", "nk>", "k>", "<", "/", " ", "  ", "\n", "\r\n", "\t", "a", "b c",
          "\u3000"]  # an ideographic space: str.strip() drops it too


@pytest.mark.parametrize("seed", range(300))
def test_after_each_delta_the_stream_has_sent_the_split_of_the_text_so_far(seed):
    """The stream keeps only the unsure tail of the text; the reference, split(), looks at all of it. After
    every delta, what went out is split(text so far, final=False); at the end it is split(whole)."""
    rng = random.Random(seed)
    text = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 14)))
    prompt = rng.choice([OPEN, PLAIN])
    cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 6))))
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    stream, sent, so_far = ReasoningStream(R1, prompt), ["", ""], ""
    for k, piece in enumerate(pieces):
        final = k == len(pieces) - 1
        r, c = stream.feed(piece, final)
        so_far, sent = so_far + piece, [sent[0] + r, sent[1] + c]
        want = R1.split(so_far, R1.opens(prompt), final)
        assert sent == [want[0] or "", want[1] or ""], (pieces, k)


def request(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **kw)


def test_a_special_token_call_marker_shows_in_the_reasoning_no_more_than_in_the_content():
    """Mistral's [TOOL_CALLS] is a special token kept in the text for its parser: thinking that mentions a
    call (a Magistral-style model) showed it in reasoning_content, streamed and not."""
    from server.tool_parsers import MistralParser
    pieces = ["Maybe ", "[TOOL_CALLS]", "get_time", "[ARGS]{}", " is right.", "</think>", "\n\nIt is noon."]
    req = request(tools=[WEATHER], tool_choice="auto")
    reply = ChoiceReply(req, False, MistralParser(), ReasoningStream(R1, OPEN))
    deltas = [reply.delta(p, "eos_token" if k == len(pieces) - 1 else None) for k, p in enumerate(pieces)]
    streamed = "".join(d.reasoning_content or "" for d, _ in deltas if d is not None)
    whole, _ = ChoiceReply(req, False, MistralParser(), ReasoningStream(R1, OPEN)).message("".join(pieces),
                                                                                          "eos_token")
    assert streamed == whole.reasoning_content == "Maybe get_time[ARGS]{} is right." and whole.content == "It is noon."


@pytest.mark.parametrize("seed", range(4))
def test_a_streamed_reply_sends_the_reasoning_then_the_content_then_the_calls(seed):
    text = "I need <tool_call> for Paris.\n</think>\n\nChecking.\n" + CALL_W
    rng, pieces, i = random.Random(seed), [], 0
    while i < len(text):
        pieces.append(text[i:i + rng.randint(1, 7)])
        i += len(pieces[-1])
    reply = ChoiceReply(request(tools=[WEATHER], tool_choice="auto"), False, HermesParser(),
                        ReasoningStream(R1, OPEN))
    deltas = [reply.delta(p, "eos_token" if k == len(pieces) - 1 else None) for k, p in enumerate(pieces)]
    got = [d for d, _ in deltas if d is not None]
    assert "".join(d.reasoning_content or "" for d in got) == "I need <tool_call> for Paris."
    assert "".join(d.content or "" for d in got) == "Checking.\n"  # streamed as it came (tool_calls.py)
    assert [c.function.name for c in got[-1].tool_calls] == ["get_weather"] and deltas[-1][1] == "tool_calls"
    whole, reason = ChoiceReply(request(tools=[WEATHER]), False, HermesParser(),
                                ReasoningStream(R1, OPEN)).message(text, "eos_token")
    assert (whole.reasoning_content, whole.content, reason) == ("I need <tool_call> for Paris.", "Checking.",
                                                                "tool_calls")


def test_it_applies_to_chat_replies_written_freely_only():
    assert applies(request(), R1) and applies(request(tools=[WEATHER], tool_choice="auto"), R1)
    assert applies(request(tools=[WEATHER], tool_choice="none"), R1)
    assert not applies(request(), None)
    assert not applies(request(tools=[WEATHER], tool_choice="required"), R1)  # a grammar writes those
    assert not applies(request(response_format={"type": "json_object"}), R1)
    assert not applies(CompletionRequest(prompt="hi"), R1)


THINK = {260: "<think>", 261: "</think>"}


class ThinkTokenizer(FakeTokenizer):
    """The fake tokenizer with <think> / </think> as special tokens, whose template opens the thinking. A
    prompt's markers become those tokens, which the fake engine's decode of the prompt skips: a SAY<<...>>
    script writes them as {think} / {/think}."""
    vocab_size = 262
    all_special_ids = FakeTokenizer.all_special_ids + tuple(THINK)
    _IDS = {v: k for k, v in THINK.items()}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [1] if add_special_tokens else []
        for part in re.split("(</?think>)", text):
            ids += [self._IDS[part]] if part in self._IDS else super().encode(part, add_special_tokens=False)
        return ids

    def encode_script(self, text: str) -> list[int]:
        ids = []
        for part in re.split("({/?think})", text):
            marker = part.replace("{", "<").replace("}", ">")
            ids += [self._IDS[marker]] if marker in self._IDS else super().encode_script(part)
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        out, run = [], []
        for i in list(ids) + [None]:
            if i is None or i in THINK:
                out.append(super().decode(run, skip_special_tokens))
                out.append("" if i is None or skip_special_tokens else THINK[i])
                run = []
            else:
                run.append(i)
        return "".join(out)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **extra) -> str:
        text = super().apply_chat_template(messages, add_generation_prompt, **extra)
        return text + "<think>\n" if add_generation_prompt else text


def test_markers_that_are_special_tokens_are_seen():
    assert make_parser("deepseek_r1", ThinkTokenizer()).special_tokens is True
    assert make_parser("deepseek_r1", FakeTokenizer()).special_tokens is False
    tok = ThinkTokenizer()
    assert tok.decode(tok.encode_script("a{/think}b"), False) == tok.decode(tok.encode("a</think>b", False), False)
    assert tok.decode(tok.encode_script("a{/think}b")) == "ab" and tok.encode("</think>") == [1, 261]


# ---- through the HTTP API -------------------------------------------------------------------------------
def serve(tokenizer=None, **config):
    from tests.live_server import fake_server
    server = fake_server(ServerConfig(stats_log_interval_s=0, **config))
    if tokenizer is not None:
        server.engine.tokenizer = tokenizer
    return server


@pytest.fixture(scope="module")
def client():
    """Markers as plain text; the prompt does not open the thinking (the model writes <think>)."""
    with serve(reasoning_parser="deepseek_r1", tool_call_parser="hermes") as s, \
            openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def r1():
    """Markers as special tokens; the chat template ends the prompt with <think>\\n (R1 distills)."""
    with serve(ThinkTokenizer(), reasoning_parser="deepseek_r1") as s, \
            openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def say(text: str) -> list[dict]:
    return [{"role": "user", "content": f"SAY<<{text}>>"}]


def chat(c: openai.OpenAI, text: str, stream: bool, max_tokens: int = 300,
         **kw) -> tuple[str | None, str | None, list, str]:
    """(reasoning_content, content, tool calls, finish_reason), streamed deltas joined (None when none)."""
    r = c.chat.completions.create(model="fake-model", messages=say(text), max_tokens=max_tokens, stream=stream,
                                  **kw)
    if not stream:
        m = r.choices[0].message
        return getattr(m, "reasoning_content", None), m.content, m.tool_calls or [], r.choices[0].finish_reason
    deltas = [ch.choices[0] for ch in r if ch.choices]
    reasoning = "".join(getattr(d.delta, "reasoning_content", None) or "" for d in deltas)
    content = "".join(d.delta.content or "" for d in deltas)
    calls = [tc for d in deltas for tc in d.delta.tool_calls or []]
    return reasoning or None, content or None, calls, deltas[-1].finish_reason


@pytest.mark.parametrize("text, want", [
    ("<think>\nParis, June: mild.\n</think>\n\nIt is mild.", ("Paris, June: mild.", "It is mild.")),
    ("<think>Still thinking about </think", ("Still thinking about </think", None)),
    ("<think>\n\n</think>\n\nHi!", (None, "Hi!")),
    ("No thinking </think> here.", (None, "No thinking </think> here.")),
])
@pytest.mark.parametrize("stream", [False, True])
def test_the_thinking_goes_to_reasoning_content(client, text, want, stream):
    reasoning, content, calls, reason = chat(client, text, stream)
    assert (reasoning, content, calls, reason) == (*want, [], "stop")


@pytest.mark.parametrize("text, want", [
    ("Paris, June: mild.\n</think>\n\nIt is mild.", ("Paris, June: mild.", "It is mild.")),
    ("Paris in June is", ("Paris in June is", None)),
])
@pytest.mark.parametrize("stream", [False, True])
def test_special_token_markers_after_a_prompt_that_opened_the_thinking(r1, text, want, stream):
    assert chat(r1, text.replace("</think>", "{/think}"), stream)[:2] == want


def test_the_stream_joined_is_the_whole_reply(client):
    text = "<think>\nA long < thought </think-ish>.\n</think>\n\nThe answer </think> stays."
    whole, streamed = chat(client, text, False), chat(client, text, True)
    assert whole == streamed and whole[:2] == ("A long < thought </think-ish>.", "The answer </think> stays.")


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_after_the_thinking_is_found_in_the_content_only(client, stream):
    text = "<think>I could write <tool_call> here, but first think.</think>\n\nLet me check. " + CALL_W
    reasoning, content, calls, reason = chat(client, text, stream, tools=[WEATHER])
    assert reasoning == "I could write <tool_call> here, but first think."
    assert content.rstrip() == "Let me check." and reason == "tool_calls"  # streamed: the space too, as it came
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("get_weather",
                                                                                     {"city": "Paris"})]


@pytest.mark.parametrize("stream", [False, True])
def test_thinking_cut_short_is_all_reasoning_with_no_content_nor_calls(client, stream):
    text = "<think>I will write " + CALL_W + " once I am sure, and then</think>Done"
    got = chat(client, text, stream, max_tokens=60, tools=[WEATHER])
    assert got == (text[len("<think>"):60].strip(), None, [], "length")


def test_without_the_parser_the_reply_is_content_untouched():
    text = "<think>\nhmm\n</think>\n\nHi"
    with serve() as s, openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0) as c:
        for stream in (False, True):
            assert chat(c, text, stream) == (None, text, [], "stop")
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": say("x")}).json()
        assert r["choices"][0]["message"]["reasoning_content"] is None


def test_completions_and_grammar_replies_are_not_split(r1):
    """/v1/completions, and a chat reply under a JSON grammar: no parser, special tokens skipped as ever."""
    text = "thought{/think}answer"
    r = r1.completions.create(model="fake-model", prompt=f"SAY<<{text}>>", max_tokens=100)
    assert r.choices[0].text == "thoughtanswer"
    reasoning, content, _, _ = chat(r1, text, False, response_format={"type": "json_object"})
    assert (reasoning, content) == (None, "thoughtanswer")


# ---- configuration --------------------------------------------------------------------------------------
def test_the_reasoning_parser_setting():
    assert ServerConfig().reasoning_parser == "none"
    assert load_config({"reasoning_parser": "deepseek_r1"}, environ={}).server.reasoning_parser == "deepseek_r1"
    env = {"GQA_REASONING_PARSER": "deepseek_r1"}
    assert load_config({}, environ=env).server.reasoning_parser == "deepseek_r1"
    with pytest.raises(ConfigError, match="server.reasoning_parser"):
        load_config({"reasoning_parser": "qwen9"}, environ={})
    import argparse
    from server.serve import add_serve_arguments
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    assert "--reasoning-parser" in parser.format_help()


class RecordingTokenizer(FakeTokenizer):
    """The fake tokenizer, keeping the messages and other variables its chat template was given."""
    seen: list[dict] = []
    variables: dict = {}

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **extra) -> str:
        self.seen, self.variables = messages, extra
        return super().apply_chat_template(messages, add_generation_prompt, **extra)


@pytest.mark.parametrize("key", ["reasoning_content", "reasoning"])
def test_an_earlier_turns_thinking_goes_back_to_the_template(key):
    """A client echoing an earlier reply (interleaved thinking in a tool loop) sends its thinking back under
    either name; the template gets it as reasoning_content, which Qwen3's templates render. It used to be
    dropped."""
    tok = RecordingTokenizer()
    earlier = {"role": "assistant", "content": "It is mild.", key: "Paris, June: mild."}
    messages = [{"role": "user", "content": "Weather?"}, earlier] + say("<think>ok</think>\n\nSure.")
    with serve(tok, reasoning_parser="deepseek_r1") as s, \
            openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0) as c:
        r = c.chat.completions.create(model="fake-model", messages=messages, max_tokens=50)
    assert (r.choices[0].message.reasoning_content, r.choices[0].message.content) == ("ok", "Sure.")
    assert tok.seen[1] == {"role": "assistant", "content": "It is mild.", "reasoning_content": "Paris, June: mild."}
    assert "reasoning_content" not in tok.seen[0] and "reasoning_content" not in tok.seen[2]


@pytest.mark.parametrize("stream", [False, True])
def test_the_thinking_is_also_under_vllms_name_reasoning(client, stream):
    """vLLM now writes the thinking as `reasoning` (OpenRouter too), DeepSeek and most SDKs read
    reasoning_content: both are sent, equal, in messages and in deltas."""
    r = client.chat.completions.with_raw_response.create(model="fake-model", max_tokens=50, stream=stream,
                                                         messages=say("<think>Hm.</think>\n\nYes."))
    if stream:
        deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in r.http_response.iter_lines()
                  if line.startswith("data: {") and '"choices":[{' in line]
    else:
        deltas = [json.loads(r.http_response.text)["choices"][0]["message"]]
    assert all(d["reasoning"] == d["reasoning_content"] for d in deltas)
    assert "".join(d["reasoning"] or "" for d in deltas) == "Hm."


def test_chat_template_kwargs_reach_the_template():
    """Qwen3's templates turn thinking off with chat_template_kwargs {"enable_thinking": false}, as vLLM
    passes them; they were refused. The request's own fields cannot be overridden through them."""
    tok = RecordingTokenizer()
    with serve(tok) as s:
        body = {"messages": say("ok"), "max_tokens": 2, "chat_template_kwargs": {"enable_thinking": False}}
        assert httpx.post(s.url + "/v1/chat/completions", json=body).status_code == 200
        assert tok.variables == {"enable_thinking": False}
        body["reasoning_effort"] = "low"  # a template variable too, as gpt-oss's templates read it
        assert httpx.post(s.url + "/v1/chat/completions", json=body).status_code == 200
        assert tok.variables == {"enable_thinking": False, "reasoning_effort": "low"}
        body["chat_template_kwargs"] = {"add_generation_prompt": False}
        r = httpx.post(s.url + "/v1/chat/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs.add_generation_prompt"
