"""POST /v1/responses (server/api_responses.py): OpenAI's Responses API on the chat route's machinery, through
raw httpx and the openai client's responses.create / responses.stream, against the fake engine (the prompt
"SAY<<text>>" makes it write text); one check on the real tiny model that it answers as the chat route does."""
from __future__ import annotations

import json

import httpx
import openai
import pytest

from server.config import ServerConfig
from server.schemas_responses import ResponsesRequest
from tests.live_server import engine_server, fake_server, metric
from tests.test_server_robustness import wait_freed

WEATHER = {"type": "function", "name": "get_weather", "description": "today's weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["paris", "rome"]}}, "required": ["city"],
    "additionalProperties": False}}
TIME = {"type": "function", "name": "get_time", "parameters": {"type": "object"}}


@pytest.fixture(scope="module")
def server():
    with fake_server() as s:
        yield s


@pytest.fixture()
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def post(server, **body) -> httpx.Response:
    return httpx.post(server.url + "/v1/responses", json=body, timeout=30)


def events(server, **body) -> list[tuple[str, dict]]:
    """(event name, data) of each server-sent event of a streamed request."""
    text = httpx.post(server.url + "/v1/responses", json={**body, "stream": True}, timeout=30).text
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_plain_text_in_openais_shape(server, client):
    body = post(server, model="fake-model", input="SAY<<hello world>>").json()
    assert body["id"].startswith("resp_") and body["object"] == "response" and body["status"] == "completed"
    [message] = body["output"]
    assert message["type"] == "message" and message["id"].startswith("msg_") and message["role"] == "assistant"
    assert message["content"] == [{"type": "output_text", "text": "hello world", "annotations": [], "logprobs": []}]
    usage = body["usage"]
    assert usage["output_tokens"] == 12 and usage["total_tokens"] == usage["input_tokens"] + 12  # 11 bytes, </s>
    assert usage["output_tokens_details"] == {"reasoning_tokens": 0} and body["incomplete_details"] is None
    assert (body["tools"], body["tool_choice"], body["truncation"], body["store"]) == ([], "auto", "disabled", False)
    r = client.responses.create(model="fake-model", input="SAY<<hi there>>", metadata={"k": "v"}, store=True,
                                user="u", service_tier="auto", prompt_cache_key="p", safety_identifier="s")
    assert r.output_text == "hi there" and r.status == "completed" and r.metadata == {"k": "v"}


def test_instructions_come_first_as_a_system_message(server, client):
    r = client.responses.create(model="fake-model", instructions="SAY<<from the top", input="and the user>>")
    # the fake template writes <|role|>content per message: the text spans both
    assert r.output_text == "from the top\n<|user|>and the user" and r.instructions == "SAY<<from the top"


def test_input_items_become_the_chat_turns(server, client):
    items = [{"role": "developer", "content": "SAY<<a"},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "b"}]},
             {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
              "content": [{"type": "output_text", "text": "c", "annotations": [], "logprobs": []}]},
             {"role": "user", "content": "d>>"}]
    assert client.responses.create(model="fake-model", input=items).output_text == \
        "a\n<|user|>b\n<|assistant|>c\n<|user|>d"


def test_max_output_tokens_makes_it_incomplete(server, client):
    body = post(server, input="SAY<<a long answer>>", max_output_tokens=4).json()
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["output"][0]["status"] == "incomplete" and body["output"][0]["content"][0]["text"] == "a lo"
    assert body["max_output_tokens"] == 4 and body["usage"]["output_tokens"] == 4
    r = client.responses.create(model="fake-model", input="SAY<<a long answer>>", max_output_tokens=4)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens" and r.output_text == "a lo"


def test_json_schema_format_goes_to_the_chat_request_and_is_echoed(server):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    fmt = {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}
    chat = ResponsesRequest(input="x", text={"format": fmt}).chat_request()
    assert chat.response_format.type == "json_schema" and chat.response_format.json_schema.schema_ == schema
    body = post(server, input='SAY<<{"a": 1}>>', text={"format": fmt}).json()
    assert json.loads(body["output"][0]["content"][0]["text"]) == {"a": 1}
    assert body["text"]["format"]["schema"] == schema and body["text"]["format"]["name"] == "thing"
    assert post(server, input="x", text={"format": {"type": "json_object"}}, max_output_tokens=2).status_code == 200


def test_a_named_function_and_required_are_calls(server, client):
    r = client.responses.create(model="fake-model", input='SAY<<{"city": "paris"}>>', tools=[WEATHER, TIME],
                                tool_choice={"type": "function", "name": "get_weather"})
    [call] = r.output
    assert call.type == "function_call" and call.name == "get_weather" and json.loads(call.arguments) == {
        "city": "paris"}
    assert call.call_id.startswith("call_") and call.id.startswith("fc_") and call.status == "completed"
    assert r.output_text == "" and r.tool_choice.name == "get_weather"
    script = '[{"name": "get_time", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "rome"}}]'
    body = post(server, input=f"SAY<<{script}>>", tools=[WEATHER, TIME], tool_choice="required").json()
    assert [(c["name"], json.loads(c["arguments"])) for c in body["output"]] == [
        ("get_time", {}), ("get_weather", {"city": "rome"})]
    stream = events(server, input=f"SAY<<{script}>>", tools=[WEATHER, TIME], tool_choice="required")
    assert [e["item"]["name"] for name, e in stream if name == "response.output_item.done"] == ["get_time",
                                                                                             "get_weather"]
    assert "".join(e["delta"] for name, e in stream if name == "response.function_call_arguments.delta") == \
        "".join(c["arguments"] for c in body["output"])


