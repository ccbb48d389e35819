"""SiLU(gate) * up over the fused gate|up projection output.

Kernel -> launcher. Rounding follows the reference: silu rounded to the input dtype before the multiply.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(X, OUT, stride_x, stride_o, INTER: tl.constexpr, BLOCK: tl.constexpr):
    # grid: (T, cdiv(I, BLOCK)); row t of X is [gate (I) | up (I)]
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTER
    gate = tl.load(X + t * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + t * stride_x + INTER + cols, mask=mask, other=0.0).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(X.dtype.element_ty).to(tl.float32)
    tl.store(OUT + t * stride_o + cols, (silu * up).to(OUT.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """x [..., 2I] (gate | up) -> silu(gate) * up [..., I]."""
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * inter)  # [T, 2I]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape[0], inter, dtype=x.dtype, device=x.device)
    if x2.shape[0] and inter:
        block = min(block, triton.next_power_of_2(inter))
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(inter, block))](
            x2, out, x2.stride(0), out.stride(0), INTER=inter, BLOCK=block, num_warps=4,
        )
    return out.view(*x.shape[:-1], inter)
