"""Scatter this step's new K/V into their paged-cache slots.

Kernel -> launcher. One program per token writes all kv heads of K and V ([KVH, D] tiles); a slot < 0
(padding token of a captured batch) is skipped, leaving the cache untouched.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(K, V, K_CACHE, V_CACHE, SLOTS,
                     stride_kt, stride_kh, stride_kd,
                     stride_vt, stride_vh, stride_vd,
                     stride_kcb, stride_kcs, stride_kch, stride_kcd,
                     stride_vcb, stride_vcs, stride_vch, stride_vcd,
                     NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                     H_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    # grid: (T,)
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOTS + t).to(tl.int64)
    if slot >= 0:
        block = slot // BLOCK_SIZE
        offset = slot % BLOCK_SIZE
        h = tl.arange(0, H_PAD)
        d = tl.arange(0, D_PAD)
        mask = (h < NUM_KV_HEADS)[:, None] & (d < HEAD_DIM)[None, :]  # [H_PAD, D_PAD]
        k = tl.load(K + t * stride_kt + h[:, None] * stride_kh + d[None, :] * stride_kd, mask=mask)
        v = tl.load(V + t * stride_vt + h[:, None] * stride_vh + d[None, :] * stride_vd, mask=mask)
        kc = K_CACHE + block * stride_kcb + offset * stride_kcs + h[:, None] * stride_kch + d[None, :] * stride_kcd
        vc = V_CACHE + block * stride_vcb + offset * stride_vcs + h[:, None] * stride_vch + d[None, :] * stride_vcd
        tl.store(kc, k.to(K_CACHE.dtype.element_ty), mask=mask)
        tl.store(vc, v.to(V_CACHE.dtype.element_ty), mask=mask)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """k, v [T, KVH, D] -> k_cache, v_cache [num_blocks, block_size, KVH, D] at slot_mapping [T] (< 0 skipped)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    block_size = k_cache.shape[1]
    h_pad = triton.next_power_of_2(num_kv_heads)
    d_pad = triton.next_power_of_2(head_dim)
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, H_PAD=h_pad, D_PAD=d_pad, BLOCK_SIZE=block_size,
        num_warps=4 if h_pad * d_pad >= 1024 else 1,
    )
