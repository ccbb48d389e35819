"""ServerState: one app's engine, settings, metrics and lifecycle (loading -> ready -> draining/dead).

Lives on app.state.server (one per create_app call), never at module level. The model loads on a
background thread so /health answers 503 while it does.
"""
from __future__ import annotations

import enum
import gc
import logging
import threading
from pathlib import Path
from typing import Any

from model.fetch import DEFAULT_MODEL
from server.config import ServerConfig
from server.http_errors import TRANSIENT_S, ApiError
from server.metrics import ServerMetrics

logger = logging.getLogger("gqa_serve.server")


class Phase(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"      # the model did not load
    DRAINING = "draining"  # SIGTERM: finishing running requests, admitting none
    STOPPED = "stopped"


class ServerState:
    def __init__(self, engine: Any, config: ServerConfig):
        self.engine = engine
        self.config = config
        self.phase = Phase.LOADING
        self.load_error: str | None = None
        self.loaded = threading.Event()   # set when loading ends, successfully or not
        self.metrics = ServerMetrics(self.stats)
        self._thread: threading.Thread | None = None
        self._froze_gc = False
        self._sampling_defaults: dict[str, float] | None = None
        self._tool_parser: tuple[Any] | None = None  # (parser or None,) once chosen
        self._reasoning_parser: tuple[Any] | None = None

    # lifecycle -----------------------------------------------------------------------------------------
    def start_loading(self) -> None:
        self._thread = threading.Thread(target=self._load, name="gqa-model-load", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        try:
            self.engine.start()
        except BaseException as exc:  # noqa: BLE001 - report any load failure as a one-line reason
            self.load_error = f"{type(exc).__name__}: {exc}".splitlines()[0]
            self.phase = Phase.FAILED
            logger.error("model failed to load: %s", self.load_error)
        else:
            if self.config.gc_freeze:
                self._freeze_gc()
            if self.phase is Phase.LOADING:
                self.phase = Phase.READY
            log_startup(self)
        finally:
            self.loaded.set()

    def begin_drain(self) -> None:
        if self.phase in (Phase.READY, Phase.LOADING):
            self.phase = Phase.DRAINING
        if self.loaded.is_set() and self.load_error is None:
            self.engine.begin_drain()

    def shutdown(self) -> None:
        self.phase = Phase.STOPPED
        if self.loaded.is_set() and self.load_error is None:
            self.engine.shutdown()
        if self._froze_gc:
            gc.unfreeze()
            self._froze_gc = False

    def _freeze_gc(self) -> None:
        """Move everything alive after start-up (imports, the model, the graphs' Python objects: about 200k
        objects) out of the cyclic collector's reach, as vLLM's engine does. A full collection otherwise walks
        them all: 119 ms on a 2-core EPYC, every few thousand requests, with every stream stalled.
        Process-wide: meant for the one server a process runs (tests that run several share it)."""
        gc.collect()
        gc.freeze()
        self._froze_gc = True
        logger.info("gc: froze %d objects alive after start-up", gc.get_freeze_count())

    @property
    def alive(self) -> bool:
        return self.phase is Phase.READY and bool(self.engine.is_alive) and self.stall() is None

    def stall(self) -> str | None:
        """Why the engine looks hung (a step that never returns: the thread or child is alive, so is_alive
        cannot tell), or None. A hung engine would otherwise take requests that then wait forever."""
        limit = self.config.engine_stall_timeout_s
        stalled = self.engine.stalled_for() if limit and self.phase is Phase.READY else 0.0
        if stalled <= limit:
            return None
        return (f"engine: no step has finished for {stalled:.0f} s with requests in flight "
                f"(engine_stall_timeout_s {limit:g}): a hung step; restart the server if it persists")

    def require_ready(self) -> None:
        """Raise the 503 that fits the phase; requests pass only when the model is loaded and alive."""
        if self.phase is Phase.READY:
            if not self.engine.is_alive:
                raise ApiError("unavailable", "engine: the generation loop has stopped; the server must restart")
            stall = self.stall()
            if stall is None:
                return
            raise ApiError("unavailable", stall, retry_after_s=TRANSIENT_S)
        if self.phase is Phase.LOADING:
            raise ApiError("unavailable", "model: still loading, retry shortly", retry_after_s=TRANSIENT_S)
        if self.phase is Phase.FAILED:
            raise ApiError("unavailable", f"model: failed to load ({self.load_error})")
        raise ApiError("unavailable", "server: shutting down, not admitting new requests", retry_after_s=TRANSIENT_S)

    # facts -----------------------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        if self.config.served_model_name:
            return self.config.served_model_name
        model = self.engine.config.model
        return Path(model).name if model else DEFAULT_MODEL

    @property
    def model_path(self) -> str | None:
        """The model directory served: the configured one, or the default model's converted directory."""
        return self.engine.config.model or getattr(self.engine, "model_dir", None)

    @property
    def max_model_len(self) -> int:
        return int(self.engine.max_model_len)

    @property
    def longest_sequence(self) -> int:
        """The most tokens (prompt + new) one request can hold: max_model_len, or the whole KV cache when
        that is smaller (start-up warns then); /info's max_total_tokens, and the room a default fills."""
        return min(self.max_model_len, int(self.engine.kv_capacity.tokens))

    def context_limit(self) -> str:
        """What sets longest_sequence, for error messages."""
        tokens = int(self.engine.kv_capacity.tokens)
        if tokens < self.max_model_len:
            return f"the whole KV cache holds {tokens:,} (kv_cache_memory; max_model_len is {self.max_model_len:,})"
        return f"max_model_len is {self.max_model_len:,}"

    @property
    def sampling_defaults(self) -> dict[str, float]:
        """OpenAI requests' defaults for unset sampling fields, from the model's generation_config.json
        (model/generation_defaults.py), read once the model directory is known; empty with
        generation_config = none."""
        if self._sampling_defaults is None:
            model_dir = getattr(self.engine, "model_dir", None)
            if self.config.generation_config == "none" or model_dir is None:
                return {}
            from model.generation_defaults import sampling_defaults
            self._sampling_defaults = sampling_defaults(model_dir)
        return self._sampling_defaults

    @property
    def tool_parser(self) -> Any:
        """The parser of tool_choice "auto" (server/tool_parsers.py), or None when it is refused; chosen once
        the tokenizer (whose chat template may name it) is loaded."""
        if self._tool_parser is None:
            from server.tool_parsers import detect_parser, make_parser
            tokenizer = getattr(self.engine, "tokenizer", None)
            if tokenizer is None:
                return None
            name = self.config.tool_call_parser
            if name == "auto":
                name = detect_parser(getattr(tokenizer, "chat_template_source", None))
            self._tool_parser = (None if name in (None, "none") else make_parser(name),)
        return self._tool_parser[0]

    @property
    def reasoning_parser(self) -> Any:
        """The reasoning_parser (server/reasoning_parsers.py) or None; built once the tokenizer, which tells
        whether its <think> markers are special tokens, is loaded."""
        if self._reasoning_parser is None:
            tokenizer = getattr(self.engine, "tokenizer", None)
            if tokenizer is None:
                return None
            from server.reasoning_parsers import make_parser
            name = self.config.reasoning_parser
            self._reasoning_parser = (None if name == "none" else make_parser(name, tokenizer),)
        return self._reasoning_parser[0]

    @property
    def prompt_char_limit(self) -> int:
        return self.config.prompt_char_limit(self.max_model_len)

    def stats(self):
        if self.loaded.is_set() and self.load_error is None:
            try:
                return self.engine.stats()
            except Exception:  # noqa: BLE001 - a dead engine must not break /metrics
                return None
        return None


def resolved_setting(engine: Any, name: str) -> str:
    """The engine's resolved value ("float32", not "auto") when it exposes one."""
    runner = getattr(getattr(engine, "engine", None), "runner", None)
    value = getattr(engine, name, None) or getattr(runner, name, None) or getattr(engine.config, name)
    return str(value).removeprefix("torch.")


def log_startup(state: ServerState) -> None:
    engine = state.engine
    mc = engine.model_config
    cap = engine.kv_capacity
    if mc.num_kv_heads < mc.num_key_value_heads:
        conversion = f", pooled by {engine.config.kv_head_method}"
    elif mc.num_kv_heads > mc.num_key_value_heads:
        conversion = ", replicated"
    else:
        conversion = ""
    logger.info("model: %s | dtype %s | device %s | KV heads %d (checkpoint %d%s, query heads %d) | "
                "KV cache dtype %s | max_model_len %s", state.model_name, resolved_setting(engine, "dtype"),
                resolved_setting(engine, "device"), mc.num_kv_heads, mc.num_key_value_heads, conversion,
                mc.num_attention_heads, engine.config.kv_cache_dtype, f"{state.max_model_len:,}")
    logger.info("KV cache: %s tokens (%s blocks of %d), max concurrency at %s tokens/request: %.1fx",
                f"{cap.tokens:,}", f"{cap.num_blocks:,}", cap.block_size, f"{state.max_model_len:,}",
                cap.tokens / max(1, state.max_model_len))
    if state.sampling_defaults:
        logger.info("OpenAI requests' unset sampling fields default to the model's generation_config.json: %s "
                    "(generation_config = none: OpenAI's own)", state.sampling_defaults)
