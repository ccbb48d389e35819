"""Host time of packing a graphed step into its pinned staging (no model, no device work: CPU is fine).

    python benchmarks/host_pack.py
    python benchmarks/host_pack.py --repeats 5 --json /tmp/host_pack.json

Two tables, best of --repeats runs of --loads loads each (us per load):
  decode   a batch-256 decode step's DecodeInputs.load_rows, block tables given as the sequences' Python
           lists (converted every step) against their int32 mirrors (Sequence.block_table_array), at 8, 40
           and 125 blocks a sequence
  prefill  PrefillInputs.load of a step with a new prompt and running decodes (the 1B shape's GQA group 4,
           head dim 64, 2,048-token budget, 256 sequences)
  sampling a step's build_sampling_tensors at batch 64 and 256 with 10% of the rows penalised (prompts and
           outputs of 100-1,024 tokens, one token appended to every row per step as in service), against
           the previous way of building the penalty tables alone: every row's token lists, padded, converted
Writes JSON to --json or $OUT/host_pack.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.results import write_json  # noqa: E402
from server.cuda_graphs import DecodeInputs  # noqa: E402
from server.prefill_graphs import PrefillInputs, token_buckets  # noqa: E402
from server.sampling_params import SamplingParams  # noqa: E402
from server.sequence import Sequence  # noqa: E402

CPU = torch.device("cpu")


def best_us(load, repeats: int, loads: int) -> float:
    load()  # first call builds the mirrors
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(loads):
            load()
        best = min(best, (time.perf_counter() - t) / loads * 1e6)
    return best


def decode_rows(batch: int, blocks: int, repeats: int, loads: int) -> dict:
    inputs = DecodeInputs(batch, 256, 4096, CPU)
    seqs = []
    for i in range(batch):
        seq = Sequence(str(i), [1], SamplingParams())
        seq.block_table.extend(range(i * blocks, (i + 1) * blocks))
        seqs.append(seq)
    n = [blocks * 16] * batch
    row = {"batch": batch, "blocks_per_seq": blocks}
    for name, tables in (("list_us", lambda: [s.block_table for s in seqs]),
                         ("mirror_us", lambda: [s.block_table_array() for s in seqs])):
        row[name] = best_us(lambda: inputs.load_rows([5] * batch, n, [0] * batch, n, tables(), batch),
                            repeats, loads)
    return row


def prefill_rows(prompt: int, decodes: int, inputs: PrefillInputs, repeats: int, loads: int) -> dict:
    rng = np.random.default_rng(0)
    rows = [(rng.integers(100, 1000, prompt).tolist(), 0, np.arange(prompt // 16 + 1, dtype=np.int32), -1)]
    rows += [([5], 300 + i, np.arange(40, dtype=np.int32), -1) for i in range(decodes)]
    logits_rows = [prompt - 1] + list(range(prompt, prompt + decodes))
    size = inputs.bucket_for(prompt + decodes, len(rows))
    us = best_us(lambda: inputs.load(rows, 16, logits_rows, size), repeats, loads)
    return {"prompt": prompt, "decodes": decodes, "bucket": size, "load_us": us}


def sampling_rows(batch: int, repeats: int, loads: int) -> dict:
    from server.sampling_batch import build_sampling_tensors
    rng = np.random.default_rng(batch)
    seqs = []
    for i in range(batch):
        pen = rng.random() < 0.1
        p = SamplingParams(temperature=0.0, frequency_penalty=0.5 if pen else 0.0,
                           repetition_penalty=1.1 if pen else 1.0)
        seq = Sequence(str(i), rng.integers(10, 128000, int(rng.integers(100, 1025))).tolist(), p)
        seq.token_ids += rng.integers(10, 128000, int(rng.integers(100, 1025))).tolist()
        seqs.append(seq)

    def step(build):
        for seq in seqs:
            seq.token_ids.append(7)
        build()

    def lists():  # the previous tables: every row, from Python lists, padded, each step
        for ids in ([s.prompt_token_ids for s in seqs], [s.output_token_ids for s in seqs]):
            width = max(map(len, ids))
            torch.tensor([x + [128256] * (width - len(x)) for x in ids], dtype=torch.int64)
    now = best_us(lambda: step(lambda: build_sampling_tensors(seqs, 128256, (2,), CPU)), repeats, loads)
    before = best_us(lambda: step(lists), repeats, loads)
    return {"batch": batch, "penalised": sum(s.params.frequency_penalty != 0 for s in seqs),
            "lists_tables_us": before, "build_us": now}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--loads", type=int, default=60)
    ap.add_argument("--json", help="write the results here (default: $OUT/host_pack.json when OUT is set)")
    args = ap.parse_args(argv)
    decode = [decode_rows(256, blocks, args.repeats, args.loads) for blocks in (8, 40, 125)]
    inputs = PrefillInputs(token_buckets(2048), 256, 128, 4, 64, CPU)
    prefill = [prefill_rows(p, d, inputs, args.repeats, args.loads)
               for p, d in ((128, 0), (128, 32), (128, 255), (2048, 0), (1024, 200))]
    sampling = [sampling_rows(b, args.repeats, max(2, args.loads // 10)) for b in (64, 256)]
    print(f"{'decode load, batch':<20} {'blocks/seq':>10} {'list us':>9} {'mirror us':>10}")
    for r in decode:
        print(f"{r['batch']:<20} {r['blocks_per_seq']:>10} {r['list_us']:>9.0f} {r['mirror_us']:>10.0f}")
    print(f"{'prefill load, prompt':<20} {'decodes':>10} {'bucket':>9} {'load us':>10}")
    for r in prefill:
        print(f"{r['prompt']:<20} {r['decodes']:>10} {r['bucket']:>9} {r['load_us']:>10.0f}")
    print(f"{'sampling, batch':<20} {'penalised':>10} {'previous tables us':>19} {'whole build us':>15}")
    for r in sampling:
        print(f"{r['batch']:<20} {r['penalised']:>10} {r['lists_tables_us']:>19.0f} {r['build_us']:>15.0f}")
    res = {"args": vars(args), "decode": decode, "prefill": prefill, "sampling": sampling}
    write_json(res, args.json, "host_pack.json")
    return res


if __name__ == "__main__":
    main()
