"""Batched sampling on the device from per-row parameter tensors (built by the server's model runner).

Order, as Hugging Face's processors/warpers: logit bias (OpenAI's logit_bias: added to the raw logits) ->
tokens a grammar or allowed_token_ids do not allow -> banned ids (min_new_tokens, bad_words; where they would
leave a masked row no token, the ban yields) -> repetition penalty (HF: prompt +
output, divide positive logits, multiply negative) -> presence/frequency penalties (OpenAI: output tokens)
-> temperature -> top_k -> top_p -> min_p -> draw. temperature 0 rows take the argmax of the penalised
logits. The draw is Gumbel-max; a seeded row's uniforms come from a counter-based hash of (seed, output
index, token id), so its tokens do not depend on what else is in the batch or on step order; unseeded rows
draw from the runner's torch.Generator. Work a batch does not ask for is skipped (host flags decide).

Logprobs are those of the raw model distribution (log_softmax of the unprocessed logits), as vLLM v1's
default "raw_logprobs": they describe the model, not the sampling settings.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch



@dataclass(frozen=True)
class SamplingTensors:
    temperature: torch.Tensor            # [B] float32; 0 = greedy
    top_k: torch.Tensor                  # [B] int64; 0 = off
    top_p: torch.Tensor                  # [B] float32; 1 = off
    min_p: torch.Tensor                  # [B] float32; 0 = off
    seeds: torch.Tensor                  # [B] int64 (ignored where has_seed is False)
    has_seed: torch.Tensor               # [B] bool
    output_index: torch.Tensor           # [B] int64, index of the token being drawn among the outputs
    seeded_rows: torch.Tensor | None = None  # [S] int64, the rows with a seed: only theirs are hashed (None:
                                             # every row's, then has_seed picks)
    # penalties, for R rows: the rows in penalty_rows [R] int64, or every row (R = B) when it is None
    penalty_rows: torch.Tensor | None = None
    repetition_penalty: torch.Tensor | None = None  # [R] float32
    presence_penalty: torch.Tensor | None = None    # [R] float32
    frequency_penalty: torch.Tensor | None = None   # [R] float32
    prompt_tokens: torch.Tensor | None = None       # [R, Lp] int64, padded with vocab_size
    output_tokens: torch.Tensor | None = None       # [R, Lo] int64, padded with vocab_size
    banned_tokens: torch.Tensor | None = None       # [B, K] int64, padded with vocab_size (min_new_tokens' stop
                                                    # ids, bad_words' next tokens)
    bias_index: torch.Tensor | None = None          # [2, N] int64: (row, token id) of each logit bias
    bias_values: torch.Tensor | None = None         # [N] float32: added to those logits
    allowed_bits: torch.Tensor | None = None        # [B, ceil(V'/32)] int32, V' >= V: bit j of word w set =
                                                    # token 32w+j allowed (a grammar's mask and/or
                                                    # allowed_token_ids'; -1: all)
    # host flags: which stages any row needs
    all_greedy: bool = False
    any_greedy: bool = False
    any_top_k: bool = False
    any_top_p: bool = False
    any_min_p: bool = False
    any_seeded: bool = False
    any_unseeded: bool = True
    max_logprobs: int | None = None      # None: no logprobs; n: chosen token's plus top n
    max_top_k: int | None = None         # every sampled row has 0 < top_k <= this (None: some row has none)


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: torch.Tensor                   # [B] int64
    logprobs: torch.Tensor | None = None      # [B] float32, of the chosen token
    top_ids: torch.Tensor | None = None       # [B, n] int64
    top_logprobs: torch.Tensor | None = None  # [B, n] float32


def _srl(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 (wrapping multiply)."""
    x = (x ^ _srl(x, 30)) * -4658895280553007687  # 0xbf58476d1ce4e5b9
    x = (x ^ _srl(x, 27)) * -7723592293110705685  # 0x94d049bb133111eb
    return x ^ _srl(x, 31)


