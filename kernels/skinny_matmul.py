"""Matmuls of at most 16 rows (decode steps of small batches), with the small op before them folded in.

y [M, N] = prologue(x) [M, K] @ W[N, K]^T (+ bias), M <= 16. Such a matmul only streams W from memory:
the question is how close to the copy bandwidth, and how much of each launch is spent before and after the
stream. cuBLAS's kernels for these shapes reach about 54% of it on an H100 (README, performance); what
else a layer does at batch 1 is small kernels whose launch gaps add up. So the input's op is done here, on
the few rows of x each program reads anyway:
  PROLOGUE 0: x as it is;
  PROLOGUE 1: silu(gate) * up over x = [gate | up] (the MLP's down projection, K = intermediate size),
              only when asked: every program recomputes it over all of x (see silu_mul_linear);
  PROLOGUE 2: RMSNorm of x + residual (a layer's norms, before qkv and before gate_up); program 0 also
              writes x + residual, the residual stream the rest of the layer reads.
Rounding follows the reference compositions (kernels/reference.py: rms_norm, silu_and_mul, then F.linear).

Each program owns BLOCK_N output columns of every row and streams its [BLOCK_N, K] slice of W once;
tl.dot pads the rows to 16 (tensor cores idle is nothing here: the bytes are the cost), and the prologue's
work must stay under what an SM can issue while a weight tile streams in (the loop's instruction counts
from ptxas are in the kernel's comments). Kernel -> launchers.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from kernels.activation import silu_and_mul
from kernels.pdl import LINE_BYTES, interpreting, launch_options, prefetch_l2

MAX_ROWS = 16
# with PDL, the bytes of its weight slice a program pulls into L2 before it waits on the kernel before: the
# whole slice of o (16 x 2,048 bf16 at batch 1 in Llama-3.2-1B), which follows the latency-bound attention;
# a cap, so that the programs resident at once never ask for more than about half of an H100's 50 MB L2
PREFETCH_BYTES = 64 * 1024


class EarlyLaunch(NamedTuple):
    """What a PDL launch does before the kernel before it ends: the bytes of its weight slice each program
    prefetches, and whether it lets the next kernel launch right after its wait (else after its K loop;
    benchmarks/skinny_matmul.py times both). pdl=True is EarlyLaunch()."""
    prefetch_bytes: int = PREFETCH_BYTES
    early_trigger: bool = False
PLAIN, SILU_MUL, RMS_NORM = 0, 1, 2


@triton.jit
def _x_tile(x_rows, RES, NORM_W, rows, stride_rm, kk, x_mask, k_ok, inv_rms, K, out_dtype: tl.constexpr,
            PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """The [BLOCK_M, BLOCK_K] tile of prologue(x) at columns kk, in the weight's dtype."""
    in_dtype = x_rows.dtype.element_ty
    if PROLOGUE == 1:
        gate = tl.load(x_rows + kk[None, :], mask=x_mask, other=0.0).to(tl.float32)
        up = tl.load(x_rows + K + kk[None, :], mask=x_mask, other=0.0).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(in_dtype).to(tl.float32)
        x = (silu * up).to(out_dtype)
    elif PROLOGUE == 2:
        h = tl.load(x_rows + kk[None, :], mask=x_mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(RES + rows[:, None] * stride_rm + kk[None, :], mask=x_mask, other=0.0)
            h = (h.to(tl.float32) + r.to(tl.float32)).to(in_dtype)
        normed = (h.to(tl.float32) * inv_rms[:, None]).to(in_dtype).to(tl.float32)
        g = tl.load(NORM_W + kk, mask=k_ok, other=0.0).to(tl.float32)
        x = (g[None, :] * normed).to(out_dtype)
    else:
        x = tl.load(x_rows + kk[None, :], mask=x_mask, other=0.0)
    return x


@triton.jit
def _skinny_matmul_kernel(X, RES, RES_OUT, NORM_W, W, BIAS, Y, eps, M, N, K,
                          stride_xm, stride_rm, stride_rom, stride_wn, stride_ym,
                          PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          IEEE: tl.constexpr, PDL: tl.constexpr, PREFETCH_LINES: tl.constexpr,
                          EARLY_TRIGGER: tl.constexpr, M_PAD: tl.constexpr):
    # grid: (cdiv(N, BLOCK_N),); every program reads all M (<= M_PAD <= BLOCK_M) rows of x. A prologue works
    # on M_PAD rows only: the tile tl.dot takes has BLOCK_M = 16, and SiLU over 16 rows where one is real
    # made the down projection's loop ~4,000 instructions a 16 KiB weight tile on sm_90 (ptxas), three times
    # what an SM issues while that tile streams in at the copy bandwidth. Plain x (M_PAD = BLOCK_M: its
    # masked rows cost nothing) is loaded straight into the dot's tile, which the row copies below would
    # only slow (261 instructions a tile against 185 at one row)
    pid = tl.program_id(0)
    rows = tl.arange(0, M_PAD)
    row_ok = rows < M
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = X + rows[:, None].to(tl.int64) * stride_xm
    w_rows = W + cols[:, None].to(tl.int64) * stride_wn
    in_dtype = X.dtype.element_ty
    w_dtype = W.dtype.element_ty
    if PDL:
        # launched early (programmatic dependent launch, kernels/pdl.py): the weight never depends on the
        # kernel before this one, so the start of this program's slice is pulled into L2 while that kernel
        # finishes (a hint: no registers held, the loop below unchanged); x and the residual, its outputs,
        # are read after the wait
        lines = tl.minimum(tl.arange(0, PREFETCH_LINES) * (1024 // w_dtype.primitive_bitwidth), K - 1)
        prefetch_l2(W + tl.minimum(cols, N - 1)[:, None].to(tl.int64) * stride_wn + lines[None, :])
        gdc_wait()
        if EARLY_TRIGGER:  # the next kernel may launch now and prefetch while this one streams its weight
            gdc_launch_dependents()
    inv_rms = tl.full([M_PAD], 1.0, dtype=tl.float32)
    if PROLOGUE == 2:
        # first pass over x (+ residual): each row's sum of squares; x is M x K, a few KiB, read from L2
        sum_sq = tl.zeros([M_PAD], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            mask = row_ok[:, None] & (kk < K)[None, :]
            h = tl.load(x_rows + kk[None, :], mask=mask, other=0.0)
            if HAS_RESIDUAL:
                r = tl.load(RES + rows[:, None] * stride_rm + kk[None, :], mask=mask, other=0.0)
                h = (h.to(tl.float32) + r.to(tl.float32)).to(in_dtype)
                if pid == 0:
                    tl.store(RES_OUT + rows[:, None] * stride_rom + kk[None, :], h, mask=mask)
            hf = h.to(tl.float32)
            sum_sq += tl.sum(hf * hf, 1)
        inv_rms = tl.rsqrt(sum_sq / K + eps)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        w = tl.load(w_rows + kk[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
        x = _x_tile(x_rows, RES, NORM_W, rows, stride_rm, kk, row_ok[:, None] & k_ok[None, :], k_ok, inv_rms, K,
                    w_dtype, PROLOGUE, HAS_RESIDUAL)  # [M_PAD, BLOCK_K]
        if PROLOGUE == 1 and M_PAD == 1:
            # one row of SiLU x mul: products and sums on the CUDA cores. Fed to tl.dot, x takes the MMA
            # operand's layout, which each warp holds whole, so every warp recomputed the SiLU: ~1,950
            # instructions a tile on sm_90 against ~580 this way (the other prologues are cheaper with the dot)
            acc += tl.sum(w.to(tl.float32) * x.to(tl.float32), axis=1)[None, :]
        else:  # the dot's rows: row r is x's row r % M_PAD (rows past M are never stored)
            if M_PAD < BLOCK_M:
                x = tl.reshape(tl.broadcast_to(x[None, :, :], (BLOCK_M // M_PAD, M_PAD, BLOCK_K)),
                               (BLOCK_M, BLOCK_K))
            acc += tl.dot(x, tl.trans(w), input_precision="ieee" if IEEE else None)
    if PDL and not EARLY_TRIGGER:
        gdc_launch_dependents()  # the next kernel may launch: this one has only its stores left
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_rows = tl.arange(0, BLOCK_M)
    tl.store(Y + out_rows[:, None] * stride_ym + cols[None, :], acc.to(Y.dtype.element_ty),
             mask=(out_rows < M)[:, None] & col_ok[None, :])


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


@functools.lru_cache(maxsize=None)
def pick_tile(n: int, k: int, elem_size: int, x_operands: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages). The widest column block that still gives every SM two
    programs; K tiles that make each weight tile 16 KiB (the stream needs about 20 KiB in flight an SM on an
    H100: 3 TB/s x ~0.7 us over 132 SMs); as many stages as fit 100 KiB of shared memory beside the
    x_operands 16-row tiles of x a stage also holds (1: plain or norm alone, 2: SiLU's gate and up, or norm's x
    and residual). A guess until benchmarks/skinny_matmul.py's sweep on a GPU says otherwise."""
    block_n = 16
    for candidate in (64, 32):
        if triton.cdiv(n, candidate) >= 2 * _num_sms(device):
            block_n = candidate
            break
    block_k = max(16, min(triton.next_power_of_2(k), 16384 // (block_n * elem_size)))
    stage_bytes = (block_n + MAX_ROWS * x_operands) * block_k * elem_size
    return block_n, block_k, 4, max(2, min(4, 100 * 1024 // stage_bytes))


def _launch(x, w, bias, out, prologue, k, residual=None, res_out=None, norm_weight=None, eps=0.0,
            tile=None, pdl: "bool | EarlyLaunch" = False) -> torch.Tensor:
    m, n = x.shape[0], w.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"skinny matmul: {m} rows, at most {MAX_ROWS}")
    if w.stride(-1) != 1 or x.stride(-1) != 1:
        raise ValueError("skinny matmul: x and the weight need unit stride along K")
    if m == 0 or n == 0:
        return out
    x_operands = 2 if prologue == SILU_MUL or residual is not None else 1
    block_n, block_k, warps, stages = tile or pick_tile(n, k, x.element_size(), x_operands, x.device)
    ieee = x.dtype == torch.float32 or w.dtype == torch.float32
    early = pdl if isinstance(pdl, EarlyLaunch) else EarlyLaunch()
    pdl = pdl is not False and not interpreting()  # grid dependencies and inline PTX: the interpreter has neither
    # lines of each weight row to prefetch: prefetch_bytes over the program's block_n rows, at most the row
    row_bytes = min(k * w.element_size(), max(LINE_BYTES, early.prefetch_bytes // block_n))
    prefetch_lines = triton.next_power_of_2(triton.cdiv(row_bytes, LINE_BYTES))
    _skinny_matmul_kernel[(triton.cdiv(n, block_n),)](
        x, residual if residual is not None else x, res_out if res_out is not None else x,
        norm_weight if norm_weight is not None else w, w, bias if bias is not None else w, out, eps, m, n, k,
        x.stride(0), residual.stride(0) if residual is not None else 0,
        res_out.stride(0) if res_out is not None else 0, w.stride(0), out.stride(0),
        PROLOGUE=prologue, HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
        BLOCK_M=MAX_ROWS, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=ieee, PDL=pdl, PREFETCH_LINES=prefetch_lines,
        EARLY_TRIGGER=early.early_trigger, M_PAD=MAX_ROWS if prologue == PLAIN else triton.next_power_of_2(m),
        num_warps=warps, num_stages=stages, **launch_options(pdl))
    return out


def _out(x, w, out_dtype, out):
    return out if out is not None else torch.empty(x.shape[0], w.shape[0], dtype=out_dtype or w.dtype,
                                                   device=x.device)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  out_dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
                  tile=None, pdl: "bool | EarlyLaunch" = False) -> torch.Tensor:
    """x [M, K] @ weight[N, K]^T (+ bias) -> [M, N] in out_dtype (default the weight's): F.linear.

    tile: (BLOCK_N, BLOCK_K, warps, stages) instead of pick_tile's. pdl: launch early with programmatic
    dependent launch (sm_90+; EngineConfig.skinny_matmul_pdl), pulling the start of each program's weight
    slice into L2 while the kernel before finishes (an EarlyLaunch says how much, and when the next kernel
    may launch); no effect in the interpreter (same for the two below)."""
    return _launch(x, weight, bias, _out(x, weight, out_dtype, out), PLAIN, x.shape[1], tile=tile, pdl=pdl)


def silu_mul_linear(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    out: torch.Tensor | None = None, tile=None, pdl: "bool | EarlyLaunch" = False,
                    fold: bool = False) -> torch.Tensor:
    """gate_up [M, 2I] (gate | up) -> silu(gate) * up @ weight[N, I]^T -> [M, N].

    fold: SiLU x mul inside this kernel (one launch) or by kernels/activation.py first (two, the default).
    Folded, every program recomputes the SiLU of all of x (N / BLOCK_N times over): at 4 rows the loop took
    ~1,970 instructions a 16 KiB weight tile on sm_90 (ptxas), more than an SM issues while the tile streams
    in; at one row the kernel multiplies on the CUDA cores (~580), but Triton then loads the weight without
    its cp.async pipeline. Which costs less than the extra launch is for a GPU (benchmarks/skinny_matmul.py
    times both at each row count)."""
    if not fold:
        return skinny_linear(silu_and_mul(gate_up), weight, bias, out=out, tile=tile, pdl=pdl)
    return _launch(gate_up, weight, bias, _out(gate_up, weight, None, out), SILU_MUL, gate_up.shape[1] // 2,
                   tile=tile, pdl=pdl)


def rms_norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                    weight: torch.Tensor, bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
                    res_out: torch.Tensor | None = None, tile=None,
                    pdl: "bool | EarlyLaunch" = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) * norm_weight @ weight^T (+ bias), x + residual); residual None -> (.., x).
    x [M, K], residual [M, K]; the norm's output never exists in memory."""
    if residual is not None:
        if residual.stride(-1) != 1:
            residual = residual.contiguous()
        res_out = res_out if res_out is not None else torch.empty_like(x)
    y = _launch(x, weight, bias, _out(x, weight, None, out), RMS_NORM, x.shape[1], residual=residual,
                res_out=res_out, norm_weight=norm_weight, eps=eps, tile=tile, pdl=pdl)
    return y, (res_out if residual is not None else x)
