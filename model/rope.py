"""RoPE: the inverse frequencies a checkpoint's rope scaling asks for, and the cos/sin table the kernels read.

Everything is computed once, in float32, the way transformers computes it, so that a position rotates q and
k by the same angles as the reference model does. The kernels only ever see the table.
"""
from __future__ import annotations

import math

import torch

from model.config import ModelConfig, RopeScaling


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] after rope scaling."""
    dim = config.head_dim
    wavelength_base = config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    inv = 1.0 / wavelength_base
    s = config.rope_scaling
    if s.rope_type == "linear":
        return inv / s.factor
    if s.rope_type == "llama3":
        return _llama3(inv, s)
    if s.rope_type == "yarn":
        return _yarn(wavelength_base, dim, config.rope_theta, s)
    return inv


def _llama3(inv: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by the factor, short ones kept, a smooth blend between."""
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(wavelength_base: torch.Tensor, dim: int, base: float, s: RopeScaling) -> torch.Tensor:
    """YaRN (arXiv 2309.00071): dimensions that turn more than beta_fast times over the original context keep
    their frequency (extrapolate), those that turn fewer than beta_slow times are divided by the factor
    (interpolate), and a linear ramp over dimension index blends the ones between."""
    def dimension_turning(turns: float) -> float:
        # the (fractional) dimension pair whose wavelength fits `turns` times into the original context
        return dim * math.log(s.original_max_position_embeddings / (turns * 2 * math.pi)) / (2 * math.log(base))

    low, high = dimension_turning(s.beta_fast), dimension_turning(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a one-dimension ramp would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (short wavelengths), 0: interpolate (long ones)
    extrapolated = 1.0 / wavelength_base
    interpolated = 1.0 / (s.factor * wavelength_base)
    return interpolated * (1 - keep) + extrapolated * keep


class RotaryEmbedding:
    """cos/sin tables for every position, [max_pos, head_dim] = cat(cos, sin) over head_dim/2 freqs.

    YaRN's attention factor multiplies both halves (transformers scales cos and sin the same way), which
    scales q.k by its square: the softmax temperature the paper prescribes for the stretched context."""

    def __init__(self, config: ModelConfig, device: torch.device, max_positions: int | None = None):
        positions = torch.arange(max_positions or config.max_positions, dtype=torch.float32)
        freqs = torch.outer(positions, rope_inv_freq(config))  # [max_pos, D/2], float32 as in HF
        table = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
        if config.rope_scaling.attention_factor != 1.0:
            table = table * config.rope_scaling.attention_factor
        self.cos_sin_cache = table.to(device)
