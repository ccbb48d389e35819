"""Rotary embedding (HF rotate-half / NeoX convention) on q and k in one launch.

Kernel -> launcher. One program per token rotates all query heads and all kv heads; cos/sin come from
cos_sin_cache [max_pos, D] = cat(cos, sin) over D/2 frequencies; the rotation runs in float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_rows(X, OUT, cos, sin, stride_xh, stride_oh, W, eps,
                 NUM_HEADS: tl.constexpr, H_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
                 HAS_NORM: tl.constexpr):
    # X, OUT: one token's row of heads, [NUM_HEADS, 2 * HALF] at head stride stride_xh / stride_oh.
    # HAS_NORM: RMSNorm each head over its 2 * HALF values with weight W first (Qwen3's q/k norm).
    h = tl.arange(0, H_PAD)
    i = tl.arange(0, HALF_PAD)
    mask = (h < NUM_HEADS)[:, None] & (i < HALF)[None, :]  # [H_PAD, HALF_PAD]: pads heads and HALF (D 80, 96)
    src = X + h[:, None] * stride_xh + i[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        x1, x2 = _rms_norm_halves(x1, x2, W, eps, i, X.dtype.element_ty, HALF)
    # Round to the input's dtype first, then to OUT's. OUT may be a narrower KV cache (fp8, from
    # kernels/rotary_cache.py): it then gets the same double rounding as rotating here and casting in the
    # cache write. A no-op cast when the dtypes agree (q, or a cache in the model's dtype).
    dst = OUT + h[:, None] * stride_oh + i[None, :]
    tl.store(dst, (x1 * cos - x2 * sin).to(X.dtype.element_ty).to(OUT.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(X.dtype.element_ty).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_halves(x1, x2, W, eps, i, dtype: tl.constexpr, HALF: tl.constexpr):
    """RMSNorm of rows split in halves [rows, HALF_PAD] (padding lanes zero), rounded as kernels/norm.py rounds:
    the normed value to the input's dtype, then times the weight, rounded again."""
    inv = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)[:, None]
    w1 = tl.load(W + i, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(W + HALF + i, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
    y1 = (w1 * (x1 * inv).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    y2 = (w2 * (x2 * inv).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    return y1, y2


@triton.jit
def _rotary_kernel(Q, K, QO, KO, POS, CS, stride_qt, stride_qh, stride_kt, stride_kh,
                   stride_qot, stride_qoh, stride_kot, stride_koh, stride_cs,
                   NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, QH_PAD: tl.constexpr,
                   KH_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    # grid: (T,)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(POS + t).to(tl.int64)
    i = tl.arange(0, HALF_PAD)
    cos = tl.load(CS + pos * stride_cs + i, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(CS + pos * stride_cs + HALF + i, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
    _rotate_rows(Q + t * stride_qt, QO + t * stride_qot, cos, sin, stride_qh, stride_qoh, Q, 0.0,
                 NUM_HEADS, QH_PAD, HALF, HALF_PAD, False)
    _rotate_rows(K + t * stride_kt, KO + t * stride_kot, cos, sin, stride_kh, stride_koh, K, 0.0,
                 NUM_KV_HEADS, KH_PAD, HALF, HALF_PAD, False)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                 inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, H, D], k [T, KVH, D], positions [T] -> rotated (q, k); inplace writes back into q and k."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos_sin_cache.stride(-1) == 1
    q_out = q if inplace else torch.empty_like(q)
    k_out = k if inplace else torch.empty_like(k)
    if num_tokens:
        half = head_dim // 2
        _rotary_kernel[(num_tokens,)](
            q, k, q_out, k_out, positions, cos_sin_cache,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), cos_sin_cache.stride(0),
            NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, QH_PAD=triton.next_power_of_2(num_heads),
            KH_PAD=triton.next_power_of_2(num_kv_heads), HALF=half, HALF_PAD=triton.next_power_of_2(half),
            num_warps=4,
        )
    return q_out, k_out
