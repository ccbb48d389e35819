"""Speculative decoding by n-gram prompt lookup at batch 1: our engine with and without drafts, against
transformers' prompt lookup decoding on the same weights, in one run; and drafts from a request's prediction
(OpenAI's Predicted Outputs, server/prediction.py).

    python benchmarks/speculative.py                                   # the default model, CPU, float32
    python benchmarks/speculative.py --device cuda --dtype bfloat16 --num-speculative-tokens 2 4 8

Workloads of chat prompts (copy and free unless --workloads says), each request alone (batch 1), greedy, eos
ignored:
- copy: "Repeat this text exactly" over a passage of tinyshakespeare. The answer copies its prompt, the case
  prompt lookup is for (quoting, editing, rewriting code);
- free: "Write a short story about ...": little to copy, so drafts are rarely proposed and rarely right;
- json: "Describe ... as JSON" under a JSON schema (PERSON_SCHEMA), ended by the grammar: a constrained
  sequence drafts the tokens its grammar forces (keys, quotes, colons). transformers has no grammars, so
  this workload has no peer row (`--workloads copy free json`);
- extract: "Extract ... as JSON" from a short made-up biography under EXTRACT_SCHEMA: the grammar forces the
  keys, and the values are copied from the text, which the lookup drafts where nothing is forced (ours only);
- edit: "Repeat this text exactly, but write "friend" instead of <a word of it>" over a passage of
  tinyshakespeare, sent with the passage as its prediction, and ended by eos (past the reply, a small model
  writes on into made-up turns, which no prediction foresees). Ours only: engine "ours" runs it without the
  prediction (plain, and with the lookup's k), engine "ours predict" with it, num_speculative_tokens 0 and
  num_prediction_tokens each of --num-prediction-tokens (8 16; the k column), with its accepted / rejected
  prediction tokens on a line below.
With --adaptive, each k runs again with prompt_lookup_adaptive (engine "ours adaptive", against ours plain; the
edit workload's predictions too, "ours predict adaptive").
Per setting: output tokens/s over the requests' wall time (prefill included, median of --repeats), the
drafts kept of those proposed, output tokens per engine step, and whether the tokens equal plain greedy
decoding's (ours plain for ours; transformers plain for its prompt lookup). transformers runs `generate`
plainly and with `prompt_lookup_num_tokens` = each k (its lookup matches up to 2 tokens; ours
--prompt-lookup-max, 4, down to --prompt-lookup-min, 2, as the engine's defaults).
"""
from __future__ import annotations

import argparse
import gc
import itertools
import re
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.results import SHAKESPEARE, write_json  # noqa: E402

PERSON_SCHEMA = {"type": "object", "additionalProperties": False,
                 "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                "occupation": {"type": "string"}, "hometown": {"type": "string"},
                                "is_married": {"type": "boolean"},
                                "hobbies": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
                 "required": ["name", "age", "occupation", "hometown", "is_married", "hobbies"]}
EXTRACT_SCHEMA = {"type": "object", "additionalProperties": False,
                  "properties": {"name": {"type": "string"}, "city": {"type": "string"},
                                 "company": {"type": "string"}, "quote": {"type": "string"}},
                  "required": ["name", "city", "company", "quote"]}
BIOGRAPHIES = [  # made up
    'Margaret Okonkwo-Reyes, a senior engineer at Northwind Traders, moved to Saint Petersburg last spring. '
    'Asked about the move, she said: "The winters are long, but the libraries are open late."',
    'After twelve years at Blue Heron Shipping, Tobias Lindqvist-Marsh opened a bakery in Port Elizabeth. '
    '"Bread forgives you more than cargo does," he told a local paper.',
    'Priya Venkataraman leads the data team of Cobalt Orchard Analytics from its office in Wellington. '
    'Her advice to new hires: "Write the test first, and the apology never."',
]
TOPICS = ["a lighthouse keeper who finds a letter", "the first snow of winter in a small town",
          "a robot that learns to paint", "two friends lost in a forest", "a baker who wakes up famous",
          "a cat that guards a library"]


def passages(n: int, chars: int = 280) -> list[str]:
    """n passages of whole lines, about `chars` long, from spread-out places in tinyshakespeare."""
    text = SHAKESPEARE.read_text()
    out = []
    for i in range(n):
        start = text.index("\n\n", 7919 * (i + 1)) + 2
        lines, size = [], 0
        for line in text[start:].splitlines():
            if size + len(line) > chars and lines:
                break
            lines.append(line)
            size += len(line) + 1
        out.append("\n".join(lines))
    return out


def extract_request(i: int) -> str:
    """The extract workload's i-th user message (answered under EXTRACT_SCHEMA)."""
    biography = BIOGRAPHIES[i % len(BIOGRAPHIES)]
    return f"Extract the person's name, city, company and what they said, as JSON:\n\n{biography}"


