"""Per-row sampling tensors for one step, from the sequences that sample (host -> device, few copies).

Rows' parameters are packed into one float and one int host tensor, so a step costs two small uploads
(plus the penalised rows' token tables only when some row uses a penalty, banned ids only while some row is below
min_new_tokens or has bad_words, (row, token, bias) triples only when some row has a logit_bias, and a bitmask of
allowed tokens only when some row has a grammar or allowed_token_ids). The host flags tell the sampler which
stages it may skip.
"""
from __future__ import annotations

import numpy as np
import torch

from model.sampler import SamplingTensors
from server.bad_words import banned_next
from server.grammar import allowed_bitmask
from server.sequence import Sequence


def _upload(rows: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.tensor(rows, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def _upload_table(rows: list[np.ndarray], pad: int, device: torch.device) -> torch.Tensor:
    """[R, max length] int64, each row padded with pad."""
    table = np.full((len(rows), max((len(r) for r in rows), default=0) or 1), pad, np.int64)
    for i, r in enumerate(rows):
        table[i, :len(r)] = r
    t = torch.from_numpy(table)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def _padded(lists: list[list[int]], pad: int) -> list[list[int]]:
    width = max((len(x) for x in lists), default=0) or 1
    return [x + [pad] * (width - len(x)) for x in lists]


def only_argmax(seqs: list[Sequence]) -> bool:
    """True when every row takes the plain argmax: greedy, no penalties, bias, token constraints or logprobs,
    nothing banned."""
    for s in seqs:
        if len(s.token_ids) - s.num_prompt_tokens < s.argmax_from:  # see Sequence.argmax_from
            return False
    return True


def build_sampling_tensors(seqs: list[Sequence], vocab_size: int, eos_token_ids: tuple[int, ...],
                           device: torch.device) -> SamplingTensors:
    ps = [s.params for s in seqs]
    floats = _upload([[p.temperature for p in ps], [p.top_p for p in ps], [p.min_p for p in ps]],
                     torch.float32, device)                                        # [3, B]
    # a top_k past the vocabulary keeps every token, as top_k = vocab_size does (and fits in int64)
    ints = _upload([[min(max(p.top_k, 0), vocab_size) for p in ps], [p.seed or 0 for p in ps],
                    [s.num_output_tokens for s in seqs], [p.seed is not None for p in ps]],
                   torch.int64, device)                                            # [4, B]
    # penalties: tables of the penalised rows' tokens only (from each sequence's int64 mirror)
    pen = [i for i, p in enumerate(ps)
           if p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0]
    any_rep = any(ps[i].repetition_penalty != 1.0 for i in pen)
    any_pf = any(ps[i].presence_penalty != 0.0 or ps[i].frequency_penalty != 0.0 for i in pen)
    penalty_rows = pen_floats = prompt_tokens = output_tokens = None
    if pen:
        penalty_rows = _upload(pen, torch.int64, device)                                 # [R]
        pen_floats = _upload([[ps[i].repetition_penalty for i in pen], [ps[i].presence_penalty for i in pen],
                              [ps[i].frequency_penalty for i in pen]], torch.float32, device)  # [3, R]
        arrays = [(seqs[i].token_array(), seqs[i].num_prompt_tokens) for i in pen]
        if any_rep:
            prompt_tokens = _upload_table([a[:k] for a, k in arrays], vocab_size, device)
        output_tokens = _upload_table([a[k:] for a, k in arrays], vocab_size, device)
    bias_index = bias_values = None
    if any(p.logit_bias for p in ps):
        pairs = [(row, token, bias) for row, p in enumerate(ps) for token, bias in p.logit_bias.items()]
        bias_index = _upload([[r for r, _, _ in pairs], [t for _, t, _ in pairs]], torch.int64, device)  # [2, N]
        bias_values = _upload([b for _, _, b in pairs], torch.float32, device)                           # [N]
    allowed_bits = _allowed_bits(seqs, vocab_size, device)
    banned = None
    if any(s.num_output_tokens < s.params.min_new_tokens or s.params.bad_words_token_ids for s in seqs):
        rows = []
        for s in seqs:
            p = s.params
            below = s.num_output_tokens < p.min_new_tokens
            row = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_token_ids)) if below else []
            if p.bad_words_token_ids:
                row += banned_next(s.token_ids, s.num_prompt_tokens, p.bad_words_token_ids)
            rows.append(row)
        banned = _upload(_padded(rows, vocab_size), torch.int64, device)
    greedy = [p.temperature == 0.0 for p in ps]
    sampled = [p for p, g in zip(ps, greedy) if not g]  # the rows whose filters matter
    top_ks = [min(p.top_k, vocab_size) for p in sampled]
    seeded = [p.seed is not None for p in ps]
    seeded_rows = [i for i, (sd, g) in enumerate(zip(seeded, greedy)) if sd and not g]
    any_unseeded = any(not sd and not g for sd, g in zip(seeded, greedy))
    logprobs = [p.logprobs for p in ps if p.logprobs is not None]
    return SamplingTensors(
        temperature=floats[0], top_p=floats[1], min_p=floats[2], top_k=ints[0], seeds=ints[1],
        output_index=ints[2], has_seed=ints[3].bool(),
        seeded_rows=_upload(seeded_rows, torch.int64, device) if seeded_rows and any_unseeded else None,
        penalty_rows=penalty_rows,
        repetition_penalty=pen_floats[0] if any_rep else None,
        presence_penalty=pen_floats[1] if any_pf else None,
        frequency_penalty=pen_floats[2] if any_pf else None,
        prompt_tokens=prompt_tokens, output_tokens=output_tokens, banned_tokens=banned,
        bias_index=bias_index, bias_values=bias_values, allowed_bits=allowed_bits,
        all_greedy=all(greedy), any_greedy=any(greedy),
        any_top_k=any(k > 0 for k in top_ks),
        any_top_p=any(p.top_p < 1.0 for p in sampled),
        any_min_p=any(p.min_p > 0.0 for p in sampled),
        any_seeded=bool(seeded_rows), any_unseeded=any_unseeded,
        max_logprobs=max(logprobs) if logprobs else None,
        max_top_k=_max_top_k(top_ks),
    )


