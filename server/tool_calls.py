"""OpenAI tool calls on /v1/chat/completions.

- `tool_choice` {"type": "function", "function": {"name": F}}: the grammar (server/grammar.py) makes the
  output F's arguments, a JSON object matching F's `parameters` schema, returned as one call.
- `tool_choice` "required": the grammar makes the output a JSON array of {"name": ..., "parameters": {...}}
  objects, each one of the tools with its own schema (one item at most with `parallel_tool_calls: false`),
  returned as those calls. This is how vLLM serves these two choices.
- "auto" (and no tool_choice with tools, as OpenAI defaults): the model writes freely; a parser for its
  family's syntax (server/tool_parsers.py: the server's `tool_call_parser`, or the one its chat template
  shows) finds the calls in the text. Without a parser "auto" is refused, naming tool_choice, and no
  tool_choice means "none".
- "none": the tools go to the chat template only.

A forced call's arguments are always complete JSON: a choice cut by max_tokens is returned as text instead,
with finish_reason "length". ChoiceReply turns one choice's output into the reply, streamed or whole; with a
reasoning parser (server/reasoning_parsers.py) the thinking goes to reasoning_content first, and all the above
works on the content after it only.
"""
from __future__ import annotations

import json
import uuid

from typing import Any

from server.http_errors import ApiError
from server.openai_common import finish_reason
from server.reasoning_parsers import ReasoningStream
from server.schemas_openai import ChatCompletionRequest
from server.schemas_openai_out import ChatDelta, ChatMessageOut, FunctionCall, ToolCall, ToolCallDelta
from server.tool_parsers import model_writes_calls, skip_space


def auto_parser(req: ChatCompletionRequest, parser: Any) -> Any:
    """The parser when the request leaves the calls to the model ("auto"), else None."""
    if req.tool_choice == "auto":
        if not req.tools:
            raise ApiError("validation", "tool_choice: 'auto' needs tools", "tool_choice")
        if parser is None:
            raise ApiError("validation", "tool_choice: 'auto' needs a parser for this model's tool-call text, and "
                                         "its chat template shows no syntax we know (set the server's "
                                         "tool_call_parser: hermes, llama3_json or mistral); send 'required', "
                                         "a named function or 'none'", "tool_choice")
        return parser
    return parser if model_writes_calls(req) else None


def tool_grammar(req: ChatCompletionRequest) -> dict | None:
    """SamplingParams.grammar for the request's tool_choice, or None when it forces no call."""
    choice, tools = req.tool_choice, req.tools or []
    if choice in (None, "none", "auto"):
        return None
    if not tools:
        raise ApiError("validation", "tool_choice: asks for a tool call, but no tools are given", "tool_choice")
    if req.response_format is not None and req.response_format.type != "text":
        raise ApiError("validation", "response_format: cannot be combined with a tool_choice that asks for "
                                     "a call (the call's arguments follow the tool's schema)", "response_format")
    schemas = {t.function.name: t.function.parameters or {"type": "object"} for t in tools}
    if choice == "required":
        # each tool's schema sits under the wrapper's $defs, its own references ("#", "#/$defs/X", as
        # pydantic writes them) rewritten to point there: as a plain subschema they would resolve
        # against the wrapper's root
        defs = {f"tool_{i}": rebased_refs(schema, f"#/$defs/tool_{i}")
                for i, schema in enumerate(schemas.values())}
        items = [{"type": "object", "required": ["name", "parameters"], "additionalProperties": False,
                  "properties": {"name": {"const": name}, "parameters": {"$ref": f"#/$defs/tool_{i}"}}}
                 for i, name in enumerate(schemas)]
        array = {"$defs": defs, "type": "array", "minItems": 1, "items": {"anyOf": items}}
        if req.parallel_tool_calls is False:
            array["maxItems"] = 1
        return {"type": "json", "value": json.dumps(array)}
    name = choice.function.name
    if name not in schemas:
        raise ApiError("validation", f"tool_choice: function '{name}' is not among the tools "
                                     f"({', '.join(schemas)})", "tool_choice")
    return {"type": "json", "value": json.dumps(schemas[name])}


def tool_schema_field(req: ChatCompletionRequest) -> str:
    """The request field tool_grammar(req) comes from, for errors about it (OpenAI's `param`)."""
    if req.tool_choice == "required":
        return "tools"
    names = [t.function.name for t in req.tools or []]
    return f"tools.{names.index(req.tool_choice.function.name)}.function.parameters"  # as pydantic names fields


_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})  # their values are data, not schemas
_NAMED_SCHEMAS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})


def rebased_refs(schema, base: str):
    """schema with each local reference ("#" or "#/...") moved under `base`, a JSON pointer to where the
    schema will sit in a larger one."""
    if isinstance(schema, list):
        return [rebased_refs(item, base) for item in schema]
    if not isinstance(schema, dict) or "$id" in schema:  # a schema with its own $id: its "#" is itself
        return schema
    out = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and (value == "#" or value.startswith("#/")):
            out[key] = base + value[1:]
        elif key in _DATA_KEYWORDS:
            out[key] = value
        elif key in _NAMED_SCHEMAS and isinstance(value, dict):  # names (maybe "const") -> schemas
            out[key] = {name: rebased_refs(sub, base) for name, sub in value.items()}
        else:
            out[key] = rebased_refs(value, base)
    return out


def tool_calls(req: ChatCompletionRequest, text: str) -> list[ToolCall]:
    """The calls a complete output of tool_grammar(req) holds."""
    if req.tool_choice == "required":
        return _calls(_written_calls(text))
    return _calls([(req.tool_choice.function.name, text)])


