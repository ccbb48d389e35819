"""ModelConfig: what the network needs from a Hugging Face config.json, validated once.

Overrides that a serving config may apply (num_kv_heads) are explicit arguments, never environment.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


class ConfigError(ValueError):
    """A checkpoint config this server cannot serve; the message says which field and why."""


@dataclass(frozen=True)
class RopeScaling:
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int  # as stored in the checkpoint
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2 always, LLaMA when attention_bias is true)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # The KV-head count the model runs with; equals num_key_value_heads unless overridden (issue 6).
    num_kv_heads: int = 0
    # Sliding-window attention (Mistral 7B v0.1; Qwen2 with use_sliding_window): a token sees the last
    # `sliding_window` keys. Our attention is full attention, which is the same while a sequence fits in
    # the window, so the context is capped there (max_context) instead of computing something else.
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if self.num_kv_heads == 0:
            object.__setattr__(self, "num_kv_heads", self.num_key_value_heads)
        for name in ("num_key_value_heads", "num_kv_heads"):
            value = getattr(self, name)
            if value <= 0 or self.num_attention_heads % value:
                raise ConfigError(
                    f"{name}={value} must be positive and divide num_attention_heads="
                    f"{self.num_attention_heads} (valid: {valid_kv_head_counts(self.num_attention_heads)})")

    @property
    def max_context(self) -> int:
        """The longest sequence this implementation runs exactly: the positions, or the sliding window."""
        return min(self.max_position_embeddings, self.sliding_window or self.max_position_embeddings)

    @property
    def q_per_kv(self) -> int:
        return self.num_attention_heads // self.num_kv_heads

    def kv_bytes_per_token(self, dtype_size: int) -> int:
        """K and V of one token across all layers."""
        return 2 * self.num_hidden_layers * self.num_kv_heads * self.head_dim * dtype_size

    def with_num_kv_heads(self, num_kv_heads: int | None) -> "ModelConfig":
        return self if num_kv_heads is None else replace(self, num_kv_heads=num_kv_heads)

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        archs = raw.get("architectures") or ["LlamaForCausalLM"]
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(f"architectures={archs!r}: supported are {', '.join(SUPPORTED_ARCHITECTURES)}")
        window = raw.get("sliding_window") if raw.get("use_sliding_window", arch == "MistralForCausalLM") else None
        if window is not None and (not isinstance(window, int) or window <= 0):
            raise ConfigError(f"config.json: sliding_window must be a positive integer or null, got {window!r}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if not isinstance(raw.get(name), int) or raw[name] <= 0:
                raise ConfigError(f"config.json: {name} must be a positive integer, got {raw.get(name)!r}")
        heads = raw["num_attention_heads"]
        head_dim = raw.get("head_dim") or raw["hidden_size"] // heads
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            architecture=arch,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=raw.get("rope_theta", (raw.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            rope_scaling=_parse_rope_scaling(raw),
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=arch == "Qwen2ForCausalLM" or bool(raw.get("attention_bias", False)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            sliding_window=window,
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, num_kv_heads: int | None = None) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: not found; a model directory needs config.json")
        return cls.from_dict(json.loads(path.read_text())).with_num_kv_heads(num_kv_heads)


def valid_kv_head_counts(num_attention_heads: int) -> list[int]:
    return [n for n in range(1, num_attention_heads + 1) if num_attention_heads % n == 0]


def _parse_rope_scaling(raw: dict) -> RopeScaling:
    # transformers >= 5 writes rope settings under rope_parameters; older configs use rope_scaling.
    scaling = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"rope_scaling.rope_type={rope_type!r} is not supported "
                          f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    if rope_type == "default":
        return RopeScaling()
    return RopeScaling(
        rope_type=rope_type,
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)),
    )


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] after rope scaling, computed in float32 exactly as HF does."""
    dim = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = config.rope_scaling
    if s.rope_type == "linear":
        return inv / s.factor
    if s.rope_type == "llama3":
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv
