"""LLMEngine: the step loop (schedule -> run -> sample -> append -> detokenize -> stop -> emit), and `LLM`,
the offline API on top of it.

Data flows one way per step: the scheduler picks, the runner computes token ids, the engine appends them,
decides stops and emits one RequestOutput delta per sequence that produced a token. Finished and aborted
sequences free their KV blocks at once. The engine is single-threaded; server/async_engine.py drives it
from its own thread.
"""
from __future__ import annotations

import time
from pathlib import Path
from dataclasses import dataclass, field, replace
from typing import Any

from server.blocks import BlockAllocator
from model.fetch import DEFAULT_MODEL
from server.engine_config import EngineConfig
from server.outputs import AdmissionError, OverloadedError, RequestOutput, TokenLogprob
from server.sampling_params import SamplingParams
from server.scheduler import Scheduler, SchedulerOutput
from server.sequence import Sequence
from server.stop_checker import StopChecker


def resolve_model_dir(config: EngineConfig) -> str:
    if config.model is not None:
        if not Path(config.model).is_dir():
            raise FileNotFoundError(f"model: {config.model} is not a directory (expected an HF-style model "
                                    "directory with config.json, *.safetensors and a tokenizer)")
        return config.model
    from model.fetch import default_cache_dir, fetch_model  # lazy: only the default model needs a fetch
    return str(fetch_model(DEFAULT_MODEL, config.model_cache_dir or default_cache_dir()))


