"""ProcessEngine: AsyncEngine's interface with the LLMEngine loop in a child process (`engine_process`).

Why: in one process the event loop's HTTP work (SSE framing, socket writes, pydantic) and the engine's
step loop share one GIL. On the H100 host at 124 req/s the served engine made 15.9k output tok/s against
29.6k offline, and the stand-in server's event loop took half the process's samples (py-spy); served from a
child, a saturated server made 18.5k against 10.8k in one process (2026-11-24), so that is the default with
CUDA (server/serve.py's uses_engine_process). vLLM and SGLang split the two the same way. Here the child owns
every piece of engine state (scheduler, KV blocks, model, detokenizers); the parent keeps only the streams
and a tokenizer of its own for the routes.

Wire: two one-way pipes. Parent -> child: ("add", id, prompt ids, params), ("abort", id), ("stop",).
Child -> parent: ("ready", facts) once loaded, or ("failed", reason); then per step ("outputs", outputs,
stats, adds applied); ("dead", reason) last if the loop dies. A receiver thread in the parent hands each
message's outputs to their streams in one loop.call_soon_threadsafe (AsyncEngine._deliver_all).

Admission stays synchronous (a 4xx before any stream): the checks that need no engine state run in the
parent against the child's facts (vocabulary, max_model_len, KV blocks); the waiting-queue bound uses the
child's last reported count plus the adds still in the pipe.
"""
from __future__ import annotations

import atexit
import gc
import logging
import multiprocessing
import signal
import threading
import time
import weakref
from dataclasses import replace
from typing import Any

from server.async_engine import MAX_FAILED_STEPS_IN_A_ROW, AsyncEngine, EngineStats, RequestStream, engine_stats
from server.blocks import BlockAllocator
from server.admission import check_request
from server.grammar import GrammarCompiler
from server.engine_config import EngineConfig
from server.outputs import AdmissionError, OverloadedError, RequestOutput
from server.sampling_params import SamplingParams
from server.scheduler import Scheduler

log = logging.getLogger(__name__)


