"""Paged flash-decoding: one query token per sequence, split-KV, the query heads of one kv group per program.

Kernel -> launcher. Program (b, kvh, split) loads the GROUP query heads that share kv head kvh as the
rows of one [G_PAD, D] tile, so each K/V page is read once per group, and streams its slice of the
context in tiles of BLOCK_N positions (whole pages of BLOCK_SIZE; the page of each position comes from the
block table). With one split it writes the output directly; otherwise it writes its partial
(max, sum, unnormalised acc) and a reduce kernel rescales and combines the splits.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.attention_prefill import LOG2E, _attend_tile, dot_precision


@triton.jit
def _decode_kernel(Q, K, V, O, PART_ACC, PART_M, PART_L, SEQ_LENS, BLOCK_TABLES, qk_scale,
                   stride_qb, stride_qh, stride_qd,
                   stride_kb, stride_ks, stride_kh, stride_kd,
                   stride_vb, stride_vs, stride_vh, stride_vd,
                   stride_ob, stride_oh, stride_od,
                   stride_bt,
                   GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
                   PRECISION: tl.constexpr):
    # grid: (B, KVH, NUM_SPLITS); partials: acc [B, H, NUM_SPLITS, D_PAD], m/l [B, H, NUM_SPLITS]
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    g = tl.arange(0, G_PAD)
    head = kvh * GROUP + g  # [G_PAD]
    d = tl.arange(0, D_PAD)
    q_ptrs = Q + b.to(tl.int64) * stride_qb + head[:, None] * stride_qh + d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=(g < GROUP)[:, None] & (d < HEAD_DIM)[None, :], other=0.0)  # [G_PAD, D_PAD]
    seq_len = tl.load(SEQ_LENS + b)
    lo, hi = _split_range(seq_len, BLOCK_N, NUM_SPLITS)
    _attend_split(q, lo, hi, K, V, O, PART_ACC, PART_M, PART_L, BLOCK_TABLES, qk_scale,
                  stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd,
                  stride_ob, stride_oh, stride_od, stride_bt,
                  GROUP, G_PAD, HEAD_DIM, D_PAD, BLOCK_SIZE, BLOCK_N, NUM_SPLITS, PRECISION)


@triton.jit
def _split_len(seq_len, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr):
    return tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N


@triton.jit
def _split_range(seq_len, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """Keys [lo, hi) of this program's split: a whole number of BLOCK_N tiles of the sequence's context."""
    split_len = _split_len(seq_len, BLOCK_N, NUM_SPLITS)
    lo = tl.program_id(2) * split_len
    return lo, tl.minimum(lo + split_len, seq_len)


@triton.jit
def used_splits(seq_len, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """How many splits hold keys (the first ones; 0 for an empty context): fewer than NUM_SPLITS when the
    context is short of NUM_SPLITS tiles, as at batch 1 under a large max_model_len."""
    return tl.cdiv(seq_len, tl.maximum(_split_len(seq_len, BLOCK_N, NUM_SPLITS), 1))


@triton.jit
def _attend_split(q, lo, hi, K, V, O, PART_ACC, PART_M, PART_L, BLOCK_TABLES, qk_scale,
                  stride_kb, stride_ks, stride_kh, stride_kd,
                  stride_vb, stride_vs, stride_vh, stride_vd,
                  stride_ob, stride_oh, stride_od, stride_bt,
                  GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                  BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
                  PRECISION: tl.constexpr):
    """Program (b, kvh, split): the group's query rows q [G_PAD, D_PAD] over keys [lo, hi), then the output
    (one split) or this split's partials (several)."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1) * GROUP
    g = tl.arange(0, G_PAD)
    g_valid = g < GROUP
    head = kvh * GROUP + g  # [G_PAD]
    d = tl.arange(0, D_PAD)
    d_valid = d < HEAD_DIM
    bt_row = BLOCK_TABLES + b.to(tl.int64) * stride_bt

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    # A causal mask with every row at position hi-1 is exactly "keys lo..hi-1": the prefill's tile step.
    q_pos = tl.zeros([G_PAD], tl.int32) + (hi - 1)
    for start_n in range(lo, hi, BLOCK_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, K, V, bt_row, kvh, start_n, hi, q_pos, d, d_valid,
                                     qk_scale, stride_kb, stride_ks, stride_kh, stride_kd,
                                     stride_vb, stride_vs, stride_vh, stride_vd,
                                     BLOCK_SIZE, BLOCK_N, True, PRECISION, HEAD_DIM == D_PAD)

    if NUM_SPLITS == 1:
        # an empty context (padding row of a captured batch) gives zeros, not NaN
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_ptrs = O + b.to(tl.int64) * stride_ob + head[:, None] * stride_oh + d[None, :] * stride_od
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=g_valid[:, None] & d_valid[None, :])
    else:
        part = (b.to(tl.int64) * num_heads + head) * NUM_SPLITS + split  # [G_PAD] row of (b, h, split)
        tl.store(PART_ACC + part[:, None] * D_PAD + d[None, :], acc, mask=g_valid[:, None])
        tl.store(PART_M + part, m_i, mask=g_valid)
        tl.store(PART_L + part, l_i, mask=g_valid)


