"""What a model-runner step hands back: Forward (its logits, not sampled yet), PendingStep (launched, its ids
still on the device) and RunnerOutput (on the host), plus the conversion of the sampler's logprob tensors."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from model.sampler import SamplerOutput
from server.outputs import TokenLogprob


@dataclass(frozen=True)
class RunnerOutput:
    token_ids: list[int]                         # one per scheduled entry that samples, in schedule order
    logprobs: list[TokenLogprob | None] | None = None
    prompt_logprobs: list[tuple[Any, list[float]]] | None = None  # (sequence, its next prompt logprobs)


@dataclass(frozen=True)
class Forward:
    """A launched forward whose rows are not sampled yet (ModelRunner.launch_sampling samples them)."""
    logits: torch.Tensor                         # [N, vocab] float32 on the device, one row per sampling entry
    sampling: list                               # the sequences that sample, in row order
    graphed: bool                                # it replayed a CUDA graph (so its ids will be published)
    prompt_logprobs: tuple[torch.Tensor, list] | None = None


@dataclass(frozen=True)
class PendingStep:
    """A launched step: its sampled ids are on the device until result() (the step's one sync)."""
    token_ids: Any                               # [N] int64 on the device, or SampledIds; None: none sample
    sampler_out: SamplerOutput | None            # kept for logprobs
    sampling: list                               # the sequences that sample, in row order
    graphed: bool                                # a decode step that replayed a CUDA graph
    prompt_logprobs: tuple[torch.Tensor, list] | None = None  # values [R], [(sequence, how many)]

    def result(self) -> RunnerOutput:
        prompt = None
        if self.prompt_logprobs is not None:
            values, owners = self.prompt_logprobs
            flat, prompt, i = values.tolist(), [], 0
            for seq, k in owners:
                prompt.append((seq, flat[i:i + k]))
                i += k
        if self.token_ids is None:
            return RunnerOutput([], prompt_logprobs=prompt)
        token_ids = self.token_ids.tolist()  # waits for the step (logprobs below wait for the stream)
        lps = None if self.sampler_out is None else logprobs_to_host(self.sampler_out, token_ids, self.sampling)
        return RunnerOutput(token_ids, lps, prompt)


def logprobs_to_host(out: SamplerOutput, chosen_ids: list[int], seqs) -> list[TokenLogprob | None] | None:
    """The sampler's logprob tensors as TokenLogprobs, for the rows whose request asked (one sync)."""
    if out.logprobs is None:
        return None
    chosen = out.logprobs.tolist()
    top_ids = out.top_ids.tolist() if out.top_ids is not None else None
    top_lp = out.top_logprobs.tolist() if out.top_logprobs is not None else None
    result: list[TokenLogprob | None] = []
    for i, seq in enumerate(seqs):
        n = seq.params.logprobs
        if n is None:
            result.append(None)
            continue
        top = tuple(zip(top_ids[i][:n], top_lp[i][:n])) if n and top_ids is not None else ()
        result.append(TokenLogprob(chosen_ids[i], chosen[i], top))
    return result
