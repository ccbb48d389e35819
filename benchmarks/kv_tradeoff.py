"""Regenerate docs/kv_tradeoff.md and docs/kv_tradeoff.png: `gqa-serve kv-report` on the default model
(SmolLM2-135M-Instruct) over tinyshakespeare, with the settings written into the Markdown.

    python benchmarks/kv_tradeoff.py                         # measure (several minutes on 2 CPU cores)
    python benchmarks/kv_tradeoff.py --from-json rows.json   # re-render from `kv-report --json` output
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.results import SHAKESPEARE, cpu_name  # noqa: E402
from server.kv_measure import KVReportRow  # noqa: E402
from server.kv_report import add_kv_report_arguments, format_table, plot_rows  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def machine() -> str:
    import torch
    return f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {platform.system()}"


REFIT_NOTE = (
    "**How refit works** (`kv_head_method=\"refit\"`, model/kv_refit.py). Fitting the pooled K projection "
    "to the group's keys by least squares on activations gives back the mean for any activations (the "
    "normal equations of one shared W' are sum_i (W' - W_i) X^T X = 0), so refit instead spends the "
    "freedom on the uncached side of each product. Keys: each RoPE frequency pair is a complex number, and "
    "a complex scale per pair commutes with every rotary position, so a per-head, per-pair scale is folded "
    "into the query rows at no cost; the merged key of each pair is the top eigenvector of the group's "
    "query-energy-weighted key covariance (the expected squared attention-logit error, averaged over "
    "relative phase). Values: per-head D x D maps are folded into o_proj and the merged value is a "
    "reduced-rank regression weighted by o_proj. Mean pooling is one point of both families, so refit's "
    "calibration objective is never worse (last column: refit / mean). All it needs is one second-moment "
    "matrix per layer from one pass of the native model over the calibration text; no training."
)


def findings(rows: list[KVReportRow]) -> list[str]:
    native = next(r for r in rows if r.native)
    out = [f"- Native ({native.num_kv_heads} KV heads, {native.kv_cache_dtype}): perplexity "
           f"{native.perplexity:.2f}, {native.kv_bytes_per_token:,} KV bytes per token."]
    by_key = {(r.method, r.num_kv_heads, r.kv_cache_dtype): r for r in rows}
    for r in rows:
        if r.kv_cache_dtype != native.kv_cache_dtype or r.native:
            continue
        if r.num_kv_heads > native.num_kv_heads:
            out.append(f"- {r.num_kv_heads} heads (replicated): perplexity {r.perplexity:.2f}, greedy agreement "
                       f"{r.greedy_agreement:.0%}: exact, at {r.kv_bytes_per_token / native.kv_bytes_per_token:g}x "
                       "the memory (only useful to match a kernel's head layout).")
        elif r.method == "mean":
            refit = by_key.get(("refit", r.num_kv_heads, r.kv_cache_dtype))
            plural = "s" if r.num_kv_heads > 1 else ""
            line = (f"- {r.num_kv_heads} head{plural}, {native.kv_bytes_per_token // r.kv_bytes_per_token}x the "
                    f"tokens: mean pooling perplexity {r.perplexity:,.2f} (agreement {r.greedy_agreement:.0%})")
            if refit:
                line += (f"; refit {refit.perplexity:,.2f} (agreement {refit.greedy_agreement:.0%}, objective "
                         f"{refit.calibration_loss_ratio:.3f} of mean's)")
            out.append(line + ".")
    for r in rows:
        if r.native and r.kv_cache_dtype != native.kv_cache_dtype:
            out.append(f"- KV cache {r.kv_cache_dtype} at native heads: perplexity {r.perplexity:.2f} "
                       f"({(r.perplexity / native.perplexity - 1) * 100:+.2f}%), greedy agreement "
                       f"{r.greedy_agreement:.0%}, {native.kv_bytes_per_token // r.kv_bytes_per_token}x the tokens.")
    return out


def render(rows: list[KVReportRow], args: argparse.Namespace, seconds: float | None) -> str:
    took = f", {seconds / 60:.1f} min wall" if seconds else ""
    return "\n".join([
        "## KV memory against quality: `num_kv_heads` and `kv_cache_dtype`",
        "",
        f"`gqa-serve kv-report --text {args.text.name} --max-tokens {args.max_tokens} --window {args.window} "
        f"--stride {args.stride}` on SmolLM2-135M-Instruct (9 query / 3 KV heads, 30 layers, head_dim 64; "
        "the Q4_1 GGUF dequantized to float32), model dtype float32 on CPU. Perplexity: the first "
        f"{args.max_tokens:,} tokens, windows of {args.window} every {args.stride} tokens (HF strided "
        f"perplexity). Greedy agreement: {args.num_prompts} prompts of 32 tokens from the same text, "
        f"{args.greedy_tokens} greedy tokens each, position by position against native heads at float32 "
        "(a strict measure: after the first different token the continuations part ways). "
        f"Capacity: whole 16-token blocks in {args.kv_cache_memory / 2**30:g} GiB, sequences of the model's "
        "8,192-token context. Refit is calibrated on "
        f"{args.calibration_tokens:,} tokens from the second half of the file (disjoint from the evaluation).",
        "",
        f"Measured {dt.date.today().isoformat()} on {machine()}{took}.",
        "",
        format_table(rows),
        "",
        *findings(rows),
        "",
        REFIT_NOTE,
        "",
        "![perplexity against KV bytes per token](kv_tradeoff.png)",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_kv_report_arguments(parser)
    parser.add_argument("--from-json", type=Path, help="rows from `kv-report --json` instead of measuring")
    parser.add_argument("--out-dir", type=Path, default=REPO / "docs")
    parser.add_argument("--seconds", type=float, default=None, help="wall time to state (with --from-json)")
    argv = sys.argv[1:] if argv is None else argv
    if "--text" not in argv:
        argv = ["--text", str(SHAKESPEARE), *argv]
    args = parser.parse_args(argv)
    seconds = args.seconds
    if args.from_json:
        rows = [KVReportRow(**r) for r in json.loads(args.from_json.read_text())]
    else:
        from server.kv_measure import measure
        from server.kv_report import _model_dir, spec_from_args
        from model.tokenizer import Tokenizer
        start = time.perf_counter()
        model_dir = _model_dir(args)
        ids = Tokenizer.from_pretrained(model_dir).encode(args.text.read_text(), add_special_tokens=False)
        rows = measure(spec_from_args(args, model_dir), ids)
        seconds = time.perf_counter() - start
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "kv_tradeoff.md").write_text(render(rows, args, seconds))
    plot_rows(rows, args.out_dir / "kv_tradeoff.png",
              f"SmolLM2-135M: perplexity on {args.max_tokens:,} tokens of {args.text.name}")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
