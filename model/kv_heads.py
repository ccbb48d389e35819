"""Change the number of KV heads of a checkpoint at load time (the num_kv_heads knob).

Fewer heads: mean-pool the K/V projections of each group of heads (Ainslie et al. 2023, GQA, section
2.2: how GQA is initialised from an MHA checkpoint), biases included. More heads: replicate each head,
which is exact, because query head h then reads a copy of the same kv head it read before.

Kv head i of the target model pools the checkpoint's heads i*g .. i*g+g-1 (g = src // dst): query head h
read checkpoint head h // (H // src) and now reads h // (H // dst) = (h // (H // src)) // g, its group.

The second method, "refit" (model/kv_refit.py), needs calibration activations, so it cannot run
tensor by tensor inside the loader: `model.kv_refit.load_refit_model` loads with "mean" and then
replaces the attention weights it refits. Here it only names the method.
"""
from __future__ import annotations

import torch

from model.config import ConfigError, valid_kv_head_counts

KV_HEAD_METHODS = ("mean", "refit")
TENSOR_METHODS = ("mean",)  # methods that convert one checkpoint tensor at a time


def valid_num_kv_heads(num_attention_heads: int, checkpoint_kv_heads: int) -> list[int]:
    """Counts reachable from the checkpoint: divisors of num_attention_heads that divide or are
    multiples of the checkpoint's count (so each new head maps to whole old heads)."""
    return [n for n in valid_kv_head_counts(num_attention_heads)
            if checkpoint_kv_heads % n == 0 or n % checkpoint_kv_heads == 0]


def check_num_kv_heads(num_attention_heads: int, checkpoint_kv_heads: int, num_kv_heads: int) -> None:
    valid = valid_num_kv_heads(num_attention_heads, checkpoint_kv_heads)
    if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads not in valid:
        raise ConfigError(
            f"num_kv_heads={num_kv_heads} is not valid for this model ({num_attention_heads} query heads, "
            f"{checkpoint_kv_heads} kv heads in the checkpoint); valid values: {valid}")


def check_kv_head_method(method: str) -> None:
    if method not in KV_HEAD_METHODS:
        raise ConfigError(f"kv_head_method={method!r}: expected one of {', '.join(KV_HEAD_METHODS)}")


def convert_kv_heads(tensor: torch.Tensor, src_heads: int, dst_heads: int, head_dim: int,
                     method: str = "mean") -> torch.Tensor:
    """k_proj / v_proj weight [src*D, hidden] or bias [src*D] -> [dst*D, ...].

    Computed in float32 and returned in the input's dtype.
    """
    if src_heads == dst_heads:
        return tensor
    check_kv_head_method(method)
    if dst_heads < src_heads and method not in TENSOR_METHODS:
        raise ConfigError(
            f"kv_head_method={method!r} pools with calibration data, which a tensor-by-tensor load does not "
            "have: load with model.kv_refit.load_refit_model(model_dir, num_kv_heads, calibration_ids)")
    if src_heads % dst_heads and dst_heads % src_heads:
        raise ConfigError(f"cannot convert {src_heads} kv heads to {dst_heads}: one must divide the other")
    heads = tensor.float().reshape(src_heads, head_dim, *tensor.shape[1:])
    if dst_heads < src_heads:
        group = src_heads // dst_heads
        heads = heads.reshape(dst_heads, group, head_dim, *tensor.shape[1:]).mean(dim=1)
    else:
        heads = heads.repeat_interleave(dst_heads // src_heads, dim=0)
    return heads.reshape(dst_heads * head_dim, *tensor.shape[1:]).to(tensor.dtype)