def _written_calls(text: str) -> list[tuple[str, str]]:
    """(name, parameters as written) of each object in the JSON array `text`. The text as written, not
    json.dumps of what json.loads reads: that would turn a valid 9E999 into Infinity, which is not JSON."""
    decode, calls = json.JSONDecoder().raw_decode, []
    i = _past(text, 0, "[")
    while True:
        fields, i = {}, _past(text, i, "{")
        while True:
            key, i = decode(text, skip_space(text, i))
            start = skip_space(text, _past(text, i, ":"))
            _, i = decode(text, start)
            fields[key] = text[start:i]
            i = skip_space(text, i)
            if text[i] != ",":
                break
            i += 1
        calls.append((json.loads(fields["name"]), fields["parameters"]))
        i = skip_space(text, _past(text, i, "}"))
        if text[i] != ",":
            return calls
        i += 1


def _past(text: str, i: int, char: str) -> int:
    i = skip_space(text, i)
    if text[i] != char:
        raise ValueError(f"expected {char!r} at {i} in {text!r}")
    return i + 1


def _calls(pairs) -> list[ToolCall]:
    return [ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name=name, arguments=arguments))
            for name, arguments in pairs]


class ChoiceReply:
    """One choice's output as the chat reply: content as it comes (no tools asked for); calls forced by
    tool_grammar, sent whole once complete; or ("auto") content until the parser sees calls begin (holding
    back only text that may open one), then, at the end, the calls the parser finds, or the text if it finds
    none. finish_reason is "tool_calls" when the reply is calls. `reasoning`: the thinking, split off first
    (reasoning_content), the rest being the content all this works on."""

    def __init__(self, req: ChatCompletionRequest, forced: bool, parser: Any = None,
                 reasoning: ReasoningStream | None = None):
        self.req, self.forced, self.parser, self.reasoning = req, forced, parser, reasoning
        self.names = {t.function.name for t in req.tools or []}
        self.parts: list[str] = []  # the output so far, joined once at the end
        self.unsent, self.sent, self.in_calls = "", 0, False  # content held back; how much went out

    def delta(self, new_text: str, engine_reason: str | None) -> tuple[ChatDelta | None, str | None]:
        """What to send for one output delta (None: nothing yet), and the finish reason if it is the last."""
        if self.reasoning is None:
            return self._content_delta(new_text, engine_reason)
        thought, new_text = self.reasoning.feed(new_text, engine_reason is not None)
        delta, reason = self._content_delta(new_text, engine_reason)
        thought = self._shown(thought) if thought else thought  # a special-token call marker shows nowhere
        if thought:
            delta = (delta or ChatDelta()).model_copy(update={"reasoning_content": thought})
        return delta, reason

    def _content_delta(self, new_text: str, engine_reason: str | None) -> tuple[ChatDelta | None, str | None]:
        finished, reason = engine_reason is not None, finish_reason(engine_reason)
        if not self.forced and self.parser is None:
            return (ChatDelta(content=new_text) if new_text else None), reason
        self.parts.append(new_text)
        if not finished:
            if self.forced or self.in_calls:
                return None, None
            self.unsent += new_text
            safe, start = self.parser.split(self.unsent, self.sent > 0)
            self.in_calls = start is not None
            return self._send(safe), None
        text = "".join(self.parts)
        message, reason = self._message(text, engine_reason)
        if not message.tool_calls:  # the rest of the text, as message() shows it
            rest = self._shown(text[self.sent:])
            return (ChatDelta(content=rest) if rest else None), reason
        # content before the calls goes out as it came (here, what the last delta brought); the calls as one
        before = text[self.sent:self.parser.split(text)[1]] if self.parser is not None else ""
        return ChatDelta(content=before or None, tool_calls=[
            ToolCallDelta(index=i, **c.model_dump()) for i, c in enumerate(message.tool_calls)]), reason

    def _send(self, n: int) -> ChatDelta | None:
        """The first n characters of the content held back, as a delta (None when n is 0)."""
        if n <= 0:
            return None
        delta, self.unsent, self.sent = ChatDelta(content=self.unsent[:n]), self.unsent[n:], self.sent + n
        return delta

    def message(self, text: str, engine_reason: str | None) -> tuple[ChatMessageOut, str | None]:
        """The whole reply from the whole output."""
        if self.reasoning is None:
            return self._message(text, engine_reason)
        thought, content = self.reasoning.whole(text)
        thought = self._shown(thought) if thought else thought
        if content is None:  # thinking to the end, or nothing after </think>: no content
            return ChatMessageOut(reasoning_content=thought), finish_reason(engine_reason)
        message, reason = self._message(content, engine_reason)
        return message.model_copy(update={"reasoning_content": thought}), reason

    def _message(self, text: str, engine_reason: str | None) -> tuple[ChatMessageOut, str | None]:
        if self.forced and engine_reason == "eos_token":  # complete: the calls, no content
            return ChatMessageOut(tool_calls=tool_calls(self.req, text)), "tool_calls"
        parsed = self.parser.parse(text, self.names) if self.parser is not None else None
        if parsed is not None:  # parallel_tool_calls false: at most one call, the first
            calls = parsed.calls[:1] if self.req.parallel_tool_calls is False else parsed.calls
            return ChatMessageOut(content=parsed.content, tool_calls=_calls(calls)), "tool_calls"
        return ChatMessageOut(content=self._shown(text)), finish_reason(engine_reason)

    def _shown(self, text: str) -> str:
        """Text that holds no call, as content: without a call marker that is a special token (kept in the
        text only for the parser to see; split() never lets content already sent end inside one)."""
        marker = getattr(self.parser, "special_token", None)
        return text.replace(marker, "") if marker else text
