"""The skinny matmul (kernels/skinny_matmul.py) against cuBLAS on the projections of small decode steps.

    python benchmarks/skinny_matmul.py                   # GPU: Llama-3.2-1B / 3.1-8B projections, 1, 4, 16 rows
    python benchmarks/skinny_matmul.py --sweep-budget-s 60   # and a tile sweep at one row
    python benchmarks/skinny_matmul.py --dry-run         # CPU smoke run of the table path (timings mean nothing)

Each row times one projection the way a captured decode step runs it: 20 calls in one CUDA graph, launch
gaps included. ours: our kernel, its op folded in; peer: what the layer runs with skinny_matmul off (cuBLAS
through F.linear, after our RMSNorm or SiLU x mul kernel where ours folds one in); limit: the weight's bytes
over the copy bandwidth measured in the same run. On sm_90+ each row has a twin with our launches started
early (programmatic dependent launch: the start of each weight slice pulled into L2 while the kernel before
finishes). A layer's four projections run back to back (the chain rows: what launch gaps cost between them),
and a whole decoder layer with its one-launch attention at 256 keys, each kernel reading the one before's
output (the layer rows: with PDL at several prefetch sizes, and with the projections' early trigger). The sweep
times a grid of tiles (BLOCK_N, BLOCK_K, warps, stages) per shape at one row, within its budget, and prints
the best beside pick_tile's choice: what to change in pick_tile, from a GPU's numbers.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from benchmarks.kernels import Bench, Row, copy_bandwidth, format_table  # noqa: E402
from benchmarks.results import write_json  # noqa: E402

from kernels import reference as ref  # noqa: E402

# (model, projection, N, K, folded op): each decoder projection and the head
SHAPES = {
    "llama-3.2-1b": [("qkv", 3072, 2048, "norm"), ("o", 2048, 2048, "plain"), ("gate_up", 16384, 2048, "norm"),
                     ("down", 2048, 8192, "silu"), ("lm_head", 128256, 2048, "plain")],
    "llama-3.1-8b": [("qkv", 6144, 4096, "norm"), ("o", 4096, 4096, "plain"), ("gate_up", 28672, 4096, "norm"),
                     ("down", 4096, 14336, "silu"), ("lm_head", 128256, 4096, "plain")],
}
TINY = {"tiny": [("qkv", 96, 64, "plain"), ("gate_up", 256, 64, "norm"), ("down", 64, 128, "silu")]}
# (query heads, kv heads, head dim) of the whole-layer rows; the tiny one matches TINY's qkv (4 + 2 x 1 heads of 16)
ATTENTION = {"llama-3.2-1b": (32, 8, 64), "llama-3.1-8b": (32, 8, 128), "tiny": (4, 1, 16)}
# the whole-layer rows' decode step: one sequence at 256 keys, split as latency.py's engine splits it (its
# graphs are captured with max_seq_len = max_model_len = 128 prompt + 256 new tokens)
CONTEXT, CAPTURED_MAX_SEQ_LEN, BLOCK_SIZE = 256, 384, 16
PREFETCH_KIB = (16, 32, 128)  # the PDL layer's prefetch per program, beside the default (PREFETCH_BYTES)


def calls(bench: Bench, rows: int, n: int, k: int, op: str, pdl: bool = False, fold: bool = False):
    """(ours, peer) for one projection, on fresh random inputs; pdl: ours launched with programmatic dependent
    launch; fold (SiLU x mul): inside our kernel, or by its own first (the launcher's default). A dry run has
    the references stand in for our kernels (pdl and fold unused)."""
    w = bench.randn(n, k) * k ** -0.5
    if bench.dry_run:
        from kernels.reference import rms_norm as norm, silu_and_mul as act
        kw: dict = {}
        silu_mul_linear, rms_norm_linear, linear = ref.silu_mul_linear, ref.rms_norm_linear, F.linear
    else:
        from kernels.activation import silu_and_mul as act
        from kernels.norm import rms_norm as norm
        from kernels.skinny_matmul import rms_norm_linear, silu_mul_linear, skinny_linear as linear
        kw = {"pdl": pdl}
    if op == "silu":
        gate_up = bench.randn(rows, 2 * k)
        silu_kw = kw if bench.dry_run else kw | {"fold": fold}
        return (lambda: silu_mul_linear(gate_up, w, **silu_kw)), (lambda: F.linear(act(gate_up), w))
    x, res, g = bench.randn(rows, k), bench.randn(rows, k), bench.randn(k)
    if op == "norm":
        return (lambda: rms_norm_linear(x, res, g, 1e-5, w, **kw)), (lambda: F.linear(norm(x, g, 1e-5, res)[0], w))
    return (lambda: linear(x, w, **kw)), (lambda: F.linear(x, w))


def table(bench: Bench, bandwidth: float, shapes: dict, row_counts: list[int], pdl: bool) -> list[Row]:
    out = []
    for model, projections in shapes.items():
        for (name, n, k, op), rows in itertools.product(projections, row_counts):
            ours, peer = calls(bench, rows, n, k, op)
            label = {"plain": "", "norm": " (+rms_norm)", "silu": " (+silu_mul)"}[op]
            limit_us = n * k * bench.randn(1).element_size() / bandwidth * 1e6
            ours_us = bench.graph_time_us(ours)
            out.append(Row(f"skinny {name}{label}", f"{model} M={rows} N={n} K={k}", ours_us,
                           "cuBLAS" + (" after ours" if label else ""), bench.graph_time_us(peer), limit_us))
            if pdl:  # the same launches, each started early (programmatic dependent launch, sm_90+)
                out.append(Row(f"skinny {name}{label}, PDL", f"{model} M={rows} N={n} K={k}",
                               bench.graph_time_us(calls(bench, rows, n, k, op, pdl=True)[0]), "ours, no PDL",
                               ours_us, limit_us))
            if op == "silu" and not bench.dry_run:  # SiLU x mul inside the kernel, against its own kernel first
                out.append(Row(f"skinny {name}, SiLU folded in", f"{model} M={rows} N={n} K={k}",
                               bench.graph_time_us(calls(bench, rows, n, k, op, fold=True)[0]), "ours, default",
                               ours_us, limit_us))
    return out


def layer_chain(bench: Bench, bandwidth: float, shapes: dict, pdl: bool) -> list[Row]:
    """One layer's four projections back to back at one row (attention left out), as a decode graph runs
    them: ours (norms and SiLU folded in; with PDL too) against cuBLAS after our norm and SiLU kernels."""
    out = []
    for model, projections in shapes.items():
        chain = [calls(bench, 1, n, k, op) for name, n, k, op in projections if name != "lm_head"]
        elem = torch.empty((), dtype=bench.dtype).element_size()
        limit_us = sum(n * k for name, n, k, _ in projections if name != "lm_head") * elem / bandwidth * 1e6
        ours_us = bench.graph_time_us(lambda: [c[0]() for c in chain])
        out.append(Row("skinny layer chain", f"{model} M=1", ours_us, "cuBLAS after ours",
                       bench.graph_time_us(lambda: [c[1]() for c in chain]), limit_us))
        if pdl:
            pdl_chain = [calls(bench, 1, n, k, op, pdl=True)[0] for name, n, k, op in projections if name != "lm_head"]
            out.append(Row("skinny layer chain, PDL", f"{model} M=1",
                           bench.graph_time_us(lambda: [c() for c in pdl_chain]), "ours, no PDL", ours_us, limit_us))
    return out


def decode_step(bench: Bench, heads: int, kv_heads: int, head_dim: int) -> dict:
    """The attention's arguments for one sequence's decode step at CONTEXT keys (the new one included), its
    pages shuffled through the cache; random cached K/V, a random rotary table (timing only)."""
    pages = -(-CONTEXT // BLOCK_SIZE)
    cache = (pages + 4, BLOCK_SIZE, kv_heads, head_dim)
    table = torch.randperm(pages + 4, device=bench.device)[:pages].to(torch.int32).view(1, pages)
    new = CONTEXT - 1
    slot = table[0, new // BLOCK_SIZE].long() * BLOCK_SIZE + new % BLOCK_SIZE
    return dict(positions=torch.tensor([new], device=bench.device),
                cos_sin_cache=torch.randn(CONTEXT, head_dim, device=bench.device), k_cache=bench.randn(*cache),
                v_cache=bench.randn(*cache), slot_mapping=slot.view(1),
                seq_lens=torch.tensor([CONTEXT], dtype=torch.int32, device=bench.device), block_tables=table)


def layer_weights(model: str, projections: list) -> dict[str, tuple[int, int]]:
    """A decoder layer's projections as name -> (N, K), o included (TINY leaves it out: hidden x q width)."""
    heads, _, head_dim = ATTENTION[model]
    dims = {name: (n, k) for name, n, k, _ in projections if name != "lm_head"}
    dims.setdefault("o", (dims["gate_up"][1], heads * head_dim))
    return dims


def decoder_layer(bench: Bench, model: str, projections: list, pdl, cublas: bool = False):
    """One decoder layer's decode step at one row, as a decode graph runs it: norm + qkv, the one-launch
    attention (RoPE, cache write, split-KV reduce), o, norm + gate_up, SiLU + down, each reading the output
    of the one before. Ours (pdl: False, or every launch but the first started early, a projection as
    True / a skinny_matmul.EarlyLaunch says), or cublas: cuBLAS after our norm and SiLU kernels, around the
    same attention."""
    heads, kv_heads, head_dim = ATTENTION[model]
    dims = layer_weights(model, projections)
    hidden = dims["gate_up"][1]
    weight = {name: bench.randn(n, k) * k ** -0.5 for name, (n, k) in dims.items()}
    x, res, g1, g2 = bench.randn(1, hidden), bench.randn(1, hidden), bench.randn(hidden), bench.randn(hidden)
    step = decode_step(bench, heads, kv_heads, head_dim)
    tickets = torch.zeros(kv_heads, dtype=torch.int32, device=bench.device)
    split = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    if bench.dry_run:
        from kernels.reference import rms_norm as norm, silu_and_mul as act

        def attend(qkv):
            q, k, v = (t.reshape(1, -1, head_dim) for t in qkv.split(split, dim=-1))
            return ref.decode_rotary_attention(q, k, v, **step, scale=head_dim ** -0.5).view(1, -1)
    else:
        from kernels.activation import silu_and_mul as act
        from kernels.decode_rotary import decode_rotary_attention
        from kernels.norm import rms_norm as norm

        def attend(qkv):
            q, k, v = (t.view(1, -1, head_dim) for t in qkv.split(split, dim=-1))
            return decode_rotary_attention(q, k, v, **step, scale=head_dim ** -0.5, max_seq_len=CAPTURED_MAX_SEQ_LEN,
                                           tickets=tickets, pdl=pdl is not False and not cublas).view(1, -1)
    if cublas or bench.dry_run:
        def layer():
            h, r = norm(x, g1, 1e-5, res)
            o = F.linear(attend(F.linear(h, weight["qkv"])), weight["o"])
            h, r = norm(o, g2, 1e-5, r)
            return F.linear(act(F.linear(h, weight["gate_up"])), weight["down"])
        return layer
    from kernels.skinny_matmul import rms_norm_linear, silu_mul_linear, skinny_linear
    kw = {"pdl": pdl}

    def layer():
        qkv, r = rms_norm_linear(x, res, g1, 1e-5, weight["qkv"], **kw)
        o = skinny_linear(attend(qkv), weight["o"], **kw)
        gate_up, r = rms_norm_linear(o, r, g2, 1e-5, weight["gate_up"], **kw)
        return silu_mul_linear(gate_up, weight["down"], **kw)
    return layer


def whole_layer(bench: Bench, bandwidth: float, shapes: dict, pdl: bool) -> list[Row]:
    """The decoder layer with its attention at one row: ours against cuBLAS; with PDL, against ours without,
    at the default prefetch and at PREFETCH_KIB, and with the projections' early trigger. Limit: the layer's
    weight and K/V bytes over the bandwidth."""
    out = []
    for model, projections in shapes.items():
        _, kv_heads, head_dim = ATTENTION[model]
        elem = torch.empty((), dtype=bench.dtype).element_size()
        params = sum(n * k for n, k in layer_weights(model, projections).values())
        limit_us = (params + 2 * CONTEXT * kv_heads * head_dim) * elem / bandwidth * 1e6
        shape = f"{model} M=1, {CONTEXT} keys"
        ours_us = bench.graph_time_us(decoder_layer(bench, model, projections, False))
        out.append(Row("decoder layer (attention)", shape, ours_us, "cuBLAS after ours",
                       bench.graph_time_us(decoder_layer(bench, model, projections, False, cublas=True)), limit_us))
        if pdl:
            from kernels.skinny_matmul import EarlyLaunch
            prefetched = ((f", prefetch {kib} KiB", EarlyLaunch(kib * 1024)) for kib in PREFETCH_KIB)
            launches = [("", EarlyLaunch()), *prefetched, (", early trigger", EarlyLaunch(early_trigger=True))]
            for label, early in launches:
                timed = bench.graph_time_us(decoder_layer(bench, model, projections, early))
                out.append(Row(f"decoder layer (attention), PDL{label}", shape, timed, "ours, no PDL", ours_us,
                               limit_us))
    return out


def sweep(bench: Bench, shapes: dict, budget_s: float) -> list[dict]:
    """Per shape at one row: each feasible tile's graph time, best first, until the budget is spent."""
    from kernels import skinny_matmul as skinny
    grid = list(itertools.product((16, 32, 64), (64, 128, 256, 512), (4, 8), (2, 3, 4, 5)))
    deadline = time.perf_counter() + budget_s
    results = []
    for model, projections in shapes.items():
        for name, n, k, _ in projections:
            x, w = bench.randn(1, k), bench.randn(n, k)
            chosen = skinny.pick_tile(n, k, w.element_size(), 1, w.device)
            timed = []
            for tile in [chosen] + [t for t in grid if t != chosen]:
                if time.perf_counter() > deadline:
                    break
                if (tile[0] + skinny.MAX_ROWS) * tile[1] * w.element_size() * (tile[3] - 1) > 200 * 1024:
                    continue  # more shared memory than an SM has
                try:
                    timed.append((bench.graph_time_us(lambda: skinny.skinny_linear(x, w, tile=tile)), tile))
                except Exception as e:  # noqa: BLE001 - a tile that does not compile is skipped, and said
                    print(f"sweep {model} {name} {tile}: {type(e).__name__}: {str(e)[:120]}")
            if timed:
                best = min(timed)
                results.append({"model": model, "projection": name, "N": n, "K": k, "tiles_timed": len(timed),
                                "chosen": list(chosen), "chosen_us": timed[0][0], "best": list(best[1]),
                                "best_us": best[0]})
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU smoke run of the table path at tiny sizes")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16], help="rows of x (decode batch sizes)")
    parser.add_argument("--sweep-budget-s", type=float, default=0.0, help="seconds for the tile sweep (0: none)")
    parser.add_argument("--json", type=Path, default=None, help="results file (default: $OUT/skinny_matmul.json)")
    args = parser.parse_args(argv)
    bench = Bench.for_run(args.dry_run, "skinny_matmul.py")
    torch.manual_seed(0)
    bandwidth = copy_bandwidth(bench)
    shapes = TINY if args.dry_run else SHAPES
    pdl = not args.dry_run and torch.cuda.get_device_capability() >= (9, 0)  # PDL is sm_90+
    rows = (table(bench, bandwidth, shapes, args.rows, pdl) + layer_chain(bench, bandwidth, shapes, pdl)
            + whole_layer(bench, bandwidth, shapes, pdl))
    device = "cpu (dry run: reference functions, timings mean nothing)" if args.dry_run \
        else torch.cuda.get_device_name()
    print(f"device: {device}\ncopy bandwidth: {bandwidth / 1e9:.1f} GB/s")
    print(format_table(rows))
    swept = sweep(bench, shapes, args.sweep_budget_s) if args.sweep_budget_s > 0 and not args.dry_run else []
    for s in swept:
        print(f"sweep {s['model']} {s['projection']} (N={s['N']} K={s['K']}, {s['tiles_timed']} tiles): "
              f"pick_tile {tuple(s['chosen'])} {s['chosen_us']:.1f} us, best {tuple(s['best'])} {s['best_us']:.1f} us")
    result = {"device": device, "dry_run": args.dry_run, "copy_bandwidth_gbps": bandwidth / 1e9,
              "rows": [asdict(r) | {"ours_over_peer": r.ours_over_peer, "fraction_of_limit": r.fraction_of_limit}
                       for r in rows], "sweep": swept}
    write_json(result, args.json, "skinny_matmul.json")
    return result


if __name__ == "__main__":
    main()
