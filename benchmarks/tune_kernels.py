"""Sweep the attention kernels' launch parameters on the GPU; prints each shape's best and the defaults' time.

    python benchmarks/tune_kernels.py [--decode-budget-s 80] [--prefill-budget-s 120]

Decode: BLOCK_N x num_warps x num_stages (splits from the heuristic), then the split count with the best.
Prefill: BLOCK_M x BLOCK_N x num_warps x num_stages, then the launch order (heavy_first) on the default
and the best tiles. Timings as in kernels.py (do_bench median, bf16, fresh random inputs per shape). The
chosen values then go into the launchers' defaults by hand, and kernels.py re-measures them against the
peers. JSON to --json or $OUT/tune_kernels.json.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.kernels import Bench, paged_inputs  # noqa: E402
from benchmarks.results import write_json  # noqa: E402


def sweep(name: str, shape: str, run, configs: list[dict], deadline: float) -> dict:
    bench = Bench("cuda", torch.bfloat16, False)
    default_us = bench.time_us(lambda: run({}))
    results = []
    for cfg in configs:
        if time.perf_counter() > deadline:
            break
        try:
            results.append((bench.time_us(lambda: run(cfg)), cfg))
        except Exception as exc:  # noqa: BLE001 - a config that does not compile (shared memory) is skipped
            print(f"  {name} {cfg}: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
    results.sort(key=lambda r: r[0])
    best_us, best = results[0] if results else (float("nan"), {})
    print(f"{name:<8} {shape:<40} default {default_us:8.1f} us   best {best_us:8.1f} us  {best}")
    for us, cfg in results[1:4]:
        print(f"{'':<49}next {us:8.1f} us  {cfg}")
    return {"kernel": name, "shape": shape, "default_us": default_us, "best_us": best_us, "best": best,
            "tried": len(results), "all": [{"us": us, **cfg} for us, cfg in results]}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--decode-budget-s", type=float, default=80.0)
    ap.add_argument("--prefill-budget-s", type=float, default=120.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from kernels.attention_decode import paged_decode_attention
    from kernels.attention_prefill import paged_prefill_attention

    bench = Bench("cuda", torch.bfloat16, False)
    deadline = time.perf_counter() + args.decode_budget_s
    out = []
    grid = list(itertools.product((32, 64, 128), (1, 2, 4), (2, 3)))
    # (batch, context, head_dim, max_seq_len the launch sees: a captured graph passes max_model_len)
    for batch, ctx, head_dim, max_seq in ((64, 4096, 128, 4096), (1, 512, 64, 2048), (64, 512, 64, 2048)):
        kc, vc, sl, bt, _, _ = paged_inputs(bench, [ctx] * batch, 32, 8, head_dim, 16)
        q = bench.randn(batch, 32, head_dim)
        o = torch.empty_like(q)

        def dec(cfg, q=q, kc=kc, vc=vc, sl=sl, bt=bt, o=o, max_seq=max_seq, head_dim=head_dim):
            return paged_decode_attention(q, kc, vc, sl, bt, head_dim ** -0.5, max_seq, out=o, **cfg)
        shape = f"decode B={batch} ctx={ctx} 32/8 d{head_dim} bs16 max_seq_len={max_seq}"
        r = sweep("decode", shape, dec, [dict(block_n=n, num_warps=w, num_stages=s) for n, w, s in grid], deadline)
        out.append(r)
        splits = [dict(r["best"], num_splits=k) for k in (1, 2, 4, 8, 16, 32)]
        out.append(sweep("decode", shape + " splits", dec, splits, deadline))
    deadline = time.perf_counter() + args.prefill_budget_s
    pgrid = list(itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3)))
    for head_dim in (128, 64):
        batch, seq = 8, 2048
        kc, vc, sl, bt, _, _ = paged_inputs(bench, [seq] * batch, 32, 8, head_dim, 16)
        q = bench.randn(batch * seq, 32, head_dim)
        o = torch.empty_like(q)
        starts = torch.arange(0, batch * seq + 1, seq, dtype=torch.int32, device="cuda")

        def pre(cfg, q=q, kc=kc, vc=vc, sl=sl, bt=bt, o=o, starts=starts, head_dim=head_dim):
            return paged_prefill_attention(q, kc, vc, starts, sl, bt, head_dim ** -0.5, seq, out=o, **cfg)
        cfgs = [dict(block_m=m, block_n=n, num_warps=w, num_stages=s) for m, n, w, s in pgrid]
        r = sweep("prefill", f"prefill {batch}x{seq} 32/8 d{head_dim}", pre, cfgs, deadline)
        flops = 4 * 32 * head_dim * batch * seq * (seq + 1) / 2
        r["best_tflops"] = flops / (r["best_us"] * 1e-6) / 1e12
        r["default_tflops"] = flops / (r["default_us"] * 1e-6) / 1e12
        print(f"{'':<49}TFLOP/s default {r['default_tflops']:.0f}, best {r['best_tflops']:.0f}")
        out.append(r)
        # launch order (kernels/attention_prefill.py heavy_first) on the default and the best tiles;
        # a few configs, so it runs even when the tile sweep used up its budget
        orders = [dict(heavy_first=True), dict(r["best"], heavy_first=False), dict(r["best"], heavy_first=True)]
        o = sweep("prefill", f"prefill {batch}x{seq} 32/8 d{head_dim} order", pre, orders, time.perf_counter() + 20)
        o["best_tflops"] = flops / (o["best_us"] * 1e-6) / 1e12
        out.append(o)
    write_json({"device": torch.cuda.get_device_name(), "rows": out}, args.json, "tune_kernels.json")
    return out


if __name__ == "__main__":
    main()
