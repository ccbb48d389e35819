"""One error type for the HTTP layer, rendered in the shape of the API family that was called.

TGI routes answer {"error": "...", "error_type": "..."} (validation errors are 422); OpenAI routes (/v1/...)
answer {"error": {"message", "type", "param", "code"}} (validation errors are 400). Every message names the
field at fault so a client can fix its request.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("gqa_serve.server")

# kind -> HTTP status (TGI family); OpenAI differs only for validation (400)
STATUS = {"validation": 422, "unauthorized": 401, "not_found": 404, "method_not_allowed": 405,
          "payload_too_large": 413, "unsupported_media_type": 415, "overloaded": 429, "generation": 500,
          "unavailable": 503}
OPENAI_TYPE = {"validation": "invalid_request_error", "unauthorized": "authentication_error",
               "not_found": "not_found_error", "method_not_allowed": "invalid_request_error",
               "payload_too_large": "invalid_request_error", "unsupported_media_type": "invalid_request_error",
               "overloaded": "rate_limit_error",
               "generation": "server_error", "unavailable": "service_unavailable_error"}
# Retry-After (seconds) on refusals that pass: a full queue drains in about a second of decoding; a model
# still loading, a draining or stalled server, a few more (TRANSIENT_S, given where raised). The openai SDK
# and huggingface_hub wait for it before they retry, rather than their own short backoff. A dead engine or
# a failed load sends none: retrying cannot help
OVERLOADED_RETRY_S, TRANSIENT_S = 1, 5
_HTTP_KIND = {400: "validation", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
              413: "payload_too_large", 415: "unsupported_media_type", 422: "validation", 429: "overloaded",
              503: "unavailable"}


class ApiError(Exception):
    """A request that cannot be served; `param` names the field at fault when there is one."""

    def __init__(self, kind: str, message: str, param: str | None = None, retry_after_s: int | None = None):
        super().__init__(message)
        self.kind = kind if kind in STATUS else "generation"
        self.message = message
        self.param = param
        self.retry_after_s = OVERLOADED_RETRY_S if kind == "overloaded" and retry_after_s is None else retry_after_s


def is_openai_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def error_status(err: ApiError, openai: bool) -> int:
    return 400 if (openai and err.kind == "validation") else STATUS[err.kind]


def error_body(err: ApiError, openai: bool) -> dict[str, Any]:
    if openai:
        return {"error": {"message": err.message, "type": OPENAI_TYPE[err.kind], "param": err.param,
                          "code": error_status(err, True)}}
    return {"error": err.message, "error_type": err.kind}


def error_json(err: ApiError, openai: bool) -> str:
    return json.dumps(error_body(err, openai), ensure_ascii=False)


def error_response(err: ApiError, path: str, headers: dict[str, str] | None = None) -> JSONResponse:
    openai = is_openai_path(path)
    if err.retry_after_s is not None:
        headers = {"Retry-After": str(err.retry_after_s), **(headers or {})}
    return JSONResponse(error_body(err, openai), status_code=error_status(err, openai), headers=headers)


def _loc_to_field(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    # drop pydantic's union-branch tags ("str", "list[int]", "function-after[...]") from the path
    parts = [p for p in parts if not (p.endswith("]") or p in ("str", "int", "float", "bool", "dict"))]
    return ".".join(parts) or "body"


def validation_error_from(exc: RequestValidationError) -> ApiError:
    errors = exc.errors()
    if not errors:
        return ApiError("validation", "body: invalid request", "body")
    first = errors[0]
    field = _loc_to_field(tuple(first.get("loc", ())))
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        return ApiError("validation", f"body: malformed JSON ({ctx.get('error', 'cannot parse')})", "body")
    if first.get("type") == "missing" and field == "body":
        return ApiError("validation", "body: a JSON object is required", "body")
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    others = {_loc_to_field(tuple(e.get("loc", ()))) for e in errors[1:]} - {field}
    more = f" (and errors in {', '.join(sorted(others)[:3])})" if others else ""
    return ApiError("validation", f"{field}: {message}{more}", field)


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc, request.url.path)

    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error_from(exc), request.url.path)

    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = _HTTP_KIND.get(exc.status_code, "generation" if exc.status_code >= 500 else "validation")
        detail = exc.detail if isinstance(exc.detail, str) else "invalid request"
        if exc.status_code == 400 and "parsing the body" in detail:
            detail = "body: cannot be parsed as JSON"
        err = ApiError(kind, detail, "body" if exc.status_code == 400 else None)
        resp = error_response(err, request.url.path, headers=getattr(exc, "headers", None))
        if exc.status_code > 400:  # a 400 is a validation error: the route's status for those (TGI: 422)
            resp.status_code = exc.status_code
        return resp

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        rid = getattr(request.state, "request_id", None)
        logger.exception("unhandled error on %s (request %s)", request.url.path, rid)
        # Starlette answers this one outside every middleware, the request id's included: set it here
        return error_response(ApiError("generation", f"internal error: {type(exc).__name__}"), request.url.path,
                              {"X-Request-Id": rid} if rid else None)

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)


def failure_error(out: Any) -> ApiError:
    """What a failed or aborted RequestOutput is answered with (a status, or a stream's last event). A failure
    that is the request's own (a grammar that turns out impossible to follow) is a 4xx naming its field."""
    if out.finish_reason == "abort":
        return ApiError("unavailable", "request aborted by the server (shutting down)", retry_after_s=TRANSIENT_S)
    if out.error_field is not None:
        return ApiError("validation", f"{out.error_field}: cannot be followed ({out.error})", out.error_field)
    return ApiError("generation", f"generation failed: {out.error or 'engine error'}")
