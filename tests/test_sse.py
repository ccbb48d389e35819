"""EventStreamResponse: events already queued behind the one in hand go out in one write."""
from __future__ import annotations

import asyncio

from server.sse import EventStreamResponse


def body_writes(response: EventStreamResponse) -> list[bytes]:
    sent = []

    async def send(message):
        sent.append(message)
    asyncio.run(response.stream_response(send))
    assert sent[0]["type"] == "http.response.start" and sent[-1] == {
        "type": "http.response.body", "body": b"", "more_body": False}
    return [m["body"] for m in sent[1:-1]]


async def numbered(n: int):
    for i in range(n):
        yield f"data: {i}\n\n"


def test_held_while_more_are_ready_then_written_together():
    ready = iter([True, True, False, True, False])
    writes = body_writes(EventStreamResponse(numbered(5), more_ready=lambda: next(ready)))
    assert writes == [b"data: 0\n\ndata: 1\n\ndata: 2\n\n", b"data: 3\n\ndata: 4\n\n"]


def test_a_stream_that_keeps_up_writes_each_event():
    assert body_writes(EventStreamResponse(numbered(3))) == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]
    assert len(body_writes(EventStreamResponse(numbered(3), more_ready=lambda: False))) == 3


def test_events_held_at_the_end_are_flushed():
    writes = body_writes(EventStreamResponse(numbered(4), more_ready=lambda: True))
    assert writes == [b"data: 0\n\ndata: 1\n\ndata: 2\n\ndata: 3\n\n"]


def test_an_event_is_one_line_to_every_line_splitter():
    """U+2028, U+2029 and U+0085 are line breaks to Python's str.splitlines (httpx's iter_lines) and JSON
    leaves them raw in a string: a generated U+2028 cut its event in two, whose JSON then failed to parse."""
    import json

    from server.sse import sse_data
    for text in ("a\u2028b\u2029c\u0085d \u00e9\u2603", "a\u2028b", "b\u2029c", "c\u0085d"):  # each alone too
        event = sse_data(json.dumps({"text": text}, ensure_ascii=False))
        lines = event.splitlines()
        assert lines[0].startswith("data: ") and lines[1:] == [""], text
        assert json.loads(lines[0][len("data: "):]) == {"text": text}
    assert "\u00e9\u2603" in sse_data(json.dumps({"text": "\u00e9\u2603"}, ensure_ascii=False))  # others stay


def scripted_client(messages: list[dict]):
    """(receive, send, sent) of an ASGI client: receive() gives `messages` in order, then waits forever (a
    client that stays); send() records into `sent` and is a checkpoint, as a server's send may be (uvicorn's is
    one only while the socket's buffer is full; hypercorn's always)."""
    sent, pending = [], list(messages)

    async def receive():
        if pending:
            return pending.pop(0)
        await asyncio.Event().wait()

    async def send(message):
        await asyncio.sleep(0)
        sent.append(message)
    return receive, send, sent


def _serve(response: EventStreamResponse, messages: list[dict]) -> list[dict]:
    """Run the response as the ASGI app it is, against scripted_client(messages)."""
    receive, send, sent = scripted_client(messages)
    asyncio.run(response({"type": "http"}, receive, send))
    return sent


def test_a_body_closed_before_its_first_step_still_aborts_through_on_abandoned():
    """The client is gone before the first event: the body iterator is closed unstarted, so its `finally`
    (where a route's stream aborts its engine request) never runs, and the request ran to its end;
    on_abandoned is called instead."""
    ran, abandoned = [], []

    async def body():
        try:
            yield "data: 0\n\n"
        finally:
            ran.append("finally")
    response = EventStreamResponse(body(), on_abandoned=lambda: abandoned.append(True))
    _serve(response, [{"type": "http.disconnect"}])
    assert ran == [] and abandoned == [True]


def test_a_stream_sent_to_its_end_is_not_abandoned():
    abandoned = []
    sent = _serve(EventStreamResponse(numbered(3), on_abandoned=lambda: abandoned.append(True)), [])
    assert abandoned == [] and sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
