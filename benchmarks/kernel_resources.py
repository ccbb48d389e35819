"""Every Triton kernel as the model launches it, compiled for a GPU architecture without a GPU: does it
build, and what does ptxas give it (registers, spills, shared memory, programs resident per SM)?

    python benchmarks/kernel_resources.py                  # sm_90 (H100) and sm_80 (A100)
    python benchmarks/kernel_resources.py --arch 90 --json out.json

Each case calls the launcher itself (kernels/aot.py::compile_only), at the shapes of real models: the
launcher's own grid, tiles, warps, stages and argument specialisation, so what compiles here is what a step
would launch. Static facts, not timings: a spill or a low residency explains a slow kernel, and a launch
that does not fit on an SM (shared memory) fails at run time, which the interpreter never shows.
Runs on CPU; needs TRITON_INTERPRET unset (the script clears it before importing the kernels).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: the kernels must be JIT functions
if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from benchmarks.results import write_json  # noqa: E402

from model.kv_dtype import FP8_MIN_CAPABILITY  # noqa: E402

FP8 = torch.float8_e4m3fn
FP8_MIN_ARCH = 10 * FP8_MIN_CAPABILITY[0] + FP8_MIN_CAPABILITY[1]  # below it model/kv_dtype.py refuses fp8 KV


@dataclass(frozen=True)
class Shape:
    name: str
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int


SHAPES = {
    "llama-3.2-1b": Shape("llama-3.2-1b", 32, 8, 64, 2048, 8192),
    "llama-3.1-8b": Shape("llama-3.1-8b", 32, 8, 128, 4096, 14336),
    "smollm2-135m": Shape("smollm2-135m", 9, 3, 64, 576, 1536),
    "qwen2-7b": Shape("qwen2-7b", 28, 4, 128, 3584, 18944),  # group 7: padded rows in every tile
    "d80": Shape("d80", 32, 8, 80, 2560, 6912),  # padded head dims
    "d96-mha": Shape("d96-mha", 32, 32, 96, 3072, 8192),  # no grouping
}
# (shape, model dtype, KV cache dtype): the presets and the GPU tests' dtypes, fp8 KV on two head dims
CONFIGS = [("llama-3.2-1b", torch.bfloat16, torch.bfloat16), ("llama-3.1-8b", torch.bfloat16, torch.bfloat16),
           ("llama-3.1-8b", torch.bfloat16, FP8), ("llama-3.2-1b", torch.bfloat16, FP8),
           ("smollm2-135m", torch.float32, torch.float32), ("smollm2-135m", torch.float16, torch.float16),
           ("qwen2-7b", torch.bfloat16, torch.bfloat16), ("d80", torch.bfloat16, torch.bfloat16),
           ("d96-mha", torch.bfloat16, torch.bfloat16)]
BLOCK_SIZE = 16
PDL_MIN_ARCH = 90  # programmatic dependent launch (griddepcontrol): Hopper and newer


@dataclass
class Row:
    arch: int
    config: str
    case: str
    kernel: str = ""
    status: str = "ok"  # ok | skipped: why | failed: error
    num_warps: int = 0
    num_stages: int = 0
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    shared: int = 0
    programs_per_sm: int = 0
    seconds: float = 0.0


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", FP8: "fp8"}[dtype]


def cases(shape: Shape, dtype: torch.dtype, kv_dtype: torch.dtype) -> list[tuple[str, Callable[[], object]]]:
    """(name, launch) pairs: each launch calls one launcher on small tensors with this model's shapes."""
    from kernels.activation import silu_and_mul
    from kernels.attention_decode import paged_decode_attention
    from kernels.attention_prefill import paged_prefill_attention
    from kernels.cache import write_kv_cache
    from kernels.decode_rotary import decode_rotary_attention
    from kernels.norm import rms_norm
    from kernels.prefill_tiles import max_tiles, prefill_block_m, tile_map
    from kernels.rotary import apply_rotary
    from kernels.rotary_cache import rotary_and_write_kv
    from kernels.skinny_matmul import rms_norm_linear, silu_mul_linear, skinny_linear

    h, kvh, d = shape.heads, shape.kv_heads, shape.head_dim
    group = h // kvh
    tokens, num_blocks = 4, 8
    qkv = torch.zeros(tokens, (h + 2 * kvh) * d, dtype=dtype)  # q, k, v as views of the fused projection
    q, k, v = qkv.split([h * d, kvh * d, kvh * d], dim=-1)
    q, k, v = q.view(tokens, h, d), k.view(tokens, kvh, d), v.view(tokens, kvh, d)
    k_cache = torch.zeros(num_blocks, BLOCK_SIZE, kvh, d, dtype=kv_dtype)
    v_cache = torch.zeros_like(k_cache)
    tables = torch.arange(2 * 4, dtype=torch.int32).view(2, 4)
    lens = torch.tensor([40, 60], dtype=torch.int32)
    starts = torch.tensor([0, 2, 4], dtype=torch.int32)
    slots = torch.arange(tokens, dtype=torch.int64)
    positions = torch.arange(tokens, dtype=torch.int64)
    cos_sin = torch.zeros(128, d, dtype=torch.float32)
    x = torch.zeros(tokens, shape.hidden, dtype=dtype)
    w = torch.zeros(shape.hidden, dtype=dtype)
    gate_up = torch.zeros(tokens, 2 * shape.intermediate, dtype=dtype)
    scale = d ** -0.5
    q_rows = torch.zeros(512, h, d, dtype=dtype)  # enough rows for the longest query below
    # the projections' weights (never read: empty, not zeroed); the head's vocabulary is Llama 3's
    w_qkv = torch.empty((h + 2 * kvh) * d, shape.hidden, dtype=dtype)
    w_gate_up = torch.empty(2 * shape.intermediate, shape.hidden, dtype=dtype)
    w_down = torch.empty(shape.hidden, shape.intermediate, dtype=dtype)
    w_head = torch.empty(128256, shape.hidden, dtype=dtype)

    def prefill(query_len: int, **kw):
        def launch():
            qs = torch.tensor([0, query_len, 2 * query_len], dtype=torch.int32)
            return paged_prefill_attention(q_rows[:2 * query_len], k_cache, v_cache, qs, lens, tables, scale,
                                           query_len, **kw)
        return launch

    def graphed_prefill(query_len: int):
        def launch():
            block_m = prefill_block_m(query_len * group, d)
            size = max_tiles(2 * query_len, 2, group, block_m)
            tiles = torch.tensor(tile_map([query_len, query_len], group, block_m, size), dtype=torch.int32)
            qs = torch.tensor([0, query_len, 2 * query_len], dtype=torch.int32)
            return paged_prefill_attention(q_rows[:2 * query_len], k_cache, v_cache, qs, lens, tables, scale,
                                           query_len, block_m=block_m, tiles=tiles)
        return launch

    out = [
        ("rms_norm", lambda: rms_norm(x, w, 1e-5)),
        ("rms_norm+residual", lambda: rms_norm(x, w, 1e-5, residual=x)),
        ("rms_norm per head (Qwen3 q/k)", lambda: rms_norm(q, w[:d], 1e-6)),
        ("silu_and_mul", lambda: silu_and_mul(gate_up)),
        ("rotary+kv_write", lambda: rotary_and_write_kv(q, k, v, positions, cos_sin, k_cache, v_cache, slots)),
        ("rotary+kv_write+qk_norm", lambda: rotary_and_write_kv(q, k, v, positions, cos_sin, k_cache, v_cache, slots,
                                                                qk_norm=(w[:d], w[:d], 1e-6))),
        ("rotary", lambda: apply_rotary(q, k, positions, cos_sin)),
        ("kv_write", lambda: write_kv_cache(k, v, k_cache, v_cache, slots)),
        ("decode, 1 split", lambda: paged_decode_attention(q[:2], k_cache, v_cache, lens, tables, scale, 64,
                                                           num_splits=1)),
        ("decode, 4 splits + reduce", lambda: paged_decode_attention(q[:2], k_cache, v_cache, lens, tables, scale,
                                                                     64, num_splits=4)),
        ("decode+rope+write, 1 split", lambda: decode_rotary_attention(
            q[:2], k[:2], v[:2], positions[:2], cos_sin, k_cache, v_cache, slots[:2], lens, tables, scale, 64,
            num_splits=1)),
        ("decode+rope+write, 4 splits", lambda: decode_rotary_attention(
            q[:2], k[:2], v[:2], positions[:2], cos_sin, k_cache, v_cache, slots[:2], lens, tables, scale, 64,
            num_splits=4)),
        ("decode+rope+write, last reduces", lambda: decode_rotary_attention(
            q[:2], k[:2], v[:2], positions[:2], cos_sin, k_cache, v_cache, slots[:2], lens, tables, scale, 64,
            num_splits=4, tickets=torch.zeros(2 * kvh, dtype=torch.int32))),
        ("skinny qkv, 1 row", lambda: skinny_linear(x[:1], w_qkv)),
        ("skinny norm+gate_up, 4 rows", lambda: rms_norm_linear(x, x, w, 1e-5, w_gate_up)),
        ("skinny silu+down folded, 1 row", lambda: silu_mul_linear(gate_up[:1], w_down, fold=True)),
        ("skinny silu+down folded, 4 rows", lambda: silu_mul_linear(gate_up, w_down, fold=True)),
        ("skinny silu, then down, 4 rows", lambda: silu_mul_linear(gate_up, w_down)),  # the default
        ("skinny lm_head -> float32, 1 row", lambda: skinny_linear(x[:1], w_head, out_dtype=torch.float32)),
        # skinny_matmul_pdl's launches: griddepcontrol, and the L2 prefetch issued before the wait
        ("skinny norm+gate_up, 4 rows, PDL", lambda: rms_norm_linear(x, x, w, 1e-5, w_gate_up, pdl=True)),
        ("skinny silu+down folded, 1 row, PDL", lambda: silu_mul_linear(gate_up[:1], w_down, pdl=True, fold=True)),
        ("decode+rope+write, last reduces, PDL", lambda: decode_rotary_attention(
            q[:2], k[:2], v[:2], positions[:2], cos_sin, k_cache, v_cache, slots[:2], lens, tables, scale, 64,
            num_splits=4, tickets=torch.zeros(2 * kvh, dtype=torch.int32), pdl=True)),
        ("prefill, 2 x 1 token", prefill(1)),  # a mixed step's decode rows: the smallest tile
        ("prefill, 2 x 40", prefill(40)),
        ("prefill, 2 x 256", prefill(256)),
        ("prefill, 2 x 256, heavy first", prefill(256, heavy_first=True)),
        ("prefill, 2 x 256, graphed tiles", graphed_prefill(256)),
    ]
    if kv_dtype != dtype:  # the cache dtype matters only where the cache is read or written
        out = [c for c in out if c[0].startswith(("rotary+kv", "kv_write", "decode", "prefill"))]
    return out


