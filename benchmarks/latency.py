"""Decode latency through the engine, against the memory roofline measured in the same process.

    python benchmarks/latency.py --dummy --config llama-3.2-1b          # GPU: random weights, 1B shapes
    python benchmarks/latency.py --dummy --config llama-3.2-1b --batch-size 64 --input-len 128 --output-len 128
    python benchmarks/latency.py --model DIR                             # a checkpoint
    python benchmarks/latency.py                                         # CPU: the default model

B identical-length random prompts go in together (greedy, ignore_eos, exactly --output-len new tokens
each), driven step by step through `LLMEngine` so each step's tokens get a host timestamp (every step ends
in one device->host copy of the sampled ids, so the clock is synchronized). Per run:
  TTFT         request arrival -> every request has its first token (prefill, chunked if B x input
               exceeds max_num_batched_tokens)
  TPOT         decode wall time / decode steps, decode = after the last first token until the end
  decode tok/s output tokens of the decode phase / its wall time (= B / TPOT when no request finishes early)
Each figure is the median over --num-iters runs after --num-iters-warmup runs. The engine's max_model_len is
the prompt + output length unless --max-model-len sets a server's (the preset's 8,192): the decode attention
picks its number of context splits from it, so the two can differ at batch 1.

Roofline: a decode step must read every weight once (the embedding as the lm_head reads it: a tied matrix
counts once, an untied embedding only by the rows it looks up) plus the KV cache of every sequence at its
context; the mean context over the decode phase is input + output/2. Its time is those bytes over the
device-to-device copy bandwidth measured here (read + write bytes per second: CUDA events on a 1 GiB copy
on CUDA, perf_counter on a host copy on CPU). "of roofline" is roofline step time / measured TPOT.
Table on stdout; JSON to --json, else $OUT/latency.json (latency_b<B>.json for B > 1) when OUT is set.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.throughput import PRESETS, add_engine_arguments, build_llm  # noqa: E402
from benchmarks.results import write_json  # noqa: E402


def copy_bandwidth(device: torch.device, nbytes: int, reps: int = 10) -> float:
    """Median bytes read + written per second of dst.copy_(src) over reps, after 3 warm-up copies."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    runs = []
    for i in range(3 + reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) * 1e-3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            seconds = time.perf_counter() - t0
        if i >= 3:
            runs.append(seconds)
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(runs)


def weight_bytes_per_step(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes a decode step reads, bytes of distinct parameters). A tied embedding is the lm_head and is
    read whole; an untied one is only looked up (a few rows), so it is left out of the bytes read."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    emb = model.model.embed_tokens.weight
    tied = emb.data_ptr() == model.lm_head.weight.data_ptr()
    return (total if tied else total - emb.numel() * emb.element_size()), total


def run_once(engine, prompts: list[list[int]], n_out: int, tag: str) -> dict:
    """One batch through the engine, step by step; timestamps after every step that emitted tokens."""
    from server.sampling_params import SamplingParams
    params = SamplingParams(temperature=0.0, max_new_tokens=n_out, ignore_eos=True)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", p, params)
    have_first: set[str] = set()
    counts: dict[str, int] = {}
    first_all = None
    decode_tokens = decode_steps = 0
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        if not outs:
            continue
        new = 0
        for o in outs:
            counts[o.request_id] = counts.get(o.request_id, 0) + len(o.new_token_ids)
            new += len(o.new_token_ids)
            have_first.add(o.request_id)
        if first_all is None:
            if len(have_first) == len(prompts):
                first_all = now
        else:
            decode_tokens += new
            decode_steps += 1
    end = time.perf_counter()
    assert all(c == n_out for c in counts.values()) and len(counts) == len(prompts), counts
    decode_s = end - first_all
    return {"ttft_s": first_all - t0, "e2e_s": end - t0, "decode_steps": decode_steps,
            "decode_tokens": decode_tokens,
            "tpot_s": decode_s / decode_steps if decode_steps else float("nan"),
            "decode_tok_s": decode_tokens / decode_s if decode_s > 0 else float("nan"),
            "e2e_out_tok_s": len(prompts) * n_out / (end - t0)}


def roofline(model, model_config, kv_elem_size: int, batch: int, ctx_mean: float, bw: float) -> dict:
    w_read, w_total = weight_bytes_per_step(model)
    kv = batch * ctx_mean * model_config.kv_bytes_per_token(kv_elem_size)
    step_s = (w_read + kv) / bw
    return {"copy_GBps": bw / 1e9, "weight_bytes_total": w_total, "weight_bytes_read_per_step": w_read,
            "kv_bytes_read_per_step_mean": kv, "mean_context": ctx_mean, "roofline_step_s": step_s,
            "roofline_tok_s": batch / step_s}


