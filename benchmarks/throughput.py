"""Offline throughput: N requests with random prompt and output lengths through the engine at once.

    python benchmarks/throughput.py --dummy --config llama-3.2-1b      # random weights, GPU shapes
    python benchmarks/throughput.py --model DIR --num-requests 128
    python benchmarks/throughput.py --preset cpu [--quick]             # SmolLM2-135M fp32 vs transformers
    python benchmarks/throughput.py --model DIR --turns 4 [--no-enable-prefix-caching]  # chats of 4 turns
    python benchmarks/throughput.py --dummy --penalized-fraction 0.1   # 10% of the requests with a penalty
    python benchmarks/throughput.py --dummy --temperature 0.8 --top-p 0.95  # sampled, not greedy

Every request ignores eos and generates exactly its drawn output length. Prints requests/s, output tok/s
and total (prompt + output) tok/s. `--preset cpu` also runs Hugging Face transformers on the same weights
in the same process: `generate` in left-padded greedy batches (eos ignored via min_new_tokens; a batch runs
to its longest request, and only the requested tokens count), its continuous batching when installed, and
batch-1 decode tok/s for both; then a table of metric, ours, transformers, ratio. JSON goes to --json.
With --turns T each request is a chat of T turns, run in rounds: turn k + 1's prompt is turn k's prompt,
its answer and a new message of --input-len tokens (what the prefix cache's generated blocks serve); the
figures count every turn's prompt and output tokens.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from model.fetch import default_cache_dir  # noqa: E402

PRESETS = {  # shapes of public checkpoints, for random-weight runs
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
                         max_position_embeddings=131072, tie_word_embeddings=True),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                         max_position_embeddings=131072),
    # Qwen3: LLaMA's shapes plus per-head q/k norms (head_dim 128 apart from hidden / heads in the 0.6B)
    "qwen3-0.6b": dict(architectures=["Qwen3ForCausalLM"], vocab_size=151936, hidden_size=1024,
                       intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, rope_theta=1000000.0, max_position_embeddings=40960, tie_word_embeddings=True),
    "qwen3-8b": dict(architectures=["Qwen3ForCausalLM"], vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     rope_theta=1000000.0, max_position_embeddings=40960),
}


class NullTokenizer:
    """Token ids only (random-weight runs): detokenizes to nothing."""
    eos_token_ids: tuple[int, ...] = ()

    def decode(self, ids, skip_special_tokens=True) -> str:
        return ""


def workload(n: int, inp: tuple[int, int], out: tuple[int, int], vocab: int, seed: int, prefix_len: int = 0):
    """n prompts of random ids; with prefix_len, all start with one shared random prefix of that length
    (a system prompt: what the prefix cache serves) before their own input_len ids."""
    rng = random.Random(seed)
    in_lens = [rng.randint(*inp) for _ in range(n)]
    out_lens = [rng.randint(*out) for _ in range(n)]
    prompts = [[rng.randrange(10, vocab) for _ in range(k)] for k in in_lens]
    if prefix_len:
        prefix = [rng.randrange(10, vocab) for _ in range(prefix_len)]
        prompts = [prefix + p for p in prompts]
    return prompts, out_lens


def random_model(config_dict: dict, dtype: str, device: str, backend: str):
    from model.rope import RotaryEmbedding
    from model.config import ModelConfig
    from model.llama import CausalLM, resolve_dtype
    from model.ops import make_ops

    dev = torch.device(device)
    cfg = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], **config_dict})
    torch.manual_seed(0)
    with dev:
        model = CausalLM(cfg, make_ops(backend, dev)).to(resolve_dtype(dtype, dev))
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    model.rotary = RotaryEmbedding(cfg, dev)
    return model.eval().requires_grad_(False)


def build_llm(args, prompts, out_lens):
    from server.llm import LLM
    from server.engine_config import EngineConfig
    from server.model_runner import ModelRunner, resolve_device

    device = str(resolve_device(args.device))
    max_len = max(len(p) + o for p, o in zip(prompts, out_lens))
    if getattr(args, "max_model_len", None) is not None:
        if args.max_model_len < max_len:
            raise SystemExit(f"--max-model-len {args.max_model_len} is shorter than the workload's longest request "
                             f"({max_len} tokens)")
        max_len = args.max_model_len
    kw = dict(dtype=args.dtype, device=device, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_memory=args.kv_cache_memory,
              gpu_memory_utilization=args.gpu_memory_utilization, attention_backend=args.attention_backend,
              max_model_len=max(max_len, args.block_size), block_size=args.block_size,
              overlap_scheduling=args.overlap_scheduling, prefill_graphs=args.prefill_graphs,
              compile_mode=args.compile_mode, compile_max_batch_size=args.compile_max_batch_size,
              enable_prefix_caching=args.enable_prefix_caching,
              decode_fusion=args.decode_fusion, skinny_matmul=args.skinny_matmul,
              skinny_matmul_pdl=args.skinny_matmul_pdl)
    if not args.dummy:
        return LLM(args.model, **kw)
    raw = PRESETS.get(args.config) or json.loads(Path(args.config).read_text())
    model = random_model(raw, args.dtype, device, args.attention_backend)
    runner = ModelRunner(EngineConfig(**kw), None, model=model)
    return LLM(None, runner=runner, tokenizer=NullTokenizer(), **kw)


def run_ours(llm, prompts, out_lens, penalized_fraction: float = 0.0, seed: int = 0, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0) -> dict:
    """With penalized_fraction, that share of the requests (drawn with seed) samples with a frequency
    penalty: rows whose sampling reads their own tokens, which overlap scheduling must wait for. temperature
    top_p and top_k apply to every request (temperature 0: greedy)."""
    from server.sampling_params import SamplingParams
    rng = random.Random(seed)
    params = [SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k,
                             max_new_tokens=o, ignore_eos=True,
                             frequency_penalty=0.5 if rng.random() < penalized_fraction else 0.0)
              for o in out_lens]
    llm.generate(fresh(prompts[:2]), params[:2])  # warm-up on other prompts: nothing for the cache to reuse
    c = llm.engine.counters
    steps0, hits0 = c.num_steps, llm.engine.scheduler.prefix_cache_hits_total
    overlapped0, deferred0 = c.overlapped_steps, c.deferred_sampling_steps
    t = time.perf_counter()
    results = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t
    assert [len(r.token_ids) for r in results] == out_lens
    return metrics(prompts, out_lens, elapsed) | {
        "steps": c.num_steps - steps0, "overlapped_steps": c.overlapped_steps - overlapped0,
        "deferred_sampling_steps": c.deferred_sampling_steps - deferred0,
        "penalized_requests": sum(p.frequency_penalty != 0.0 for p in params),
        "preemptions": llm.engine.scheduler.num_preemptions_total,
        "prefix_cache_hit_tokens": llm.engine.scheduler.prefix_cache_hits_total - hits0}


def run_turns(llm, messages: list[list[list[int]]], out_lens: list[list[int]]) -> dict:
    """messages[k][i]: conversation i's new message at turn k; each turn's prompt extends the last one."""
    from server.sampling_params import SamplingParams
    llm.generate(fresh(messages[0][:2]), SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True))
    steps0, hits0 = llm.engine.counters.num_steps, llm.engine.scheduler.prefix_cache_hits_total
    history: list[list[int]] = [[] for _ in messages[0]]
    all_prompts: list[list[int]] = []
    t = time.perf_counter()
    for new, outs in zip(messages, out_lens):
        prompts = [h + m for h, m in zip(history, new)]
        params = [SamplingParams(temperature=0.0, max_new_tokens=o, ignore_eos=True) for o in outs]
        results = llm.generate(prompts, params, use_tqdm=False)
        history = [p + r.token_ids for p, r in zip(prompts, results)]
        all_prompts += prompts
    elapsed = time.perf_counter() - t
    return metrics(all_prompts, [o for outs in out_lens for o in outs], elapsed) | {
        "steps": llm.engine.counters.num_steps - steps0,
        "preemptions": llm.engine.scheduler.num_preemptions_total,
        "prefix_cache_hit_tokens": llm.engine.scheduler.prefix_cache_hits_total - hits0}


def fresh(prompts: list[list[int]]) -> list[list[int]]:
    """Prompts of the same lengths that share no leading block with these (reversed random ids)."""
    return [p[::-1] if len(p) > 1 and p[::-1] != p else p + [p[0] + 1] for p in prompts]


def metrics(prompts, out_lens, elapsed) -> dict:
    n_in, n_out = sum(map(len, prompts)), sum(out_lens)
    return {"elapsed_s": elapsed, "requests_per_s": len(prompts) / elapsed, "output_tok_s": n_out / elapsed,
            "total_tok_s": (n_in + n_out) / elapsed}


def ours_batch1(llm, prompt, n_out) -> float:
    from server.sampling_params import SamplingParams
    p = SamplingParams(temperature=0.0, max_new_tokens=n_out, ignore_eos=True)
    t = time.perf_counter()
    llm.generate([prompt], p)
    return n_out / (time.perf_counter() - t)


def hf_generate(hf, prompts, out_lens, batch_size: int) -> dict:
    t = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        chunk, outs = prompts[i:i + batch_size], out_lens[i:i + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        m = max(outs)
        hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=m, min_new_tokens=m, do_sample=False,
                    pad_token_id=0)
    return metrics(prompts, out_lens, time.perf_counter() - t)


def hf_continuous(hf, prompts, out_lens) -> dict | str:
    try:
        from transformers import GenerationConfig
        gc = GenerationConfig(do_sample=False, max_new_tokens=max(out_lens), eos_token_id=None, pad_token_id=0)
        manager = hf.init_continuous_batching(generation_config=gc)
        manager.start()
        t = time.perf_counter()
        for i, (p, o) in enumerate(zip(prompts, out_lens)):
            manager.add_request(p, request_id=f"r{i}", max_new_tokens=o, eos_token_id=-1)
        done = 0
        while done < len(prompts):
            r = manager.get_result(timeout=600)
            if r is None:
                raise RuntimeError("no result in 600 s")
            done += r.is_finished()
        elapsed = time.perf_counter() - t
        manager.stop(block=True, timeout=10)
        return metrics(prompts, out_lens, elapsed)
    except Exception as exc:  # noqa: BLE001 - the peer is optional; say why it is missing
        return f"n/a ({type(exc).__name__}: {str(exc)[:80]})"


def hf_batch1(hf, prompt, n_out) -> float:
    ids = torch.tensor([prompt])
    t = time.perf_counter()
    hf.generate(input_ids=ids, max_new_tokens=n_out, min_new_tokens=n_out, do_sample=False, pad_token_id=0)
    return n_out / (time.perf_counter() - t)


def compare_with_transformers(args, llm, prompts, out_lens) -> dict:
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    res = {"transformers": transformers.__version__, "generate_batch_size": args.hf_batch_size}
    with torch.inference_mode():
        res["hf_generate"] = hf_generate(hf, prompts, out_lens, args.hf_batch_size)
        res["hf_continuous"] = hf_continuous(hf, prompts, out_lens)
        n1 = 32 if args.quick else 128
        # three prompts the engine has not seen (each prefill is timed whole), the two engines taking turns
        # so that a slow spell of a shared machine hits both; the median of each
        ours1, hf1, batch1_prompts = [], [], fresh(prompts[:3])
        for prompt in batch1_prompts:
            n = min(n1, llm.engine.max_model_len - len(prompt))  # (max_model_len fits the workload)
            ours1.append(ours_batch1(llm, prompt, n))
            hf1.append(hf_batch1(hf, prompt, n))
        res["ours_batch1_tok_s"], res["hf_batch1_tok_s"] = statistics.median(ours1), statistics.median(hf1)
        res["batch1_prompt_lens"] = [len(p) for p in batch1_prompts]
    return res


def print_table(ours: dict, cmp: dict | None) -> None:
    rows = [(k, ours[k]) for k in ("requests_per_s", "output_tok_s", "total_tok_s")]
    if cmp is None:
        for k, v in rows:
            print(f"{k:<28}{v:>12.2f}")
        return
    print(f"{'metric':<40}{'ours':>12}{'transformers':>14}{'ratio':>8}")
    for peer in ("hf_generate", "hf_continuous"):
        p = cmp[peer]
        for k, v in rows:
            if isinstance(p, dict):
                print(f"{k + ' vs ' + peer:<40}{v:>12.2f}{p[k]:>14.2f}{v / p[k]:>8.2f}")
            else:
                print(f"{k + ' vs ' + peer:<40}{v:>12.2f}  {p}")
    a, b = cmp["ours_batch1_tok_s"], cmp["hf_batch1_tok_s"]
    print(f"{'batch-1 decode tok/s (median of 3)':<40}{a:>12.2f}{b:>14.2f}{a / b:>8.2f}")


def add_engine_arguments(ap: argparse.ArgumentParser) -> None:
    """The EngineConfig fields a benchmark run varies (shared with latency.py)."""
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="the engine's context length (default: the workload's longest request). A server runs "
                    "with its config's (configs/llama-3.2-1b.toml: 8,192), and the decode attention's split count "
                    "follows it (kernels/attention_decode.py::choose_num_splits)")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--kv-cache-memory", default="1GiB")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--overlap-scheduling", action=argparse.BooleanOptionalAction, default=True,
                    help="launch decode steps ahead of the host (EngineConfig.overlap_scheduling)")
    ap.add_argument("--prefill-graphs", action=argparse.BooleanOptionalAction, default=True,
                    help="CUDA graphs for steps with prompt tokens too (EngineConfig.prefill_graphs)")
    ap.add_argument("--compile-mode", choices=["off", "default", "max-autotune"], default="off",
                    help="torch.compile the small decode graphs' forward (EngineConfig.compile_mode)")
    ap.add_argument("--compile-max-batch-size", type=int, default=32)
    ap.add_argument("--decode-fusion", action=argparse.BooleanOptionalAction, default=True,
                    help="decode steps run rotary + cache write inside the attention kernel "
                    "(EngineConfig.decode_fusion)")
    ap.add_argument("--skinny-matmul", action=argparse.BooleanOptionalAction, default=False,
                    help="steps of up to 16 tokens project with our Triton kernel, the post-attention norm and "
                    "SiLU x mul folded in (EngineConfig.skinny_matmul)")
    ap.add_argument("--skinny-matmul-pdl", action=argparse.BooleanOptionalAction, default=False,
                    help="with --skinny-matmul: each of those launches starts while the kernel before it "
                    "finishes, by programmatic dependent launch (sm_90+; EngineConfig.skinny_matmul_pdl)")
    ap.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                    help="share prompt blocks between requests (EngineConfig.enable_prefix_caching); the "
                    "benchmarks' warm-ups and repeats use fresh prompts, so it finds nothing to share "
                    "unless the workload has a shared prefix (--prefix-len)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="model directory")
    ap.add_argument("--dummy", action="store_true", help="random weights with --config's shapes")
    ap.add_argument("--config", default="llama-3.2-1b", help=f"config.json path or one of {list(PRESETS)}")
    ap.add_argument("--preset", choices=["cpu"], help="cpu: default SmolLM2-135M fp32, vs transformers")
    ap.add_argument("--model-cache-dir", default=str(default_cache_dir()))
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--input-len", type=int, nargs=2, default=(100, 1024))
    ap.add_argument("--output-len", type=int, nargs=2, default=(100, 1024))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prefix-len", type=int, default=0, help="a shared random prefix of this many tokens "
                    "before every prompt (as vLLM's --random-prefix-len)")
    ap.add_argument("--turns", type=int, default=1, help="each request a chat of this many turns (see above)")
    ap.add_argument("--temperature", type=float, default=0.0, help="every request's temperature (0: greedy)")
    ap.add_argument("--top-p", type=float, default=1.0, help="every request's top_p")
    ap.add_argument("--top-k", type=int, default=0, help="every request's top_k (0: off)")
    ap.add_argument("--penalized-fraction", type=float, default=0.0, help="this share of the requests samples "
                    "with frequency_penalty 0.5 (rows that read their own tokens: their steps sample after the "
                    "step in flight)")
    ap.add_argument("--quick", action="store_true", help="8 short requests: a smoke test")
    add_engine_arguments(ap)
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.preset == "cpu":
        from model.fetch import fetch_model
        from model.fetch import DEFAULT_MODEL
        args.model = args.model or str(fetch_model(DEFAULT_MODEL, Path(args.model_cache_dir)))
        args.dtype, args.device, args.num_requests = "float32", "cpu", 64
        args.input_len = args.output_len = (32, 256)
    if args.quick:
        args.num_requests = 8
        args.input_len, args.output_len = (16, 64), (8, 32)
    if not args.dummy and not args.model:
        ap.error("give --model DIR, --dummy, or --preset cpu")
    vocab = (PRESETS.get(args.config) or json.loads(Path(args.config).read_text()))["vocab_size"] \
        if args.dummy else json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    turns = [workload(args.num_requests, tuple(args.input_len), tuple(args.output_len), vocab, args.seed + k,
                      args.prefix_len if k == 0 else 0) for k in range(args.turns)]
    prompts, out_lens = turns[0]
    if args.turns > 1:
        if args.preset == "cpu":
            ap.error("--turns has no transformers comparison: leave out --preset cpu")
        whole = [sum(len(t[0][i]) + t[1][i] for t in turns) for i in range(args.num_requests)]
        llm = build_llm(args, [[0] * n for n in whole], [0] * args.num_requests)
        ours = run_turns(llm, [t[0] for t in turns], [t[1] for t in turns])
    else:
        llm = build_llm(args, prompts, out_lens)
        ours = run_ours(llm, prompts, out_lens, args.penalized_fraction, args.seed, args.temperature, args.top_p,
                        args.top_k)
    cmp = compare_with_transformers(args, llm, prompts, out_lens) if args.preset == "cpu" else None
    prefix = f"shared prefix {args.prefix_len} + " if args.prefix_len else ""
    chats = f" x {args.turns} turns" if args.turns > 1 else ""
    print(f"{args.num_requests} requests{chats}, input {prefix}U{tuple(args.input_len)}, output U{tuple(args.output_len)}, "
          f"device {llm.engine.runner.device}, {ours['steps']} steps, {ours['preemptions']} preemptions, "
          f"{ours['prefix_cache_hit_tokens']:,} tokens from the prefix cache, {ours['elapsed_s']:.1f} s")
    if "overlapped_steps" in ours:
        sampled = f"temperature {args.temperature}, top_p {args.top_p}" if args.temperature else "greedy"
        print(f"{sampled}; {ours['penalized_requests']} requests with a penalty; {ours['overlapped_steps']} steps launched "
              f"while one was in flight, {ours['deferred_sampling_steps']} of them sampled after it")
    print_table(ours, cmp)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "ours": ours, "compare": cmp}, indent=1,
                                              default=str))


if __name__ == "__main__":
    main()
