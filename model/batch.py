"""The per-step input of the model: one flat batch of T tokens from B sequences.

Prefill chunks and decode tokens share this shape, so one forward serves a mixed step.
All tensors live on the model's device; the host ints are there so launchers need no device sync.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepBatch:
    input_ids: torch.Tensor        # [T] int64
    positions: torch.Tensor        # [T] int64, absolute position of each token in its sequence
    slot_mapping: torch.Tensor     # [T] int64, cache slot (block * block_size + offset) to write; < 0 = padding
    query_start_loc: torch.Tensor  # [B+1] int32, cumulative new-token counts (cu_seqlens of the queries)
    seq_lens: torch.Tensor         # [B] int32, context length after this step (cached + new tokens)
    block_tables: torch.Tensor     # [B, max_blocks] int32, padded with 0 past each sequence's blocks
    logits_indices: torch.Tensor   # [N] int64, rows of T whose logits are wanted (usually each seq's last)
    max_query_len: int             # host copy of max(new tokens per sequence)
    max_seq_len: int               # host copy of max(seq_lens)
    # A graph-captured step with prompt tokens (server/prefill_graphs.py) fixes the prefill attention's work
    # list instead of letting max_query_len size its grid: [2 * entries] int32 (kernels/prefill_tiles.py),
    # made for tiles of attention_tile_rows packed rows. None: the launcher sizes its own grid.
    attention_tiles: torch.Tensor | None = None
    attention_tile_rows: int = 0

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


def build_step_batch(token_ids: list[list[int]], num_cached: list[int], block_tables: list[list[int]],
                     block_size: int, device: torch.device | str = "cpu",
                     all_logits: bool = False, logits_indices: list[int] | None = None) -> StepBatch:
    """Pack a step from host lists: sequence b feeds token_ids[b] after num_cached[b] cached tokens.

    The engine's model runner and the tests both use this, so there is one packing rule.
    With all_logits, every token's logits are returned (perplexity); with logits_indices, those rows (the
    engine's: sequences mid-prefill sample nothing); otherwise each sequence's last.
    """
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    starts = [0]
    seq_lens = []
    for toks, cached, table in zip(token_ids, num_cached, block_tables):
        for i, tok in enumerate(toks):
            pos = cached + i
            input_ids.append(tok)
            positions.append(pos)
            slots.append(table[pos // block_size] * block_size + pos % block_size)
        starts.append(starts[-1] + len(toks))
        seq_lens.append(cached + len(toks))
    max_blocks = max((len(t) for t in block_tables), default=1) or 1
    tables = [t + [0] * (max_blocks - len(t)) for t in block_tables]
    if logits_indices is not None:
        logits_idx = logits_indices
    elif all_logits:
        logits_idx = list(range(len(input_ids)))
    else:
        logits_idx = [s - 1 for s in starts[1:]]

    # Two host->device copies (one int64, one int32 buffer) instead of one per field; the fields are views.
    i64 = _to_device(torch.tensor(input_ids + positions + slots + logits_idx, dtype=torch.int64), device)
    i32 = _to_device(torch.tensor(starts + seq_lens + [b for t in tables for b in t], dtype=torch.int32), device)
    T, B = len(input_ids), len(seq_lens)
    return StepBatch(
        input_ids=i64[:T], positions=i64[T:2 * T], slot_mapping=i64[2 * T:3 * T], logits_indices=i64[3 * T:],
        query_start_loc=i32[:B + 1], seq_lens=i32[B + 1:2 * B + 1],
        block_tables=i32[2 * B + 1:].view(B, max_blocks),
        max_query_len=max((len(t) for t in token_ids), default=0),
        max_seq_len=max(seq_lens, default=0),
    )


def _to_device(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def full_budget_batch(total_tokens: int, max_len: int, block_size: int, num_logits: int,
                      device: torch.device | str) -> tuple[StepBatch, int]:
    """A whole-prefill batch of total_tokens (sequences of at most max_len) over fresh blocks, sampling
    num_logits rows: the widest step a budget allows, for memory profiling. Returns it and its block count."""
    lens = [min(max_len, total_tokens - i) for i in range(0, total_tokens, max_len)]
    tables, next_block = [], 0
    for n in lens:
        k = -(-n // block_size)
        tables.append(list(range(next_block, next_block + k)))
        next_block += k
    batch = build_step_batch([[0] * n for n in lens], [0] * len(lens), tables, block_size, device,
                             logits_indices=list(range(min(num_logits, total_tokens))))
    return batch, next_block
