"""The KV cache's storage dtype, which may differ from the model's (the second memory lever after
num_kv_heads).

K/V are cast to this dtype when written to the cache and read back into float32 for attention (the
reference path), so a narrower cache costs only the round-trip's rounding. fp8_e4m3 is stored as
torch.float8_e4m3fn without a scale (scale 1, as vLLM's default): values beyond +-448 saturate.
"""
from __future__ import annotations

import torch

KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16", "fp8_e4m3")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "fp8_e4m3": torch.float8_e4m3fn}


FP8_MIN_CAPABILITY = (8, 9)  # Triton's float8_e4m3fn (fp8e4nv) exists from Ada / Hopper on


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype, device: torch.device | None = None,
                           ops: str | None = None) -> torch.dtype:
    """'auto' = the model's dtype; otherwise the named storage dtype. With the device and the model's ops
    ("triton" | "torch"), also refuses what that pair cannot run: Triton compiles no float8_e4m3fn code
    below compute capability 8.9 (an A100's kernels would fail at the first step, not here)."""
    if name == "auto":
        return model_dtype
    if name not in _DTYPES:
        raise ValueError(f"kv_cache_dtype={name!r}: expected one of {', '.join(KV_CACHE_DTYPES)}")
    dtype = _DTYPES[name]
    if dtype == torch.float8_e4m3fn and ops == "triton" and device is not None and device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < FP8_MIN_CAPABILITY:
            raise ValueError(
                f"kv_cache_dtype={name!r} needs a GPU of compute capability "
                f"{'.'.join(map(str, FP8_MIN_CAPABILITY))} or newer with the Triton kernels (this one is "
                f"{'.'.join(map(str, capability))}); use bfloat16 or float16, or attention_backend='torch'")
    return dtype


def kv_cache_dtype_name(dtype: torch.dtype) -> str:
    """torch dtype -> the name used in configs and reports."""
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"{dtype} is not a supported KV cache dtype")


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
