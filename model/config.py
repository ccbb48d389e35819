"""ModelConfig: what the network needs from a Hugging Face config.json, validated once.

Overrides that a serving config may apply (num_kv_heads) are explicit arguments, never environment.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear", "yarn")


class ConfigError(ValueError):
    """A checkpoint config this server cannot serve; the message says which field and why."""


@dataclass(frozen=True)
class RopeScaling:
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # YaRN only (model/rope.py): the ramp's bounds in turns over the original context, whether they are
    # rounded to whole dimensions, and the cos/sin scale (resolved here from factor, mscale, mscale_all_dim)
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 1.0


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
    qk_norm: bool = False  # Qwen3: an RMSNorm over each head's q and k before RoPE
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
    def max_positions(self) -> int:
        """Positions the model is meant for. YaRN stretches the original context by its factor (Qwen2.5's long-
        context recipe adds it to a config whose max_position_embeddings is still the original 32,768), as
        vLLM derives its max_model_len; a config that states more positions keeps them."""
        s = self.rope_scaling
        if s.rope_type == "yarn":
            return max(self.max_position_embeddings, int(s.original_max_position_embeddings * s.factor))
        return self.max_position_embeddings

    @property
    def max_context(self) -> int:
        """The longest sequence this implementation runs exactly: the positions, or the sliding window."""
        return min(self.max_positions, self.sliding_window or self.max_positions)

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
        """Every field this server reads, checked: a wrong type or value here is one clear error at load,
        not a server that answers /health and then fails every request."""
        archs = raw.get("architectures") or ["LlamaForCausalLM"]
        archs = [archs] if isinstance(archs, str) else archs
        arch = archs[0] if isinstance(archs, list) else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(f"architectures={archs!r}: supported are {', '.join(SUPPORTED_ARCHITECTURES)}")
        act = raw.get("hidden_act", "silu")
        if act not in ("silu", "swish"):  # the MLP is SwiGLU: another activation would run silu silently
            raise ConfigError(f"config.json: hidden_act={act!r} is not supported (the MLP computes silu)")
        for name in ("mlp_bias", "attention_bias", "tie_word_embeddings", "use_sliding_window"):
            if raw.get(name) is not None and not isinstance(raw[name], bool):
                raise ConfigError(f"config.json: {name} must be true or false, got {raw[name]!r}")
        if raw.get("mlp_bias"):
            raise ConfigError("config.json: mlp_bias=true is not supported (the MLP projections have no bias)")
        sizes = {name: _positive_int(raw, name) for name in ("vocab_size", "hidden_size", "intermediate_size",
                                                             "num_hidden_layers", "num_attention_heads")}
        heads = sizes["num_attention_heads"]
        max_positions = _positive_int(raw, "max_position_embeddings", 2048)
        return cls(
            architecture=arch,
            **sizes,
            num_key_value_heads=_positive_int(raw, "num_key_value_heads", heads),
            # (transformers' Qwen3Config defaults head_dim to 128, not hidden / heads)
            head_dim=_positive_int(raw, "head_dim",
                                   128 if arch == "Qwen3ForCausalLM" else sizes["hidden_size"] // heads),
            rms_norm_eps=_positive_number(raw, "rms_norm_eps", 1e-6),
            rope_theta=_positive_number(_rope_theta_source(raw), "rope_theta", 10000.0),
            rope_scaling=_parse_rope_scaling(raw, max_positions),
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=arch == "Qwen2ForCausalLM" or bool(raw.get("attention_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            bos_token_id=_token_ids(raw, "bos_token_id")[0] if raw.get("bos_token_id") is not None else None,
            eos_token_ids=_token_ids(raw, "eos_token_id"),
            sliding_window=_sliding_window(raw, arch, sizes["num_hidden_layers"]),
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, num_kv_heads: int | None = None) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: not found; a model directory needs config.json")
        return cls.from_dict(json.loads(path.read_text())).with_num_kv_heads(num_kv_heads)


def valid_kv_head_counts(num_attention_heads: int) -> list[int]:
    return [n for n in range(1, num_attention_heads + 1) if num_attention_heads % n == 0]


def _sliding_window(raw: dict, arch: str, num_layers: int) -> int | None:
    """The window transformers applies to some layer, or None. Mistral reads sliding_window alone (absent:
    4,096); Qwen2/Qwen3 only under use_sliding_window (absent window: 4,096), and only on the layers from
    max_window_layers (28) on, or those layer_types names "sliding_attention"; LLaMA has none."""
    if arch == "MistralForCausalLM":
        window = raw.get("sliding_window", 4096)
    elif arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and raw.get("use_sliding_window"):
        window = raw.get("sliding_window", 4096)
        layer_types = raw.get("layer_types")
        if layer_types is None:
            first = raw.get("max_window_layers", 28)
            if not _is_int(first) or first < 0:
                raise ConfigError(f"config.json: max_window_layers must be a non-negative integer, got {first!r}")
            window = window if first < num_layers else None
        elif not isinstance(layer_types, list) or len(layer_types) != num_layers:
            raise ConfigError(f"config.json: layer_types must be a list of num_hidden_layers={num_layers} or null, "
                              f"got {layer_types!r}")
        elif "sliding_attention" not in layer_types:
            window = None
    else:
        return None
    if window is not None and (not _is_int(window) or window <= 0):
        raise ConfigError(f"config.json: sliding_window must be a positive integer or null, got {window!r}")
    return window


def _rope_scaling_dict(raw: dict):
    # transformers >= 5 writes rope settings under rope_parameters; older configs use rope_scaling, which
    # transformers takes first when both are there
    return raw.get("rope_scaling") or raw.get("rope_parameters") or {}


def _rope_theta_source(raw: dict) -> dict:
    """Where rope_theta is read, in transformers' order: the rope dict it uses, then the top level. Past those,
    rope_parameters (a transformers-5 config with a rope_scaling added by hand, where transformers would fall
    back to 10,000 and run a different model)."""
    rope_params = raw.get("rope_parameters") if isinstance(raw.get("rope_parameters"), dict) else {}
    scaling = _rope_scaling_dict(raw)
    for source in (scaling if isinstance(scaling, dict) else {}, raw, rope_params):
        if source.get("rope_theta") is not None:
            return source
    return raw


def _parse_rope_scaling(raw: dict, max_position_embeddings: int) -> RopeScaling:
    scaling = _rope_scaling_dict(raw)
    if not isinstance(scaling, dict):
        raise ConfigError(f"config.json: rope_scaling must be an object or null, got {scaling!r}")
    if any(isinstance(value, dict) for value in scaling.values()):  # {"full_attention": {...}, ...}
        raise ConfigError("config.json: rope parameters per layer type are not supported (one RoPE for all layers)")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"rope_scaling.rope_type={rope_type!r} is not supported "
                          f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    if rope_type == "default":
        return RopeScaling()
    # a top-level value comes first (Phi-3 writes it there), then the rope dict's, then the model's context,
    # as transformers takes it
    if raw.get("original_max_position_embeddings") is not None:
        original = _positive_int(raw, "original_max_position_embeddings")
    else:
        original = _positive_int(scaling, "original_max_position_embeddings", max_position_embeddings,
                                 where="rope_scaling.")
    if rope_type == "yarn":
        return _parse_yarn(scaling, max_position_embeddings, original)
    if "factor" not in scaling:
        raise ConfigError(f"config.json: rope_scaling of type {rope_type!r} needs a factor")
    return RopeScaling(rope_type=rope_type, factor=_rope_number(scaling, "factor", 1.0),
                       original_max_position_embeddings=original,
                       low_freq_factor=_rope_number(scaling, "low_freq_factor", 1.0),
                       high_freq_factor=_rope_number(scaling, "high_freq_factor", 4.0))


def _rope_number(scaling: dict, name: str, default: float) -> float:
    return _positive_number(scaling, name, default, where="rope_scaling.")


def _parse_yarn(scaling: dict, max_position_embeddings: int, original: int) -> RopeScaling:
    """YaRN's fields as transformers reads them: a missing factor is the ratio of the contexts (DeepSeek's
    configs), a missing or zero beta its default, and the attention factor, unless given, 0.1 ln(factor) + 1,
    or the ratio of that with mscale and with mscale_all_dim when both are set."""
    def optional(name: str) -> float:  # null or 0 reads as unset, as transformers' `or` reads it
        return 0.0 if not scaling.get(name) else _rope_number(scaling, name, 0.0)
    factor = _rope_number(scaling, "factor", 1.0) if scaling.get("factor") is not None \
        else max_position_embeddings / original
    truncate = scaling.get("truncate", True)
    if not isinstance(truncate, bool):
        raise ConfigError(f"config.json: rope_scaling.truncate must be true or false, got {truncate!r}")

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
    if scaling.get("attention_factor") is not None:
        attention_factor = _rope_number(scaling, "attention_factor", 1.0)
    elif optional("mscale") and optional("mscale_all_dim"):
        attention_factor = mscale(factor, optional("mscale")) / mscale(factor, optional("mscale_all_dim"))
    else:
        attention_factor = mscale(factor)
    return RopeScaling(rope_type="yarn", factor=factor, original_max_position_embeddings=original,
                       beta_fast=optional("beta_fast") or 32.0, beta_slow=optional("beta_slow") or 1.0,
                       truncate=truncate, attention_factor=attention_factor)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(raw: dict, name: str, default: int | None = None, where: str = "") -> int:
    """raw[name] (default when absent or null), which must be a positive integer."""
    value = raw.get(name)
    if value is None and default is not None:
        return default
    if not _is_int(value) or value <= 0:
        raise ConfigError(f"config.json: {where}{name} must be a positive integer, got {value!r}")
    return value


def _positive_number(raw: dict, name: str, default: float, where: str = "") -> float:
    value = raw.get(name, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
        raise ConfigError(f"config.json: {where}{name} must be a positive number, got {value!r}")
    return float(value)


def _token_ids(raw: dict, name: str) -> tuple[int, ...]:
    """A token id or a list of them (eos_token_id), or null."""
    value = raw.get(name)
    ids = value if isinstance(value, list) else ([] if value is None else [value])
    if not all(_is_int(i) and i >= 0 for i in ids):
        raise ConfigError(f"config.json: {name} must be a token id, a list of them or null, got {value!r}")
    return tuple(ids)
