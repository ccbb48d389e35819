"""Server-sent events: framing, and a response that always notices a client that went away."""
from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_data(payload: str) -> str:
    """One event; payload is a single line of JSON (json.dumps escapes newlines)."""
    return f"data: {payload}\n\n"


class EventStreamResponse(StreamingResponse):
    """text/event-stream whose body iterator is cancelled and closed the moment the client disconnects.

    Starlette only listens for http.disconnect under ASGI spec < 2.4; this does it always, and closes the
    iterator either way so its `finally` (which aborts the engine request) runs at once, not at GC.
    """

    def __init__(self, events: AsyncIterator[str]):
        super().__init__(events, media_type="text/event-stream", headers=SSE_HEADERS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:
                        pass  # the client went away mid-send
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()
