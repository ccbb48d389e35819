"""OpenAI tool calls on /v1/chat/completions, made by the grammar (server/grammar.py) rather than parsed.

- `tool_choice` {"type": "function", "function": {"name": F}}: the output is F's arguments, a JSON object
  matching F's `parameters` schema, returned as one call.
- `tool_choice` "required": the output is a JSON array of {"name": ..., "parameters": {...}} objects, each
  one of the tools with its own schema (one item at most with `parallel_tool_calls: false`), returned as
  those calls. This is how vLLM serves these two choices.
- "none": the tools go to the chat template only. "auto" (OpenAI's default when tools are given) would have
  to recognise each model family's own tool-call syntax in free text; it is refused, naming tool_choice.

A call's arguments are always complete JSON: a choice cut by max_tokens is returned as text instead, with
finish_reason "length".
"""
from __future__ import annotations

import json
import uuid

from server.http_errors import ApiError
from server.schemas_openai import ChatCompletionRequest
from server.schemas_openai_out import FunctionCall, ToolCall


def tool_grammar(req: ChatCompletionRequest) -> dict | None:
    """SamplingParams.grammar for the request's tool_choice, or None when it asks for no call."""
    choice, tools = req.tool_choice, req.tools or []
    if choice in (None, "none"):
        return None
    if not tools:
        raise ApiError("validation", "tool_choice: asks for a tool call, but no tools are given", "tool_choice")
    if choice == "auto":
        raise ApiError("validation", "tool_choice: 'auto' is not supported (it needs a parser for each model "
                                     "family's tool-call text); send 'required', a named function or 'none'",
                       "tool_choice")
    if req.response_format is not None and req.response_format.type != "text":
        raise ApiError("validation", "response_format: cannot be combined with a tool_choice that asks for "
                                     "a call (the call's arguments follow the tool's schema)", "response_format")
    schemas = {t.function.name: t.function.parameters or {"type": "object"} for t in tools}
    if choice == "required":
        items = [{"type": "object", "properties": {"name": {"const": name}, "parameters": schema},
                  "required": ["name", "parameters"], "additionalProperties": False}
                 for name, schema in schemas.items()]
        array = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
        if req.parallel_tool_calls is False:
            array["maxItems"] = 1
        return {"type": "json", "value": json.dumps(array)}
    name = choice.function.name
    if name not in schemas:
        raise ApiError("validation", f"tool_choice: function '{name}' is not among the tools "
                                     f"({', '.join(schemas)})", "tool_choice")
    return {"type": "json", "value": json.dumps(schemas[name])}


def tool_calls(req: ChatCompletionRequest, text: str) -> list[ToolCall]:
    """The calls a complete output of tool_grammar(req) holds."""
    if req.tool_choice == "required":
        calls = [(c["name"], json.dumps(c["parameters"])) for c in json.loads(text)]
    else:
        calls = [(req.tool_choice.function.name, text)]
    return [ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name=name, arguments=arguments))
            for name, arguments in calls]
