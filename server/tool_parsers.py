"""Tool calls written in a model's free text, for tool_choice "auto": one parser per family's syntax (as
vLLM's --tool-call-parser), picked by `tool_call_parser` or detected from the chat template.

- hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call, after optional
  content (Hermes, Qwen 2.5 / 3, SmolLM3 and the many templates that copied them).
- llama3_json: the reply is `{"name": ..., "parameters": {...}}` (calls separated by `;`), optionally after
  `<|python_tag|>` (Llama 3.1-3.3's JSON tool calling).
- mistral: `[TOOL_CALLS]` then a JSON array `[{"name": ..., "arguments": {...}}, ...]` (Mistral 7B v0.3, Nemo,
  Small), or `[TOOL_CALLS]name[ARGS]{...}` once per call (tokenizers v11 and later), after optional content.
  `[TOOL_CALLS]` is a special token, so requests using this parser are decoded with special tokens kept
  (`special_token`, as vLLM does), and a reply that is no call after all shows it nowhere.

A parser answers two questions: how much of a growing text is surely content (so a stream can send it at
once and hold back only what may start a call), and, at the end, which calls the text holds. The first is
asked of the text not yet sent only, so that a stream's delta costs what it brings, not the text so far. A call whose
name is not among the request's tools, or whose arguments are not a JSON object, makes the whole reply
content: a reply is all calls or none, never a guess.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

PARSERS = ("hermes", "llama3_json", "mistral")


def model_writes_calls(req: object) -> bool:
    """A request whose tool calls the model writes in its text, for a parser to find: tools, and tool_choice
    "auto" or unset (forced calls come from a grammar; "none" asks for none)."""
    return bool(getattr(req, "tools", None)) and getattr(req, "tool_choice", None) in (None, "auto")


@dataclass(frozen=True)
class ParsedReply:
    content: str | None              # text before the calls (None when empty)
    calls: list[tuple[str, str]]     # (function name, arguments as JSON text)


def _held_back(text: str, marker: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of marker (it may still become one)."""
    return max((k for k in range(1, len(marker)) if text.endswith(marker[:k])), default=0)


class _CallsAfterMarker:
    """A syntax whose calls begin at a marker (START), after optional content."""
    START: str

    def split(self, text: str, after_content: bool = False) -> tuple[int, int | None]:
        """(safe, start): text[:safe] is content whatever follows; start: where the calls begin, if seen.
        Up to the marker, or all but a tail that may still become one. `text`: the reply, or its part not yet
        sent as content (after_content: some was); a marker never begins in a part split() let go."""
        i = text.find(self.START)
        if i >= 0:
            return i, i
        return len(text) - _held_back(text, self.START), None