def compile_config(arch: int, shape_name: str, dtype: torch.dtype, kv_dtype: torch.dtype) -> list[Row]:
    """Every case of one (model shape, dtypes) compiled for sm_<arch>: one Row per kernel launched."""
    from kernels.aot import compile_only

    rows = []
    config = f"{shape_name} {dtype_name(dtype)}, kv {dtype_name(kv_dtype)}"
    for case, launch in cases(SHAPES[shape_name], dtype, kv_dtype):
        if kv_dtype == FP8 and arch < FP8_MIN_ARCH:
            rows.append(Row(arch, config, case, status=f"skipped: fp8 KV needs sm_{FP8_MIN_ARCH}+"))
            continue
        if case.endswith(", PDL") and arch < PDL_MIN_ARCH:
            rows.append(Row(arch, config, case, status=f"skipped: PDL needs sm_{PDL_MIN_ARCH}+"))
            continue
        t0 = time.perf_counter()
        with compile_only(arch) as launches:
            try:
                launch()
            except Exception as e:  # noqa: BLE001 - a compile error is this table's finding
                rows.append(Row(arch, config, case, status=f"failed: {type(e).__name__}: "
                                + str(getattr(e, "__cause__", None) or e)[-300:]))
                continue
        took = time.perf_counter() - t0
        if not launches:
            rows.append(Row(arch, config, case, status="failed: nothing compiled (kernels imported interpreted?)"))
        for launched in launches:
            fields = {k: v for k, v in asdict(launched).items() if k in Row.__dataclass_fields__}
            rows.append(Row(arch, config, case, seconds=took, **fields))
    return rows


