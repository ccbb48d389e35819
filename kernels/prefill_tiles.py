"""The prefill kernel's work list, made on the host: one (sequence, first packed row) pair per program.

Eagerly, kernels/attention_prefill.py sizes its grid from the step's max_query_len: (tiles of the longest
query, sequences, kv heads), and programs past a shorter sequence's rows exit. A CUDA graph cannot do that,
because its grid is fixed at capture while the step's sequences change. So a graph-captured step (server/
prefill_graphs.py) hands the kernel this list in a static buffer instead: grid (max_tiles, kv heads), and
program i works on entry i. Entries past the step's own are (0, NO_ROWS): their row is past every
sequence's rows, so the program returns at once.

Pure Python on purpose: the server builds this list every step and CPU-only installs have no triton.
"""
from __future__ import annotations

NO_ROWS = 1 << 30  # a first row no sequence reaches: the padding entry's program does nothing


def prefill_block_m(rows: int, head_dim: int, float32: bool = False) -> int:
    """BLOCK_M for a step whose longest query has `rows` packed rows (tokens x query heads per kv head).

    Tiles from benchmarks/tune_kernels.py on an H100 (8 x 2,048, 32/8 heads, bf16): 128 rows at head dim 128,
    64 below; 16 when the queries are short (a decode row packs only GROUP rows). float32 queries multiply
    exactly (no tensor cores), which takes far more registers per tile: benchmarks/kernel_resources.py found
    64-row tiles spilling 2.8 KB per thread on sm_90 (26 KB on sm_80) at head dim 64, 32 rows none."""
    if float32:
        return 16 if rows < 32 else 32
    if rows < 64:
        return 16
    return 128 if max(16, head_dim) > 64 and rows >= 128 else 64


def max_tiles(num_tokens: int, num_seqs: int, group: int, block_m: int) -> int:
    """An upper bound on the entries of any step of at most num_tokens tokens over num_seqs sequences:
    sum over sequences of ceil(q_len * group / block_m) <= num_tokens * group / block_m + num_seqs."""
    return -(-num_tokens * group // block_m) + min(num_seqs, num_tokens)


def tile_map(query_lens: list[int], group: int, block_m: int, size: int) -> list[int]:
    """Flat [sequence, first row, sequence, first row, ...] of `size` entries (2 * size ints): every packed
    row of every sequence in exactly one entry, then padding entries (0, NO_ROWS).

    Sequence by sequence, rows ascending: the eager grid's order (one sequence's tiles run together and
    share its K/V in L2), which beat heavy-first on the H100 (benchmarks/tune_kernels.py)."""
    flat: list[int] = []
    for b, q_len in enumerate(query_lens):
        for row0 in range(0, q_len * group, block_m):
            flat += (b, row0)
    used = len(flat) // 2
    if used > size:
        raise ValueError(f"{used} prefill tiles do not fit the {size} the step was sized for")
    return flat + [0, NO_ROWS] * (size - used)