def hashed_uniform(seeds: torch.Tensor, output_index: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] uniforms in (0, 1) that depend only on (seed, output index, token id)."""
    golden = -7046029254386353131  # 0x9e3779b97f4a7c15
    row = _mix64(seeds * golden + output_index)                               # [B]
    ids = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    h = _mix64(row[:, None] + (ids[None, :] + 1) * golden)                      # [B, V]
    return open_unit_float(_srl(h, 64 - UNIFORM_BITS))


UNIFORM_BITS = 23  # 24 would round the top value, (2**24 - 0.5) / 2**24, to exactly 1.0 in float32


def open_unit_float(bits: torch.Tensor) -> torch.Tensor:
    """Integers in [0, 2**UNIFORM_BITS) to float32 uniforms strictly inside (0, 1): a 1.0 made the Gumbel
    noise -log(-log(u)) infinite, which picked that token whatever its logit (or, if masked, NaN)."""
    return (bits.float() + 0.5) * (1.0 / (1 << UNIFORM_BITS))


def _apply_penalties(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    B, V = logits.shape
    if t.bias_index is not None:  # out of place: the raw logits stay for logprobs
        logits = logits.index_put((t.bias_index[0], t.bias_index[1]), t.bias_values, accumulate=True)
    if t.allowed_bits is not None:
        shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
        allowed = ((t.allowed_bits[:, :, None] >> shifts) & 1).flatten(1)[:, :V]  # [B, V] 0/1
        logits = logits.masked_fill(allowed == 0, float("-inf"))
    if t.banned_tokens is not None:
        banned = torch.zeros(B, V + 1, dtype=torch.bool, device=logits.device)
        banned.scatter_(1, t.banned_tokens, True)
        kept = logits.masked_fill(banned[:, :V], float("-inf"))
        if t.allowed_bits is not None:  # a grammar (or allowed_token_ids) that allows only banned ids (it must
            # end: eos) wins over the ban; the row would otherwise be all -inf and argmax would take token 0
            kept = torch.where(kept.amax(dim=-1, keepdim=True) == float("-inf"), logits, kept)
        logits = kept
    if t.repetition_penalty is None and t.presence_penalty is None:
        return logits
    rows = t.penalty_rows  # only the penalised rows' [R, V] are worked on (a batch mixes them with others)
    sub = logits if rows is None else logits.index_select(0, rows)
    R = sub.shape[0]
    if t.repetition_penalty is not None:
        seen = torch.zeros(R, V + 1, dtype=torch.bool, device=logits.device)
        seen.scatter_(1, t.prompt_tokens, True)
        seen.scatter_(1, t.output_tokens, True)
        p = t.repetition_penalty[:, None]
        penalised = torch.where(sub > 0, sub / p, sub * p)
        sub = torch.where(seen[:, :V], penalised, sub)
    if t.presence_penalty is not None:
        counts = torch.zeros(R, V + 1, dtype=logits.dtype, device=logits.device)
        counts.scatter_add_(1, t.output_tokens, torch.ones_like(t.output_tokens, dtype=logits.dtype))
        counts = counts[:, :V]
        sub = sub - t.frequency_penalty[:, None] * counts - t.presence_penalty[:, None] * (counts > 0)
    return sub if rows is None else logits.index_copy(0, rows, sub)


CPU_CANDIDATES = 1024  # top-p without top-k on CPU: the best 1,024 tokens, a full sort for rows they miss


def _thresholds(logits: torch.Tensor, best: torch.Tensor, t: SamplingTensors) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the lowest logit that survives top-k then top-p, from `best` [B, K], the row's K largest
    logits in descending order (K = V: all of them). Returns (cut [B], exact [B]): exact where the cut is
    surely right with only these K. A row with a top-k of k <= K always is: were the nucleus to reach past
    the K-th token, it would end inside the ties of the k-th value, whose value is the cut. A row without
    one is when top-p already drops its K-th token (or is off: no cut)."""
    B, K = best.shape
    V = logits.shape[1]
    inf = float("inf")  # a Python scalar: a tensor made from it here would be a host-to-device copy each step
    has_k = t.top_k > 0 if t.any_top_k else torch.zeros(B, dtype=torch.bool, device=logits.device)
    k = torch.where(has_k, t.top_k.clamp(max=V), K).clamp(max=K)
    kth = torch.where(has_k, best.gather(1, (k - 1)[:, None]).squeeze(1), -inf)  # ties with the kth stay, as HF
    exact = (has_k & (t.top_k <= K)) | (K == V)  # a top-k past the best K: its kth is not among them
    if not t.any_top_p:
        return kth, exact | ~has_k
    # top-p over the top-k survivors' softmax: normalised over the whole row, cumulated over the best K
    lse = logits.masked_fill(logits < kth[:, None], -inf).logsumexp(dim=-1)          # [B]
    probs = (best.masked_fill(best < kth[:, None], -inf) - lse[:, None]).exp()        # [B, K]
    before = probs.cumsum(dim=-1) - probs                                            # mass of better tokens
    keep = before < t.top_p[:, None]
    keep[:, 0] = True
    last = best.gather(1, (keep.sum(dim=-1) - 1)[:, None]).squeeze(1)               # keep is a prefix
    on = t.top_p < 1.0
    cut = torch.where(on, torch.maximum(kth, last), kth)
    return cut, exact | (~has_k & (~on | ~keep[:, -1]))


