"""Priority scheduling: what interactive requests gain when batch jobs fill the server, and what it costs.

    python benchmarks/priority.py                                  # the default model, CPU, float32
    python benchmarks/priority.py --device cuda --dtype bfloat16 --model /models/Llama-3.2-1B --batch 512

One in-process engine per policy, the same workload, the same arrival steps. At step 0, --batch requests
("batch", priority 1) of --batch-prompt tokens and --batch-output new tokens fill more than max_num_seqs,
so a queue forms. Then --interactive short requests ("interactive", priority 0) arrive one every --every
steps. Under "fcfs" every request is sent with priority 0 (fcfs refuses any other), so the interactive ones
wait behind the queue; under "priority" they go to its head and take a slot from the newest batch request,
which recomputes later. Printed per policy: the interactive requests' time to first token and end-to-end
time (p50 and max, in ms and in engine steps), the time until the last batch request ended, output tokens
per second over the run, preemptions, and whether every request's tokens equal the other policy's (greedy,
eos ignored: the order of work changes, the tokens must not).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.results import SHAKESPEARE, write_json  # noqa: E402


def prompt_ids(tokenizer, i: int, length: int) -> list[int]:
    """`length` tokens of tinyshakespeare from a different place per request (no shared prefixes)."""
    text = SHAKESPEARE.read_text() if SHAKESPEARE.exists() else "To be, or not to be, that is the question. " * 999
    ids = tokenizer.encode(text[(i * 7919) % (len(text) // 2):][:length * 8])
    return ids[:length]


def run(args, policy: str) -> dict:
    from server.llm import LLM
    from server.sampling_params import SamplingParams

    llm = LLM(args.model, device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
              kv_cache_memory=args.kv_cache_memory, gpu_memory_utilization=0.5, scheduling_policy=policy,
              max_model_len=max(args.batch_prompt + args.batch_output, args.interactive_prompt
                                + args.interactive_output) + 8)
    engine = llm.engine
    tok = llm.tokenizer

    def params(kind: str) -> SamplingParams:
        new = args.batch_output if kind == "batch" else args.interactive_output
        priority = 0 if policy == "fcfs" or kind == "interactive" else 1
        return SamplingParams(temperature=0.0, max_new_tokens=new, ignore_eos=True, priority=priority)
    engine.add_request("warm-up", prompt_ids(tok, 0, 16), params("interactive"))
    while engine.has_unfinished():
        engine.step()
    preemptions = engine.scheduler.num_preemptions_total
    added: dict[str, tuple[float, int]] = {}  # request -> (time, step) it was added
    first: dict[str, tuple[float, int]] = {}
    ended: dict[str, tuple[float, int]] = {}
    tokens: dict[str, list[int]] = {}
    start = time.perf_counter()
    for i in range(args.batch):
        engine.add_request(f"batch-{i}", prompt_ids(tok, 1 + i, args.batch_prompt), params("batch"))
        added[f"batch-{i}"] = (start, 0)
    step, sent = 0, 0
    while engine.has_unfinished() or sent < args.interactive:
        if sent < args.interactive and step >= args.first_arrival + sent * args.every:
            rid = f"interactive-{sent}"
            engine.add_request(rid, prompt_ids(tok, 1000 + sent, args.interactive_prompt), params("interactive"))
            added[rid] = (time.perf_counter(), step)
            sent += 1
        outputs = engine.step()
        step += 1
        now = time.perf_counter()
        for out in outputs:
            if out.new_token_ids:
                first.setdefault(out.request_id, (now, step))
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                ended[out.request_id] = (now, step)
    wall = time.perf_counter() - start
    inter = [r for r in added if r.startswith("interactive")]

    def spans(until: dict) -> tuple[list[float], list[int]]:
        return ([1000 * (until[r][0] - added[r][0]) for r in inter], [until[r][1] - added[r][1] for r in inter])
    ttft_ms, ttft_steps = spans(first)
    e2e_ms, e2e_steps = spans(ended)
    batch_end = max(ended[r][0] for r in added if r.startswith("batch")) - start
    result = dict(policy=policy, ttft_p50_ms=statistics.median(ttft_ms), ttft_max_ms=max(ttft_ms),
                  ttft_p50_steps=statistics.median(ttft_steps), ttft_max_steps=max(ttft_steps),
                  e2e_p50_ms=statistics.median(e2e_ms), e2e_max_ms=max(e2e_ms),
                  e2e_p50_steps=statistics.median(e2e_steps), batch_done_s=batch_end,
                  output_tok_s=sum(map(len, tokens.values())) / wall, steps=step,
                  preemptions=engine.scheduler.num_preemptions_total - preemptions, tokens=tokens)
    del llm, engine
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model directory (default: the default model, fetched if needed)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--kv-cache-memory", default="256MiB")
    p.add_argument("--batch", type=int, default=24, help="batch requests, all at step 0")
    p.add_argument("--batch-prompt", type=int, default=192)
    p.add_argument("--batch-output", type=int, default=96)
    p.add_argument("--interactive", type=int, default=8)
    p.add_argument("--interactive-prompt", type=int, default=32)
    p.add_argument("--interactive-output", type=int, default=16)
    p.add_argument("--first-arrival", type=int, default=20, help="step of the first interactive arrival")
    p.add_argument("--every", type=int, default=25, help="steps between interactive arrivals")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.model is None:
        from model.fetch import DEFAULT_MODEL, default_cache_dir, fetch_model
        args.model = str(fetch_model(DEFAULT_MODEL, default_cache_dir()))
    results = [run(args, policy) for policy in ("fcfs", "priority")]
    same = results[0]["tokens"] == results[1]["tokens"]
    print(f"{args.batch} batch requests ({args.batch_prompt} + {args.batch_output} tokens) at step 0, "
          f"{args.interactive} interactive ({args.interactive_prompt} + {args.interactive_output}) one every "
          f"{args.every} steps from step {args.first_arrival}; max_num_seqs {args.max_num_seqs}, "
          f"{args.device} {args.dtype}")
    print(f"{'policy':<9} {'TTFT p50 ms':>11} {'max ms':>8} {'p50 steps':>9} {'max':>5} {'e2e p50 ms':>10} "
          f"{'max ms':>8} {'batch done s':>12} {'out tok/s':>9} {'preempt':>7} {'same tokens':>11}")
    rows = []
    for r in results:
        print(f"{r['policy']:<9} {r['ttft_p50_ms']:>11.0f} {r['ttft_max_ms']:>8.0f} {r['ttft_p50_steps']:>9.0f} "
              f"{r['ttft_max_steps']:>5} {r['e2e_p50_ms']:>10.0f} {r['e2e_max_ms']:>8.0f} {r['batch_done_s']:>12.2f} "
              f"{r['output_tok_s']:>9.1f} {r['preemptions']:>7} {str(same):>11}")
        rows.append({k: v for k, v in r.items() if k != "tokens"} | {"same_tokens": same})
    write_json({"settings": vars(args), "rows": rows}, args.json, "priority.json")
    return rows


if __name__ == "__main__":
    main()
