"""The gate in front of every route (bearer auth, drain refusal, a JSON body's content type and size limit),
the request id,
and the response counter.

A plain ASGI middleware (not BaseHTTPMiddleware) so `receive` keeps delivering http.disconnect to the
handlers behind it. The body is read here, up to max_payload_bytes, and replayed to the app: a body over the
limit (declared in Content-Length or found while reading) is refused with a 413. A refused body is read to its end
and dropped first, up to DRAIN_FACTOR times the limit (see `_discard_body`).
"""
from __future__ import annotations

import hmac
import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.http_errors import TRANSIENT_S, ApiError, error_response
from server.state import Phase, ServerState

OPEN_PATHS = frozenset({"/health", "/ping", "/metrics"})
REQUEST_ID_HEADER = b"x-request-id"
# a client's (or a proxy's) id is kept when it is 1-128 letters, digits and ._:/+@- (no quotes, spaces or
# "=", so it cannot break or forge a field of the logfmt request line); any other value is replaced, as
# Heroku's router and Rails do, rather than failing the request
_CLIENT_ID = re.compile(rb"[A-Za-z0-9._:/+@-]{1,128}")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# how much of a refused body is read and dropped before the answer, as a multiple of max_payload_bytes
DRAIN_FACTOR = 16


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None


def bearer_ok(scope: Scope, api_key: str) -> bool:
    raw = _header(scope, b"authorization") or b""
    scheme, _, token = raw.partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    return hmac.compare_digest(token.strip(), api_key.encode("utf-8"))


class GateMiddleware:
    def __init__(self, app: ASGIApp, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        config = self.state.config
        if config.api_key is not None and not bearer_ok(scope, config.api_key.get_secret_value()):
            err = ApiError("unauthorized", "authorization: a valid 'Authorization: Bearer <api key>' header "
                                           "is required", "authorization")
            await error_response(err, path, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
            return
        if self.state.phase in (Phase.DRAINING, Phase.STOPPED):
            err = ApiError("unavailable", "server: shutting down, not admitting new requests",
                           retry_after_s=TRANSIENT_S)
            await error_response(err, path, {"Connection": "close"})(scope, receive, send)
            return
        if scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        media = (_header(scope, b"content-type") or b"").split(b";")[0].strip().lower()
        if media != b"application/json":
            # every body here is JSON, and FastAPI reads one only under that type: a form-encoded one (curl -d
            # without -H) was a 422 about a dictionary
            sent = repr(media.decode("latin-1")) if media else "none sent"
            err = ApiError("unsupported_media_type", f"content-type: {sent}; send the JSON body with "
                           "'Content-Type: application/json' (TGI answers 415 too)", "content-type")
            await _discard_body(scope, receive, DRAIN_FACTOR * self.state.config.max_payload_bytes)
            await error_response(err, path, {"Connection": "close"})(scope, receive, send)
            return
        replay = await self._read_body(scope, receive, send, path)
        if replay is not None:
            await self.app(scope, replay, send)

    async def _read_body(self, scope: Scope, receive: Receive, send: Send, path: str) -> Receive | None:
        limit = self.state.config.max_payload_bytes
        too_large = ApiError("payload_too_large", f"body: larger than the limit of {limit:,} bytes "
                                                  "(max_payload_bytes)", "body")
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                size = -1
            if size < 0:
                err = ApiError("validation", "content-length: not a valid byte count", "content-length")
                await error_response(err, path, {"Connection": "close"})(scope, receive, send)
                return None
            if size > limit:
                if size <= DRAIN_FACTOR * limit:
                    await _discard_body(scope, receive, DRAIN_FACTOR * limit)
                await error_response(too_large, path, {"Connection": "close"})(scope, receive, send)
                return None
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                if message.get("more_body", False):
                    await _discard_body(scope, receive, DRAIN_FACTOR * limit - total)
                await error_response(too_large, path, {"Connection": "close"})(scope, receive, send)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay


async def _discard_body(scope: Scope, receive: Receive, budget: int) -> None:
    """Read the rest of a refused body and drop it, up to `budget` bytes. Why: a client still sending when the
    error comes (most send the headers, then the body) met a connection reset instead of the 4xx, because a
    socket closed with unread bytes is reset by the kernel, and a reset can overtake the answer. Past the
    budget the answer goes out anyway. A client that asked `Expect: 100-continue` has sent nothing yet and
    is answered at once (reading would invite the body)."""
    if (_header(scope, b"expect") or b"").lower() == b"100-continue":
        return
    while budget > 0:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def request_id(scope: Scope) -> str | None:
    """The id RequestIdMiddleware gave this request (None outside it: an app without the middleware)."""
    return scope.get("state", {}).get("request_id")


class RequestIdMiddleware:
    """Outermost: every request gets an id, the client's X-Request-Id when it sent a usable one, else a new
    uuid4 hex. The routes build their response and engine ids from it and the request log line names it, so
    one grep follows a request from the proxy through our logs; the response carries it back as X-Request-Id
    (as OpenAI's API and vLLM's --enable-request-id-headers do), errors and the gate's refusals included."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = _header(scope, REQUEST_ID_HEADER)
        rid = sent.decode("ascii") if sent is not None and _CLIENT_ID.fullmatch(sent) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != REQUEST_ID_HEADER]
                message = {**message, "headers": [*headers, (REQUEST_ID_HEADER, rid.encode("ascii"))]}
            await send(message)

        await self.app(scope, receive, send_with_id)


class ResponseCountMiddleware:
    """Outermost: counts every response by route and status (the gate's 401/413/503 included), so error rates
    can be read from /metrics. Routes are path templates, so the label set stays small."""

    def __init__(self, app: ASGIApp, state: ServerState, route_paths: frozenset[str]):
        self.app = app
        self.state = state
        self.route_paths = route_paths  # the app's own paths: the gate answers some before routing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = getattr(scope.get("route"), "path", None)  # set by the router when a route matched
                if route is None:
                    route = scope["path"] if scope["path"] in self.route_paths else "unmatched"
                self.state.metrics.http_responses.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
