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


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """'auto' = the model's dtype; otherwise the named storage dtype."""
    if name == "auto":
        return model_dtype
    if name not in _DTYPES:
        raise ValueError(f"kv_cache_dtype={name!r}: expected one of {', '.join(KV_CACHE_DTYPES)}")
    return _DTYPES[name]


def kv_cache_dtype_name(dtype: torch.dtype) -> str:
    """torch dtype -> the name used in configs and reports."""
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"{dtype} is not a supported KV cache dtype")


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