def _allowed_bits(seqs: list[Sequence], vocab_size: int, device: torch.device) -> torch.Tensor | None:
    """The rows' allowed tokens as one bitmask (None when no row has a grammar or allowed_token_ids): a
    grammar's mask, and with allowed_token_ids only those ids of it."""
    # a sequence that ended while this step was in flight (its grammar maybe complete) samples unmasked:
    # the engine drops its token
    grammars = [None if s.is_finished else s.grammar for s in seqs]
    has_grammar = any(g is not None for g in grammars)
    static = [(row, s.allowed_token_mask) for row, s in enumerate(seqs) if s.allowed_token_mask is not None]
    if not has_grammar and not static:
        return None
    bits = allowed_bitmask(grammars) if has_grammar else torch.full((len(seqs), (vocab_size + 31) // 32), -1,
                                                                    dtype=torch.int32)
    words = bits.numpy()  # (the same memory)
    for row, allowed in static:  # (ids are below vocab_size, admission's check: within the mask's width)
        n = min(len(allowed), words.shape[1])
        words[row, :n] &= allowed[:n]
        words[row, n:] = 0
    return bits.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else bits


def _max_top_k(top_ks: list[int]) -> int | None:
    """The sampled rows' largest top-k when every one has a top-k (the sampler then skips its full sort)."""
    return max(top_ks) if top_ks and min(top_ks) > 0 else None


def profile_sampling_tensors(num_rows: int, device: torch.device) -> SamplingTensors:
    """A worst-case-ish sampling pass for memory profiling: every row sampled with top-k/top-p."""
    ones = torch.ones(num_rows, device=device)
    zeros = torch.zeros(num_rows, dtype=torch.int64, device=device)
    return SamplingTensors(temperature=ones, top_k=zeros + 50, top_p=ones * 0.9, min_p=ones * 0.0, seeds=zeros,
                           has_seed=zeros.bool(), output_index=zeros, any_top_k=True, any_top_p=True,
                           max_logprobs=5)  # max_top_k None: the full sort, the pass that needs most memory
