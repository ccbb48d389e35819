"""Measure the KV-memory / quality trade-off of one checkpoint: every valid num_kv_heads under each
pooling method, and the KV cache dtypes at the native count, each as one KVReportRow.

Evaluation text: the first max_tokens tokens of the text (strided perplexity, model/perplexity.py).
Calibration text for "refit": tokens from the second half of the text (and never before max_tokens),
so the fit never sees what it is scored on. Greedy agreement: num_prompts prompts cut from the
evaluation tokens, each continued greedily for greedy_tokens tokens, compared position by position
with the native model at the model's dtype.
"""
from __future__ import annotations

from collections.abc import Callable
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from model.kv_dtype import dtype_size, kv_cache_dtype_name, resolve_kv_cache_dtype
from model.kv_heads import KV_HEAD_METHODS, check_kv_head_method, valid_num_kv_heads
from model.kv_refit import collect_grams, refit_model
from model.llama import load_model, resolve_dtype
from model.perplexity import greedy_agreement, greedy_generate, perplexity, strided_windows

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVReportSpec:
    model_dir: Path
    max_tokens: int = 4096
    window: int = 512
    stride: int = 256
    dtype: str = "auto"
    device: str = "cpu"
    kv_cache_memory: int = 2**30
    max_model_len: int | None = None     # None: the model's max_position_embeddings
    block_size: int = 16
    methods: tuple[str, ...] = ("mean", "refit")
    kv_cache_dtypes: tuple[str, ...] = ("bfloat16", "float16", "fp8_e4m3")  # besides auto, native heads
    num_kv_heads: tuple[int, ...] | None = None  # None: every valid count
    num_prompts: int = 4
    prompt_tokens: int = 32
    greedy_tokens: int = 32
    calibration_tokens: int = 2048


@dataclass(frozen=True)
class KVReportRow:
    method: str                  # "mean" or "refit"; at or above the native count both are exact
    num_kv_heads: int
    native: bool                 # num_kv_heads equals the checkpoint's
    kv_cache_dtype: str
    kv_bytes_per_token: int
    capacity_tokens: int         # whole blocks of block_size in kv_cache_memory
    capacity_seqs: int           # full sequences of max_model_len that fit at once
    perplexity: float
    greedy_agreement: float      # with native heads at the model dtype
    calibration_loss_ratio: float | None = None  # refit / mean on the refit objective (keys + values)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Variant:
    method: str
    num_kv_heads: int
    kv_cache_dtype: str


def _variants(spec: KVReportSpec, native: int, valid: list[int]) -> list[_Variant]:
    counts = list(spec.num_kv_heads) if spec.num_kv_heads else valid
    out = [_Variant("mean", native, "auto")]  # the reference comes first
    for method in spec.methods:
        for n in counts:
            # Refit only pools; at or above the native count it is the same model as mean.
            if (method, n) != ("mean", native) and (method == "mean" or n < native):
                out.append(_Variant(method, n, "auto"))
    out += [_Variant("mean", native, d) for d in spec.kv_cache_dtypes if d != "auto"]
    return out