@triton.jit
def _reduce_kernel(O, PART_ACC, PART_M, PART_L, stride_ob, stride_oh, stride_od,
                   HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr,
                   S_PAD: tl.constexpr):
    # grid: (B, H); combines the NUM_SPLITS partials of one (sequence, head)
    b = tl.program_id(0)
    h = tl.program_id(1)
    row = b.to(tl.int64) * tl.num_programs(1) + h
    s = tl.arange(0, S_PAD)
    s_valid = s < NUM_SPLITS
    d = tl.arange(0, D_PAD)
    m = tl.load(PART_M + row * NUM_SPLITS + s, mask=s_valid, other=float("-inf"))  # [S_PAD]
    l = tl.load(PART_L + row * NUM_SPLITS + s, mask=s_valid, other=0.0)
    acc = tl.load(PART_ACC + (row * NUM_SPLITS + s)[:, None] * D_PAD + d[None, :],
                  mask=s_valid[:, None], other=0.0)  # [S_PAD, D_PAD]
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # empty context: every weight is 0
    w = tl.exp2(m - m_max)  # empty splits have m = -inf -> weight 0
    total = tl.sum(w * l, 0)
    out = tl.sum(w[:, None] * acc, 0) / tl.where(total > 0, total, 1.0)  # [D_PAD]
    tl.store(O + b.to(tl.int64) * stride_ob + h * stride_oh + d * stride_od,
             out.to(O.dtype.element_ty), mask=d < HEAD_DIM)


def choose_num_splits(batch: int, num_kv_heads: int, max_seq_len: int, device: torch.device,
                      block_n: int = 64) -> int:
    """Enough (sequence, kv head, split) programs for ~2 waves of SMs, each split >= 256 keys.

    H100, B=64 x 4,096 keys, 32/8 heads (benchmarks/tune_kernels.py): 1 split 369 us, 2 389, 4 383, 8 390:
    once the (sequence, kv head) programs alone fill the SMs, more splits only add partials to reduce.
    B=1 x 512 keys, d64, as captured (max_seq_len 2,048): 1 split 18.6 us, 2 14.6, 4 11.4, 8 12.5.

    A pure function of host ints (and the device's SM count), so a captured decode step replays the same
    grid.
    """
    if device.type == "cuda":
        num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        num_sms = 16  # interpreter: few programs keep it fast; any value is correct
    base = max(1, batch * num_kv_heads)
    want = triton.cdiv(2 * num_sms, base)
    most = max(1, triton.cdiv(max_seq_len, max(256, block_n)))
    return int(max(1, min(want, most, 64)))


class DecodeTiles(NamedTuple):
    group: int  # query heads per kv head: the rows of one program's tile
    g_pad: int
    d_pad: int
    block_n: int
    num_splits: int


def decode_tiles(q: torch.Tensor, k_cache: torch.Tensor, max_seq_len: int, num_splits: int | None = None,
                 block_n: int | None = None) -> DecodeTiles:
    """The tiling both decode launchers use (here and kernels/decode_rotary.py), so that they compare on the
    same grid: q [B, H, D], k_cache [num_blocks, block_size, KVH, D]; None picks the default."""
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert num_heads % num_kv_heads == 0, "query heads must be a multiple of kv heads"
    group = num_heads // num_kv_heads
    if block_n is None:
        block_n = max(block_size, 64)  # several pages per iteration keeps loads in flight
    assert block_n >= 16 and block_n & (block_n - 1) == 0, "tl.dot wants a power-of-2 BLOCK_N >= 16"
    if num_splits is None:
        num_splits = choose_num_splits(batch, num_kv_heads, max_seq_len, q.device, block_n)
    return DecodeTiles(group, max(16, triton.next_power_of_2(group)),  # tl.dot wants M >= 16
                       max(16, triton.next_power_of_2(head_dim)), block_n, num_splits)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float, max_seq_len: int,
                           out: torch.Tensor | None = None, num_splits: int | None = None,
                           block_n: int | None = None, num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """One query token per sequence: q [B, H, D] over the paged cache [num_blocks, block_size, KVH, D] -> [B, H, D].

    seq_lens [B] int32 counts the new token; max_seq_len (host int) sizes the split heuristic only.
    """
    batch, _, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    t = decode_tiles(q, k_cache, max_seq_len, num_splits, block_n)
    if out is None:
        out = torch.empty_like(q)
    if batch == 0:
        return out
    part_acc, part_m, part_l = split_partials(out, t.num_splits, t.d_pad)
    _decode_kernel[(batch, num_kv_heads, t.num_splits)](
        q, k_cache, v_cache, out, part_acc, part_m, part_l, seq_lens, block_tables, scale * LOG2E,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(), block_tables.stride(0),
        GROUP=t.group, G_PAD=t.g_pad, HEAD_DIM=head_dim, D_PAD=t.d_pad, BLOCK_SIZE=block_size, BLOCK_N=t.block_n,
        NUM_SPLITS=t.num_splits, PRECISION=dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    reduce_splits(out, part_acc, part_m, part_l, t.num_splits, t.d_pad)
    return out


def split_partials(out: torch.Tensor, num_splits: int, d_pad: int):
    """(acc [B, H, S, D_PAD], m [B, H, S], l [B, H, S]) float32 for S > 1 splits; with one split the kernel
    writes out directly and the three arguments are unused placeholders."""
    if num_splits == 1:
        return out, out, out
    batch, num_heads, _ = out.shape
    part_acc = torch.empty(batch, num_heads, num_splits, d_pad, dtype=torch.float32, device=out.device)
    part_m = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=out.device)
    return part_acc, part_m, torch.empty_like(part_m)


def reduce_splits(out: torch.Tensor, part_acc, part_m, part_l, num_splits: int, d_pad: int) -> None:
    if num_splits > 1:
        batch, num_heads, head_dim = out.shape
        _reduce_kernel[(batch, num_heads)](
            out, part_acc, part_m, part_l, *out.stride(),
            HEAD_DIM=head_dim, D_PAD=d_pad, NUM_SPLITS=num_splits,
            S_PAD=triton.next_power_of_2(num_splits), num_warps=4,
        )