class ProcessEngine(AsyncEngine):
    def __init__(self, config: EngineConfig, log_level: str = "info", gc_freeze: bool = True):
        """gc_freeze: the child freezes what is alive once its model has loaded (see ServerState)."""
        super().__init__(config)
        self.log_level, self.gc_freeze = log_level, gc_freeze
        self._process: Any = None
        self._send_lock = threading.Lock()
        self._targets: dict[str, RequestStream] = {}  # request id -> stream, until its finished output
        self._stats = EngineStats(0, 0, 0.0, 0, 0, 0, 0, 0, 0, 0)
        self._rejected = 0  # admissions refused here, added to the child's count

    # ---- lifecycle ---------------------------------------------------------------------------------
    def start(self, *, runner=None, tokenizer=None) -> None:
        """Spawn the child, wait until it has loaded the model (blocking), start the receiver thread."""
        if runner is not None:
            raise ValueError("engine_process: the child loads its own model; a runner cannot cross processes")
        with self._lock:
            if self._thread is not None:
                return
            ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
            commands, self._commands_out = ctx.Pipe(duplex=False)
            self._results, results_in = ctx.Pipe(duplex=False)
            self._process = ctx.Process(target=run_engine_process, name="gqa-engine",
                                        args=(self.config, commands, results_in, self.log_level, self.gc_freeze),
                                        daemon=True)
            self._process.start()
            atexit.register(_shutdown_at_exit, weakref.ref(self))
            commands.close()
            results_in.close()
            self._connect(tokenizer)

    def _connect(self, tokenizer) -> None:
        """Wait for the child's first message on `self._results`: its facts, or why it did not load."""
        try:
            kind, facts = self._results.recv()
        except EOFError:
            kind, facts = "failed", f"the engine process exited with {self._exit_status()}"
        if kind != "ready":
            self._process.join(timeout=5)
            raise RuntimeError(facts)
        self._attach(facts, tokenizer)

    def _attach(self, facts: dict, tokenizer) -> None:
        """Take the child's facts (`child_facts`) and start the receiver on `self._results`."""
        for name in ("model_config", "kv_capacity", "max_model_len", "model_dir", "dtype", "device"):
            setattr(self, name, facts[name])
        if tokenizer is None:
            from model.tokenizer import Tokenizer
            tokenizer = Tokenizer.from_pretrained(self.model_dir)
        self.tokenizer = tokenizer
        self._grammars = GrammarCompiler(tokenizer, self.model_config.vocab_size,  # grammar checks at the door
                                         tuple(tokenizer.eos_token_ids) or tuple(self.model_config.eos_token_ids))
        self._grammars.warm()
        # a Scheduler of the child's sizes, only for its stateless admission check
        self._admission = Scheduler(BlockAllocator(self.kv_capacity.num_blocks, self.config.block_size),
                                    max_num_seqs=self.config.max_num_seqs,
                                    max_num_batched_tokens=self.config.max_num_batched_tokens,
                                    max_model_len=self.max_model_len, max_waiting_requests=1,
                                    scheduling_policy=self.config.scheduling_policy)
        self._stats, self.child_gc_frozen = facts["stats"], facts["gc_frozen"]
        self._thread = threading.Thread(target=self._receive, name="gqa-engine-outputs", daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self._process is not None and self._process.is_alive() and self._dead is None

    def shutdown(self) -> None:
        self._stop = True
        if self._process is None:
            return
        self._send(("stop",))
        self._process.join(timeout=10)
        if self._process.is_alive():
            # stuck or stopped (SIGSTOP), and deaf to SIGTERM: unkilled, multiprocessing's atexit would join it forever
            self._process.kill()
            self._process.join(timeout=5)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    # ---- requests (event loop thread) --------------------------------------------------------------
    def _admit(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """The child's admission checks, against its facts; the queue bound counts adds still in the pipe."""
        try:
            check_request(prompt_token_ids, params, self.model_config.vocab_size, self._admission, self._grammars)
            if self._stats.num_waiting + self._pending_adds >= self.config.max_waiting_requests:
                raise OverloadedError(f"{self.config.max_waiting_requests} requests are already waiting; "
                                      "retry later")
        except (AdmissionError, OverloadedError):
            self._rejected += 1
            raise

    def _enqueue_add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                     stream: RequestStream) -> None:
        with self._lock:
            self._targets[request_id] = stream
        self._send(("add", request_id, prompt_token_ids, params))

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def _exit_status(self) -> str:
        """The child's exit code once reaped: its pipe closes as it dies, before waitpid can see it gone."""
        self._process.join(timeout=5)
        code = self._process.exitcode
        return f"code {code}" + (f": {signal.strsignal(-code)}" if code is not None and code < 0 else "")

    def stats(self) -> EngineStats:
        with self._lock:  # the child's last report; the adds still in the pipe wait too (they did not show)
            s, pending = self._stats, self._pending_adds
        return replace(s, admission_rejections_total=s.admission_rejections_total + self._rejected,
                       num_waiting=s.num_waiting + max(0, pending))

    def _send(self, message: tuple) -> None:
        try:
            with self._send_lock:
                self._commands_out.send(message)
        except (BrokenPipeError, OSError, AttributeError):
            pass  # the child is gone: the receiver fails every stream

    # ---- receiver thread ---------------------------------------------------------------------------
    def _receive(self) -> None:
        try:
            while True:
                message = self._results.recv()
                if message[0] == "dead":
                    self._dead = message[1]
                    break
                _, outputs, stats, applied = message
                self._progress_time = time.monotonic()
                deliveries = []
                with self._lock:  # together: stats() counts the adds not yet applied as waiting
                    self._stats = stats
                    self._pending_adds -= applied
                    for out in outputs:
                        stream = self._targets.pop(out.request_id, None) if out.finished \
                            else self._targets.get(out.request_id)
                        if stream is not None:
                            deliveries.append((stream, out))
                self._deliver_all(deliveries)
        except (EOFError, OSError):
            if not self._stop:
                self._dead = f"the engine process exited ({self._exit_status()})"
        if self._dead:
            log.error("engine process stopped: %s", self._dead)
        with self._lock:
            # its sequences and KV blocks went with the child: gauges at rest (/metrics, drain), counters kept
            last = self._stats
            self._stats = replace(last, num_running=0, num_waiting=0, kv_cache_usage=0.0,
                                  num_free_blocks=last.num_total_blocks)
            self._pending_adds = 0  # never applied: failed below with the rest
            failed = [(s, RequestOutput(rid, [], "", True, "error", error=self._dead or "the server stopped"))
                      for rid, s in self._targets.items()]
            self._targets.clear()
        self._deliver_all(failed)


def _shutdown_at_exit(ref: weakref.ref) -> None:
    """Registered after multiprocessing's own atexit hook, so it runs first: that hook would terminate() a child
    that ignores SIGTERM and then join it forever when the parent exits without shutdown() (a stop mid-load)."""
    engine = ref()
    if engine is not None and engine._process.is_alive():
        engine.shutdown()


# ---- the child ------------------------------------------------------------------------------------------
def run_engine_process(config: EngineConfig, commands, results, log_level: str = "info",
                       gc_freeze: bool = True) -> None:
    """The child's main: load, report, then apply commands and step until told to stop."""
    # Ctrl-C and a supervisor's SIGTERM (systemd's KillMode=control-group) reach the whole group: the parent
    # decides, so its drain can finish the requests in flight; ProcessEngine.shutdown stops or kills the child
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s [engine]: %(message)s")
    from server.engine import LLMEngine
    try:
        engine = LLMEngine(config)
        engine.grammars.warm()  # now, not at the first constrained request (see AsyncEngine.start)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent as one line
        results.send(("failed", f"{type(exc).__name__}: {exc}".splitlines()[0]))
        return
    serve_engine(engine, commands, results, gc_freeze)


def serve_engine(engine, commands, results, gc_freeze: bool = False) -> None:
    """Report a loaded engine ready, then apply commands and step until told to stop or dead."""
    if gc_freeze:  # the model's and the imports' objects: a full collection would walk them all
        gc.collect()
        gc.freeze()
    results.send(("ready", child_facts(engine)))
    try:
        _loop(engine, commands, results)
    except Exception as exc:  # noqa: BLE001
        log.exception("engine loop died")
        results.send(("dead", f"{type(exc).__name__}: {exc}"))


def child_facts(engine) -> dict[str, Any]:
    """What the parent needs of a loaded engine: its sizes for admission, and its first stats."""
    return {"model_config": engine.model_config, "kv_capacity": engine.kv_capacity,
            "max_model_len": engine.max_model_len, "model_dir": engine.model_dir,
            "dtype": engine.runner.dtype, "device": engine.runner.device, "stats": engine_stats(engine),
            "gc_frozen": gc.get_freeze_count()}


def _loop(engine, commands, results) -> None:
    while True:
        outputs: list[RequestOutput] = []
        applied = 0
        timeout = 0.0 if engine.has_unfinished() else 0.1
        while commands.poll(timeout):
            timeout = 0.0
            cmd = commands.recv()
            if cmd[0] == "stop":
                return
            if cmd[0] == "add":
                applied += 1
                try:
                    engine.add_request(cmd[1], cmd[2], cmd[3], queue_bound=False)  # the parent admitted it
                except Exception as exc:  # noqa: BLE001 - refused between the parent's check and the pipe
                    outputs.append(RequestOutput(cmd[1], [], "", True, "error", error=str(exc)))
            else:
                out = engine.abort(cmd[1])
                if out is not None:
                    outputs.append(out)
        stepped = engine.has_unfinished()
        if stepped:
            outputs += engine.step()
        if outputs or applied or stepped:  # every step: the parent's stall check counts them
            results.send(("outputs", outputs, engine_stats(engine), applied))
        if engine.counters.failed_steps_in_a_row >= MAX_FAILED_STEPS_IN_A_ROW:
            results.send(("dead", f"{MAX_FAILED_STEPS_IN_A_ROW} engine steps failed in a row"))
            return