def split_tokens(token_ids: list[int], spec: KVReportSpec) -> tuple[list[int], list[int]]:
    """(evaluation, calibration) token ids, disjoint."""
    evaluation = token_ids[:spec.max_tokens]
    if len(evaluation) < 2:
        raise ValueError(f"the text has {len(token_ids)} tokens; perplexity needs at least 2")
    start = max(len(evaluation), len(token_ids) // 2)
    calibration = token_ids[start:start + spec.calibration_tokens]
    if "refit" in spec.methods and len(calibration) < min(spec.calibration_tokens, 64):
        raise ValueError(f"the text has {len(token_ids)} tokens: too few after the {len(evaluation)} evaluation "
                         "tokens to calibrate refit on disjoint text; lower --max-tokens or give a longer text")
    return evaluation, calibration


def _prompts(evaluation: list[int], spec: KVReportSpec) -> list[list[int]]:
    length = min(spec.prompt_tokens, max(1, len(evaluation) // max(1, spec.num_prompts)))
    step = max(1, (len(evaluation) - length) // max(1, spec.num_prompts))
    return [evaluation[i * step:i * step + length] for i in range(spec.num_prompts)]


def work_units(spec: KVReportSpec, num_variants: int, num_eval_tokens: int, num_refits: int) -> int:
    """Progress-bar total: one unit per perplexity window, per greedy step, per calibration window."""
    windows = len(strided_windows(num_eval_tokens, spec.window, spec.stride))
    calib = -(-spec.calibration_tokens // spec.window) if num_refits else 0
    return num_variants * (windows + spec.greedy_tokens) + calib


def measure(spec: KVReportSpec, token_ids: list[int],
            progress_factory: Callable[[int], Callable[[int], None]] | None = None,
            describe: Callable[[str], None] | None = None) -> list[KVReportRow]:
    """All rows of the report. progress_factory(total) returns the per-unit callback (a tqdm update)."""
    for method in spec.methods:
        check_kv_head_method(method)
    device = torch.device(spec.device)
    model_dtype = resolve_dtype(spec.dtype, device)
    load = dict(dtype=model_dtype, device=spec.device)
    native_model = load_model(spec.model_dir, **load)
    config = native_model.config
    native = config.num_key_value_heads
    valid = valid_num_kv_heads(config.num_attention_heads, native)
    for n in spec.num_kv_heads or ():
        if n not in valid:
            raise ValueError(f"num_kv_heads={n} is not valid for this model; valid values: {valid}")
    if config.qk_norm and "refit" in spec.methods:  # model/kv_refit.py cannot fit a per-head k norm
        if spec.methods == ("refit",):
            raise ValueError(f"refit cannot pool {config.architecture}'s heads (its per-head q/k norm makes keys "
                             "nonlinear in the layer input); measure --methods mean")
        logger.warning("%s has a per-head q/k norm, which refit cannot fit: measuring mean pooling only",
                       config.architecture)
        spec = replace(spec, methods=tuple(m for m in spec.methods if m != "refit"))
    max_model_len = spec.max_model_len or config.max_context
    evaluation, calibration = split_tokens(token_ids, spec)
    prompts = _prompts(evaluation, spec)
    if spec.window > config.max_context:  # checked before the calibration, which would fail first
        raise ValueError(f"--window {spec.window} exceeds the model's context of {config.max_context} tokens")
    if len(prompts[0]) + spec.greedy_tokens > config.max_context:
        raise ValueError(f"--greedy-tokens {spec.greedy_tokens} after {len(prompts[0])}-token prompts exceeds the "
                         f"model's context of {config.max_context} tokens")
    variants = _variants(spec, native, valid)
    refits = [v for v in variants if v.method == "refit"]
    progress = progress_factory(work_units(spec, len(variants), len(evaluation), len(refits))) \
        if progress_factory else None
    grams = None
    if refits:
        if describe:
            describe("calibrating refit")
        grams = collect_grams(native_model, calibration, window=spec.window, block_size=spec.block_size)
        if progress:
            progress(-(-spec.calibration_tokens // spec.window))

    rows: list[KVReportRow] = []
    reference: list[list[int]] | None = None
    for v in variants:
        if describe:
            describe(f"{v.method} kv_heads={v.num_kv_heads} kv_dtype={v.kv_cache_dtype}")
        loss_ratio = None
        if v.num_kv_heads == native:
            model = native_model
        elif v.method == "refit":
            model = load_model(spec.model_dir, num_kv_heads=v.num_kv_heads, **load)
            losses = refit_model(native_model, model, grams)
            loss_ratio = (sum(x.key_refit + x.value_refit for x in losses)
                          / sum(x.key_mean + x.value_mean for x in losses))
        else:
            model = load_model(spec.model_dir, num_kv_heads=v.num_kv_heads, kv_head_method=v.method, **load)
        kv_dtype = resolve_kv_cache_dtype(v.kv_cache_dtype, model_dtype, model.lm_head.weight.device,
                                          getattr(getattr(model, "ops", None), "name", None))  # fp8: Ada+
        ppl = perplexity(model, evaluation, window=spec.window, stride=spec.stride, kv_cache_dtype=kv_dtype,
                         block_size=spec.block_size, progress=progress)
        tokens = greedy_generate(model, prompts, spec.greedy_tokens, kv_cache_dtype=kv_dtype,
                                 block_size=spec.block_size, progress=progress)
        reference = reference or tokens
        per_token = model.config.kv_bytes_per_token(dtype_size(kv_dtype))
        capacity = spec.kv_cache_memory // (per_token * spec.block_size) * spec.block_size
        rows.append(KVReportRow(
            method=v.method, num_kv_heads=v.num_kv_heads, native=v.num_kv_heads == native,
            kv_cache_dtype=kv_cache_dtype_name(kv_dtype), kv_bytes_per_token=per_token,
            capacity_tokens=capacity, capacity_seqs=capacity // max_model_len, perplexity=ppl.perplexity,
            greedy_agreement=greedy_agreement(reference, tokens), calibration_loss_ratio=loss_ratio))
    order = {m: i for i, m in enumerate(KV_HEAD_METHODS)}
    return sorted(rows, key=lambda r: (r.kv_cache_dtype != rows[0].kv_cache_dtype, order[r.method],
                                       r.num_kv_heads, -r.kv_bytes_per_token))


__all__ = ["KVReportSpec", "KVReportRow", "KV_HEAD_METHODS", "measure", "split_tokens", "work_units"]
