"""Varlen causal FlashAttention-2 over the paged KV cache (whole prefills, prefill chunks, prefix hits).

Kernel -> launcher. Each program owns one tile of BLOCK_M *packed rows* of one sequence and one kv head:
row r is (query token r // GROUP, query head kvh * GROUP + r % GROUP), so the GROUP query heads that share
a kv head read each K/V tile once (GQA without copying K/V). Keys are streamed in tiles of BLOCK_N
positions through the block table (any block_size), with an online softmax in float32; the score matrix
is never materialised. Keys strictly before the tile's first query position need no causal mask, so the
key loop runs in two phases: unmasked, then the diagonal band with the causal mask.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.prefill_tiles import prefill_block_m

LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(acc, m_i, l_i, q, K, V, bt_row, kvh, start_n, kv_end, q_pos, d, d_valid, qk_scale,
                 stride_kb, stride_ks, stride_kh, stride_kd,
                 stride_vb, stride_vs, stride_vh, stride_vd,
                 BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                 PRECISION: tl.constexpr, EVEN_D: tl.constexpr):
    """One K/V tile of BLOCK_N positions folded into the running (acc, m_i, l_i) of BLOCK_M rows.

    CAUSAL tiles mask keys past kv_end and past each row's position. The others (the prefill's keys
    before the diagonal band) are whole by construction, so their loads go unmasked (EVEN_D: no padded
    head-dim lanes either), which keeps them vectorised."""
    n = start_n + tl.arange(0, BLOCK_N)  # [BLOCK_N] absolute key positions
    slot_off = n % BLOCK_SIZE
    if CAUSAL:
        n_valid = n < kv_end
        page = tl.load(bt_row + n // BLOCK_SIZE, mask=n_valid, other=0).to(tl.int64)
    else:
        page = tl.load(bt_row + n // BLOCK_SIZE).to(tl.int64)
    k_ptrs = K + page[None, :] * stride_kb + slot_off[None, :] * stride_ks + kvh * stride_kh \
        + d[:, None] * stride_kd
    v_ptrs = V + page[:, None] * stride_vb + slot_off[:, None] * stride_vs + kvh * stride_vh \
        + d[None, :] * stride_vd
    if CAUSAL:
        k = tl.load(k_ptrs, mask=n_valid[None, :] & d_valid[:, None], other=0.0)  # [D_PAD, BLOCK_N]
    elif EVEN_D:
        k = tl.load(k_ptrs)
    else:
        k = tl.load(k_ptrs, mask=d_valid[:, None], other=0.0)
    # a narrower cache (fp8, or fp16 under fp32 queries) is widened in registers: tl.dot takes no fp8 rhs
    # against a 16-bit lhs, and p must not be rounded to fp8 below
    k = k.to(q.dtype)
    qk = tl.dot(q, k, input_precision=PRECISION)  # [BLOCK_M, BLOCK_N], unscaled
    if CAUSAL:
        keep = (n[None, :] <= q_pos[:, None]) & n_valid[None, :]
        qk = tl.where(keep, qk, float("-inf"))
    # the scale (> 0, log2 domain) goes into the max of each row and into one fused multiply-add before
    # exp2, instead of a multiply over the whole tile first: the softmax's ALU work bounds this loop
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if CAUSAL:
        v = tl.load(v_ptrs, mask=n_valid[:, None] & d_valid[None, :], other=0.0)  # [BLOCK_N, D_PAD]
    elif EVEN_D:
        v = tl.load(v_ptrs)
    else:
        v = tl.load(v_ptrs, mask=d_valid[None, :], other=0.0)
    v = v.to(q.dtype)
    # rescale, then let the MMA accumulate into acc: a separate add would be one more pass over the
    # [BLOCK_M, D] accumulator per key tile, four times the score tile's size at BLOCK_N 32, D 128
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(Q, K, V, O, QUERY_START, SEQ_LENS, BLOCK_TABLES, TILES, qk_scale,
                    stride_qt, stride_qh, stride_qd,
                    stride_kb, stride_ks, stride_kh, stride_kd,
                    stride_vb, stride_vs, stride_vh, stride_vd,
                    stride_ot, stride_oh, stride_od,
                    stride_bt,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    PRECISION: tl.constexpr, HEAVY_FIRST: tl.constexpr, USE_TILES: tl.constexpr):
    if USE_TILES:  # grid: (entries of TILES, KVH); entry = (sequence, first packed row), see prefill_tiles.py
        pid = tl.program_id(0)
        b = tl.load(TILES + 2 * pid)
        row0 = tl.load(TILES + 2 * pid + 1)
        kvh = tl.program_id(1)
    elif HEAVY_FIRST:  # grid: (B, KVH, M tiles), last tiles (the most keys) launched first
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        row0 = (tl.num_programs(2) - 1 - tl.program_id(2)) * BLOCK_M
    else:  # grid: (M tiles = cdiv(max_query_len * GROUP, BLOCK_M), B, KVH)
        row0 = tl.program_id(0) * BLOCK_M
        b = tl.program_id(1)
        kvh = tl.program_id(2)
    q_start = tl.load(QUERY_START + b)
    q_len = tl.load(QUERY_START + b + 1) - q_start
    seq_len = tl.load(SEQ_LENS + b)
    ctx = seq_len - q_len  # tokens already in the cache before this step's queries
    if row0 < q_len * GROUP:
        rows = row0 + tl.arange(0, BLOCK_M)  # [BLOCK_M] packed (token, head-in-group)
        tok = rows // GROUP
        head = kvh * GROUP + rows % GROUP
        row_valid = tok < q_len
        d = tl.arange(0, D_PAD)
        d_valid = d < HEAD_DIM
        q_ptrs = Q + (q_start + tok).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh \
            + d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=row_valid[:, None] & d_valid[None, :], other=0.0)  # [BLOCK_M, D_PAD]
        q_pos = ctx + tok  # [BLOCK_M] absolute positions (padding rows lie past seq_len)
        first_pos = ctx + row0 // GROUP
        kv_end = tl.minimum(ctx + (row0 + BLOCK_M - 1) // GROUP + 1, seq_len)
        bt_row = BLOCK_TABLES + b.to(tl.int64) * stride_bt

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        # phase 1: keys before every row's position, no causal mask
        band = (first_pos // BLOCK_N) * BLOCK_N
        for start_n in range(0, band, BLOCK_N):
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, K, V, bt_row, kvh, start_n, kv_end, q_pos,
                                         d, d_valid, qk_scale,
                                         stride_kb, stride_ks, stride_kh, stride_kd,
                                         stride_vb, stride_vs, stride_vh, stride_vd,
                                         BLOCK_SIZE, BLOCK_N, False, PRECISION, HEAD_DIM == D_PAD)
        # phase 2: the diagonal band (every row sees at least key `band`, so m_i turns finite here)
        for start_n in range(band, kv_end, BLOCK_N):
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, K, V, bt_row, kvh, start_n, kv_end, q_pos,
                                         d, d_valid, qk_scale,
                                         stride_kb, stride_ks, stride_kh, stride_kd,
                                         stride_vb, stride_vs, stride_vh, stride_vd,
                                         BLOCK_SIZE, BLOCK_N, True, PRECISION, HEAD_DIM == D_PAD)
        acc = acc / l_i[:, None]
        o_ptrs = O + (q_start + tok).to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh \
            + d[None, :] * stride_od
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :])


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs would silently run in tf32 on tensor cores; keep them exact to match the reference."""
    return "ieee" if dtype == torch.float32 else "tf32"


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                            scale: float, max_query_len: int, out: torch.Tensor | None = None,
                            block_m: int | None = None, block_n: int | None = None,
                            num_warps: int | None = None, num_stages: int | None = None,
                            heavy_first: bool = False, tiles: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of q [T, H, D] over the paged cache [num_blocks, block_size, KVH, D] -> [T, H, D].

    query_start_loc [B+1] int32, seq_lens [B] int32 (context after this step), block_tables [B, max_blocks].
    max_query_len is a host int (no device sync): it sizes the grid.
    heavy_first launches every sequence's last query tiles (the most keys) first, as FlashAttention-2 orders
    its work, so the light tiles fill the tail of the grid; the default order launches one (sequence, kv
    head)'s tiles together, which shares their K/V in L2. Which wins is for benchmarks/tune_kernels.py on a GPU.
    tiles (int32, 2 * entries, from kernels/prefill_tiles.tile_map with this block_m) replaces the grid that
    max_query_len would size: a CUDA graph's grid stays fixed while its steps' queries change.
    """
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert num_heads % num_kv_heads == 0, "query heads must be a multiple of kv heads"
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q)
    batch = seq_lens.shape[0]
    if num_tokens == 0 or batch == 0 or max_query_len == 0:
        return out
    d_pad = max(16, triton.next_power_of_2(head_dim))
    # Tiles from benchmarks/tune_kernels.py on an H100, 8 x 2,048 causal, 32/8 heads, bf16: head dim 128
    # best at 128 x 32, 4 warps, 3 stages (311 TFLOP/s); 64 at 64 x 64, 4 warps, 2 stages (304). float32
    # (exact products, no tensor cores): the tiles that compile without register spills on sm_80 and sm_90
    # at head dims 64 and 128 (benchmarks/kernel_resources.py), 32 x 16 with 8 warps.
    wide, exact = d_pad >= 128, q.dtype == torch.float32
    if block_m is None:
        assert tiles is None, "a tile map is made for one block_m: pass it"
        block_m = prefill_block_m(max_query_len * group, head_dim, float32=exact)
    if block_n is None:
        block_n = 16 if exact else 32 if wide else 64
    if num_stages is None:
        num_stages = 3 if wide or exact else 2
    if num_warps is None:
        num_warps = 8 if exact and block_m >= 32 else 4
    assert min(block_m, block_n) >= 16, "tl.dot wants tiles of at least 16"
    num_m = triton.cdiv(max_query_len * group, block_m)
    if tiles is not None:
        grid = (tiles.shape[0] // 2, num_kv_heads)
    else:
        grid = (batch, num_kv_heads, num_m) if heavy_first else (num_m, batch, num_kv_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables,
        query_start_loc if tiles is None else tiles, scale * LOG2E,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(), block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=dot_precision(q.dtype), HEAVY_FIRST=heavy_first,
        USE_TILES=tiles is not None,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
