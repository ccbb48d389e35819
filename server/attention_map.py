"""`gqa-serve attention-map`: one layer's attention heatmaps as a PNG grid (matplotlib Agg), for reports.

The same numbers as POST /explain/attention (model/explain.py's torch reference path): one subplot per
query head, grouped in rows by the KV head they share; queries down, keys across.
"""
from __future__ import annotations

import argparse
from pathlib import Path


_FLAGS = {"layers": "--layer", "heads": "--heads", "num_kv_heads": "--num-kv-heads", "prompt": "--prompt"}


def add_attention_map_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF-style model directory")
    parser.add_argument("--prompt", required=True, help="the text whose attention to draw (at most 256 tokens)")
    parser.add_argument("--layer", type=int, required=True, help="decoder layer, 0-based")
    parser.add_argument("--heads", type=int, nargs="+", default=None, help="query heads to draw (default: all)")
    parser.add_argument("--num-kv-heads", type=int, default=None,
                        help="KV heads to run with (default: the checkpoint's); pooled or replicated")
    parser.add_argument("--kv-head-method", default="mean", choices=["mean", "refit"],
                        help="how pooled heads are made (refit calibrates on the packaged text, as serve does)")
    parser.add_argument("--no-special-tokens", action="store_true", help="do not add BOS")
    parser.add_argument("--dpi", type=int, default=110)
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")


def run_attention_map(args: argparse.Namespace) -> int:
    from model.explainer import AttentionExplainer, ExplainError

    explainer = AttentionExplainer(args.model, kv_head_method=args.kv_head_method)
    try:
        result = explainer.explain(args.prompt, layers=[args.layer], heads=args.heads,
                                   num_kv_heads=args.num_kv_heads,
                                   add_special_tokens=not args.no_special_tokens)
    except ExplainError as exc:
        flag = _FLAGS.get(exc.field, exc.field)
        raise ValueError(f"{flag}: {exc.message}") from exc
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_attention_grid(result, explainer.info().model, args.out, dpi=args.dpi)
    print(args.out)
    return 0


def save_attention_grid(result, model_name: str, out: Path, dpi: int = 110) -> None:
    """One row per KV group, one column per query head of the group that was asked for."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    layer = result.layers[0]
    weights = {h: w.numpy() for h, w in zip(layer.heads, layer.weights)}
    rows = [[h for h in g.query_heads if h in weights] for g in result.groups]
    groups = [(g, r) for g, r in zip(result.groups, rows) if r]
    ncols = max(len(r) for _, r in groups)
    labels = [t.text.replace("\n", "\\n") for t in result.tokens]
    num_tokens = len(labels)
    side = min(4.2, max(2.4, 0.16 * num_tokens))
    fig = Figure(figsize=(side * ncols + 1.2, side * len(groups) + 0.9), dpi=dpi, layout="constrained")
    axes = fig.subplots(len(groups), ncols, squeeze=False)
    image = None
    for row, (group, heads) in enumerate(groups):
        for col in range(ncols):
            ax = axes[row][col]
            if col >= len(heads):
                ax.set_axis_off()
                continue
            head = heads[col]
            image = ax.imshow(weights[head], cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(f"head {head} (kv {group.kv_head})", fontsize=9)
            if num_tokens <= 32:
                ax.set_xticks(range(num_tokens), labels, rotation=90, fontsize=6)
                ax.set_yticks(range(num_tokens), labels, fontsize=6)
            else:
                ax.tick_params(labelsize=6)
            if col == 0:
                ax.set_ylabel(f"KV head {group.kv_head}\nquery", fontsize=8)
    fig.suptitle(f"{model_name} · layer {layer.layer} · num_kv_heads={result.num_kv_heads}\n{num_tokens} tokens; "
                 "queries down, keys across; causal softmax weights", fontsize=10)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label="softmax weight")
    fig.savefig(out, format="png")
