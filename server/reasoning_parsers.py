"""A reasoning model's chain of thought, split from its answer (as vLLM's --reasoning-parser), for
/v1/chat/completions: `reasoning_content` beside `content` in the message and in streamed deltas.

- deepseek_r1: thinking between `<think>` and `</think>`, then the answer (DeepSeek-R1 and its Llama / Qwen
  distills, QwQ, Qwen3). Their chat templates often end the prompt with `<think>\\n` already, so the reply
  starts inside the thinking and only `</think>` shows in it; otherwise the model writes `<think>` first.

The rule, the same streamed or whole. Thinking is open when the prompt ends with `<think>` or the reply
begins with it (after whitespace; that `<think>` is dropped). Then the text up to `</think>` is reasoning
(whitespace around it stripped; none when empty) and the text after it, leading newlines stripped, is
content (none when empty); with no `</think>` at all (cut by max_tokens or a stop) the whole reply is
reasoning and there is no content, as vLLM's deepseek_r1 gives it. A reply that never opened thinking (the
prompt does not end with `<think>` and the reply does not begin with it: a model answering without
thinking, or a template that closed it) is content, every byte as written, a later `</think>` included: the
stream must route its first words before it could know of one.

A reply written under a grammar (a forced tool call, response_format json) has no thinking part, so the
parser is not applied to it (`applies`). `<think>` / `</think>` are plain text in most tokenizers, special
tokens in some: then requests it applies to are decoded with special tokens kept (`special_tokens`, as
openai_common does for mistral's [TOOL_CALLS]), or the markers would vanish from the text.
"""
from __future__ import annotations

from typing import Any

from server.tool_parsers import _held_back

PARSERS = ("deepseek_r1",)


class DeepSeekR1Parser:
    name = "deepseek_r1"
    START, END = "<think>", "</think>"

    def __init__(self, special_tokens: bool = False):
        self.special_tokens = special_tokens  # the markers are special tokens: keep them in the decoded text

    def opens(self, prompt: str) -> bool:
        """Whether the prompt leaves the reply inside the thinking part."""
        return prompt.rstrip().endswith(self.START)

    def split(self, text: str, thinking: bool, final: bool = True) -> tuple[str | None, str | None]:
        """(reasoning, content) of a reply; `thinking`: opens(prompt). With final false (the text may still
        grow) each is only what is sure, as a string: what a longer text's split starts with."""
        body = text.lstrip()
        if body.startswith(self.START):
            thinking, body = True, body[len(self.START):]
        elif not final and self.START.startswith(body):  # may yet open with <think>: nothing is sure
            return "", ""
        elif not thinking:
            return None, text
        else:
            body = text
        end = body.find(self.END)
        if end < 0:
            if not final:  # a partial </think> at the end is held back; so is trailing whitespace (strip())
                return body[:len(body) - _held_back(body, self.END)].strip(), ""
            return body.strip() or None, None
        reasoning, content = body[:end].strip(), body[end + len(self.END):].lstrip("\r\n")
        if not final:
            return reasoning, content
        return reasoning or None, content or None


def make_parser(name: str, tokenizer: Any = None):
    """The parser `name`; its markers count as special tokens when the tokenizer has them as such."""
    cls = {"deepseek_r1": DeepSeekR1Parser}[name]
    specials = set(getattr(tokenizer, "all_special_ids", ()))

    def special(marker: str) -> bool:
        ids = tokenizer.encode(marker, add_special_tokens=False)
        return len(ids) == 1 and ids[0] in specials
    return cls(tokenizer is not None and (special(cls.START) or special(cls.END)))


def applies(req: Any, parser: Any) -> bool:
    """Whether a request's reply is split: a chat request written freely (no forced call, no JSON grammar)."""
    if parser is None or not hasattr(req, "messages"):
        return False
    if getattr(req, "tool_choice", None) not in (None, "none", "auto"):
        return False
    fmt = getattr(req, "response_format", None)
    return fmt is None or fmt.type == "text"


class ReasoningStream:
    """One choice's reply as it arrives: each delta's new reasoning and new content, so that the deltas joined
    are split() of the whole reply, and what has gone out after each delta is split(text so far, final=False).
    Each delta costs what it brings, not the text so far: only what is not yet sure (whitespace that strip()
    may drop, a tail that may start </think>) is kept and looked at again."""

    def __init__(self, parser: DeepSeekR1Parser, prompt: str):
        self.parser, self.thinking = parser, parser.opens(prompt)
        self.part = "undecided"  # then "content" (thinking never opened), "reasoning", then "answer"
        self.held = ""           # undecided: the text so far; reasoning: its tail not yet sent
        self.started = False     # reasoning: some went out (its leading whitespace is dropped before that)
        self.started_answer = False  # answer: likewise, for the newlines that open it

    def whole(self, text: str) -> tuple[str | None, str | None]:
        return self.parser.split(text, self.thinking)

    def feed(self, new_text: str, final: bool) -> tuple[str, str]:
        start, end = self.parser.START, self.parser.END
        if self.part == "undecided":
            text, self.held = self.held + new_text, ""
            body = text.lstrip()
            if body.startswith(start):
                self.part, new_text = "reasoning", body[len(start):]
            elif not final and start.startswith(body):  # may yet open with <think>
                self.held = text
                return "", ""
            else:
                self.part, new_text = ("reasoning" if self.thinking else "content"), text
        if self.part == "content":
            return "", new_text
        if self.part == "answer":
            return "", self._answer(new_text)
        text, self.held = self.held + new_text, ""
        if not self.started:
            text = text.lstrip()
        at = text.find(end)
        if at >= 0:
            self.part = "answer"
            return text[:at].rstrip(), self._answer(text[at + len(end):])
        if final:
            return text.rstrip(), ""
        sure = text[:len(text) - _held_back(text, end)].rstrip()
        self.held, self.started = text[len(sure):], self.started or bool(sure)
        return sure, ""

    def _answer(self, text: str) -> str:
        """The answer's part of text: the newlines that open the answer are dropped."""
        if not self.started_answer:
            text = text.lstrip("\r\n")
            self.started_answer = bool(text)
        return text