def print_table(res: dict) -> None:
    m, r = res["median"], res["roofline"]
    cols = ["batch", "in", "out", "TTFT ms", "TPOT ms", "decode tok/s", "e2e tok/s", "roofline ms",
            "roofline tok/s", "of roofline"]
    vals = [res["batch_size"], res["input_len"], res["output_len"], f"{m['ttft_s'] * 1e3:.2f}",
            f"{m['tpot_s'] * 1e3:.3f}", f"{m['decode_tok_s']:.1f}", f"{m['e2e_out_tok_s']:.1f}",
            f"{r['roofline_step_s'] * 1e3:.3f}", f"{r['roofline_tok_s']:.1f}", f"{res['fraction_of_roofline']:.1%}"]
    w = [max(len(c), len(str(v))) for c, v in zip(cols, vals)]
    print(" | ".join(c.rjust(n) for c, n in zip(cols, w)))
    print("-+-".join("-" * n for n in w))
    print(" | ".join(str(v).rjust(n) for v, n in zip(vals, w)))
    print(f"roofline: ({r['weight_bytes_read_per_step'] / 1e6:.1f} MB weights + "
          f"{r['kv_bytes_read_per_step_mean'] / 1e6:.2f} MB KV at mean context {r['mean_context']:.0f}) / "
          f"{r['copy_GBps']:.1f} GB/s copy; device {res['device']}, dtype {res['dtype']}, "
          f"max_model_len {res['max_model_len']}, "
          f"{res['num_iters']} runs (TPOT all: {', '.join(f'{x * 1e3:.3f}' for x in res['all_tpot_s'])} ms)")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="model directory (default: the default model, unless --dummy)")
    ap.add_argument("--dummy", action="store_true", help="random weights with --config's shapes")
    ap.add_argument("--config", default="llama-3.2-1b", help=f"config.json path or one of {list(PRESETS)}")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--num-iters", type=int, default=5)
    ap.add_argument("--num-iters-warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--copy-bytes", type=int, default=None, help="copy-bandwidth tensor size "
                    "(default 1 GiB on CUDA, 256 MiB on CPU)")
    add_engine_arguments(ap)
    ap.add_argument("--blas-library", choices=["default", "cublas", "cublaslt"], default="default",
                    help="torch.backends.cuda.preferred_blas_library for this run: an experiment on the small "
                         "batch-1 matmuls (the engine itself leaves torch's choice alone)")
    ap.add_argument("--json", help="write the results here (default: $OUT/latency[_b<B>].json when OUT is set)")
    args = ap.parse_args(argv)

    from server.model_runner import resolve_device
    device = resolve_device(args.device)
    if args.blas_library != "default" and device.type == "cuda":
        torch.backends.cuda.preferred_blas_library(args.blas_library)
    bw = copy_bandwidth(device, args.copy_bytes or (2**30 if device.type == "cuda" else 2**28))

    b, n_in, n_out = args.batch_size, args.input_len, args.output_len
    if args.dummy:
        vocab = (PRESETS.get(args.config) or json.loads(Path(args.config).read_text()))["vocab_size"]
    elif args.model:
        vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    else:
        vocab = None  # the default model: known once loaded
    build_args = SimpleNamespace(**{**vars(args), "max_num_seqs": max(args.max_num_seqs, b)})
    llm = build_llm(build_args, [[0] * n_in], [n_out])
    engine = llm.engine
    vocab = vocab or engine.model_config.vocab_size
    g = torch.Generator().manual_seed(args.seed)

    runs = []
    for it in range(args.num_iters_warmup + args.num_iters):
        # fresh prompts each run: a repeated one would be prefilled from the prefix cache (TTFT)
        prompts = torch.randint(10, vocab, (b, n_in), generator=g).tolist()
        r = run_once(engine, prompts, n_out, f"it{it}")
        if it >= args.num_iters_warmup:
            runs.append(r)
    median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    runner = engine.runner
    kv_elem = torch.empty((), dtype=runner.kv_dtype).element_size()
    roof = roofline(runner.model, engine.model_config, kv_elem, b, n_in + n_out / 2, bw)
    res = {"batch_size": b, "input_len": n_in, "output_len": n_out, "num_iters": args.num_iters,
           "device": str(runner.device), "dtype": str(runner.dtype).removeprefix("torch."),
           "model": "dummy:" + args.config if args.dummy else (llm.model_dir or args.model),
           "median": median, "all_tpot_s": [r["tpot_s"] for r in runs], "runs": runs, "roofline": roof,
           "fraction_of_roofline": roof["roofline_step_s"] / median["tpot_s"],
           "torch": torch.__version__, "blas_library": args.blas_library, "compile_mode": args.compile_mode,
           "max_model_len": engine.max_model_len, "decode_fusion": args.decode_fusion, "skinny_matmul": args.skinny_matmul,
           "skinny_matmul_pdl": args.skinny_matmul_pdl,
           "compile_seconds": runner.compiled.compile_seconds if runner.compiled else None,
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    print_table(res)
    write_json({"args": vars(args), **res}, args.json, "latency.json" if b == 1 else f"latency_b{b}.json")
    return res


if __name__ == "__main__":
    main()