def test_a_function_call_output_round_trip(server, client):
    first = client.responses.create(model="fake-model", input='SAY<<{"city": "rome"}>>', tools=[WEATHER],
                                    tool_choice={"type": "function", "name": "get_weather"})
    call = first.output[0]
    turns = [{"role": "user", "content": "weather?"}, *first.output,  # sent back as the SDK returned them
             {"type": "function_call_output", "call_id": call.call_id, "output": "SAY<<sunny in rome>>"}]
    second = client.responses.create(model="fake-model", input=turns, tools=[WEATHER])
    assert second.output_text == "sunny in rome"
    # as a chat client sends the same conversation: the call on the assistant turn, the result as a tool turn
    messages = ResponsesRequest(input=[first.output[0].to_dict(), *turns[2:]], instructions="i").chat_messages()
    assert messages == [{"role": "system", "content": "i"},
                        {"role": "assistant", "content": None, "tool_calls": [{"id": call.call_id, "type": "function",
                         "function": {"name": "get_weather", "arguments": call.arguments}}]},
                        {"role": "tool", "tool_call_id": call.call_id, "content": "SAY<<sunny in rome>>"}]
    thought = ResponsesRequest(input=[{"type": "reasoning", "summary": [], "content": [
        {"type": "reasoning_text", "text": "hm"}]}, {"role": "assistant", "content": "ok"}]).chat_messages()
    assert thought == [{"role": "assistant", "content": "ok", "reasoning_content": "hm"}]


def test_stream_event_order_sequence_numbers_and_text(server, client):
    got = events(server, input="Once upon", max_output_tokens=6, temperature=0, include=[
        "message.output_text.logprobs"], top_logprobs=2)
    names = [name for name, _ in got]
    assert names == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added"] + ["response.output_text.delta"] * 6 + [
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.incomplete"]
    assert [e["sequence_number"] for _, e in got] == list(range(len(got)))
    assert all(name == e["type"] for name, e in got)
    deltas = [e for name, e in got if name == "response.output_text.delta"]
    whole = post(server, input="Once upon", max_output_tokens=6, temperature=0,
                 include=["message.output_text.logprobs"], top_logprobs=2).json()
    text = whole["output"][0]["content"][0]
    assert "".join(e["delta"] for e in deltas) == text["text"] == got[-1][1]["response"]["output"][0]["content"][0][
        "text"]
    assert [lp for e in deltas for lp in e["logprobs"]] == text["logprobs"] and len(text["logprobs"]) == 6
    assert len(text["logprobs"][0]["top_logprobs"]) == 2
    assert {e["item_id"] for e in deltas} == {got[2][1]["item"]["id"]}  # the item output_item.added opened
    with client.responses.stream(model="fake-model", input="SAY<<streamed>>") as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert final.output_text == "streamed" and kinds[-1] == "response.completed" and final.usage.output_tokens == 9
    chunks = client.responses.create(model="fake-model", input="SAY<<ab>>", stream=True)
    assert "".join(e.delta for e in chunks if e.type == "response.output_text.delta") == "ab"


def test_a_failure_after_the_start_is_a_response_failed_event(server, client):
    got = events(server, input="FAIL")
    assert got[-1][0] == "response.failed" and got[-1][1]["response"]["status"] == "failed"
    assert got[-1][1]["response"]["error"]["code"] == "server_error"
    assert "simulated engine failure" in got[-1][1]["response"]["error"]["message"]
    with client.responses.stream(model="fake-model", input="FAIL") as stream:
        assert [e.type for e in stream][-1] == "response.failed"
    assert post(server, input="FAIL").status_code == 500


@pytest.mark.parametrize("extra, param", [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"background": True}, "background"),
    ({"frequency_penalty": 1}, "frequency_penalty"),
    ({"truncation": "auto"}, "truncation"),
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input.0.role"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input.0.call_id"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input.0"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
    ({"include": ["file_search_call.results"]}, "include.0"),
    ({"max_output_tokens": 5000}, "max_output_tokens"),
    ({"text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format.name"),
])
def test_bad_requests_are_400s_naming_the_field(server, extra, param):
    r = post(server, **{"input": "hi", **extra})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"].startswith(param) and error["type"] == "invalid_request_error"


def test_the_openai_client_raises_on_bad_requests(client):
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        client.responses.create(model="fake-model", input="hi", previous_response_id="resp_1")
    with pytest.raises(openai.NotFoundError, match="model"):
        client.responses.create(model="other", input="hi")


