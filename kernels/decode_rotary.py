"""Decode attention with the rotary embedding and the KV-cache write folded in, and (given a `tickets`
buffer) the split-KV reduce too: one launch per layer where a decode step otherwise makes two or three
(kernels/rotary_cache.py, then kernels/attention_decode.py's decode and reduce kernels).

Kernel -> launcher; reference: kernels/reference.py::decode_rotary_attention (= rotary_and_write_kv, then
paged_attention). Program (b, kvh, split) rotates its group's query rows in registers as it loads them
(rotate-half: each lane d also loads its partner lane d +- D/2), and the one split that holds the new
token's position rotates that token's k for kv head kvh, writes it and v into the token's cache slot, and
only then streams its keys, so the loop reads the new key back like any other. No other program reads
that slot in this launch: every other split ends before it. A slot < 0 (padding row of a captured batch)
writes nothing, as in rotary_cache.py; its seq_len of 0 gives an empty split and a zero output.
Rounding matches the unfused pair bit for bit: rotation in float32, rounded to q's / k's dtype, then to
the cache's. The reduce: see _reduce_if_last (the reduce kernel's maths, its float32 sums in split order).
With pdl (EngineConfig.skinny_matmul_pdl: the skinny projections around it launch early too) the launch
may start while the qkv projection before it runs (kernels/pdl.py): until that one completes, a program
reads only the step's inputs and pulls its first cached keys and values into L2 (earlier steps wrote them),
then it waits and at once lets the o projection after it launch, which pulls its weights into L2 while
this latency-bound kernel runs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from kernels.attention_decode import (_attend_split, _split_range, decode_tiles, reduce_splits, split_partials,
                                      used_splits)
from kernels.attention_prefill import LOG2E, dot_precision
from kernels.pdl import LINE_BYTES, interpreting, launch_options, prefetch_l2


@triton.jit
def _rotate_loaded(rows, d, d_valid, cos, sin_signed, mask, HALF: tl.constexpr):
    """rows: pointers [R, 1] to head vectors (or one scalar pointer, R = 1) -> [R, D_PAD] rotated in float32,
    0 where masked."""
    partner = tl.where(d < HALF, d + HALF, d - HALF)
    x = tl.load(rows + d[None, :], mask=mask, other=0.0).to(tl.float32)
    x_partner = tl.load(rows + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    return x * cos[None, :] + x_partner * sin_signed[None, :]


@triton.jit
def _decode_rotary_kernel(Q, K, V, K_CACHE, V_CACHE, O, PART_ACC, PART_M, PART_L, TICKETS, POS, CS, SLOTS,
                          SEQ_LENS, BLOCK_TABLES, qk_scale,
                          stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
                          stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
                          stride_ob, stride_oh, stride_bt, stride_cs,
                          GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                          D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                          NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr, LAST_SPLIT_REDUCES: tl.constexpr,
                          PDL: tl.constexpr, PREFETCH_KEYS: tl.constexpr, KV_LINES: tl.constexpr):
    # grid: (B, KVH, NUM_SPLITS), as kernels/attention_decode.py; every head-dim stride is 1
    HALF: tl.constexpr = HEAD_DIM // 2
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    seq_len = tl.load(SEQ_LENS + b)
    lo, hi = _split_range(seq_len, BLOCK_N, NUM_SPLITS)
    pos = tl.load(POS + b).to(tl.int64)
    d = tl.arange(0, D_PAD)
    d_valid = d < HEAD_DIM
    lane = tl.where(d < HALF, d, d - HALF)
    cos = tl.load(CS + pos * stride_cs + lane, mask=d_valid, other=0.0).to(tl.float32)
    sin = tl.load(CS + pos * stride_cs + HALF + lane, mask=d_valid, other=0.0).to(tl.float32)
    sin = tl.where(d < HALF, -sin, sin)  # x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin
    if PDL:  # q, k and v are the qkv projection's output: nothing of them before the wait
        if lo < hi:
            _prefetch_kv(K_CACHE, V_CACHE, BLOCK_TABLES + b * stride_bt, kvh, lo, hi, stride_kcb, stride_kcs,
                         stride_kch, stride_vcb, stride_vcs, stride_vch, HEAD_DIM, BLOCK_SIZE, PREFETCH_KEYS,
                         KV_LINES)
        gdc_wait()
        gdc_launch_dependents()

    if (lo <= seq_len - 1) & (seq_len - 1 < hi):  # this split holds the new token
        slot = tl.load(SLOTS + b).to(tl.int64)
        if slot >= 0:
            k_row = K + b * stride_kb + kvh * stride_kh
            k = _rotate_loaded(k_row, d, d_valid, cos, sin, d_valid[None, :], HALF)  # [1, D_PAD]
            k_dst = K_CACHE + (slot // BLOCK_SIZE) * stride_kcb + (slot % BLOCK_SIZE) * stride_kcs \
                + kvh * stride_kch + d[None, :]
            tl.store(k_dst, k.to(K.dtype.element_ty).to(K_CACHE.dtype.element_ty), mask=d_valid[None, :])
            v = tl.load(V + b * stride_vb + kvh * stride_vh + d, mask=d_valid)
            v_dst = V_CACHE + (slot // BLOCK_SIZE) * stride_vcb + (slot % BLOCK_SIZE) * stride_vcs \
                + kvh * stride_vch + d
            tl.store(v_dst, v.to(V_CACHE.dtype.element_ty), mask=d_valid)
        # every thread's stores land before any thread's loads in the key loop below
        tl.debug_barrier()

    # An empty split (past the context: splits are sized by the context, their count by the captured
    # maximum) has nothing to add; the last split's reduce reads the used splits only, so it skips its work.
    # The reduce kernel reads every split's partials, so without the last split reducing it writes them.
    if (lo < hi) | (LAST_SPLIT_REDUCES == 0):
        g = tl.arange(0, G_PAD)
        head = kvh * GROUP + g
        q_rows = Q + b * stride_qb + head[:, None] * stride_qh  # [G_PAD, 1]
        q = _rotate_loaded(q_rows, d, d_valid, cos, sin, (g < GROUP)[:, None] & d_valid[None, :], HALF)
        q = q.to(Q.dtype.element_ty)  # [G_PAD, D_PAD], as the unfused kernel's rotated q buffer holds it
        _attend_split(q, lo, hi, K_CACHE, V_CACHE, O, PART_ACC, PART_M, PART_L, BLOCK_TABLES, qk_scale,
                      stride_kcb, stride_kcs, stride_kch, 1, stride_vcb, stride_vcs, stride_vch, 1,
                      stride_ob, stride_oh, 1, stride_bt,
                      GROUP, G_PAD, HEAD_DIM, D_PAD, BLOCK_SIZE, BLOCK_N, NUM_SPLITS, PRECISION)
    if LAST_SPLIT_REDUCES:
        _reduce_if_last(O, PART_ACC, PART_M, PART_L, TICKETS, used_splits(seq_len, BLOCK_N, NUM_SPLITS),
                        stride_ob, stride_oh, GROUP, G_PAD, HEAD_DIM, D_PAD, NUM_SPLITS)


@triton.jit
def _prefetch_kv(K_CACHE, V_CACHE, bt_row, kvh, lo, hi, stride_kcb, stride_kcs, stride_kch,
                 stride_vcb, stride_vcs, stride_vch, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                 KEYS: tl.constexpr, LINES: tl.constexpr):
    """prefetch.global.L2 of the cached K and V rows of keys lo .. lo + KEYS - 1 (at most hi - 1) of kv head
    kvh: one block-table load, then hints only, so that the key loop's first loads hit L2 instead of going
    to memory one latency after another. The new token's slot is among them; its line is written later in
    this launch, which a prefetch into L2 (the point of coherence) cannot make stale."""
    n = tl.minimum(lo + tl.arange(0, KEYS), hi - 1)
    page = tl.load(bt_row + n // BLOCK_SIZE).to(tl.int64)
    slot = n % BLOCK_SIZE
    lines = tl.minimum(tl.arange(0, LINES) * (1024 // K_CACHE.dtype.element_ty.primitive_bitwidth), HEAD_DIM - 1)
    prefetch_l2(K_CACHE + (page * stride_kcb + slot * stride_kcs + kvh * stride_kch)[:, None] + lines[None, :])
    prefetch_l2(V_CACHE + (page * stride_vcb + slot * stride_vcs + kvh * stride_vch)[:, None] + lines[None, :])


@triton.jit
def _below(split, used, N: tl.constexpr):
    """split < used as an [N] mask: the interpreter types a scalar comparison with a loaded value as int32,
    which a load refuses as its mask."""
    return tl.full([N], split, tl.int32) < used


@triton.jit
def _reduce_if_last(O, PART_ACC, PART_M, PART_L, TICKETS, used, stride_ob, stride_oh,
                    GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                    NUM_SPLITS: tl.constexpr, REDUCE_UNROLL: tl.constexpr = 4):
    """The split-KV reduce without its own launch: each (sequence, kv head)'s splits take a ticket after
    storing their partials, and the one that draws the last combines the group's partials (the reduce
    kernel's maths) and resets the ticket counter to 0 for the next launch (a graph replays this one).
    The barrier puts every thread's partial stores before the ticket's release (acq_rel at GPU scope);
    the reads skip L1 (.cg), which may hold lines of an earlier replay."""
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    tl.debug_barrier()
    counter = TICKETS + b * tl.num_programs(1) + kvh
    if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == NUM_SPLITS - 1:
        g = tl.arange(0, G_PAD)
        g_valid = g < GROUP
        head = kvh * GROUP + g
        d = tl.arange(0, D_PAD)
        row = (b * tl.num_programs(1) * GROUP + head) * NUM_SPLITS  # [G_PAD] first partial of each head
        # REDUCE_UNROLL splits a pass, unrolled, so that their loads are in flight together: one L2 latency
        # a pass instead of one a split (a plain loop here compiled to a load-use stall per split on sm_90).
        # Only the `used` splits that hold keys are read (the empty ones wrote nothing); the sums are the
        # reduce kernel's, whose empty splits add weight 0 (+0 changes no sum), in the same order.
        m_max = tl.full([G_PAD], float("-inf"), tl.float32)
        for s0 in range(0, used, REDUCE_UNROLL):
            for j in tl.static_range(REDUCE_UNROLL):
                ok = g_valid & _below(s0 + j, used, G_PAD)
                m_max = tl.maximum(m_max, tl.load(PART_M + row + s0 + j, mask=ok, other=float("-inf"),
                                                  cache_modifier=".cg"))
        m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # an empty context: every weight is 0
        total = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], tl.float32)
        for s0 in range(0, used, REDUCE_UNROLL):
            for j in tl.static_range(REDUCE_UNROLL):
                ok = g_valid & _below(s0 + j, used, G_PAD)
                w = tl.exp2(tl.load(PART_M + row + s0 + j, mask=ok, other=float("-inf"), cache_modifier=".cg")
                            - m_max)  # [G_PAD]; empty splits have m = -inf: weight 0
                total += w * tl.load(PART_L + row + s0 + j, mask=ok, other=0.0, cache_modifier=".cg")
                acc += w[:, None] * tl.load(PART_ACC + (row + s0 + j)[:, None] * D_PAD + d[None, :],
                                            mask=ok[:, None], other=0.0, cache_modifier=".cg")
        out = acc / tl.where(total > 0, total, 1.0)[:, None]
        tl.store(O + b * stride_ob + head[:, None] * stride_oh + d[None, :], out.to(O.dtype.element_ty),
                 mask=g_valid[:, None] & (d < HEAD_DIM)[None, :])
        tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")


def decode_rotary_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                            cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            slot_mapping: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                            scale: float, max_seq_len: int, out: torch.Tensor | None = None,
                            num_splits: int | None = None, block_n: int | None = None, num_warps: int = 4,
                            num_stages: int = 2, tickets: torch.Tensor | None = None,
                            pdl: bool = False) -> torch.Tensor:
    """One new token per sequence. q [B, H, D], k / v [B, KVH, D] unrotated (may be column slices of the
    fused qkv matmul's output), positions [B], cos_sin_cache [max_pos, D], caches [num_blocks, block_size,
    KVH, D], slot_mapping [B] (< 0: padding), seq_lens [B] counting the new token, block_tables [B, max_blocks]
    -> attention output [B, H, D]; the new k (rotated) and v are in the caches afterwards.

    tickets: int32 zeros with at least B * KVH entries, kept across calls (each launch leaves them 0):
    with it, split partials are combined by the last split to finish instead of a second (reduce) launch.
    pdl: launch by programmatic dependent launch (sm_90+; see the module's docstring); no effect in the
    interpreter."""
    batch, _, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert head_dim % 2 == 0
    assert k.shape == v.shape == (batch, num_kv_heads, head_dim) and v_cache.shape == k_cache.shape
    t = decode_tiles(q, k_cache, max_seq_len, num_splits, block_n)
    assert all(x.stride(-1) == 1 for x in (q, k, v, k_cache, v_cache, cos_sin_cache))
    if out is None:
        out = torch.empty_like(q)
    assert out.stride(-1) == 1
    if batch == 0:
        return out
    part_acc, part_m, part_l = split_partials(out, t.num_splits, t.d_pad)
    last_split_reduces = t.num_splits > 1 and tickets is not None
    if last_split_reduces:
        assert tickets.dtype == torch.int32 and tickets.numel() >= batch * num_kv_heads
    pdl = pdl and not interpreting()
    _decode_rotary_kernel[(batch, num_kv_heads, t.num_splits)](
        q, k, v, k_cache, v_cache, out, part_acc, part_m, part_l, tickets if last_split_reduces else seq_lens,
        positions, cos_sin_cache, slot_mapping,
        seq_lens, block_tables, scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3], out.stride(0), out.stride(1), block_tables.stride(0),
        cos_sin_cache.stride(0),
        GROUP=t.group, G_PAD=t.g_pad, HEAD_DIM=head_dim, D_PAD=t.d_pad, BLOCK_SIZE=block_size, BLOCK_N=t.block_n,
        NUM_SPLITS=t.num_splits,
        PRECISION=dot_precision(q.dtype), LAST_SPLIT_REDUCES=last_split_reduces,
        # the keys the loop's first two tiles read, and the 128-byte lines of one cached row
        PDL=pdl, PREFETCH_KEYS=2 * t.block_n,
        KV_LINES=triton.next_power_of_2(triton.cdiv(head_dim * k_cache.element_size(), LINE_BYTES)),
        num_warps=num_warps, num_stages=num_stages, **launch_options(pdl),
    )
    if not last_split_reduces:
        reduce_splits(out, part_acc, part_m, part_l, t.num_splits, t.d_pad)
    return out
