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

    def as_tensor(values, dtype):
        return torch.tensor(values, dtype=dtype, device=device)

    return StepBatch(
        input_ids=as_tensor(input_ids, torch.int64),
        positions=as_tensor(positions, torch.int64),
        slot_mapping=as_tensor(slots, torch.int64),
        query_start_loc=as_tensor(starts, torch.int32),
        seq_lens=as_tensor(seq_lens, torch.int32),
        block_tables=as_tensor(tables, torch.int32),
        logits_indices=as_tensor(logits_idx, torch.int64),
        max_query_len=max((len(t) for t in token_ids), default=0),
        max_seq_len=max(seq_lens, default=0),
    )