@dataclass
class EngineCounters:
    num_steps: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    admission_rejections_total: int = 0
    failed_steps_in_a_row: int = 0


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
        self.eos_token_ids = tuple(tokenizer.eos_token_ids) or tuple(self.model_config.eos_token_ids)
        self.allocator = BlockAllocator(self.kv_capacity.num_blocks, config.block_size)
        self.scheduler = Scheduler(self.allocator, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.max_num_batched_tokens,
                                   max_model_len=self.max_model_len,
                                   max_waiting_requests=config.max_waiting_requests)
        self.counters = EngineCounters()

    # ---- requests ----------------------------------------------------------------------------------
    def check_admission(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Checks that need no engine state (safe from any thread); raises AdmissionError."""
        try:
            vocab = self.model_config.vocab_size
            bad = next((t for t in prompt_token_ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise AdmissionError(f"inputs: token id {bad} is outside the vocabulary (0..{vocab - 1})")
            self.scheduler.check_admission(len(prompt_token_ids), params)
        except AdmissionError:
            self.counters.admission_rejections_total += 1
            raise

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float | None = None) -> Sequence:
        from model.detokenizer import IncrementalDetokenizer

        self.check_admission(prompt_token_ids, params)
        seq = Sequence(request_id, prompt_token_ids, params, arrival_time)
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer, list(prompt_token_ids),
                                                 skip_special_tokens=params.skip_special_tokens)
        seq.stop_checker = StopChecker(params, self.eos_token_ids)
        try:
            self.scheduler.add(seq)
        except (AdmissionError, OverloadedError):
            self.counters.admission_rejections_total += 1
            raise
        return seq

    def abort(self, request_id: str) -> RequestOutput | None:
        """Finish a request now and free its blocks; None if it is unknown or already finished."""
        seq = self.scheduler.abort(request_id)
        return None if seq is None else self._finished_output(seq, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- one step ----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        now = time.monotonic()
        for s in sched.scheduled:
            if s.seq.first_scheduled_time is None:
                s.seq.first_scheduled_time = now
        try:
            result = self.runner.execute(sched)
        except Exception as exc:  # noqa: BLE001 - the step's requests fail, the engine goes on
            self.counters.failed_steps_in_a_row += 1
            return self._fail(sched, exc)
        self.counters.failed_steps_in_a_row = 0
        self.counters.num_steps += 1
        self.scheduler.finish_step(sched)
        outputs = []
        sampled = [s.seq for s in sched.scheduled if s.samples]
        logprobs = result.logprobs or [None] * len(sampled)
        for seq, token_id, lp in zip(sampled, result.token_ids, logprobs):
            outputs.append(self._append(seq, token_id, lp, now))
        return outputs

    def _append(self, seq: Sequence, token_id: int, lp: TokenLogprob | None, now: float) -> RequestOutput:
        seq.append_token(token_id)
        self.counters.generation_tokens_total += 1
        if seq.first_token_time is None:
            seq.first_token_time = now
            self.counters.prompt_tokens_total += seq.num_prompt_tokens
        if lp is not None:
            seq.cumulative_logprob += lp.logprob
        n = seq.num_output_tokens
        decision = seq.stop_checker.check_token(token_id, n)
        if decision is not None:
            decision = replace(decision, text_delta=decision.text_delta + self._flush(seq))
        else:
            delta = seq.detokenizer.add(token_id)
            if n >= seq.params.max_new_tokens:
                delta += self._flush(seq)
            decision = seq.stop_checker.check_text(delta, n)
        if decision.finish_reason is not None:
            self.scheduler.finish(seq, decision.finish_reason, decision.stop_reason)
        queue_time = seq.first_scheduled_time - seq.arrival_time if n == 1 else None
        return RequestOutput(
            request_id=seq.request_id, new_token_ids=[token_id], new_text=decision.text_delta,
            finished=decision.finish_reason is not None, finish_reason=decision.finish_reason,
            stop_reason=decision.stop_reason, new_logprobs=None if lp is None else [lp],
            num_prompt_tokens=seq.num_prompt_tokens, num_output_tokens=n, queue_time=queue_time)

    def _flush(self, seq: Sequence) -> str:
        """At the end, text the detokenizer still holds (an incomplete character) goes out as decode() has it."""
        detok = seq.detokenizer
        full = self.tokenizer.decode(detok.output_ids, skip_special_tokens=seq.params.skip_special_tokens)
        text = detok.text
        return full[len(text):] if len(full) > len(text) and full.startswith(text) else ""

    def _fail(self, sched: SchedulerOutput, exc: Exception) -> list[RequestOutput]:
        message = f"{type(exc).__name__}: {exc}"
        outputs = []
        for s in sched.scheduled:
            if not s.seq.is_finished:
                self.scheduler.finish(s.seq, "error")
                outputs.append(self._finished_output(s.seq, "error", message))
        return outputs

    @staticmethod
    def _finished_output(seq: Sequence, reason: str, error: str | None = None) -> RequestOutput:
        return RequestOutput(request_id=seq.request_id, new_token_ids=[], new_text="", finished=True,
                             finish_reason=reason, error=error, num_prompt_tokens=seq.num_prompt_tokens,
                             num_output_tokens=seq.num_output_tokens)


# ---- offline API ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CompletionResult:
    request_id: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None


@dataclass
class _Collector:
    prompt_token_ids: list[int]
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    last: RequestOutput | None = None

    def add(self, out: RequestOutput) -> None:
        self.text.append(out.new_text)
        self.token_ids.extend(out.new_token_ids)
        if out.new_logprobs is not None:
            self.logprobs = (self.logprobs or []) + list(out.new_logprobs)
        self.last = out


class LLM:
    """`LLM(model_dir).generate(prompts, params)`, in the spirit of vLLM's offline API."""

    def __init__(self, model: str | None = None, *, runner: Any = None, tokenizer: Any = None, **config: Any):
        self.engine = LLMEngine(EngineConfig(model=model, **config), runner=runner, tokenizer=tokenizer)
        self.tokenizer = self.engine.tokenizer
        self.model_config = self.engine.model_config
        self.model_dir = self.engine.model_dir

    def generate(self, prompts: list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[CompletionResult]:
        params = params if params is not None else SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(plist)} SamplingParams")
        token_lists = [p if isinstance(p, list) else self.tokenizer.encode(p) for p in prompts]
        ids = [f"offline-{i}" for i in range(len(prompts))]
        for toks, p in zip(token_lists, plist):  # refuse the whole batch before running any of it
            self.engine.check_admission(toks, p)
        collectors = {rid: _Collector(list(toks)) for rid, toks in zip(ids, token_lists)}
        pending = list(zip(ids, token_lists, plist))[::-1]
        bar = None
        if use_tqdm:
            from tqdm import tqdm
            bar = tqdm(total=len(prompts), desc="generate")
        sched = self.engine.scheduler
        while pending or self.engine.has_unfinished():
            while pending and sched.num_waiting < sched.max_waiting_requests:
                self.engine.add_request(*pending.pop())
            for out in self.engine.step():
                collectors[out.request_id].add(out)
                if out.finished and bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        results = []
        for rid, c in collectors.items():
            last = c.last
            if last is not None and last.finish_reason == "error":
                raise RuntimeError(f"request {rid} failed: {last.error}")
            results.append(CompletionResult(rid, c.prompt_token_ids, "".join(c.text), c.token_ids,
                                            last.finish_reason if last else None,
                                            last.stop_reason if last else None, c.logprobs))
        return results
