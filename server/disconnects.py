"""A client that goes away: its engine requests are aborted at once, which frees their KV blocks.

Streams abort their own request when closed (server/generation.py's `_tracked`); what is here covers the rest:
a handler that awaits a whole result (`unless_disconnected`), and a streamed response whose body was closed
before its first step, which runs no `finally` (`aborter`, EventStreamResponse's on_abandoned).
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from fastapi import Request

from server.state import ServerState

T = TypeVar("T")


def aborter(state: ServerState, request_ids: list[str]) -> Callable[[], None]:
    """EventStreamResponse's on_abandoned for these requests: abort them (a no-op for those already ended)."""
    def abort() -> None:
        for request_id in request_ids:
            state.engine.abort(request_id)
    return abort


class ClientDisconnected(Exception):
    pass


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run `work` but cancel it (aborting its engine requests) as soon as the client goes away.

    Starlette cancels streaming responses on disconnect but not ordinary handlers, hence this race.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise ClientDisconnected()
