"""LLMEngine: the step loop (schedule -> run -> sample -> append -> detokenize -> stop -> emit); the offline
API on top of it is server/llm.py.

Data flows one way per step: the scheduler picks, the runner computes token ids, the engine appends them,
decides stops and emits one RequestOutput delta per sequence that produced a token. Finished and aborted
sequences free their KV blocks at once. Single-threaded: server/async_engine.py drives it from its thread.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any

from server.blocks import BlockAllocator
from server.engine_config import EngineConfig, resolve_model_dir
from server.admission import check_request, token_ids_within
from server.grammar import GrammarCompiler, GrammarFailed
from server.outputs import (AdmissionError, EngineCounters, OverloadedError, RequestOutput, TokenLogprob,
                            finished_output, prediction_totals)
from server.sampling_params import SamplingParams
from server.scheduler import Scheduler
from server.scheduler_output import SchedulerOutput
from server.sequence import Sequence
from server.speculative import DraftRow, make_proposer, verified_tokens
from server.step_results import Forward
from server.stop_checker import StopChecker

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig, *, runner: Any = None, tokenizer: Any = None):
        """runner/tokenizer may be injected (tests, a shared tokenizer); otherwise both load from config.model."""
        self.config = config
        self.model_dir: str | None = config.model
        if runner is None or tokenizer is None:
            model_dir = self.model_dir = resolve_model_dir(config)
            if tokenizer is None:
                from model.tokenizer import Tokenizer
                tokenizer = Tokenizer.from_pretrained(model_dir)
            if runner is None:
                from server.model_runner import ModelRunner
                runner = ModelRunner(config, model_dir, eos_token_ids=tuple(tokenizer.eos_token_ids))
        self.tokenizer = tokenizer
        self.runner = runner
        self.model_config = runner.model_config
        self.max_model_len: int = runner.max_model_len
        self.kv_capacity = runner.kv_capacity
        self.eos_token_ids = token_ids_within(tokenizer, tuple(tokenizer.eos_token_ids)
                                              or tuple(self.model_config.eos_token_ids), self.model_config.vocab_size)
        self.grammars = GrammarCompiler(tokenizer, self.model_config.vocab_size, self.eos_token_ids)
        self.allocator = BlockAllocator(self.kv_capacity.num_blocks, config.block_size,
                                        enable_prefix_caching=config.enable_prefix_caching)
        self.scheduler = Scheduler(self.allocator, max_num_seqs=config.max_num_seqs, max_model_len=self.max_model_len,
                                   max_num_batched_tokens=config.max_num_batched_tokens,
                                   max_waiting_requests=config.max_waiting_requests,
                                   scheduling_policy=config.scheduling_policy)
        self.counters = EngineCounters()
        self.proposer = make_proposer(config, self.model_config.vocab_size)  # drafts (server/speculative.py)
        self._in_flight: _Launched | None = None  # a launched step the host has not seen yet

    # ---- requests ----------------------------------------------------------------------------------
    def check_admission(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Checks that need no engine state (safe from any thread); raises AdmissionError."""
        try:
            check_request(prompt_token_ids, params, self.model_config.vocab_size, self.scheduler, self.grammars)
        except AdmissionError:
            self.counters.admission_rejections_total += 1
            raise

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float | None = None, queue_bound: bool = True) -> Sequence:
        from model.detokenizer import IncrementalDetokenizer
        self.check_admission(prompt_token_ids, params)
        seq = Sequence(request_id, prompt_token_ids, params, arrival_time)
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer, list(prompt_token_ids),
                                                 skip_special_tokens=params.skip_special_tokens)
        seq.stop_checker = StopChecker(params, self.eos_token_ids)
        if params.grammar is not None:
            seq.grammar = self.grammars.matcher(params.grammar)
        try:
            self.scheduler.add(seq, queue_bound)
        except (AdmissionError, OverloadedError):
            self.counters.admission_rejections_total += 1
            raise
        if self.proposer is not None:  # (a prediction to draft from: server/prediction.py; once admitted)
            self.proposer.watch(seq)
        return seq

    def abort(self, request_id: str) -> RequestOutput | None:
        """Finish a request now and free its blocks; None if it is unknown or already finished."""
        seq = self.scheduler.abort(request_id)
        return None if seq is None else finished_output(seq, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    # ---- one step ----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one step; return the deltas of the step that completed (see _overlappable for which)."""
        outputs: list[RequestOutput] = []
        if self._in_flight is not None and not self._may_overlap():
            outputs += self._complete(self._in_flight)
        if self.proposer is not None:  # (no drafts for a sequence whose last token is still in flight)
            self.proposer.propose(self.scheduler.running)
        sched = self.scheduler.schedule()
        if self._in_flight is not None and not self._overlappable(sched):
            outputs += self._complete(self._in_flight)  # fills the placeholders sched was built over
            sched = replace(sched, scheduled=tuple(s for s in sched.scheduled if not s.seq.is_finished))
        if sched.is_empty:
            if self._in_flight is not None:
                outputs += self._complete(self._in_flight)
            return outputs
        now = time.monotonic()
        for s in sched.scheduled:
            if s.seq.first_scheduled_time is None:
                s.seq.first_scheduled_time = now
        launched = self._launch(sched, defer_sampling=self._in_flight is not None, launched_at=now)
        if self._in_flight is not None:
            self.counters.overlapped_steps += 1
            outputs += self._complete(self._in_flight)  # the host's work here overlaps the launched step
        launched = self._sample(sched, launched, now) if isinstance(launched, Forward) else launched
        if isinstance(launched, list):  # the launch failed: its requests end with an error
            return outputs + launched
        if launched.pending.graphed and self.config.overlap_scheduling and not self._drafting(sched):
            self._in_flight = launched
        else:
            outputs += self._complete(launched)
        return outputs

    def _may_overlap(self) -> bool:
        """Whether the next step may be scheduled before the in-flight one is seen by the host: it can replay
        a graph, a decode-only one over captured sizes or, with prefill graphs, one with prompt tokens too
        (_overlappable decides once it is scheduled). Rows that sample from their output tokens' values
        (penalties, a grammar) do not prevent it: their sampling waits for those values (_launch)."""
        sched = self.scheduler
        graphs = getattr(self.runner, "graphs", None)
        if graphs is None:
            return False
        if getattr(self.runner, "prefill_graphs", None) is not None:
            return True
        if sched.waiting or len(sched.running) > graphs.max_size:
            return False
        return all(len(seq.token_ids) - seq.num_computed_tokens == 1 for seq in sched.running)

    def _drafting(self, sched: SchedulerOutput) -> bool:
        """This step drafts or the next may (the lookup is on, or a running request has a prediction): the host
        must see this one's kept tokens first (server/speculative.py)."""
        proposer = self.proposer
        return proposer is not None and (sched.num_draft_tokens > 0 or proposer.active(self.scheduler.num_running))

    def _overlappable(self, sched: SchedulerOutput) -> bool:
        runs_ahead = getattr(self.runner, "runs_ahead", None)
        return runs_ahead is not None and runs_ahead(sched)

    def _launch(self, sched: SchedulerOutput, defer_sampling: bool,
                launched_at: float) -> "_Launched | Forward | list[RequestOutput]":
        """Queue the step on the device; each sampling sequence gets a placeholder token (-1) that _complete
        fills, so the scheduler can plan the next step before the host sees this one's ids. With
        defer_sampling (a step is in flight), rows that sample from their tokens' values (penalties, a grammar)
        make it queue the forward alone: step() samples it after appending the in-flight tokens."""
        defer = defer_sampling and any(s.samples and s.seq.reads_own_tokens for s in sched.scheduled)
        try:
            pending = self.runner.launch_forward(sched) if defer else self.runner.launch(sched)
        except Exception as exc:  # noqa: BLE001 - the step's requests fail, the engine goes on
            self.counters.failed_steps_in_a_row += 1
            return self._fail(sched, exc)
        self.counters.num_steps += 1
        self.scheduler.finish_step(sched)
        self.counters.deferred_sampling_steps += defer
        return pending if defer else self._sample(sched, pending, launched_at)

    def _sample(self, sched: SchedulerOutput, step: Any, launched_at: float) -> "_Launched | list[RequestOutput]":
        """Sample a deferred Forward (or take a launched PendingStep); then each sampling sequence gets its
        placeholder token."""
        if isinstance(step, Forward):
            try:
                step = self.runner.launch_sampling(step)
            except Exception as exc:  # noqa: BLE001
                self.counters.failed_steps_in_a_row += 1
                return self._fail(sched, exc)
        placeholders = []
        for seq in step.sampling:
            if seq.__class__ is DraftRow:  # a draft's row: its token (if kept) follows its sequence's
                placeholders.append(-1)
                continue
            placeholders.append(len(seq.token_ids))
            seq.token_ids.append(-1)
        return _Launched(sched, step, placeholders, launched_at)

    def _complete(self, launched: "_Launched") -> list[RequestOutput]:
        if launched is self._in_flight:
            self._in_flight = None
        try:
            result = launched.pending.result()
        except Exception as exc:  # noqa: BLE001
            self.counters.failed_steps_in_a_row += 1
            return self._fail(launched.sched, exc)
        self.counters.failed_steps_in_a_row = 0
        now = time.monotonic()
        self.counters.step_gaps.observe(launched.sched.has_prefill, launched.launched_at, now)
        for seq, values in result.prompt_logprobs or ():
            seq.prompt_logprobs.extend(values)
        sampled = launched.pending.sampling
        logprobs = result.logprobs or [None] * len(sampled)
        if launched.sched.num_draft_tokens:
            return self._complete_verified(launched, result.token_ids, logprobs, now)
        outputs = []
        bs = self.allocator.block_size if self.allocator.enable_prefix_caching else 0
        for seq, index, token_id, lp in zip(sampled, launched.placeholders, result.token_ids, logprobs):
            if seq.is_finished:  # stopped or aborted while this step was in flight: its token is dropped
                del seq.token_ids[index:]
                continue
            if bs and index % bs == 0:
                self.allocator.register_filled_block(seq, index)
            outputs.append(self._append(seq, index, token_id, lp, now))
        return outputs

    def _complete_verified(self, launched: "_Launched", token_ids: list[int], logprobs: list,
                           now: float) -> list[RequestOutput]:
        """A step with drafts (server/speculative.py): each sequence keeps its accepted drafts and the token
        sampled after them."""
        outputs = []
        for seq, index, token_id, lp in verified_tokens(launched.pending.sampling, launched.placeholders, token_ids,
                                                        logprobs, self.counters):
            self.allocator.register_filled_block(seq, index)
            outputs.append(self._append(seq, index, token_id, lp, now))
        return outputs

    def _append(self, seq: Sequence, index: int, token_id: int, lp: TokenLogprob | None,
                now: float) -> RequestOutput:
        """_take_token; a failure in the sequence's own host work (its detokenizer, stop strings, grammar)
        ends that sequence alone with an error, not the step's other sequences or the engine loop."""
        try:
            return self._take_token(seq, index, token_id, lp, now)
        except Exception as exc:  # noqa: BLE001
            log.exception("request %s failed on its token %d", seq.request_id, token_id)
            if not seq.is_finished:
                self.scheduler.finish(seq, "error")
            out = finished_output(seq, "error", f"{type(exc).__name__}: {exc}")
            if not isinstance(exc, GrammarFailed):
                return out
            allowed = seq.params.allowed_token_ids
            if allowed is not None and token_id not in allowed:  # the two masks left the row no token
                return out._replace(error_field="allowed_token_ids", error="none of these ids is one the grammar "
                                    f"allows next ({out.error})")
            return out._replace(error_field="grammar")

    def _take_token(self, seq: Sequence, index: int, token_id: int, lp: TokenLogprob | None,
                    now: float) -> RequestOutput:
        seq.token_ids[index] = token_id
        self.counters.generation_tokens_total += 1
        if seq.first_token_time is None:
            seq.first_token_time = now
            self.counters.prompt_tokens_total += seq.num_prompt_tokens
        if lp is not None:
            seq.cumulative_logprob += lp.logprob
        n = index + 1 - seq.num_prompt_tokens  # this token's number among the outputs
        decision = seq.stop_checker.check_token(token_id, n)
        if decision is not None:
            decision = decision._replace(text_delta=decision.text_delta + seq.detokenizer.flush())
        else:
            delta = seq.detokenizer.add(token_id)
            complete = seq.grammar is not None and seq.grammar.advance(token_id)  # nothing more may follow
            if n >= seq.params.max_new_tokens:
                delta += seq.detokenizer.flush()
            decision = seq.stop_checker.check_text(delta, n)
            if complete and decision.finish_reason is None:
                end = seq.stop_checker.finish_now("eos_token")
                decision = end._replace(text_delta=decision.text_delta + end.text_delta)
        if decision.finish_reason is not None:
            self.scheduler.finish(seq, decision.finish_reason, decision.stop_reason)
            del seq.token_ids[index + 1:]  # a placeholder of a step still in flight
        queue_time = seq.first_scheduled_time - seq.arrival_time if n == 1 else None
        return RequestOutput(
            request_id=seq.request_id, new_token_ids=[token_id], new_text=decision.text_delta,
            finished=decision.finish_reason is not None, finish_reason=decision.finish_reason,
            stop_reason=decision.stop_reason, new_logprobs=None if lp is None else [lp],
            num_prompt_tokens=seq.num_prompt_tokens, num_output_tokens=n, queue_time=queue_time,
            prompt_logprobs=seq.prompt_logprobs if n == 1 else None, step_time=now,
            **prediction_totals(seq))

    def _fail(self, sched: SchedulerOutput, exc: Exception) -> list[RequestOutput]:
        message = f"{type(exc).__name__}: {exc}"
        outputs = []
        for s in sched.scheduled:
            if not s.seq.is_finished:
                self.scheduler.finish(s.seq, "error")
                outputs.append(finished_output(s.seq, "error", message))
        return outputs


@dataclass(frozen=True)
class _Launched:
    sched: SchedulerOutput
    pending: Any              # server.step_results.PendingStep (or a test's stand-in)
    placeholders: list[int]   # index in seq.token_ids of each of pending.sampling's placeholder
    launched_at: float        # time.monotonic() as the host began to launch it (server/step_gaps.py)
