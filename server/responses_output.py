"""The output items of a /v1/responses reply (server/api_responses.py), and the stream events that build them."""
from __future__ import annotations

import uuid
from typing import Any

from server.schemas_openai_out import ChatDelta, ChatMessageOut, ChatTokenLogprob, ToolCall
from server.schemas_responses import OutputFunctionCall, OutputItem, OutputMessage, OutputReasoning, OutputText, \
    ReasoningText


class OutputItems:
    """A reply's output items, built from what ChoiceReply gives (each streamed delta, or the whole message
    at once): reasoning, then the message, then the calls, each item opened as its first text comes. `add`
    and `close` return the stream's events for what they changed (the non-streaming route drops them).
    Logprobs wait for the next text of the message: joined, the deltas' logprobs are the message's."""

    def __init__(self) -> None:
        self.items: list[OutputItem] = []  # closed, in output order
        self.open_kind: str | None = None  # the item being written: "reasoning" or "message"
        self.open_id, self.open_text = "", []
        self.message_logprobs: list[ChatTokenLogprob] = []
        self.unsent_logprobs: list[ChatTokenLogprob] = []
        self.reasoning_text = ""  # for usage's reasoning_tokens

    def add(self, reply: ChatDelta | ChatMessageOut | None, logprobs: list[ChatTokenLogprob]) -> list[dict]:
        self.unsent_logprobs += logprobs
        if reply is None:
            return []
        events = self._write("reasoning", reply.reasoning_content) if reply.reasoning_content else []
        if reply.content:
            events += self._write("message", reply.content)
        for call in reply.tool_calls or []:
            events += self._close("completed") + self._call(call)
        return events

    def close(self, reason: str | None) -> list[dict]:
        status = "incomplete" if reason == "length" else "completed"
        if not self.items and self.open_kind is None:  # nothing written: still a message, empty, as OpenAI's
            return self._open("message") + self._close(status)
        return self._close(status)

    def fail(self) -> list[dict]:
        """The reply failed: the item being written is closed as incomplete, so response.failed carries it."""
        return self._close("incomplete")

    def _ids(self) -> dict[str, Any]:
        return {"item_id": self.open_id, "output_index": len(self.items), "content_index": 0}

    def _write(self, kind: str, text: str) -> list[dict]:
        events = [] if self.open_kind == kind else self._close("completed") + self._open(kind)
        self.open_text.append(text)
        if kind == "reasoning":
            self.reasoning_text += text
            return events + [{"type": "response.reasoning_text.delta", **self._ids(), "delta": text}]
        return events + [self._text_delta(text)]

    def _text_delta(self, text: str) -> dict:
        sent, self.unsent_logprobs = self.unsent_logprobs, []
        self.message_logprobs += sent
        return {"type": "response.output_text.delta", **self._ids(), "delta": text,
                "logprobs": [lp.model_dump() for lp in sent]}

    def _open(self, kind: str) -> list[dict]:
        self.open_kind, self.open_text = kind, []
        if kind == "reasoning":
            self.open_id = f"rs_{uuid.uuid4().hex}"
            item, part = OutputReasoning(id=self.open_id, content=[], status="in_progress"), ReasoningText(text="")
        else:
            self.open_id = f"msg_{uuid.uuid4().hex}"
            item, part = OutputMessage(id=self.open_id, status="in_progress", content=[]), OutputText(text="")
        return [{"type": "response.output_item.added", "output_index": len(self.items), "item": item.model_dump()},
                {"type": "response.content_part.added", **self._ids(), "part": part.model_dump()}]

    def _close(self, status: str) -> list[dict]:
        if self.open_kind is None:
            return []
        # logprobs of tokens that brought no text (the end-of-sequence token) go out before the end
        events = [self._text_delta("")] if self.open_kind == "message" and self.unsent_logprobs else []
        text, ids = "".join(self.open_text), self._ids()
        if self.open_kind == "reasoning":
            part: ReasoningText | OutputText = ReasoningText(text=text)
            item: OutputItem = OutputReasoning(id=self.open_id, content=[part], status=status)
            done = {"type": "response.reasoning_text.done", **ids, "text": text}
        else:
            part = OutputText(text=text, logprobs=self.message_logprobs)
            item = OutputMessage(id=self.open_id, status=status, content=[part])
            done = {"type": "response.output_text.done", **ids, "text": text,
                    "logprobs": [lp.model_dump() for lp in self.message_logprobs]}
        self.items.append(item)
        self.open_kind = None
        return events + [done, {"type": "response.content_part.done", **ids, "part": part.model_dump()},
                         {"type": "response.output_item.done", "output_index": ids["output_index"],
                          "item": item.model_dump()}]

    def _call(self, call: ToolCall) -> list[dict]:
        arguments, index = call.function.arguments, len(self.items)
        added = OutputFunctionCall(id=f"fc_{uuid.uuid4().hex}", call_id=call.id, name=call.function.name,
                                   arguments="", status="in_progress")
        done = added.model_copy(update={"arguments": arguments, "status": "completed"})
        self.items.append(done)
        ids = {"item_id": added.id, "output_index": index}
        return [{"type": "response.output_item.added", "output_index": index, "item": added.model_dump()},
                {"type": "response.function_call_arguments.delta", **ids, "delta": arguments},
                {"type": "response.function_call_arguments.done", **ids, "arguments": arguments},
                {"type": "response.output_item.done", "output_index": index, "item": done.model_dump()}]