def edit_request(passage: str) -> str:
    """The edit workload's user message for a passage (whose prediction is the passage itself): one word of it
    to be written differently."""
    words = re.findall(r"[A-Za-z]{5,}", passage) or ["the"]
    return f'Repeat this text exactly, but write "friend" instead of "{words[len(words) // 2]}":\n\n{passage}'


def edit_predictions(model_dir: str, n: int) -> list[list[int]]:
    """The edit workload's predictions: its passages' tokens (no special tokens, as the chat route's)."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    return [tok.encode(p, add_special_tokens=False) for p in passages(n)]


def chat_prompts(model_dir: str, workload: str, n: int) -> list[list[int]]:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    if workload == "copy":
        contents = [f"Repeat this text exactly:\n\n{p}" for p in passages(n)]
    elif workload == "edit":
        contents = [edit_request(p) for p in passages(n)]
    elif workload == "extract":
        contents = [extract_request(i) for i in range(n)]
    elif workload == "json":
        contents = [f"Describe the main character of a story about {TOPICS[i % len(TOPICS)]} as a JSON object."
                    for i in range(n)]
    else:
        contents = [f"Write a short story about {TOPICS[i % len(TOPICS)]}." for i in range(n)]
    if tok.chat_template is None:  # a test model without one: the bare request
        return [tok.encode(c) for c in contents]
    prompts = []
    for c in contents:
        ids = tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True, tokenize=True)
        prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return prompts


def free_device(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


_request_ids = itertools.count()


def ours_generate(llm, prompt: list[int], params) -> tuple[list[int], int, int]:
    """One request through the engine's steps (LLM.generate's loop): its tokens, and its prediction tokens
    accepted and rejected."""
    engine, rid, tokens, last = llm.engine, f"bench-{next(_request_ids)}", [], None
    engine.add_request(rid, prompt, params)
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
            last = out
    return tokens, last.accepted_prediction_tokens, last.rejected_prediction_tokens


def run_ours(args, k: int, prompts: list[list[int]], workload: str, adaptive: bool = False,
             predictions: list[list[int]] | None = None) -> dict:
    """predictions: sent with the prompts, drafted k tokens a step (num_prediction_tokens k, no lookup)."""
    import json

    from server.llm import LLM
    from server.sampling_params import Grammar, SamplingParams

    llm = LLM(args.model, device=args.device, dtype=args.dtype, num_speculative_tokens=0 if predictions else k,
              num_prediction_tokens=k if predictions else 0, max_num_seqs=4,
              prompt_lookup_min=args.prompt_lookup_min, prompt_lookup_max=args.prompt_lookup_max,
              prompt_lookup_adaptive=adaptive,
              kv_cache_memory="256MiB", gpu_memory_utilization=0.3,
              max_model_len=max(map(len, prompts)) + args.max_new_tokens + 8)
    schema = {"json": PERSON_SCHEMA, "extract": EXTRACT_SCHEMA}.get(workload)
    grammar = Grammar(type="json", value=json.dumps(schema)) if schema else None
    params = SamplingParams(temperature=0.0, max_new_tokens=args.max_new_tokens,
                            ignore_eos=grammar is None and workload != "edit", grammar=grammar)
    each = [params.model_copy(update={"prediction_token_ids": tuple(predictions[i])}) if predictions else params
            for i in range(len(prompts))]
    ours_generate(llm, prompts[0], params.model_copy(update={"max_new_tokens": 4}))  # warm-up
    counters = llm.engine.counters
    walls, tokens, predicted = [], [], [0, 0]
    drafted, accepted, steps = counters.draft_tokens, counters.accepted_draft_tokens, counters.num_steps
    by_position, num_drafts = list(counters.accepted_by_position), counters.num_drafts
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        runs = [ours_generate(llm, p, q) for p, q in zip(prompts, each)]
        walls.append(time.perf_counter() - t0)
        tokens = [r[0] for r in runs]
        predicted = [predicted[0] + sum(r[1] for r in runs), predicted[1] + sum(r[2] for r in runs)]
    out = sum(map(len, tokens))
    result = dict(tok_s=out / statistics.median(walls), tokens=tokens,
                  accepted_prediction=predicted[0] / args.repeats, rejected_prediction=predicted[1] / args.repeats,
                  drafted=(counters.draft_tokens - drafted) / args.repeats,
                  accepted=(counters.accepted_draft_tokens - accepted) / args.repeats,
                  tokens_per_step=out * args.repeats / (counters.num_steps - steps),
                  num_drafts=(counters.num_drafts - num_drafts) / args.repeats,  # and draft j + 1 kept, by j:
                  kept_by_position=[(a - b) / args.repeats for a, b in zip(counters.accepted_by_position[:k],
                                                                             by_position)])
    del llm
    free_device(args.device)
    return result


def run_transformers(args, k: int, prompts: list[list[int]], workload: str) -> dict:
    import transformers

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
    extra = {"prompt_lookup_num_tokens": k} if k else {}
    n = args.max_new_tokens

    def generate(p: list[int], new: int) -> list[int]:
        with torch.no_grad():
            ids = torch.tensor([p], device=args.device)
            out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None,
                                 pad_token_id=0, **extra)
        return out[0, len(p):].tolist()

    generate(prompts[0], 4)  # warm-up
    walls = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        tokens = [generate(p, n) for p in prompts]
        walls.append(time.perf_counter() - t0)
    del model
    free_device(args.device)
    return dict(tok_s=sum(map(len, tokens)) / statistics.median(walls), tokens=tokens)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model directory (default: the default model, fetched if needed)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--num-speculative-tokens", type=int, nargs="+", default=[4])
    p.add_argument("--prompt-lookup-min", type=int, default=2)
    p.add_argument("--prompt-lookup-max", type=int, default=4)
    p.add_argument("--num-prediction-tokens", type=int, nargs="+", default=[8, 16],
                   help="the edit workload: each as num_prediction_tokens, with the prediction (engine 'ours predict')")
    p.add_argument("--workloads", nargs="+", default=["copy", "free"],
                   choices=["copy", "free", "json", "extract", "edit"])
    p.add_argument("--num-prompts", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--no-transformers", action="store_true", help="leave out the peer")
    p.add_argument("--adaptive", action="store_true",
                   help="also run each k with prompt_lookup_adaptive (engine 'ours adaptive')")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.model is None:
        from model.fetch import DEFAULT_MODEL, default_cache_dir, fetch_model
        args.model = str(fetch_model(DEFAULT_MODEL, default_cache_dir()))
    torch.manual_seed(0)
    rows = []
    print(f"{'workload':<8} {'engine':<21} {'k':>2} {'out tok/s':>9} {'vs plain':>8} {'drafts kept':>16} "
          f"{'tok/step':>8} {'same tokens':>11}")
    for workload in args.workloads:
        prompts = chat_prompts(args.model, workload, args.num_prompts)
        runs = [("ours", k) for k in [0, *args.num_speculative_tokens]]
        if args.adaptive:
            runs += [("ours adaptive", k) for k in args.num_speculative_tokens]
        predictions = edit_predictions(args.model, args.num_prompts) if workload == "edit" else None
        if predictions:
            runs += [("ours predict", k) for k in args.num_prediction_tokens]
            if args.adaptive:
                runs += [("ours predict adaptive", k) for k in args.num_prediction_tokens]
        if not args.no_transformers and workload in ("copy", "free"):
            runs += [("transformers", k) for k in [0, *args.num_speculative_tokens]]
        plain = {}
        for engine, k in runs:
            if engine == "transformers":
                res = run_transformers(args, k, prompts, workload)
            else:
                res = run_ours(args, k, prompts, workload, adaptive=engine.endswith("adaptive"),
                               predictions=predictions if engine.startswith("ours predict") else None)
            if k == 0:
                plain[engine] = res
            base = plain[engine.split()[0]]
            row = dict(workload=workload, engine=engine, k=k, tok_s=res["tok_s"],
                       speedup=res["tok_s"] / base["tok_s"], same_tokens=res["tokens"] == base["tokens"],
                       drafted=res.get("drafted"), accepted=res.get("accepted"),
                       tokens_per_step=res.get("tokens_per_step"), num_drafts=res.get("num_drafts"),
                       kept_by_position=res.get("kept_by_position"),
                       accepted_prediction=res.get("accepted_prediction"),
                       rejected_prediction=res.get("rejected_prediction"))
            rows.append(row)
            kept = f"{row['accepted']:.0f}/{row['drafted']:.0f}" if row["drafted"] is not None else "-"
            per_step = f"{row['tokens_per_step']:.2f}" if row["tokens_per_step"] is not None else "-"
            print(f"{workload:<8} {engine:<21} {k:>2} {row['tok_s']:>9.2f} {row['speedup']:>7.2f}x {kept:>16} "
                  f"{per_step:>8} {str(row['same_tokens']):>11}", flush=True)
            if row["num_drafts"]:
                print(f"{'':<33} of {row['num_drafts']:.0f} drafts, kept by position: "
                      f"{' '.join(f'{v:.0f}' for v in row['kept_by_position'])}")
            if engine.startswith("ours predict"):
                print(f"{'':<33} prediction tokens accepted {row['accepted_prediction']:.0f}, "
                      f"rejected {row['rejected_prediction']:.0f}")
        if "transformers" in plain:
            same = plain["transformers"]["tokens"] == plain["ours"]["tokens"]
            print(f"{workload:<8} plain greedy tokens, ours = transformers: {same}")
            rows.append(dict(workload=workload, engine="ours vs transformers", k=0, same_tokens=same))
    write_json({"device": args.device, "dtype": args.dtype, "model": args.model,
                "prompt_lookup": [args.prompt_lookup_min, args.prompt_lookup_max],
                "max_new_tokens": args.max_new_tokens, "num_prompts": args.num_prompts, "repeats": args.repeats,
                "rows": rows}, args.json, "speculative.json")
    return rows


if __name__ == "__main__":
    main()
