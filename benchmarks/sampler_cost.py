"""What sampling costs per step, on a real model's logits: the full-vocabulary sort against the cut the
sampler now takes from the best tokens (model/sampler.py::_apply_top_k_top_p).

    python benchmarks/sampler_cost.py                       # the default model (SmolLM2-135M), CPU, batch 64
    python benchmarks/sampler_cost.py --batch-sizes 8 64 --repeats 7 --json /tmp/sampler.json

The logits are the default model's next-token logits after windows of tinyshakespeare (so the nucleus has
the size a real model gives it, not a random model's flat one), tiled to each batch size. Each setting is
timed as `sample()` runs it ("now"), and with the full sort forced ("sort": no max_top_k, no CPU
candidates), median of --repeats. Both give the same tokens (tests/test_sampler.py); the "sort rows" column
counts the rows the candidates could not settle and the sampler sorted anyway.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.results import SHAKESPEARE, write_json  # noqa: E402
from model import sampler  # noqa: E402

SETTINGS = {  # name: (temperature, top_k, top_p)
    "temperature 0.8": (0.8, 0, 1.0),
    "top_p 0.9": (0.8, 0, 0.9),
    "top_k 50": (0.8, 50, 1.0),
    "top_k 20, top_p 0.8": (0.7, 20, 0.8),  # Qwen2.5's generation_config
}


def model_logits(model_dir: str, rows: int, context: int, device: str) -> torch.Tensor:
    """[rows, V] float32 next-token logits after `rows` windows of `context` tokens of tinyshakespeare."""
    from model.batch import build_step_batch
    from model.kv_cache import KVCache
    from model.llama import load_model
    from model.tokenizer import Tokenizer

    ids = Tokenizer.from_pretrained(model_dir).encode(SHAKESPEARE.read_text()[:200_000])
    windows = [ids[i * 997: i * 997 + context] for i in range(rows)]
    model = load_model(model_dir, device=device)
    block = 16
    per_seq = -(-context // block)
    cache = KVCache.allocate(model.config, rows * per_seq, block, torch.float32, device)
    tables = [list(range(r * per_seq, (r + 1) * per_seq)) for r in range(rows)]
    batch = build_step_batch(windows, [0] * rows, tables, block, device=device)
    with torch.inference_mode():
        return model(batch, cache).float()


def tensors(batch: int, temperature: float, top_k: int, top_p: float, device: str) -> sampler.SamplingTensors:
    col = lambda v, dt: torch.full((batch,), v, dtype=dt, device=device)  # noqa: E731
    return sampler.SamplingTensors(
        temperature=col(temperature, torch.float32), top_k=col(top_k, torch.int64), top_p=col(top_p, torch.float32),
        min_p=col(0.0, torch.float32), seeds=col(0, torch.int64), has_seed=col(False, torch.bool),
        output_index=col(0, torch.int64), any_top_k=top_k > 0, any_top_p=top_p < 1.0,
        max_top_k=top_k if top_k > 0 else None)


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model directory (default: the default model, fetched if needed)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 64])
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.model is None:
        from model.fetch import DEFAULT_MODEL, default_cache_dir, fetch_model
        args.model = str(fetch_model(DEFAULT_MODEL, default_cache_dir()))
    base = model_logits(args.model, max(args.batch_sizes), args.context, args.device)
    gen = torch.Generator(device=args.device).manual_seed(0)
    rows = []
    print(f"{'batch':>5}  {'setting':<22} {'sort ms':>8} {'now ms':>8} {'speed-up':>8} {'sort rows':>9}")
    for batch in args.batch_sizes:
        logits = base[:batch]
        for name, (temp, top_k, top_p) in SETTINGS.items():
            t = tensors(batch, temp, top_k, top_p, args.device)
            forced = replace(t, max_top_k=None)
            default_candidates = sampler.CPU_CANDIDATES
            now = median_ms(lambda: sampler.sample(logits, t, gen), args.repeats)
            sampler.CPU_CANDIDATES = logits.shape[1]  # the full sort, as before
            try:
                sort = median_ms(lambda: sampler.sample(logits, forced, gen), args.repeats)
            finally:
                sampler.CPU_CANDIDATES = default_candidates
            tempered = logits / temp
            best = tempered.topk(min(t.max_top_k or sampler.CPU_CANDIDATES, logits.shape[1]), dim=-1).values
            _, exact = sampler._thresholds(tempered, best, t)
            unsettled = 0 if (t.max_top_k or not (t.any_top_k or t.any_top_p)) else int((~exact).sum())
            rows.append(dict(batch=batch, setting=name, sort_ms=sort, now_ms=now, sort_rows=unsettled))
            print(f"{batch:>5}  {name:<22} {sort:>8.1f} {now:>8.1f} {sort / now:>7.1f}x {unsettled:>9}")
    write_json({"device": args.device, "vocab": base.shape[1], "rows": rows}, args.json, "sampler_cost.json")
    return rows


if __name__ == "__main__":
    main()
