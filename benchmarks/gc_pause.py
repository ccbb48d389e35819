"""How long one full cyclic garbage collection stalls a server process, before and after gc.freeze().

    python benchmarks/gc_pause.py                      # the server's imports and a random tiny model, CPU
    python benchmarks/gc_pause.py --config llama-3.2-1b --device cuda

A full collection walks every tracked object, and what a server holds after start-up (its imports, the
model, the graphs' Python objects) never becomes garbage; the server freezes those once the model has
loaded (ServerConfig.gc_freeze). This builds the same state in-process (the serving stack imported, a
random-weight model behind a ModelRunner), then times gc.collect() for each generation, median of
--repeats, before and after gc.freeze(). Writes JSON to --json or $OUT/gc_pause.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.results import write_json  # noqa: E402

TINY = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 4096}


def collect_ms(generation: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        gc.collect(generation)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", help="a preset name or config.json (default: a 2-layer tiny model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="write the results here (default: $OUT/gc_pause.json when OUT is set)")
    args = ap.parse_args(argv)
    import server.app  # noqa: F401 - the serving stack's imports, as `gqa-serve serve` has them
    import server.engine_process  # noqa: F401
    from benchmarks.throughput import PRESETS, random_model
    from server.engine_config import EngineConfig
    from server.model_runner import ModelRunner
    raw = TINY if args.config is None else PRESETS.get(args.config) or json.loads(Path(args.config).read_text())
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    model = random_model(raw, dtype, args.device, "auto")
    runner = ModelRunner(EngineConfig(device=args.device, dtype=dtype, max_model_len=1024,
                                      kv_cache_memory=64 << 20, gpu_memory_utilization=0.5), None, model=model)
    gc.unfreeze()
    rows = []
    for frozen in (False, True):
        if frozen:
            gc.collect()
            gc.freeze()
        rows.append({"frozen": frozen, "tracked_objects": len(gc.get_objects()),
                     **{f"gen{g}_ms": collect_ms(g, args.repeats) for g in (0, 1, 2)}})
    gc.unfreeze()
    print(f"{'':<14} {'tracked objects':>15} {'gen 0 ms':>9} {'gen 1 ms':>9} {'full ms':>9}")
    for r in rows:
        print(f"{'after freeze' if r['frozen'] else 'as loaded':<14} {r['tracked_objects']:>15,} "
              f"{r['gen0_ms']:>9.2f} {r['gen1_ms']:>9.2f} {r['gen2_ms']:>9.2f}")
    res = {"args": vars(args), "rows": rows, "kv_blocks": runner.kv_capacity.num_blocks}
    write_json(res, args.json, "gc_pause.json")
    return res


if __name__ == "__main__":
    main()
