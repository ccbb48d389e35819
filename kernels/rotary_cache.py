"""Rotary embedding fused with the paged KV-cache write: one launch per layer instead of two.

Kernel -> launcher; reference: kernels/reference.py::rotary_and_write_kv (= apply_rotary, then
write_kv_cache). Unfused, the rotated k makes a round trip through memory only to be read back by the cache
write, and a captured decode step pays a second launch per layer. Here one program per token rotates all
query heads into q_out, rotates all kv heads of k straight into the token's cache slot, and copies v into
its slot; a slot < 0 (padding row of a captured batch) skips both cache stores but not the q rotation,
whose row the attention still reads. Rotation as in kernels/rotary.py: HF rotate-half (NeoX), float32.
With qk_norm (Qwen3) each head of q and k is RMS-normed in registers before its rotation, which saves the
two norm launches and the copies of q and k out of the fused projection's strided views.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.rotary import _rotate_rows


@triton.jit
def _copy_rows(X, OUT, stride_xh, stride_oh,
               NUM_HEADS: tl.constexpr, H_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    # v needs no rotation; it moves as the same two [H_PAD, HALF_PAD] halves so the tiles match k's.
    h = tl.arange(0, H_PAD)
    i = tl.arange(0, HALF_PAD)
    mask = (h < NUM_HEADS)[:, None] & (i < HALF)[None, :]
    src = X + h[:, None] * stride_xh + i[None, :]
    dst = OUT + h[:, None] * stride_oh + i[None, :]
    tl.store(dst, tl.load(src, mask=mask).to(OUT.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, tl.load(src + HALF, mask=mask).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_cache_kernel(Q, K, V, QO, K_CACHE, V_CACHE, POS, CS, SLOTS, QW, KW, eps,
                         stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                         stride_qot, stride_qoh, stride_kcb, stride_kcs, stride_kch,
                         stride_vcb, stride_vcs, stride_vch, stride_cs,
                         NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, QH_PAD: tl.constexpr,
                         KH_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, HAS_NORM: tl.constexpr):
    # grid: (T,)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(POS + t).to(tl.int64)
    i = tl.arange(0, HALF_PAD)
    cos = tl.load(CS + pos * stride_cs + i, mask=i < HALF, other=0.0).to(tl.float32)[None, :]  # [1, HALF_PAD]
    sin = tl.load(CS + pos * stride_cs + HALF + i, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
    _rotate_rows(Q + t * stride_qt, QO + t * stride_qot, cos, sin, stride_qh, stride_qoh, QW, eps,
                 NUM_HEADS, QH_PAD, HALF, HALF_PAD, HAS_NORM)
    slot = tl.load(SLOTS + t).to(tl.int64)
    if slot >= 0:  # padding rows leave the cache untouched (slot -1 would address before the cache)
        block = slot // BLOCK_SIZE
        offset = slot % BLOCK_SIZE
        _rotate_rows(K + t * stride_kt, K_CACHE + block * stride_kcb + offset * stride_kcs, cos, sin,
                     stride_kh, stride_kch, KW, eps, NUM_KV_HEADS, KH_PAD, HALF, HALF_PAD, HAS_NORM)
        _copy_rows(V + t * stride_vt, V_CACHE + block * stride_vcb + offset * stride_vcs,
                   stride_vh, stride_vch, NUM_KV_HEADS, KH_PAD, HALF, HALF_PAD)


def rotary_and_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                        cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor, q_out: torch.Tensor | None = None,
                        qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> torch.Tensor:
    """q [T, H, D], k / v [T, KVH, D], positions [T], cos_sin_cache [max_pos, D] = cat(cos, sin),
    k_cache / v_cache [num_blocks, block_size, KVH, D], slot_mapping [T] (< 0 skipped) -> rotated q [T, H, D].
    qk_norm: (q weight [D], k weight [D], eps) to RMS-norm each head of q and k before the rotation.

    q, k and v may be strided views (column slices of the fused qkv matmul's output); only the head dim
    must be unit-stride. The caches may have another dtype than k / v (cast on store, fp8 included).
    q_out (default: a new contiguous tensor) receives the rotated q; it may be q itself.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert head_dim % 2 == 0 and k.shape == v.shape == (num_tokens, num_kv_heads, head_dim)
    assert k_cache.shape[2:] == (num_kv_heads, head_dim) and v_cache.shape == k_cache.shape
    if q_out is None:
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    assert q_out.shape == q.shape and q_out.dtype == q.dtype
    assert all(x.stride(-1) == 1 for x in (q, k, v, q_out, k_cache, v_cache, cos_sin_cache))
    if num_tokens == 0:
        return q_out
    half = head_dim // 2
    q_weight, k_weight, eps = qk_norm if qk_norm is not None else (q, k, 0.0)  # unread without the norm
    # (the kernel rounds weight x normed to q's dtype; a wider weight would promote in the unfused norm)
    assert qk_norm is None or (q_weight.shape == k_weight.shape == (head_dim,)
                               and q_weight.dtype == k_weight.dtype == q.dtype)
    _rotary_cache_kernel[(num_tokens,)](
        q, k, v, q_out, k_cache, v_cache, positions, cos_sin_cache, slot_mapping, q_weight, k_weight, eps,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        q_out.stride(0), q_out.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], cos_sin_cache.stride(0),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, QH_PAD=triton.next_power_of_2(num_heads),
        KH_PAD=triton.next_power_of_2(num_kv_heads), HALF=half, HALF_PAD=triton.next_power_of_2(half),
        BLOCK_SIZE=k_cache.shape[1], HAS_NORM=qk_norm is not None, num_warps=4,
    )
    return q_out
