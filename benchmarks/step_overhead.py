"""Host time of one decode step: the engine's whole step (schedule, pack, copy, replay, sample, detokenize,
stop checks, outputs) on a 1-layer model, against the device time of the same device work.

    python benchmarks/step_overhead.py                       # 1-layer Llama-3.2-1B shape, bf16, CUDA graphs
    python benchmarks/step_overhead.py --batch-sizes 1 64 --layers 1 --vocab 32000
    python benchmarks/step_overhead.py --host-only --device cpu --tokenizer ~/.cache/gqa-serve/models/smollm2-135m

A 1-layer model makes the device work small, so what is left of the step is the host's. Per batch size:
  step_us    median wall time of engine.step() over decode steps (it ends in the step's one sync)
  device_us  the same step's device work (graph replay + sampling) timed back to back (CUDA events on a
             GPU), so the queue never drains and the host's cost is hidden
  host_us    step_us - device_us: the time the device waits for the host each step (target < 60 us)

--host-only replaces the model with a stand-in "replay" that writes one-hot logits for a scripted token
stream (tinyshakespeare through --tokenizer, else random ids), on the graph path's static buffers. It runs
on any device, CPU included, so the engine's own Python cost per step can be measured and profiled without
a GPU (--profile prints cProfile's top functions for one batch size). --tokenizer makes the detokenizer do
real work (default: a tokenizer that decodes to nothing, as the throughput benchmarks use). --async-engine
serves the same steps through AsyncEngine to asyncio streams, as the HTTP server does (mean step time).
Writes JSON to --json or $OUT/step_overhead.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.throughput import PRESETS, NullTokenizer, random_model  # noqa: E402
from benchmarks.results import SHAKESPEARE, write_json  # noqa: E402


def token_script(tokenizer, vocab: int, length: int = 4096) -> list[int]:
    """Ids the host-only stand-in emits in turn: real text when there is a tokenizer, so detokenization
    does the work it does in service."""
    if hasattr(tokenizer, "encode"):
        path = SHAKESPEARE if SHAKESPEARE.is_file() else None
        text = path.read_text()[:200_000] if path else "To be, or not to be, that is the question. " * 2000
        ids = [i for i in tokenizer.encode(text, add_special_tokens=False)[:length] if i < vocab]
        if ids:
            return ids
    g = torch.Generator().manual_seed(0)
    return torch.randint(10, vocab, (length,), generator=g).tolist()


def install_host_only_replay(graphs, script: list[int]) -> None:
    """Each size's replay becomes: one-hot logits for the next scripted ids (row r takes a different point
    of the script, so rows differ). The model is never run; the staging copies still are."""
    script_t = torch.tensor(script, dtype=torch.int64, device=graphs.logits.device)
    state = {"step": 0}

    def replay(size: int) -> None:
        k = state["step"] = state["step"] + 1
        rows = torch.arange(size, device=script_t.device)
        ids = script_t[(k + 97 * rows) % len(script)]
        graphs.logits[:size].zero_()
        graphs.logits[rows, ids] = 1.0

    graphs._replay = {s: (lambda s=s: replay(s)) for s in graphs.sizes}


def time_device_work(work, device: torch.device, reps: int = 200) -> float:
    """Microseconds per call of `work`, back to back (CUDA events on a GPU, wall time elsewhere)."""
    with torch.inference_mode():
        for _ in range(10):
            work()
        if device.type != "cuda":
            t = time.perf_counter()
            for _ in range(reps):
                work()
            return (time.perf_counter() - t) * 1e6 / reps
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            work()
        end.record()
        torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def measure(llm, batch: int, steps: int, vocab: int, profile: bool = False) -> dict:
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
    profiler = None
    if profile:
        import cProfile
        profiler = cProfile.Profile()
    walls = []
    for _ in range(steps):
        t0 = time.perf_counter()
        if profiler:
            profiler.enable()
        engine.step()
        if profiler:
            profiler.disable()
        walls.append(time.perf_counter() - t0)
    graphs = engine.runner.graphs
    seqs = list(engine.scheduler.running)
    size = graphs.padded_size_for(len(seqs)) if graphs is not None else None
    for s in seqs:
        engine.abort(s.request_id)
    while engine.has_unfinished():  # a step still in flight (overlap scheduling)
        engine.step()
    return with_device_time(engine.runner, batch, size, statistics.median(walls) * 1e6) | {"profiler": profiler}


def measure_async(async_engine, batch: int, steps: int, vocab: int) -> dict:
    """The same decode steps served through AsyncEngine: the engine thread also hands every output to an
    asyncio stream that a consumer task drains, as the HTTP server does. Mean wall time per step."""
    import asyncio
    from server.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_new_tokens=steps, ignore_eos=True)
    g = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(10, vocab, (32,), generator=g).tolist() for _ in range(batch)]

    async def run() -> tuple[float, int]:
        # The whole run, submission to the last output read: the engine thread does not wait for the
        # readers, so a window that starts later would miss the steps it ran meanwhile. The prefill step is
        # one of `steps`.
        steps0, t0 = async_engine.stats().num_steps, time.perf_counter()
        streams = [async_engine.add_request(f"a{batch}-{i}", p, params) for i, p in enumerate(prompts)]
        for stream in streams:
            async for _ in stream:
                pass
        return time.perf_counter() - t0, async_engine.stats().num_steps - steps0
    elapsed, num_steps = asyncio.run(run())
    graphs = async_engine.engine.runner.graphs
    size = graphs.padded_size_for(batch) if graphs is not None else None
    return with_device_time(async_engine.engine.runner, batch, size, elapsed / max(num_steps, 1) * 1e6)


def with_device_time(runner, batch: int, size: int | None, step_us: float) -> dict:
    """A result row: step_us, and when the step replays a graph, its device work timed back to back."""
    row = {"batch": batch, "padded": size, "step_us": step_us, "device_us": None, "host_us": None,
           "graph": size is not None}
    if size is None:
        return row
    graphs = runner.graphs
    replay = graphs._replay[size]

    def device_work():  # the steps are greedy without logprobs: the runner's argmax-only path
        replay()
        graphs.logits[:batch].argmax(dim=-1)

    row["device_us"] = time_device_work(device_work, runner.device)
    row["host_us"] = step_us - row["device_us"]
    return row


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="llama-3.2-1b", choices=list(PRESETS))
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=None, help="override the preset's vocab (smaller lm_head)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 elsewhere")
    ap.add_argument("--host-only", action="store_true", help="no model: a scripted stand-in replay (any device)")
    ap.add_argument("--tokenizer", default=None, help="a model dir whose tokenizer detokenizes the outputs")
    ap.add_argument("--profile", type=int, default=None, metavar="BATCH", help="cProfile the steps of BATCH")
    ap.add_argument("--async-engine", action="store_true",
                    help="serve the steps through AsyncEngine and asyncio streams, as the HTTP server does")
    ap.add_argument("--overlap-scheduling", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from model.tokenizer import Tokenizer
    from server.llm import LLM
    from server.engine_config import EngineConfig
    from server.model_runner import ModelRunner

    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    raw = dict(PRESETS[args.config], num_hidden_layers=args.layers)
    if args.vocab:
        raw["vocab_size"] = args.vocab
    if args.host_only:  # the model is never run: keep it (and its CPU init) small
        raw.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=16)
    tokenizer = Tokenizer.from_pretrained(args.tokenizer) if args.tokenizer else NullTokenizer()
    kw = dict(dtype=dtype, device=args.device, max_num_seqs=max(args.batch_sizes), max_model_len=1024,
              gpu_memory_utilization=0.5, overlap_scheduling=args.overlap_scheduling, kv_cache_memory=256 << 20)
    model = random_model(raw, dtype, args.device, "auto")
    runner = ModelRunner(EngineConfig(**kw), None, model=model)
    if args.host_only:
        if runner.graphs is None:
            runner.use_graph_path_eagerly()
        install_host_only_replay(runner.graphs, token_script(tokenizer, raw["vocab_size"]))
    if args.async_engine:
        from server.async_engine import AsyncEngine
        served = AsyncEngine(EngineConfig(**kw))
        served.start(runner=runner, tokenizer=tokenizer)
        try:
            rows = [measure_async(served, b, args.steps, raw["vocab_size"]) | {"profiler": None}
                    for b in args.batch_sizes]
        finally:
            served.shutdown()
    else:
        llm = LLM(None, runner=runner, tokenizer=tokenizer, **kw)
        rows = [measure(llm, b, args.steps, raw["vocab_size"], profile=b == args.profile)
                for b in args.batch_sizes]
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    what = "host only (no model)" if args.host_only else f"{args.config} shape, {args.layers} layer(s)"
    print(f"device {dev}; {what}, vocab {raw['vocab_size']}, {dtype}; tokenizer {args.tokenizer or 'none'}; "
          f"overlap scheduling {'on' if args.overlap_scheduling else 'off'}; "
          f"{'AsyncEngine + asyncio streams (mean)' if args.async_engine else 'LLMEngine.step (median)'}")
    print(f"{'batch':>6} {'padded':>7} {'step us':>9} {'device us':>10} {'host us':>8} {'target us':>10}")
    f = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
    for r in rows:
        print(f"{r['batch']:>6} {r['padded'] or '-':>7} {f(r['step_us']):>9} {f(r['device_us']):>10} "
              f"{f(r['host_us']):>8} {'60':>10}")
    for r in rows:
        if r["profiler"] is not None:
            import pstats
            print(f"\ncProfile of batch {r['batch']} ({args.steps} steps), by own time:")
            pstats.Stats(r["profiler"], stream=sys.stdout).sort_stats("tottime").print_stats(20)
        r.pop("profiler")
    write_json({"args": vars(args), "device": dev, "rows": rows}, args.json, "step_overhead.json")
    return rows


if __name__ == "__main__":
    main()
