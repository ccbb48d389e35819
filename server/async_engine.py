"""AsyncEngine: the LLMEngine on its own daemon thread, with one async stream per request.

The asyncio side only enqueues commands (add, abort) and reads streams; the engine thread owns every piece
of engine state, applies commands between steps (so an abort frees blocks before the next step) and hands
each step's RequestOutputs to their streams with one loop.call_soon_threadsafe per event loop (not one per
output: each call takes a lock and writes the loop's wake-up pipe, which at batch 64 cost the engine thread
~0.8 ms per step, measured on CPU). The event loop never waits on a step.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import weakref
from dataclasses import dataclass

from server.engine import LLMEngine
from server.engine_config import EngineConfig
from server.outputs import EngineDeadError, OverloadedError, RequestOutput
from server.sampling_params import SamplingParams
from server.sequence import Sequence

log = logging.getLogger(__name__)
MAX_FAILED_STEPS_IN_A_ROW = 3  # beyond this a failing step is the engine's fault, not a request's


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_free_blocks: int
    num_total_blocks: int
    num_preemptions_total: int
    prompt_tokens_total: int
    generation_tokens_total: int
    admission_rejections_total: int
    num_steps: int
    decode_graph_steps: int = 0   # steps that replayed a decode graph (the rest of num_steps: below, or eager)
    prefill_graph_steps: int = 0  # steps with prompt tokens that replayed a prefill graph
    prefix_cache_queries_total: int = 0  # tokens of admissions that looked in the prefix cache
    prefix_cache_hits_total: int = 0     # of those, tokens whose K/V were found there
    overlapped_steps: int = 0            # steps launched while the previous one was in flight
    deferred_sampling_steps: int = 0     # of those, sampled once the previous one's tokens were appended
    draft_tokens: int = 0                # speculative tokens verified (server/speculative.py)
    accepted_draft_tokens: int = 0       # of those, kept
    num_drafts: int = 0                  # times a sequence fed drafts
    accepted_by_position: tuple[int, ...] = ()  # times draft j + 1 was kept (up to the 16th)
    step_gaps: tuple = ()  # StepGaps.snapshot(): each kind's bucket counts and sum (server/step_gaps.py)


def engine_stats(e: LLMEngine) -> EngineStats:
    c, a = e.counters, e.allocator
    graphs = [getattr(e.runner, name, None) for name in ("graphs", "prefill_graphs")]
    replays = [sum(g.replays.values()) if g is not None else 0 for g in graphs]
    return EngineStats(e.scheduler.num_running, e.scheduler.num_waiting, a.usage, a.num_free_blocks,
                       a.num_blocks, e.scheduler.num_preemptions_total, c.prompt_tokens_total,
                       c.generation_tokens_total, c.admission_rejections_total, c.num_steps, *replays,
                       e.scheduler.prefix_cache_queries_total, e.scheduler.prefix_cache_hits_total,
                       c.overlapped_steps, c.deferred_sampling_steps, c.draft_tokens, c.accepted_draft_tokens,
                       c.num_drafts, tuple(c.accepted_by_position[:max(e.config.num_speculative_tokens,
                                                                            e.config.num_prediction_tokens)]),
                       c.step_gaps.snapshot())


class RequestStream:
    """`async for out in stream` yields the request's RequestOutput deltas; ends after the finished one."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self._loop = loop
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.finished = False

    def put(self, out: RequestOutput) -> None:  # on the event loop thread
        self._queue.put_nowait(out)

    def ready(self) -> bool:
        """An output is waiting: the next __anext__ returns at once."""
        return not self._queue.empty()

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        out = await self._queue.get()
        self.finished = out.finished
        return out


class AsyncEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.engine: LLMEngine | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, RequestStream] = {}  # touched only on the event loop thread
        self._progress_time = time.monotonic()  # the last step's end, or when requests arrived at an idle engine
        # the same streams until their readers drop them (a finished one may still hold unread outputs)
        self._readable: weakref.WeakValueDictionary[str, RequestStream] = weakref.WeakValueDictionary()
        self._pending_adds = 0                        # adds enqueued, not yet in the scheduler
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._draining = False
        self._dead: str | None = None

    # ---- lifecycle ---------------------------------------------------------------------------------
    def start(self, *, runner=None, tokenizer=None) -> None:
        """Load the model and tokenizer (blocking) and start the loop thread; idempotent."""
        with self._lock:
            if self._thread is not None:
                return
            self.engine = LLMEngine(self.config, runner=runner, tokenizer=tokenizer)
            # index the vocabulary for grammars now: it holds the GIL (0.4 s for SmolLM2's 49k tokens), and at
            # the first constrained request it would stall every stream
            self.engine.grammars.warm()
            self.tokenizer = self.engine.tokenizer
            self.model_config = self.engine.model_config
            self.kv_capacity = self.engine.kv_capacity
            self.max_model_len = self.engine.max_model_len
            self.model_dir = self.engine.model_dir
            self.dtype = self.engine.runner.dtype
            self.device = self.engine.runner.device
            self._thread = threading.Thread(target=self._run, name="gqa-engine", daemon=True)
            self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def begin_drain(self) -> None:
        self._draining = True

    async def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats()
            if s.num_running == 0 and s.num_waiting == 0 and self._pending_adds == 0:
                return True
            if time.monotonic() >= deadline or not self.is_alive:
                return False
            await asyncio.sleep(0.01)

    # ---- requests (event loop thread) --------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> RequestStream:
        if not self.is_alive:
            raise EngineDeadError(f"the engine is not running{': ' + self._dead if self._dead else ''}")
        if self._draining:
            raise OverloadedError("the server is draining: no new requests")
        if request_id in self._streams:
            raise ValueError(f"duplicate request_id {request_id!r}")
        self._admit(prompt_token_ids, params)
        if not self._streams:  # idle until now: its silence so far was not a stall
            self._progress_time = time.monotonic()
        stream = RequestStream(request_id, asyncio.get_running_loop())
        self._streams[request_id] = stream
        self._readable[request_id] = stream
        with self._lock:
            self._pending_adds += 1
        self._enqueue_add(request_id, list(prompt_token_ids), params, stream)
        return stream

    def _admit(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise AdmissionError (never fits) or OverloadedError (the waiting queue is full)."""
        engine = self.engine
        engine.check_admission(prompt_token_ids, params)
        if engine.scheduler.num_waiting + self._pending_adds >= self.config.max_waiting_requests:
            engine.counters.admission_rejections_total += 1
            raise OverloadedError(f"{self.config.max_waiting_requests} requests are already waiting; retry later")

    def _enqueue_add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                     stream: RequestStream) -> None:
        self._commands.put(("add", request_id, prompt_token_ids, params, stream))
        self._wake.set()

    def outputs_ready(self, request_ids: list[str]) -> bool:
        """On the event loop thread: whether any of these requests has outputs waiting in its stream."""
        streams = self._readable
        return any(stream.ready() for stream in map(streams.get, request_ids) if stream is not None)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    def stalled_for(self) -> float:
        """On the event loop thread: seconds without a finished step while requests are in flight (0 if none)."""
        return time.monotonic() - self._progress_time if self._streams else 0.0

    def abort_all(self) -> int:
        """On the event loop thread: abort every request in flight (each stream ends with finish_reason
        "abort", which the routes answer as 503 or an error event); returns how many."""
        request_ids = list(self._streams)
        for request_id in request_ids:
            self.abort(request_id)
        return len(request_ids)

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 0.0, 0, 0, 0, 0, 0, 0, 0) if self.engine is None else engine_stats(self.engine)

    # ---- engine thread -----------------------------------------------------------------------------
    def _deliver(self, stream: RequestStream, out: RequestOutput) -> None:
        self._deliver_all([(stream, out)])

    def _deliver_all(self, deliveries: list[tuple[RequestStream, RequestOutput]]) -> None:
        """Hand outputs to their streams: one callback per event loop, in order."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, RequestOutput]]] = {}
        for stream, out in deliveries:
            by_loop.setdefault(stream._loop, []).append((stream, out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(self._put_all, items)
            except RuntimeError:  # the client's event loop is closed: nobody is listening
                pass

    def _put_all(self, items: list[tuple[RequestStream, RequestOutput]]) -> None:  # on the event loop thread
        for stream, out in items:
            stream.put(out)
            if out.finished:
                self._streams.pop(out.request_id, None)

    def _apply_commands(self, targets: dict[str, RequestStream]) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, rid, tokens, params, stream = cmd
                with self._lock:
                    self._pending_adds -= 1
                try:
                    self.engine.add_request(rid, tokens, params, queue_bound=False)  # admitted by _admit
                    targets[rid] = stream
                except Exception as exc:  # noqa: BLE001 - refused between the check and the queue
                    self._deliver(stream, RequestOutput(rid, [], "", True, "error", error=str(exc)))
            else:
                out = self.engine.abort(cmd[1])
                stream = targets.pop(cmd[1], None)
                if out is not None and stream is not None:
                    self._deliver(stream, out)

    def _run(self) -> None:
        targets: dict[str, RequestStream] = {}  # the engine thread's view of the streams
        try:
            while not self._stop:
                self._apply_commands(targets)
                if not self.engine.has_unfinished():
                    self._wake.wait(timeout=0.1)
                    self._wake.clear()
                    continue
                outputs = self.engine.step()
                self._progress_time = time.monotonic()
                if self.engine.counters.failed_steps_in_a_row >= MAX_FAILED_STEPS_IN_A_ROW:
                    # dead before these errors reach clients, so a retry gets EngineDeadError
                    self._dead = f"{MAX_FAILED_STEPS_IN_A_ROW} engine steps failed in a row"
                deliveries = []
                for out in outputs:
                    stream = targets.pop(out.request_id) if out.finished else targets.get(out.request_id)
                    if stream is not None:
                        deliveries.append((stream, out))
                self._deliver_all(deliveries)
                if self._dead:
                    break
        except Exception as exc:  # noqa: BLE001
            log.exception("engine loop died")
            self._dead = f"{type(exc).__name__}: {exc}"
        if self._dead:
            log.error("engine loop stopped: %s", self._dead)
            self._fail_all(targets)

    def _fail_all(self, targets: dict[str, RequestStream]) -> None:
        self._apply_commands(targets) if self.engine else None
        for rid, stream in list(targets.items()):
            seq: Sequence | None = self.engine.scheduler.requests.get(rid)
            n = seq.num_output_tokens if seq else 0
            self._deliver(stream, RequestOutput(rid, [], "", True, "error", error=self._dead,
                                                num_output_tokens=n))
        targets.clear()
