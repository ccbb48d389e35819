"""The one attention entry the model calls: decode-only batches take flash-decoding, the rest the
varlen prefill kernel (which also serves mixed prefill + decode steps). Chosen from host ints and shapes
only, so no device sync and a captured decode step always takes the same path.
"""
from __future__ import annotations

import torch

from kernels.attention_decode import paged_decode_attention
from kernels.attention_prefill import paged_prefill_attention


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                    scale: float, max_query_len: int, max_seq_len: int,
                    out: torch.Tensor | None = None, tiles: torch.Tensor | None = None,
                    tile_rows: int = 0) -> torch.Tensor:
    """q [T, H, D] over k_cache / v_cache [num_blocks, block_size, KVH, D] -> [T, H, D] (see reference).

    tiles / tile_rows: the prefill kernel's fixed work list and its BLOCK_M (kernels/prefill_tiles.py), for
    graph-captured steps; rows of q that no sequence owns (a padded step's tail) are then left unwritten."""
    if tiles is not None:
        return paged_prefill_attention(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale,
                                       max_query_len, out=out, block_m=tile_rows, tiles=tiles)
    if max_query_len == 1 and q.shape[0] == seq_lens.shape[0]:
        return paged_decode_attention(q, k_cache, v_cache, seq_lens, block_tables, scale, max_seq_len, out=out)
    return paged_prefill_attention(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale,
                                   max_query_len, out=out)
