"""`gqa-serve kv-report`: KV memory against quality for every valid num_kv_heads (and KV cache dtype).

Prints a Markdown table (or, with --json, a JSON list of rows) and optionally plots perplexity against KV
bytes per token. The measuring is in server/kv_measure.py; this file is flags, output and the plot.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from model.fetch import default_cache_dir
from model.kv_dtype import KV_CACHE_DTYPES
from model.kv_heads import KV_HEAD_METHODS
from server.engine_config import parse_bytes
from server.kv_measure import KVReportRow, KVReportSpec, measure



def _csv(choices: tuple[str, ...] | None = None):
    def parse(value: str) -> tuple[str, ...]:
        items = tuple(v.strip() for v in value.split(",") if v.strip())
        bad = [v for v in items if choices is not None and v not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"{', '.join(bad)}: expected some of {', '.join(choices)}")
        return items
    return parse


def _int_csv(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected comma-separated integers") from None


def _bytes(value: str) -> int:
    try:
        return parse_bytes(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_kv_report_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--model", help="HF-style model directory (default: the default model, fetched once)")
    add("--model-cache-dir", type=Path, default=default_cache_dir(), help="where the default model is cached")
    add("--text", type=Path, required=True, help="UTF-8 text: perplexity on its start, refit calibration later on")
    add("--max-tokens", type=int, default=4096, help="evaluate perplexity on the first N tokens of the text")
    add("--window", type=int, default=512, help="tokens per perplexity window (HF strided perplexity)")
    add("--stride", type=int, default=256, help="tokens between window starts")
    add("--json", action="store_true", help="print a JSON list of rows instead of the table")
    add("--plot", type=Path, help="write a PNG of perplexity against KV bytes per token")
    add("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="model dtype")
    add("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add("--kv-cache-memory", type=_bytes, default=2**30, help="KV cache budget for the capacity columns (1GiB)")
    add("--max-model-len", type=int, default=None, help="sequence length for capacity_seqs (default: the model's)")
    add("--block-size", type=int, default=16, help="KV block size (capacity counts whole blocks)")
    add("--methods", type=_csv(KV_HEAD_METHODS), default=KV_HEAD_METHODS,
        help=f"kv-head pooling methods, comma-separated (default {','.join(KV_HEAD_METHODS)})")
    add("--kv-cache-dtypes", type=_csv(KV_CACHE_DTYPES), default=("bfloat16", "float16", "fp8_e4m3"),
        help="KV cache dtypes measured at the native head count besides auto (empty string: none)")
    add("--num-kv-heads", type=_int_csv, default=None, help="only these counts (default: every valid one)")
    add("--num-prompts", type=int, default=4, help="prompts for greedy agreement")
    add("--greedy-tokens", type=int, default=32, help="greedy tokens generated per prompt")
    add("--calibration-tokens", type=int, default=2048, help="refit calibration tokens (after the evaluation)")
    add("--no-progress", action="store_true", help="no progress bar on stderr")


def _model_dir(args: argparse.Namespace) -> Path:
    if args.model:
        return Path(args.model)
    from model.fetch import DEFAULT_MODEL, fetch_model
    return fetch_model(DEFAULT_MODEL, args.model_cache_dir)


def spec_from_args(args: argparse.Namespace, model_dir: Path) -> KVReportSpec:
    from server.model_runner import resolve_device
    for name in ("max_tokens", "window", "stride", "num_prompts", "greedy_tokens", "calibration_tokens",
                 "block_size", "max_model_len"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return KVReportSpec(
        model_dir=model_dir, max_tokens=args.max_tokens, window=args.window, stride=args.stride,
        dtype=args.dtype, device=str(resolve_device(args.device)), kv_cache_memory=args.kv_cache_memory,
        max_model_len=args.max_model_len, block_size=args.block_size, methods=tuple(args.methods),
        kv_cache_dtypes=tuple(args.kv_cache_dtypes), num_kv_heads=args.num_kv_heads,
        num_prompts=args.num_prompts, greedy_tokens=args.greedy_tokens,
        calibration_tokens=args.calibration_tokens)


def format_table(rows: list[KVReportRow]) -> str:
    """A Markdown table (what docs/kv_tradeoff.md pastes)."""
    head = ("method", "kv heads", "KV dtype", "KV bytes/token", "capacity (tokens)", "capacity (seqs)",
            "perplexity", "greedy agreement", "refit/mean objective")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        heads = f"{r.num_kv_heads} (native)" if r.native else str(r.num_kv_heads)
        ratio = "" if r.calibration_loss_ratio is None else f"{r.calibration_loss_ratio:.3f}"
        cells = (r.method, heads, r.kv_cache_dtype, f"{r.kv_bytes_per_token:,}", f"{r.capacity_tokens:,}",
                 f"{r.capacity_seqs:,}", f"{r.perplexity:.3f}", f"{r.greedy_agreement:.1%}", ratio)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_rows(rows: list[KVReportRow], path: Path, title: str) -> None:
    """Perplexity against KV bytes per token: one series per method, plus the KV dtypes at native heads."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    native = next(r for r in rows if r.native and r.method == rows[0].method)
    model_dtype = native.kv_cache_dtype
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    series: dict[str, list[KVReportRow]] = {}
    for r in rows:
        key = f"num_kv_heads, {r.method}" if r.kv_cache_dtype == model_dtype else "KV cache dtype, native heads"
        series.setdefault(key, []).append(r)
    markers = iter("osD^v")
    for label, items in series.items():
        dtype_series = label.startswith("KV cache dtype")
        if native not in items:  # every series starts from the native model at the model dtype
            items = items + [native]
        items = sorted(items, key=lambda r: (r.kv_bytes_per_token, r.kv_cache_dtype))
        xs, ys = [r.kv_bytes_per_token for r in items], [r.perplexity for r in items]
        ax.plot(xs, ys, marker=next(markers), linestyle=":" if dtype_series else "-", label=label, alpha=0.85)
        for k, r in enumerate(items):
            if r is native and not dtype_series and label != f"num_kv_heads, {native.method}":
                continue  # label the shared native point once
            note = r.kv_cache_dtype if dtype_series else f"{r.num_kv_heads}h"
            ax.annotate(note, (r.kv_bytes_per_token, r.perplexity), textcoords="offset points",
                        xytext=(5, 5 if k % 2 == 0 or not dtype_series else -11), fontsize=8)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1024:g} KiB"))
    perplexities = [r.perplexity for r in rows]
    if max(perplexities) / min(perplexities) > 5:
        ax.set_yscale("log")
    ax.set_xlabel("KV cache bytes per token (all layers, K and V)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_kv_report(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from model.tokenizer import Tokenizer

    model_dir = _model_dir(args)
    text = args.text.read_text(encoding="utf-8")
    spec = spec_from_args(args, model_dir)
    token_ids = Tokenizer.from_pretrained(model_dir).encode(text, add_special_tokens=False)
    bars = []

    def progress_factory(total: int):
        bar = tqdm(total=total, unit="step", desc="kv-report", disable=args.no_progress, file=sys.stderr)
        bars.append(bar)
        return bar.update

    def describe(what: str) -> None:
        if bars:
            bars[0].set_postfix_str(what)

    try:
        rows = measure(spec, token_ids, progress_factory, describe)
    finally:
        for bar in bars:
            bar.close()
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=1))
    else:
        print(format_table(rows))
    if args.plot:
        n = min(args.max_tokens, len(token_ids))
        plot_rows(rows, args.plot, f"{model_dir.name}: perplexity on {n:,} tokens of {args.text.name}")
    return 0