def run(archs: list[int], configs=CONFIGS, jobs: int = 1) -> list[Row]:
    """All (arch, config) pairs, `jobs` processes at a time (ptxas and Triton's passes are single-threaded)."""
    work = [(arch, *config) for arch in archs for config in configs]
    if jobs <= 1:
        return [row for job in work for row in compile_config(*job)]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return [row for rows in pool.map(compile_config, *zip(*work)) for row in rows]


def print_table(rows: list[Row]) -> None:
    head = (f"{'arch':>5} {'model, dtypes':<28} {'case':<33} {'kernel':<22} {'warps':>5} {'stages':>6} "
            f"{'regs':>5} {'spill B':>7} {'smem KiB':>8} {'per SM':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        lead = f"sm_{r.arch:<2} {r.config:<28} {r.case:<33}"
        if r.status != "ok":
            print(f"{lead} {r.status}")
            continue
        print(f"{lead} {r.kernel:<22} {r.num_warps:>5} {r.num_stages:>6} {r.registers:>5} "
              f"{r.spill_stores:>7} {r.shared / 1024:>8.1f} {r.programs_per_sm:>6}")


def main(argv: list[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, action="append", help="compute capability x 10 (80, 86, 89, 90, 100); repeat")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes (default: cores)")
    args = p.parse_args(argv)
    import triton

    archs = args.arch or [90, 80]
    t0 = time.perf_counter()
    rows = run(archs, jobs=args.jobs)
    print_table(rows)
    bad = [r for r in rows if r.status.startswith("failed") or (r.status == "ok" and r.programs_per_sm == 0)]
    print(f"\n{len(rows)} launches, triton {triton.__version__}, {time.perf_counter() - t0:.0f} s; "
          f"{len(bad)} failed or do not fit")
    write_json({"triton": triton.__version__, "rows": [asdict(r) for r in rows]}, args.json,
               "kernel_resources.json")
    return rows


if __name__ == "__main__":
    sys.exit(1 if any(r.status.startswith("failed") or (r.status == "ok" and not r.programs_per_sm)
                      for r in main()) else 0)