def test_reasoning_and_calls_the_model_writes():
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "paris"}}\n</tool_call>'
    text = f"<think>Paris, surely.</think>\n\nLet me check. {call}"
    with fake_server(ServerConfig(stats_log_interval_s=0, reasoning_parser="deepseek_r1",
                                  tool_call_parser="hermes")) as s:
        body = post(s, input=f"SAY<<{text}>>", tools=[WEATHER], reasoning={"effort": "low"}).json()
        reasoning, message, function_call = body["output"]
        assert reasoning["type"] == "reasoning" and reasoning["id"].startswith("rs_") and reasoning["summary"] == []
        assert reasoning["content"] == [{"type": "reasoning_text", "text": "Paris, surely."}]
        assert message["content"][0]["text"] == "Let me check."
        assert function_call["name"] == "get_weather" and json.loads(function_call["arguments"]) == {"city": "paris"}
        assert body["usage"]["output_tokens_details"]["reasoning_tokens"] == len("Paris, surely.")
        got = events(s, input=f"SAY<<{text}>>", tools=[WEATHER])
        assert "".join(e["delta"] for n, e in got if n == "response.reasoning_text.delta") == "Paris, surely."
        items = [e["item"]["type"] for n, e in got if n == "response.output_item.done"]
        assert items == ["reasoning", "message", "function_call"]
        assert [e["output_index"] for n, e in got if n == "response.output_item.added"] == [0, 1, 2]


def test_a_client_that_leaves_frees_its_request(server):
    before = metric(server.url, "gqaserve_generation_tokens_total")
    with httpx.stream("POST", server.url + "/v1/responses", json={"input": "x", "max_output_tokens": 1000,
                                                                  "stream": True}) as r:
        lines = r.iter_lines()  # keep a reference: a collected iterator closes the response
        next(lines)
        assert metric(server.url, "gqaserve_num_requests_running") == 1
    wait_freed(server.url, before, 1000)  # not streamed: tests/test_server_robustness.py


def test_the_real_model_answers_as_the_chat_route_does(tiny_llama_dir):
    with engine_server(tiny_llama_dir) as s, \
            openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0) as c:
        model = c.models.list().data[0].id
        chat = c.chat.completions.create(model=model, max_tokens=8, temperature=0, messages=[
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": "To be or not"}])
        r = c.responses.create(model=model, instructions="Be brief.", input="To be or not", max_output_tokens=8,
                               temperature=0)
        assert r.output_text == chat.choices[0].message.content and r.usage.output_tokens == 8
        assert r.usage.input_tokens == chat.usage.prompt_tokens
        with c.responses.stream(model=model, instructions="Be brief.", input="To be or not", max_output_tokens=8,
                                temperature=0) as stream:
            assert "".join(e.delta for e in stream if e.type == "response.output_text.delta") == r.output_text
        schema = {"type": "object", "properties": {"a": {"enum": ["x", "y"]}}, "required": ["a"],
                  "additionalProperties": False}
        fmt = c.responses.create(model=model, input="JSON please", max_output_tokens=40, temperature=1.0,
                                 text={"format": {"type": "json_schema", "name": "pick", "schema": schema}})
        assert fmt.status == "completed" and json.loads(fmt.output_text)["a"] in ("x", "y")


def test_an_empty_reply_is_an_empty_message(server, client):
    """The model ended at once: the output was [] (clients read output[0]) and the end token's logprob was lost;
    chat answers content "" with that logprob."""
    body = post(server, input="SAY<<>>", include=["message.output_text.logprobs"]).json()
    [message] = body["output"]
    assert message["type"] == "message" and message["status"] == "completed"
    [part] = message["content"]
    assert part["text"] == "" and len(part["logprobs"]) == body["usage"]["output_tokens"] == 1
    names = [name for name, _ in events(server, input="SAY<<>>")]
    assert names[2:] == ["response.output_item.added", "response.content_part.added", "response.output_text.done",
                         "response.content_part.done", "response.output_item.done", "response.completed"]
    assert client.responses.create(model="fake-model", input="SAY<<>>").output_text == ""


def test_a_failure_closes_the_item_it_cut_and_carries_it(server):
    """response.failed came with output [] after the message item had been opened and written to."""
    got = events(server, input="FAIL")
    names = [name for name, _ in got]
    assert names[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.failed"]
    [item] = got[-1][1]["response"]["output"]
    assert item["status"] == "incomplete" and item["content"][0]["text"] == got[-2][1]["item"]["content"][0]["text"]
    assert item["content"][0]["text"] == "".join(e["delta"] for n, e in got if n == "response.output_text.delta")


def test_an_unset_tool_choice_is_echoed_as_what_it_does(server):
    """Without a tool-call parser, tools and no tool_choice run as "none" (README), but "auto" was echoed."""
    assert post(server, input="SAY<<hi>>", tools=[WEATHER]).json()["tool_choice"] == "none"
    assert post(server, input="SAY<<hi>>").json()["tool_choice"] == "auto"
