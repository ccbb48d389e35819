"""`gqa-serve` command line: serve | generate | fetch-model | kv-report | attention-map.

Each subcommand's flags and body live with the room that owns them; this file only wires them.
Bad arguments exit with status 2 and a one-line reason.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from model.fetch import DEFAULT_MODEL, default_cache_dir



class OneLineParser(argparse.ArgumentParser):
    """argparse prints the whole usage on error; a one-line reason is easier to read in scripts."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="HF-style model directory (default: the default model, fetched once)")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--num-kv-heads", type=int, default=None,
                        help="run with this many KV heads (pooled or replicated from the checkpoint's)")
    parser.add_argument("--kv-head-method", default="mean", choices=["mean", "refit"],
                        help="how pooled KV heads are made (see the README's num_kv_heads section)")
    parser.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"])
    parser.add_argument("--model-cache-dir", type=Path, default=default_cache_dir())
    parser.add_argument("--json", action="store_true",
                        help="one JSON line per prompt: text, prompt_token_ids, token_ids, finish_reason")


def run_generate(args: argparse.Namespace) -> int:
    from server.llm import LLM
    from server.sampling_params import SamplingParams

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos)
    llm = LLM(model=args.model, dtype=args.dtype, device=args.device, num_kv_heads=args.num_kv_heads,
              kv_head_method=args.kv_head_method, attention_backend=args.attention_backend,
              model_cache_dir=str(args.model_cache_dir))
    config = llm.model_config
    logging.getLogger("gqa_serve").info(
        "model %s: %d layers, %d query heads, num_kv_heads=%d (checkpoint %d)", llm.model_dir,
        config.num_hidden_layers, config.num_attention_heads, config.num_kv_heads, config.num_key_value_heads)
    prompts = args.prompt
    if args.chat:
        prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    for result in llm.generate(prompts, params):
        if args.json:
            print(json.dumps({"text": result.text, "prompt_token_ids": result.prompt_token_ids,
                              "token_ids": result.token_ids, "finish_reason": result.finish_reason}))
        else:
            print(result.text)
    return 0


def add_fetch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", default=DEFAULT_MODEL, help="a known model name")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())


def run_fetch(args: argparse.Namespace) -> int:
    from model.fetch import fetch_model
    print(fetch_model(args.name, args.cache_dir))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="gqa-serve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", parser_class=OneLineParser)
    commands = {}

    def add(name: str, help_text: str, add_arguments, run) -> None:
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(sub_parser)
        commands[name] = run

    from server.serve import add_serve_arguments, run_serve
    add("serve", "serve the model over HTTP (TGI /generate, OpenAI /v1)", add_serve_arguments, run_serve)
    add("generate", "generate offline from prompts", add_generate_arguments, run_generate)
    add("fetch-model", "download and convert a known model into the cache", add_fetch_arguments, run_fetch)
    from server.kv_report import add_kv_report_arguments, run_kv_report
    add("kv-report", "KV memory against quality for every valid num_kv_heads", add_kv_report_arguments,
        run_kv_report)
    from server.attention_map import add_attention_map_arguments, run_attention_map
    add("attention-map", "one layer's attention heatmaps as a PNG grid", add_attention_map_arguments,
        run_attention_map)
    parser.set_defaults(_commands=commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # With no subcommand, serve the default model (what a newcomer expects from the bare command).
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["serve", *argv]
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args._commands[args.command](args)
    except (ValueError, OSError) as exc:  # config, checkpoint and parameter errors; files that cannot be read
        print(f"gqa-serve {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2


def one_line(exc: Exception) -> str:
    """pydantic's report spans lines; scripts want `field: reason` on one."""
    from pydantic import ValidationError
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in exc.errors())
    return " ".join(str(exc).split())


if __name__ == "__main__":
    sys.exit(main())
