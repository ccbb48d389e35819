"""Tool calls written in a model's free text, for tool_choice "auto": one parser per family's syntax (as
vLLM's --tool-call-parser), picked by `tool_call_parser` or detected from the chat template.

- hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call, after optional
  content (Hermes, Qwen 2.5 / 3, SmolLM3 and the many templates that copied them).
- llama3_json: the reply is `{"name": ..., "parameters": {...}}` (calls separated by `;`), optionally after
  `<|python_tag|>` (Llama 3.1-3.3's JSON tool calling).

A parser answers two questions: how much of a growing text is surely content (so a stream can send it at
once and hold back only what may start a call), and, at the end, which calls the text holds. A call whose
name is not among the request's tools, or whose arguments are not a JSON object, makes the whole reply
content: a reply is all calls or none, never a guess.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

PARSERS = ("hermes", "llama3_json")


@dataclass(frozen=True)
class ParsedReply:
    content: str | None              # text before the calls (None when empty)
    calls: list[tuple[str, str]]     # (function name, arguments as JSON text)


def _held_back(text: str, marker: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of marker (it may still become one)."""
    return max((k for k in range(1, len(marker)) if text.endswith(marker[:k])), default=0)


def _call(obj: object, names: set[str], args_key: tuple[str, ...]) -> tuple[str, str] | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = next((obj[k] for k in args_key if k in obj), {})
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return (obj["name"], json.dumps(args, ensure_ascii=False)) if isinstance(args, dict) else None


class HermesParser:
    name = "hermes"
    START, END = "<tool_call>", "</tool_call>"
    _BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)

    def split(self, text: str) -> tuple[int, int | None]:
        """(safe, start): text[:safe] is content whatever follows; start: where the calls begin, if seen."""
        i = text.find(self.START)
        if i >= 0:
            return i, i
        return len(text) - _held_back(text, self.START), None

    def parse(self, text: str, names: set[str]) -> ParsedReply | None:
        start = text.find(self.START)
        if start < 0:
            return None
        calls, end = [], start
        for block in self._BLOCK.finditer(text, start):
            if text[end:block.start()].strip():  # prose between calls: not a reply of calls
                return None
            try:
                call = _call(json.loads(block.group(1)), names, ("arguments", "parameters"))
            except json.JSONDecodeError:
                return None
            if call is None:
                return None
            calls.append(call)
            end = block.end()
        if text[end:].strip():
            return None
        return ParsedReply(text[:start].strip() or None, calls)


class Llama3JsonParser:
    name = "llama3_json"
    TAG = "<|python_tag|>"

    def split(self, text: str) -> tuple[int, int | None]:
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
        decoder, calls, i = json.JSONDecoder(), [], 0
        while i < len(body):
            try:
                obj, i = decoder.raw_decode(body, i)
            except json.JSONDecodeError:
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


def make_parser(name: str):
    return {"hermes": HermesParser, "llama3_json": Llama3JsonParser}[name]()


def detect_parser(template_source: str | None) -> str | None:
    """The parser a chat template's own tool-call syntax calls for, or None when it shows none."""
    if not template_source:
        return None
    if "<tool_call>" in template_source:
        return "hermes"
    if "<|python_tag|>" in template_source or ("ipython" in template_source and '"parameters"' in template_source):
        return "llama3_json"
    return None
