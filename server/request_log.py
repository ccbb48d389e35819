"""A request's ids, and the one log line it leaves when it ends.

Every HTTP request has an id (server/middleware.py: the client's X-Request-Id, else a uuid4 hex). The
OpenAI routes answer `<prefix>-<id>` as the response's `id`, as vLLM does, and each engine request of the
response (one per choice or prompt) is `<prefix>-<id>-<index>-<tag>`: the tag is a uuid4, so two requests
sent with one X-Request-Id (a proxy fanning out) never collide in the engine. One grep for the id finds the
access log, this line and any engine log about the request.

The line is logfmt, one per engine request, on the `gqa_serve.requests` logger (`log_requests = false`
turns it off):

    request tgi-4f1c...-0-9a2b... finish=eos_token prompt_tokens=12 output_tokens=30 queue_s=0.002
        ttft_s=0.041 e2e_s=0.512 tpot_ms=15.7
"""
from __future__ import annotations

import json
import logging
import uuid

from starlette.requests import Request

from server.middleware import request_id
from server.outputs import RequestOutput

log = logging.getLogger("gqa_serve.requests")


def response_id(request: Request, prefix: str) -> str:
    return f"{prefix}-{request_id(request.scope) or uuid.uuid4().hex}"


def engine_ids(response: str, count: int) -> list[str]:
    tag = uuid.uuid4().hex  # whole: requests sharing a client id must not collide (a collision would be a 500)
    return [f"{response}-{index}-{tag}" for index in range(count)]


def log_ended(engine_id: str, final: RequestOutput | None, *, prompt_tokens: int, output_tokens: int,
              queue_time: float | None, arrival: float, first_token_at: float | None, now: float) -> None:
    """`final`: the last output, or None when the request was aborted before it (client gone, sibling failed).
    prompt_tokens: as submitted (an engine that died answers its failure with no count)."""
    fields = [f"finish={final.finish_reason if final is not None else 'abort'}", f"prompt_tokens={prompt_tokens}",
              f"output_tokens={output_tokens}"]
    if queue_time is not None:
        fields.append(f"queue_s={queue_time:.3f}")
    if first_token_at is not None:
        fields.append(f"ttft_s={first_token_at - arrival:.3f}")
    fields.append(f"e2e_s={now - arrival:.3f}")
    if first_token_at is not None and output_tokens > 1:  # time per output token after the first
        fields.append(f"tpot_ms={1000 * (now - first_token_at) / (output_tokens - 1):.2f}")
    if final is not None and final.error:
        fields.append(f"error={json.dumps(final.error)}")  # quoted, as logfmt quotes a value with spaces
    level = logging.WARNING if final is not None and final.finish_reason == "error" else logging.INFO
    log.log(level, "request %s %s", engine_id, " ".join(fields))