def _apply_top_k_top_p(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Mask each row below its top-k / top-p cut. A cut keeps every token tied with it (a sort's arbitrary
    tie order would split them). Where the host knows that every sampled row has a top-k (max_top_k), the
    cut comes from the best max_top_k logits (torch.topk) instead of a sort of the whole vocabulary; on
    CPU, top-p rows try the best CPU_CANDIDATES first (checking a row's result costs no device sync there)."""
    V = logits.shape[1]
    if t.max_top_k is not None and t.max_top_k < V:
        cut, _ = _thresholds(logits, logits.topk(t.max_top_k, dim=-1).values, t)
    elif logits.device.type == "cpu" and CPU_CANDIDATES < V:
        cut, exact = _thresholds(logits, logits.topk(CPU_CANDIDATES, dim=-1).values, t)
        if not bool(exact.all()):
            rows = (~exact).nonzero().squeeze(1)
            sub = logits.index_select(0, rows)
            full, _ = _thresholds(sub, sub.sort(dim=-1, descending=True).values,
                                  replace(t, top_k=t.top_k.index_select(0, rows), top_p=t.top_p.index_select(0, rows)))
            cut = cut.index_copy(0, rows, full)
    else:
        cut, _ = _thresholds(logits, logits.sort(dim=-1, descending=True).values, t)
    return logits.masked_fill(logits < cut[:, None], float("-inf"))


def warped(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p (masked to -inf): what the draw samples from, in HF's order.
    Greedy rows (temperature 0) come back untempered."""
    temp = torch.where(t.temperature > 0, t.temperature, 1.0)
    logits = logits / temp[:, None]
    if t.any_top_k or t.any_top_p:
        logits = _apply_top_k_top_p(logits, t)
    if t.any_min_p:
        probs = logits.softmax(dim=-1)
        threshold = t.min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def sample(logits: torch.Tensor, t: SamplingTensors, generator: torch.Generator | None = None) -> SamplerOutput:
    """logits [B, V] float32 -> one token per row (no host sync)."""
    raw = logits
    logits = _apply_penalties(logits, t)
    greedy_ids = logits.argmax(dim=-1) if t.any_greedy else None
    if t.all_greedy:
        token_ids = greedy_ids
    else:
        logits = warped(logits, t)
        B, V = logits.shape
        if t.any_seeded and not t.any_unseeded:
            u = hashed_uniform(t.seeds, t.output_index, V)
        else:
            u = torch.rand(B, V, device=logits.device, generator=generator).clamp_(min=1e-20)
            if t.any_seeded and t.seeded_rows is not None:  # hash the seeded rows alone: the hash is [S, V]
                rows = t.seeded_rows                          # int64 work, 14x a draw's cost on CPU
                u.index_copy_(0, rows, hashed_uniform(t.seeds.index_select(0, rows),
                                                      t.output_index.index_select(0, rows), V))
            elif t.any_seeded:
                u = torch.where(t.has_seed[:, None], hashed_uniform(t.seeds, t.output_index, V), u)
        gumbel = -torch.log(-torch.log(u))
        token_ids = (logits + gumbel).argmax(dim=-1)
        if greedy_ids is not None:
            token_ids = torch.where(t.temperature > 0, token_ids, greedy_ids)
    if t.max_logprobs is None:
        return SamplerOutput(token_ids)
    logprobs = raw.log_softmax(dim=-1)
    chosen = logprobs.gather(1, token_ids[:, None]).squeeze(1)
    if t.max_logprobs == 0:
        return SamplerOutput(token_ids, chosen)
    top_lp, top_ids = logprobs.topk(t.max_logprobs, dim=-1)
    return SamplerOutput(token_ids, chosen, top_ids, top_lp)
