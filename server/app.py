"""create_app(engine, config): the FastAPI application around one engine.

Nothing here is module-level state: every app gets its own ServerState (engine, settings, metrics
registry, lifecycle). At startup the model loads on a background thread, so /health answers (503) at once;
at shutdown the engine is stopped. Middleware order, outermost first: the request id (X-Request-Id), the
response counter (/metrics' route x status), CORS (only when origins are configured), the gate (auth, drain
refusal, body size), then the routes.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from server.api_ops import ops_router, package_version
from server.api_openai import openai_router
from server.api_responses import responses_router
from server.api_tgi import tgi_router
from server.config import ServerConfig
from server.explain_api import create_explain_disabled_router, create_explain_router
from server.http_errors import install_error_handlers
from server.middleware import GateMiddleware, RequestIdMiddleware, ResponseCountMiddleware
from server.state import ServerState

logger = logging.getLogger("gqa_serve.server")


def create_app(engine: Any, config: ServerConfig | None = None) -> FastAPI:
    """`engine` is an AsyncEngine (or anything with its interface); it is started by the app's lifespan."""
    state = ServerState(engine, config or ServerConfig())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.start_loading()
        stats_task = asyncio.ensure_future(log_stats_periodically(state))
        try:
            yield
        finally:
            stats_task.cancel()
            await asyncio.gather(stats_task, return_exceptions=True)
            await asyncio.to_thread(state.loaded.wait, 60.0)
            await asyncio.to_thread(state.shutdown)

    app = FastAPI(title="gqa-serve", version=package_version(), lifespan=lifespan,
                  description="LLaMA-family inference server: TGI- and OpenAI-compatible APIs.")
    app.state.server = state
    install_error_handlers(app)
    routers = [ops_router(), tgi_router(), openai_router(), responses_router(), explain_router(state)]
    for router in routers:
        app.include_router(router)
    app.add_middleware(GateMiddleware, state=state)
    if state.config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(state.config.cors_origins),
                           allow_methods=["GET", "POST", "OPTIONS"],
                           # any request header from an allowed origin, as vLLM's default: the openai JS SDK
                           # sends X-Stainless-* headers, whose preflight a fixed list refused
                           allow_headers=["*"],
                           expose_headers=["X-Request-Id"])
    app.add_middleware(ResponseCountMiddleware, state=state,
                       route_paths=frozenset(route.path for router in routers for route in router.routes))
    app.add_middleware(RequestIdMiddleware)
    return app


def explain_router(state: ServerState):
    """The attention explorer when enabled (built on first use, from the served model's directory)."""
    if not state.config.enable_explain:
        return create_explain_disabled_router()
    lock, built = threading.Lock(), []

    def get_explainer():
        state.require_ready()  # the explainer reads the served model's directory: 503 until it is loaded
        with lock:
            if not built:
                from model.explainer import AttentionExplainer
                engine = state.engine.config
                built.append(AttentionExplainer(state.engine.model_dir, tokenizer=state.engine.tokenizer,
                                                kv_head_method=engine.kv_head_method,
                                                calibration_text=engine.kv_calibration_text,
                                                calibration_tokens=engine.kv_calibration_tokens))
            return built[0]

    return create_explain_router(get_explainer)


def stats_line(s: Any, previous: Any, elapsed: float) -> str:
    prompt_rate = (s.prompt_tokens_total - previous.prompt_tokens_total) / elapsed if previous else 0.0
    gen_rate = (s.generation_tokens_total - previous.generation_tokens_total) / elapsed if previous else 0.0
    line = (f"stats: prompt {prompt_rate:,.1f} tok/s, generation {gen_rate:,.1f} tok/s | running "
            f"{s.num_running}, waiting {s.num_waiting} | KV cache {100 * s.kv_cache_usage:.1f}% "
            f"({s.num_total_blocks - s.num_free_blocks:,}/{s.num_total_blocks:,} blocks) | preemptions "
            f"{s.num_preemptions_total}")
    queries = s.prefix_cache_queries_total - (previous.prefix_cache_queries_total if previous else 0)
    if queries:
        hits = s.prefix_cache_hits_total - (previous.prefix_cache_hits_total if previous else 0)
        line += f" | prefix cache hits {100 * hits / queries:.1f}%"
    drafted = s.draft_tokens - (previous.draft_tokens if previous else 0)
    if drafted:  # speculative decoding's acceptance over the interval, as vLLM logs it
        kept = s.accepted_draft_tokens - (previous.accepted_draft_tokens if previous else 0)
        line += f" | drafts kept {100 * kept / drafted:.1f}% ({kept:,}/{drafted:,})"
    return line


async def log_stats_periodically(state: ServerState) -> None:
    interval = state.config.stats_log_interval_s
    if interval <= 0:
        return
    previous, then = None, time.monotonic()
    while True:
        await asyncio.sleep(interval)
        stats = state.stats()
        if stats is None:
            continue
        now = time.monotonic()
        busy = stats.num_running or stats.num_waiting or previous is None or \
            stats.generation_tokens_total != previous.generation_tokens_total
        if busy:  # an idle server stays quiet
            logger.info(stats_line(stats, previous, now - then))
        previous, then = stats, now