def _not_json(value: str) -> float:
    raise ValueError(f"{value} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    return value if math.isfinite(value) else _not_json(text)  # 1e999: it would be written back as Infinity


# Strict: NaN, Infinity and overflowing numbers are refused (arguments written back must be JSON). A model's
# text may also nest past the recursion limit or hold a 5,000-digit integer: callers catch _JSON_FAILURES.
_JSON = json.JSONDecoder(parse_constant=_not_json, parse_float=_finite)
_JSON_FAILURES = (ValueError, RecursionError)


def _call(obj: object, names: set[str], args_key: tuple[str, ...]) -> tuple[str, str] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or obj["name"] not in names:
        return None
    args = next((obj[k] for k in args_key if k in obj), {})
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = _JSON.decode(args)
        except _JSON_FAILURES:
            return None
    if not isinstance(args, dict):
        return None
    text = json.dumps(args, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud83d", half an emoji) is valid JSON only escaped
        text = json.dumps(args)
    return obj["name"], text


class HermesParser(_CallsAfterMarker):
    name = "hermes"
    special_token = None  # the call marker when it is a special token: requests using the parser keep them
    START, END = "<tool_call>", "</tool_call>"

    def parse(self, text: str, names: set[str]) -> ParsedReply | None:
        """Blocks of START, a JSON call, END (the last one's END may be cut off), with only whitespace between
        them. The JSON is read as JSON, so an argument holding "</tool_call>" does not end its block."""
        start = text.find(self.START)
        if start < 0:
            return None
        calls, i = [], start
        while i < len(text):
            if not text.startswith(self.START, i):  # prose between or after the calls: not a reply of calls
                return None
            try:
                obj, i = _JSON.raw_decode(text, skip_space(text, i + len(self.START)))
            except _JSON_FAILURES:
                return None
            call = _call(obj, names, ("arguments", "parameters"))
            if call is None:
                return None
            calls.append(call)
            i = skip_space(text, i)
            if text.startswith(self.END, i):
                i = len(text) - len(text[i + len(self.END):].lstrip())  # any whitespace, as str.strip()
            elif i < len(text):  # only the last block may lack its END (cut at eos)
                return None
        return ParsedReply(text[:start].strip() or None, calls)


def skip_space(text: str, i: int) -> int:
    """Past the JSON whitespace at text[i]."""
    while i < len(text) and text[i] in " \t\n\r":
        i += 1
    return i


class Llama3JsonParser:
    name = "llama3_json"
    special_token = None
    TAG = "<|python_tag|>"

    def split(self, text: str, after_content: bool = False) -> tuple[int, int | None]:
        if after_content:  # the reply began as content: it stays content
            return len(text), None
        body = text.lstrip()
        if not body or self.TAG.startswith(body):  # nothing decided yet
            return 0, None
        if body.startswith("{") or body.startswith(self.TAG):
            return 0, 0
        return len(text), None  # content: the calls only ever open the reply

    def parse(self, text: str, names: set[str]) -> ParsedReply | None:
        body = text.strip().removeprefix(self.TAG).strip()
        if not body.startswith("{"):
            return None
        calls, i = [], 0
        while i < len(body):
            try:
                obj, i = _JSON.raw_decode(body, i)
            except _JSON_FAILURES:
                return None
            call = _call(obj, names, ("parameters", "arguments"))
            if call is None:
                return None
            calls.append(call)
            rest = body[i:].lstrip()
            if rest.startswith(";"):
                rest = rest[1:].lstrip()
            elif rest:
                return None
            i = len(body) - len(rest)
        return ParsedReply(None, calls)


class MistralParser(_CallsAfterMarker):
    name = "mistral"
    special_token = START = "[TOOL_CALLS]"
    _NAME = re.compile(r"\s*([^\s\[\]{}]+)\s*(?:\[ARGS\])?\s*")  # name[ARGS]{...}, or name{...}

    def parse(self, text: str, names: set[str]) -> ParsedReply | None:
        start = text.find(self.START)
        if start < 0:
            return None
        calls = []
        for part in text[start + len(self.START):].split(self.START):
            body = part.strip()
            try:
                if body.startswith(("[", "{")):  # a JSON array of calls (or one call)
                    value, end = _JSON.raw_decode(body)
                    objs = value if isinstance(value, list) else [value]
                else:  # name[ARGS]{arguments}
                    head = self._NAME.match(body)
                    if head is None:
                        return None
                    args, end = _JSON.raw_decode(body, head.end())
                    objs = [{"name": head.group(1), "arguments": args}]
            except _JSON_FAILURES:
                return None
            found = [_call(obj, names, ("arguments", "parameters")) for obj in objs]
            if body[end:].strip() or not found or None in found:
                return None
            calls += found
        return ParsedReply(text[:start].strip() or None, calls)


def make_parser(name: str):
    return {"hermes": HermesParser, "llama3_json": Llama3JsonParser, "mistral": MistralParser}[name]()


def detect_parser(template_source: str | None) -> str | None:
    """The parser a chat template's own tool-call syntax calls for, or None when it shows none."""
    if not template_source:
        return None
    if "<tool_call>" in template_source:
        return "hermes"
    if "[TOOL_CALLS]" in template_source or "[AVAILABLE_TOOLS]" in template_source:
        return "mistral"
    if "<|python_tag|>" in template_source or ("ipython" in template_source and '"parameters"' in template_source):
        return "llama3_json"
    return None
