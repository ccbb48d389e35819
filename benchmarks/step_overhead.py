"""Host time of one decode step: the engine's whole step (schedule, pack, copy, replay, sample, detokenize)
on a 1-layer model, against the GPU time of the same device work.

    python benchmarks/step_overhead.py                       # 1-layer Llama-3.2-1B shape, bf16, CUDA graphs
    python benchmarks/step_overhead.py --batch-sizes 1 64 --layers 1 --vocab 32000

A 1-layer model makes the device work small, so what is left of the step is the host's. Per batch size:
  step_us    median wall time of engine.step() over decode steps (it ends in the step's one sync)
  device_us  the same step's device work (graph replay + sampling) timed back to back with CUDA events,
             so the GPU queue never drains and the host's cost is hidden
  host_us    step_us - device_us: the time the GPU waits for the host each step (target < 60 us)
Writes JSON to --json or $OUT/step_overhead.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.throughput import PRESETS, NullTokenizer, random_model  # noqa: E402


def measure(llm, batch: int, steps: int, vocab: int) -> dict:
    from model.sampler import sample
    from server.sampling_batch import build_sampling_tensors
    from server.sampling_params import SamplingParams

    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_new_tokens=steps + 20, ignore_eos=True)
    g = torch.Generator().manual_seed(batch)
    for i in range(batch):
        engine.add_request(f"b{batch}-{i}", torch.randint(10, vocab, (32,), generator=g).tolist(), params)
    while any(s.num_output_tokens == 0 for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()  # prefills
    for _ in range(5):
        engine.step()  # warm decode steps
    walls = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - t0)
    runner = engine.runner
    graphs = runner.graphs
    seqs = list(engine.scheduler.running)
    size = graphs.padded_size_for(len(seqs)) if graphs is not None else None
    for s in seqs:
        engine.abort(s.request_id)
    while engine.has_unfinished():  # a step still in flight (overlap scheduling)
        engine.step()
    if size is None:
        return {"batch": batch, "step_us": statistics.median(walls) * 1e6, "device_us": None, "host_us": None,
                "graph": False}
    tensors = build_sampling_tensors(seqs, vocab, (), runner.device)
    replay = graphs._replay[size]

    def device_work():
        replay()
        sample(graphs.logits[:batch], tensors, runner.generator)

    with torch.inference_mode():
        for _ in range(10):
            device_work()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        reps = 200
        start.record()
        for _ in range(reps):
            device_work()
        end.record()
        torch.cuda.synchronize()
    device_us = start.elapsed_time(end) * 1e3 / reps
    step_us = statistics.median(walls) * 1e6
    return {"batch": batch, "padded": size, "step_us": step_us, "device_us": device_us,
            "host_us": step_us - device_us, "graph": True}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="llama-3.2-1b", choices=list(PRESETS))
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=None, help="override the preset's vocab (smaller lm_head)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--overlap-scheduling", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from server.llm import LLM
    from server.engine_config import EngineConfig
    from server.model_runner import ModelRunner

    raw = dict(PRESETS[args.config], num_hidden_layers=args.layers)
    if args.vocab:
        raw["vocab_size"] = args.vocab
    kw = dict(dtype=args.dtype, device=args.device, max_num_seqs=max(args.batch_sizes), max_model_len=1024,
              gpu_memory_utilization=0.5, overlap_scheduling=args.overlap_scheduling)
    model = random_model(raw, args.dtype, args.device, "auto")
    llm = LLM(None, runner=ModelRunner(EngineConfig(**kw), None, model=model), tokenizer=NullTokenizer(), **kw)
    rows = [measure(llm, b, args.steps, raw["vocab_size"]) for b in args.batch_sizes]
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device {dev}; {args.config} shape, {args.layers} layer(s), vocab {raw['vocab_size']}, {args.dtype}")
    print(f"{'batch':>6} {'padded':>7} {'step us':>9} {'device us':>10} {'host us':>8}")
    f = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
    for r in rows:
        print(f"{r['batch']:>6} {r.get('padded', '-'):>7} {f(r['step_us']):>9} {f(r['device_us']):>10} "
              f"{f(r['host_us']):>8}")
    path = args.json or (str(Path(os.environ["OUT"]) / "step_overhead.json") if os.environ.get("OUT") else None)
    if path:
        Path(path).write_text(json.dumps({"args": vars(args), "device": dev, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
