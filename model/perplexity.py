"""Quality of a loaded model, measured through its own paged KV cache: strided perplexity and greedy
continuations (for agreement between two variants of one checkpoint).

The cache is allocated here in the requested dtype, so a narrower KV cache dtype (model/kv_dtype.py)
is measured exactly as the server would run it: K/V rounded on write, attention in float32 on read.

Perplexity follows Hugging Face's strided recipe ("Perplexity of fixed-length models"): windows of
`window` tokens start every `stride` tokens; each window is a fresh sequence (positions from 0), and
only the tokens no earlier window scored count, and never a window's first token (nothing precedes it).
With stride < window every token after the first is so scored exactly once, with at least window - stride
tokens of context once the first window is past; with stride == window each window's first token goes
unscored, as in HF's recipe.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from model.batch import build_step_batch
from model.kv_cache import KVCache

Progress = Callable[[int], None]  # called with the number of work units just finished


@dataclass(frozen=True)
class Window:
    begin: int        # first token fed
    end: int          # one past the last token fed
    score_from: int   # first token whose prediction counts (> begin)


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float   # nats per scored token
    num_scored: int
    num_windows: int


def strided_windows(num_tokens: int, window: int, stride: int) -> list[Window]:
    """HF's windows over num_tokens tokens: [begin, end) every stride, scoring only the new targets."""
    if window < 2 or stride < 1 or stride > window:
        raise ValueError(f"need window >= 2 and 1 <= stride <= window, got window={window}, stride={stride}")
    if num_tokens < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {num_tokens}")
    windows, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + window, num_tokens)
        windows.append(Window(begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == num_tokens:
            break
    return windows


def _allocate(model, num_tokens: int, block_size: int, kv_cache_dtype: torch.dtype) -> KVCache:
    num_blocks = max(1, -(-num_tokens // block_size))
    device = model.lm_head.weight.device
    return KVCache.allocate(model.config, num_blocks, block_size, kv_cache_dtype, device)


def perplexity(model, token_ids: list[int], *, window: int, stride: int,
               kv_cache_dtype: torch.dtype | None = None, block_size: int = 16,
               progress: Progress | None = None) -> PerplexityResult:
    """Strided perplexity of token_ids under model (one window per forward, logits for every token)."""
    if window > model.config.max_context:  # past a sliding window our full attention is not the model's
        raise ValueError(f"window={window} exceeds the model's context of {model.config.max_context} tokens")
    kv_cache_dtype = kv_cache_dtype or model.lm_head.weight.dtype
    windows = strided_windows(len(token_ids), window, stride)
    cache = _allocate(model, window, block_size, kv_cache_dtype)
    table = list(range(cache.num_blocks))
    device = model.lm_head.weight.device
    total_nll, count = 0.0, 0
    for w in windows:
        batch = build_step_batch([token_ids[w.begin:w.end]], [0], [table], block_size, device, all_logits=True)
        with torch.inference_mode():
            logits = model(batch, cache)  # [L, vocab] float32
        first = w.score_from - w.begin  # logits row first-1 predicts token `first`
        targets = torch.tensor(token_ids[w.score_from:w.end], device=device)
        logprobs = torch.log_softmax(logits[first - 1:-1].float(), dim=-1)
        total_nll -= float(logprobs.gather(1, targets[:, None]).sum())
        count += targets.numel()
        if progress:
            progress(1)
    mean_nll = total_nll / count
    return PerplexityResult(math.exp(mean_nll), mean_nll, count, len(windows))


def greedy_generate(model, prompts: list[list[int]], max_new_tokens: int, *,
                    kv_cache_dtype: torch.dtype | None = None, block_size: int = 16,
                    progress: Progress | None = None) -> list[list[int]]:
    """Greedy continuations of all prompts as one batch (prefill step, then decode steps); no EOS stop."""
    kv_cache_dtype = kv_cache_dtype or model.lm_head.weight.dtype
    device = model.lm_head.weight.device
    per_seq = max(1, -(-(max(map(len, prompts)) + max_new_tokens) // block_size))
    cache = _allocate(model, per_seq * block_size * len(prompts), block_size, kv_cache_dtype)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(prompts))]
    outputs: list[list[int]] = [[] for _ in prompts]
    feed = [list(p) for p in prompts]
    cached = [0] * len(prompts)
    for _ in range(max_new_tokens):
        batch = build_step_batch(feed, cached, tables, block_size, device)
        with torch.inference_mode():
            next_ids = model(batch, cache).argmax(dim=-1).tolist()  # [B]
        for i, tok in enumerate(next_ids):
            cached[i] += len(feed[i])
            outputs[i].append(tok)
            feed[i] = [tok]
        if progress:
            progress(1)
    return outputs


def greedy_agreement(reference: list[list[int]], candidate: list[list[int]]) -> float:
    """Fraction of positions where the candidate's greedy token equals the reference's."""
    pairs = [(a, b) for ref, cand in zip(reference, candidate, strict=True) for a, b in zip(ref, cand, strict=True)]
    if not pairs:
        raise ValueError("no tokens to compare")
    return sum(a == b for a, b in pairs) / len(pairs)
