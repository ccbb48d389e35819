"""`LLM`: the offline API over LLMEngine, in the spirit of vLLM's (`LLM(model_dir).generate(prompts, params)`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from server.bad_words import with_bad_words_token_ids
from server.engine import LLMEngine
from server.engine_config import EngineConfig
from server.outputs import RequestOutput, TokenLogprob
from server.sampling_params import SamplingParams


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
        # the engine takes bad words as ids (one params object for every prompt: converted once)
        plist = [with_bad_words_token_ids(p, self.tokenizer) for p in params] if isinstance(params, list) \
            else [with_bad_words_token_ids(params, self.tokenizer)] * len(prompts)
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
