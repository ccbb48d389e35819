"""Where a decode step's GPU time goes, kernel by kernel: the torch profiler over eager decode forwards.

    python benchmarks/profile_step.py                         # Llama-3.2-1B shape, batch 1, context 256, CUDA
    python benchmarks/profile_step.py --batch-size 64 --layers 16 --context 512

Runs the model eagerly (so each kernel shows; a CUDA graph replays the same kernels back to back without
the launch gaps) on random weights, after a prefill of `context` tokens per sequence, and prints the kernels
sorted by device time per step, with the weight bytes each step must read and the copy-bandwidth time for
them. JSON (the top rows) to --json or $OUT/profile_step.json. On CPU it profiles CPU time (smoke test).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402

from benchmarks.throughput import PRESETS, random_model  # noqa: E402
from benchmarks.results import write_json  # noqa: E402


def timed_events(averages, cuda: bool) -> list[tuple[object, float]]:
    """(event, its own time in us) for what a step's time adds up from, longest first, nothing twice: on CUDA
    the device's own events (kernels, copies, fills), each its device time; on CPU each op's CPU time less its
    children's. On CUDA the host-side ops are left out although some carry a "self" device time: torch
    2.11 gave aten::mm the whole time of the cuBLAS kernels it launched, which were rows of their own too,
    so the first version of this table counted 1.05 ms of a 1.3 ms step twice (2026-11-24, H100)."""
    if cuda:
        timed = [(e, e.device_time_total) for e in averages if e.device_type != DeviceType.CPU]
    else:
        timed = [(e, e.self_cpu_time_total) for e in averages]
    return sorted(((e, t) for e, t in timed if t > 0), key=lambda et: et[1], reverse=True)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="llama-3.2-1b", choices=list(PRESETS))
    ap.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    ap.add_argument("--vocab", type=int, default=None, help="override the preset's vocab")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--compile-mode", choices=["off", "default", "max-autotune"], default="off",
                    help="torch.compile the forward as the engine's compile_mode does (which GEMMs it picks)")
    ap.add_argument("--skinny-matmul", action="store_true",
                    help="the projections on our small-batch kernel (EngineConfig.skinny_matmul; Triton ops only)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from model.batch import build_step_batch
    from model.kv_cache import KVCache

    dev = torch.device(args.device)
    dtype = args.dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    raw = dict(PRESETS[args.config])
    if args.layers:
        raw["num_hidden_layers"] = args.layers
    if args.vocab:
        raw["vocab_size"] = args.vocab
    model = random_model(raw, dtype, args.device, "auto")
    if args.skinny_matmul:
        if model.ops.name != "triton":
            ap.error("--skinny-matmul needs the Triton ops (a CUDA device)")
        model.ops.skinny_matmul = True
    bs, B, ctx = 16, args.batch_size, args.context
    per_seq = -(-(ctx + args.steps + 1) // bs)
    cache = KVCache.allocate(model.config, B * per_seq, bs, model.lm_head.weight.dtype, dev)
    tables = [list(range(b * per_seq, (b + 1) * per_seq)) for b in range(B)]
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(10, raw["vocab_size"], (B, ctx), generator=g).tolist()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if dev.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.inference_mode():
        model(build_step_batch(prompts, [0] * B, tables, bs, dev), cache)  # prefill
        # max_seq_len fixed as a decode graph fixes it (one split count; one compiled graph)
        batches = [replace(build_step_batch([[5 + b] for b in range(B)], [ctx + i] * B, tables, bs, dev),
                           max_seq_len=ctx + args.steps + 3) for i in range(args.steps + 3)]
        forward = model.hidden_states
        if args.compile_mode != "off":
            from server.compiled_forward import CompiledForward
            forward = CompiledForward(model, args.compile_mode, max_batch_size=B).for_size(B)
        logits = torch.empty(B, raw["vocab_size"], dtype=torch.float32, device=dev)

        def decode_step(batch):  # what a decode graph holds (server/cuda_graphs.py DecodeGraphRunner._step)
            logits.copy_(model.ops.linear(forward(batch, cache), model.lm_head, out_dtype=torch.float32))
        for batch in batches[:3]:  # warm-up (compiles every kernel variant)
            decode_step(batch)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        with torch.profiler.profile(activities=activities) as prof:
            for batch in batches[3:]:
                decode_step(batch)
            if dev.type == "cuda":
                torch.cuda.synchronize()
    events = timed_events(prof.key_averages(), dev.type == "cuda")
    total = sum(self_time for _, self_time in events) / args.steps
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = [{"kernel": e.key, "calls_per_step": e.count / args.steps, "us_per_step": t / args.steps,
             "share": t / args.steps / total if total else 0.0} for e, t in events]
    print(f"device {torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}; {args.config} shape, "
          f"{raw['num_hidden_layers']} layers, vocab {raw['vocab_size']}, {dtype}; batch {B}, context {ctx}")
    print(f"{'kernel':<70} {'calls/step':>10} {'us/step':>9} {'share':>6}")
    for r in rows[:args.rows]:
        print(f"{r['kernel'][:70]:<70} {r['calls_per_step']:>10.1f} {r['us_per_step']:>9.1f} {r['share']:>6.1%}")
    print(f"total {'device' if dev.type == 'cuda' else 'CPU'} time per step {total:.1f} us over {len(events)} "
          f"kinds of kernel; weights {weight_bytes / 1e9:.3f} GB per step")
    write_json({"args": vars(args), "total_us_per_step": total, "weight_bytes": weight_bytes, "rows": rows[:60]},
               args.json, "profile_step.json")
    return rows


if __name__ == "__main__":
    main()
