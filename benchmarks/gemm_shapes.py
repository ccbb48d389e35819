"""Each projection of a model shape as a GEMM at decode batch sizes, against the time its weight takes to read.

    python benchmarks/gemm_shapes.py                                # Llama-3.2-1B shapes, M = 1, 8, 64, CUDA bf16
    python benchmarks/gemm_shapes.py --config llama-3.1-8b --batch-sizes 1
    python benchmarks/gemm_shapes.py --backends cublas cublaslt inductor   # inductor: compile_mode max-autotune

A decode step at small batch is a stream of weight reads: its time is set by how near each projection's
GEMM gets to the copy bandwidth. This times each one alone, with each backend the engine can use:
cuBLAS and cuBLASLt (torch.backends.cuda.preferred_blas_library) and inductor's max-autotune choice for that
exact shape (its Triton templates or cuBLAS, as EngineConfig.compile_mode="max-autotune" would pick), and
prints the limit beside them: weight bytes over the copy bandwidth measured in the same process.

Each call reads another copy of the weight (enough copies to pass 4x the L2 cache), as in a real step,
where every weight is read once after the others have flushed the L2; CUDA events around `reps` calls,
median of `--repeats` such runs. JSON to --json or $OUT/gemm_shapes.json. On CPU: a smoke test (torch only).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.latency import copy_bandwidth  # noqa: E402
from benchmarks.results import write_json  # noqa: E402
from benchmarks.throughput import PRESETS  # noqa: E402


def projections(cfg: dict) -> dict[str, tuple[int, int]]:
    """name -> (in features K, out features N) of every matmul a decode step runs (q/k/v and gate/up fused,
    as model/weights.py loads them)."""
    h, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // heads
    inter = cfg["intermediate_size"]
    return {"qkv": (h, (heads + 2 * kv) * d), "o": (heads * d, h), "gate_up": (h, 2 * inter),
            "down": (inter, h), "lm_head": (h, cfg["vocab_size"])}


def time_calls(fn, x: torch.Tensor, weights: list[torch.Tensor], reps: int, repeats: int) -> float:
    """Median seconds per call of fn(x, w), cycling through `weights`."""
    for w in weights[:3]:
        fn(x, w)  # warm-up (and compilation)
    runs = []
    for _ in range(repeats):
        if x.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(reps):
                fn(x, weights[i % len(weights)])
            end.record()
            end.synchronize()
            runs.append(start.elapsed_time(end) * 1e-3 / reps)
        else:
            t0 = time.perf_counter()
            for i in range(reps):
                fn(x, weights[i % len(weights)])
            runs.append((time.perf_counter() - t0) / reps)
    return statistics.median(runs)


def backend_fn(name: str):
    """A linear for one backend (None: not available here)."""
    if name in ("cublas", "cublaslt", "torch"):
        return F.linear
    if name == "inductor":
        return torch.compile(F.linear, mode="max-autotune-no-cudagraphs", dynamic=False)
    raise ValueError(f"unknown backend {name!r}")


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="llama-3.2-1b", help=f"config.json path or one of {list(PRESETS)}")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--backends", nargs="+", default=None,
                    help="cublas cublaslt inductor (CUDA; the default: all three), torch (CPU)")
    ap.add_argument("--only", nargs="+", default=None, help="projections to run (default: all)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--copy-bytes", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    backends = args.backends or (["cublas", "cublaslt", "inductor"] if cuda else ["torch"])
    cfg = PRESETS.get(args.config) or json.loads(Path(args.config).read_text())
    bw = copy_bandwidth(dev, args.copy_bytes or (2**30 if cuda else 2**26))
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size if cuda else 32 << 20
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for name, (k, n) in projections(cfg).items():
        if args.only and name not in args.only:
            continue
        w_bytes = k * n * torch.empty((), dtype=dtype).element_size()
        copies = max(2, -(-4 * l2 // w_bytes))
        weights = [torch.randn(n, k, device=dev, dtype=dtype, generator=gen) * 0.02 for _ in range(copies)]
        for m in args.batch_sizes:
            x = torch.randn(m, k, device=dev, dtype=dtype, generator=gen)
            limit = (w_bytes + (m * k + m * n) * x.element_size()) / bw
            row = {"projection": name, "m": m, "k": k, "n": n, "weight_bytes": w_bytes, "copies": copies,
                   "limit_us": limit * 1e6, "us": {}}
            with torch.inference_mode():
                for b in backends:
                    if cuda and b in ("cublas", "cublaslt"):
                        torch.backends.cuda.preferred_blas_library(b)
                    try:
                        row["us"][b] = time_calls(backend_fn(b), x, weights, args.reps, args.repeats) * 1e6
                    finally:
                        if cuda:
                            torch.backends.cuda.preferred_blas_library("cublas")
            best = min(row["us"], key=row["us"].get)
            row["best"], row["best_of_limit"] = best, row["limit_us"] / row["us"][best]
            rows.append(row)
            write_json({"partial": True, "rows": rows}, args.json, "gemm_shapes.json")  # if time runs out
        del weights
    steps = step_totals(rows, backends, cfg["num_hidden_layers"])
    print_table(rows, steps, backends, bw, torch.cuda.get_device_name(dev) if cuda else "cpu", dtype)
    write_json({"device": torch.cuda.get_device_name(dev) if cuda else "cpu", "dtype": str(dtype),
                "config": args.config, "copy_GBps": bw / 1e9, "torch": torch.__version__, "rows": rows,
                "steps": steps}, args.json, "gemm_shapes.json")
    return rows


def step_totals(rows: list[dict], backends: list[str], layers: int) -> list[dict]:
    """Per batch size, what one decode step's matmuls add up to (each layer's four, times the layers, plus
    the lm_head) for each backend and for the best per projection, against the limit; only when every
    projection ran."""
    out = []
    for m in sorted({r["m"] for r in rows}):
        mine = {r["projection"]: r for r in rows if r["m"] == m}
        if set(mine) != {"qkv", "o", "gate_up", "down", "lm_head"}:
            continue

        def total(key) -> float:
            return sum(key(mine[p]) * (1 if p == "lm_head" else layers) for p in mine)
        t = {"m": m, "limit_us": total(lambda r: r["limit_us"]),
             "us": {b: total(lambda r, b=b: r["us"][b]) for b in backends},
             "best_us": total(lambda r: r["us"][r["best"]])}
        out.append(t)
    return out


def print_table(rows: list[dict], steps: list[dict], backends: list[str], bw: float, device: str, dtype) -> None:
    print(f"device {device}, {str(dtype).removeprefix('torch.')}, copy {bw / 1e9:.0f} GB/s (read + write); "
          "us per call; (x) = limit / time")
    head = ["projection", "M", "K x N", "weight MB", "limit us", *backends, "best"]
    lines = [head]
    for r in rows:
        cells = [f"{r['us'][b]:.1f} ({r['limit_us'] / r['us'][b]:.2f})" for b in backends]
        lines.append([r["projection"], str(r["m"]), f"{r['k']} x {r['n']}", f"{r['weight_bytes'] / 1e6:.1f}",
                      f"{r['limit_us']:.1f}", *cells, r["best"]])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for j, line in enumerate(lines):
        print(" | ".join(c.rjust(w) for c, w in zip(line, widths)))
        if j == 0:
            print("-+-".join("-" * w for w in widths))
    for t in steps:
        each = ", ".join(f"{b} {t['us'][b]:.0f} ({t['limit_us'] / t['us'][b]:.2f})" for b in backends)
        print(f"one decode step's matmuls at M={t['m']}: limit {t['limit_us']:.0f} us; {each}; best of each "
              f"projection {t['best_us']:.0f} ({t['limit_us'] / t['best_us']:.2f})")


if __name__ == "__main__":
    main()
