"""Time of a step that carries a new prompt: alone, and joining running decodes; replayed from its token
bucket's CUDA graph (server/prefill_graphs.py) and run eagerly, in one process on one engine.

    python benchmarks/prefill_step.py                       # Llama-3.2-1B shape, bf16, CUDA
    python benchmarks/prefill_step.py --decodes 32 --prompt-len 128 --profile

Eagerly, such a step launches its kernels one at a time from Python, so its wall time is the larger of
the host's launch work and the device's work; replayed, it is the device's work plus the step's packing. In
serving such a step is the inter-token latency every running request sees when a new one arrives. Per case:
  step_ms    median wall time of the engine.step() call that returns the prompt's first token (with
             overlap scheduling that call also launches the next step: the gap the running requests see)
  device_ms  the device time of that step's kernels (torch profiler, summed, overlap off; CPU: not measured)
  host_ms    step_ms - device_ms, the time the device waits for the host
and the ten largest kernels per case. --profile prints cProfile's top functions over eager prefill-alone
steps. Writes JSON to --json or $OUT/prefill_step.json.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
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


def timed_prompt_step(engine, prompt: list[int], tag: str) -> float:
    """Add one request and time the engine step that prefills it (seconds). The step that returns the
    request's first token is the one; running decodes (if any) share it."""
    from server.sampling_params import SamplingParams
    engine.add_request(tag, prompt, SamplingParams(temperature=0.0, max_new_tokens=2, ignore_eos=True))
    while True:
        t = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t
        if any(o.request_id == tag for o in outs):
            return dt


def device_ms_of(fn, device: torch.device, top: dict | None = None) -> float | None:
    """Device time of fn's kernels, summed (torch profiler); None off CUDA. Only the kernels' own events
    count (device_type CUDA), so an op and the kernel it launched are not both counted. `top` collects
    each kernel's ms (name -> list) for the table of the largest."""
    if device.type != "cuda":
        fn()
        return None
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    for e in kernels if top is not None else ():
        top.setdefault(e.key, []).append(e.self_device_time_total / 1e3)
    return sum(e.self_device_time_total for e in kernels) / 1e3


def run_case(engine, prompts, num_decodes: int, reps: int, tag: str, measure=None) -> list:
    """reps prompt steps, each joining num_decodes running decode requests; measure(step) wraps each
    (default: wall seconds)."""
    from server.sampling_params import SamplingParams
    long = SamplingParams(temperature=0.0, max_new_tokens=4 * reps + 64, ignore_eos=True)
    for i in range(num_decodes):  # long-running decodes the prompt steps join
        engine.add_request(f"{tag}-dec{i}", prompts[i % len(prompts)], long)
    for _ in range(3):
        engine.step()
    measure = measure or (lambda step: step())
    values = [measure(lambda i=i: timed_prompt_step(engine, prompts[i % len(prompts)], f"{tag}-p{i}"))
              for i in range(reps)]
    for i in range(num_decodes):
        engine.abort(f"{tag}-dec{i}")
    while engine.has_unfinished():
        engine.step()
    return values


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="llama-3.2-1b", help=f"config.json path or one of {list(PRESETS)}")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decodes", type=int, default=32, help="running decodes in the mixed case")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--profile", action="store_true", help="print cProfile's top functions (prefill alone)")
    add_engine_arguments(ap)
    ap.add_argument("--json", help="write the results here (default: $OUT/prefill_step.json when OUT is set)")
    args = ap.parse_args(argv)
    raw = PRESETS.get(args.config) or json.loads(Path(args.config).read_text())
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(10, raw["vocab_size"], (8, args.prompt_len), generator=g).tolist()
    # prefix caching off: the timed steps repeat these 8 prompts and must prefill each one whole
    llm = build_llm(SimpleNamespace(**{**vars(args), "dummy": True, "enable_prefix_caching": False}), prompts,
                    [4 * args.reps + 128])
    engine = llm.engine
    device = engine.runner.device
    if device.type != "cuda" and args.prefill_graphs:  # CPU: the graphs' static path, the model as "replay"
        engine.runner.use_graph_path_eagerly()
    graphs = engine.runner.prefill_graphs  # None with --no-prefill-graphs: eager cases only
    names = {"prefill alone": 0, f"prefill + {args.decodes} decodes": args.decodes}
    modes = ["eager"] if graphs is None else ["graph" if device.type == "cuda" else "static", "eager"]
    cases, kernels = {}, {}

    def each_case(body):  # the same engine with its prefill graphs, then without (same weights and cache)
        for mode in modes:
            engine.runner.prefill_graphs = None if mode == "eager" else graphs
            for name, n in names.items():
                body(f"{name}, {mode}", n)
        engine.runner.prefill_graphs = graphs

    def timed(case, n):
        ms = [t * 1e3 for t in run_case(engine, prompts, n, args.reps, f"t{case}")]
        cases[case] = {"step_ms": statistics.median(ms), "all_ms": ms}

    def profiled(case, n):
        # overlap off while profiling: with it, the step() call that returns the prompt's first token also
        # launches the next step, whose kernels would land in the same profile
        served, engine.config = engine.config, engine.config.model_copy(update={"overlap_scheduling": False})
        top = kernels.setdefault(case, {})
        dev = run_case(engine, prompts, n, 3, f"d{case}", measure=lambda step: device_ms_of(step, device, top))
        engine.config = served
        d = None if dev[0] is None else statistics.median(dev)
        cases[case].update(device_ms=d, host_ms=None if d is None else cases[case]["step_ms"] - d)

    with torch.inference_mode():
        run_case(engine, prompts, 0, 3, "warm")
        # wall times first: a torch profiler session can leave the launch path slower for the process after it
        each_case(timed)
        prof = None
        if args.profile:
            engine.runner.prefill_graphs = None  # the eager step's host work is what cProfile can show
            prof = cProfile.Profile()
            run_case(engine, prompts, 0, args.reps, "cprof", measure=lambda step: (prof.enable(), step(), prof.disable()))
        each_case(profiled)
    if prof is not None:
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    for case, top in kernels.items():
        if top:
            print(f"largest kernels, {case} (ms per step, median of 3):")
            for k, v in sorted(top.items(), key=lambda kv: -statistics.median(kv[1]))[:10]:
                print(f"  {statistics.median(v):7.3f}  {k[:100]}")
    print(f"prompt {args.prompt_len} tokens, {args.config}, device {device}")
    print(f"{'case':<34} | step ms | device ms | host ms")
    for name, c in cases.items():
        print(f"{name:<34} | {c['step_ms']:7.2f} | {fmt(c['device_ms']):>9} | {fmt(c['host_ms']):>7}")
    res = {"args": vars(args), "device": str(device), "cases": cases, "kernels_ms": kernels,
           "prefill_graph_replays": None if graphs is None else dict(graphs.replays),
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    write_json(res, args.json, "prefill_step.json")
    return res


if __name__ == "__main__":
    main()
