"""The attention explorer over HTTP (issue 9): GET /explain (the page), GET /explain/model, POST
/explain/attention. Off by default: the app mounts create_explain_router only with --enable-explain and
create_explain_disabled_router otherwise, so /explain* then answers 404 with the flag to set.

The computation is model/explain.py's torch reference path, run in a worker thread; it never touches the
serving engine.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError
from starlette.concurrency import run_in_threadpool

from model.explain import LayerAttention, QueryWalkthrough
from model.explainer import AttentionExplainer, AttentionExplanation, ExplainError
from server.http_errors import ApiError, error_response
from server.schema_common import Text

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_FILES = {"explain.js": "text/javascript", "explain.css": "text/css"}
DISABLED_MESSAGE = "the attention explorer is disabled; start the server with --enable-explain"
DIGITS = 6  # decimals sent over the wire: enough for any plot, and it keeps a 256-token map small


class ExplainAttentionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # strict integers: pydantic's lax mode reads true as 1 (one KV head) and 2.0 as 2
    prompt: Text = Field(description="the text to explain; at most 256 tokens after tokenization")
    layers: list[StrictInt] = Field(default_factory=lambda: [0], description="decoder layers (0-based)")
    heads: list[StrictInt] | None = Field(default=None, description="query heads whose maps to return; all if null")
    num_kv_heads: StrictInt | None = Field(default=None, description="native (null) or a pooled/replicated count")
    query_index: StrictInt | None = Field(default=None, description="token to walk through; the last if null")
    add_special_tokens: bool = True
    include_weights: bool = Field(default=True, description="false: only tokens and the walkthrough "
                                                            "(the page sends it when a token is clicked)")


def create_explain_router(get_explainer: Callable[[], AttentionExplainer]) -> APIRouter:
    """Routes of the explorer; get_explainer is called per request (the app may build it lazily)."""
    router = APIRouter()

    @router.get("/explain", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "explain.html", media_type="text/html")

    @router.get("/explain/static/{name}", include_in_schema=False)
    async def static(name: str, request: Request):
        if name not in STATIC_FILES:
            return error_response(ApiError("not_found", f"no static file {name!r}"), request.url.path)
        return FileResponse(STATIC_DIR / name, media_type=STATIC_FILES[name])

    @router.get("/explain/model")
    async def model_info() -> JSONResponse:
        explainer = await run_in_threadpool(get_explainer)
        return JSONResponse(info_json(explainer))

    @router.post("/explain/attention")
    async def attention(request: Request) -> JSONResponse:
        try:
            body = ExplainAttentionRequest.model_validate(await _json_body(request))
        except ApiError as err:
            return error_response(err, request.url.path)
        except ValidationError as exc:
            return error_response(_validation_error(exc), request.url.path)
        try:
            content = await run_in_threadpool(lambda: _explain(get_explainer(), body))
        except ExplainError as exc:
            return error_response(ApiError("validation", str(exc), exc.field), request.url.path)
        return JSONResponse(content)

    return router


def create_explain_disabled_router() -> APIRouter:
    """What a server without --enable-explain answers on /explain*: 404 that says how to turn it on."""
    router = APIRouter()

    async def disabled(request: Request) -> JSONResponse:
        return error_response(ApiError("not_found", DISABLED_MESSAGE), request.url.path)

    for path in ("/explain", "/explain/{rest:path}"):
        router.add_api_route(path, disabled, methods=["GET", "POST"], include_in_schema=False)
    return router


async def _json_body(request: Request) -> object:
    raw = await request.body()
    try:
        return json.loads(raw) if raw else None
    except ValueError as exc:
        raise ApiError("validation", f"body: malformed JSON ({exc})", "body") from exc


def _validation_error(exc: ValidationError) -> ApiError:
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ())]
    field = ".".join(loc) or "body"
    if first.get("type") == "model_type":
        return ApiError("validation", "body: a JSON object is required", "body")
    if first.get("type") == "extra_forbidden":
        return ApiError("validation", f"{field}: unknown field (expected one of "
                                      f"{', '.join(ExplainAttentionRequest.model_fields)})", field)
    return ApiError("validation", f"{field}: {first.get('msg', 'invalid value')}", field)


def _explain(explainer: AttentionExplainer, body: ExplainAttentionRequest) -> dict:
    result = explainer.explain(body.prompt, layers=body.layers, heads=body.heads,
                               num_kv_heads=body.num_kv_heads, query_index=body.query_index,
                               add_special_tokens=body.add_special_tokens)
    return explanation_json(result, explainer, include_weights=body.include_weights)


def _floats(t: torch.Tensor) -> list:
    scale = 10.0 ** DIGITS
    return (t.detach().double().cpu() * scale).round().div(scale).tolist()


def info_json(explainer: AttentionExplainer) -> dict:
    return asdict(explainer.info())


def explanation_json(result: AttentionExplanation, explainer: AttentionExplainer,
                     include_weights: bool = True) -> dict:
    info = explainer.info()
    return {
        "model": info.model,
        "num_layers": info.num_layers,
        "num_heads": info.num_heads,
        "num_kv_heads": result.num_kv_heads,
        "native_num_kv_heads": info.native_num_kv_heads,
        "head_dim": result.head_dim,
        "scale": result.head_dim ** -0.5,
        "kv_groups": [{"kv_head": g.kv_head, "query_heads": list(g.query_heads)} for g in result.groups],
        "tokens": [{"index": t.index, "id": t.id, "text": t.text, "piece": t.piece} for t in result.tokens],
        "query_index": result.query_index,
        "layers": [_layer_json(layer, result, include_weights) for layer in result.layers],
    }


def _layer_json(layer: LayerAttention, result: AttentionExplanation, include_weights: bool) -> dict:
    kv_of = {h: g.kv_head for g in result.groups for h in g.query_heads}
    out: dict = {"layer": layer.layer}
    if include_weights:  # [T, T] per head, zero above the diagonal
        out["heads"] = [{"head": h, "kv_head": kv_of[h], "weights": _floats(w)}
                        for h, w in zip(layer.heads, layer.weights)]
    out["walkthrough"] = _walk_json(layer.walkthrough)
    return out


def _walk_json(walk: QueryWalkthrough) -> dict:
    return {
        "query_index": walk.query_index,
        "heads": [{"head": s.head, "kv_head": s.kv_head, "q": _floats(s.q), "scores": _floats(s.scores),
                   "weights": _floats(s.weights), "z": _floats(s.z)} for s in walk.heads],
        "concat": _floats(walk.concat),
        "output": _floats(walk.output),
    }
