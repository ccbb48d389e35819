"""EngineConfig: everything the engine needs to load a model, size its KV cache and schedule steps.

Pydantic, frozen, no environment reads: server/config.py composes this with the ServerConfig into a
ServeConfig (TOML, flags, env). Fields that depend on the model (max_model_len) or the machine (dtype/device
"auto") are resolved by the model runner; the helpers here only do the parts that need no model.
"""
from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

if TYPE_CHECKING:
    from model.config import ModelConfig

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "t": 10**12, "tb": 10**12}


def parse_bytes(value: int | str) -> int:
    """`1073741824`, `"1GiB"`, `"512 MiB"`, `"2G"` -> bytes."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"expected a byte count such as 1073741824, '1GiB' or '512MiB', got {value!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def union_members(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


class Settings(BaseModel):
    """A model of settings (EngineConfig, ServerConfig), from TOML, flags, env or Python."""

    @field_validator("*", mode="before")
    @classmethod
    def _not_a_boolean(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads true as 1: `num_kv_heads = true` would serve one KV head
        if isinstance(value, bool) and bool not in union_members(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"not a boolean setting, got {value!r}")
        return value


class EngineConfig(Settings):
    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    model: str | None = Field(None, description="model directory; None = the default model (see model_cache_dir)")
    model_cache_dir: str | None = Field(
        None, description="where the default model is fetched to (None: ~/.cache/gqa-serve/models)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_kv_heads: int | None = Field(None, ge=1, description="serve with this many KV heads (pooled at load)")
    kv_head_method: Literal["mean", "refit"] = Field(
        "mean", description="how pooled KV heads are made: mean of each group (GQA paper), or refit on "
                            "kv_calibration_text (training-free; see the README's num_kv_heads section)")
    kv_calibration_text: str | None = Field(None, description="text file refit calibrates on "
                                                              "(None: public-domain text shipped in model/data)")
    kv_calibration_tokens: int = Field(2048, ge=2, description="tokens of kv_calibration_text that refit reads")
    kv_cache_dtype: Literal["auto", "float32", "bfloat16", "float16", "fp8_e4m3"] = Field(
        "auto", description="storage dtype of the KV cache; auto = the model dtype")
    block_size: int = Field(16, description="tokens per KV block; a power of 2 in 8..128")
    max_model_len: int | None = Field(None, ge=1,
                                      description="None = the model's max_position_embeddings (YaRN: stretched)")
    max_num_seqs: int = Field(256, ge=1, description="most sequences in one step")
    max_num_batched_tokens: int = Field(2048, ge=1, description="token budget of one step (chunked prefill)")
    kv_cache_memory: int = Field(2**30, ge=1, description="KV cache bytes on CPU ('1GiB' accepted)")
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    max_waiting_requests: int = Field(1024, ge=1, description="queue length beyond which requests are refused")
    scheduling_policy: Literal["fcfs", "priority"] = Field(
        "fcfs", description="fcfs: first come, first served; priority: a request's `priority` orders the queue "
                            "(lower first) and preempts running requests of a lower priority (vLLM's)")
    seed: int = Field(0, ge=0, le=2**64 - 1,  # torch.Generator.manual_seed's range
                      description="seed of the sampler's generator for requests without a seed")
    attention_backend: Literal["auto", "torch", "triton"] = "auto"
    enforce_eager: bool = Field(False, description="never capture CUDA graphs")
    decode_fusion: bool = Field(True, description="Triton path: a decode-only step's attention is one launch "
                                "per layer: RoPE and the K/V cache write folded into the decode kernel, and "
                                "split-KV partials combined by the last split instead of a reduce kernel "
                                "(kernels/decode_rotary.py; 1.02-1.03x the decode tok/s on an H100); off: "
                                "the RoPE + cache-write kernel, then decode attention")
    skinny_matmul: bool = Field(False, description="Triton path: steps of at most 16 tokens (small decode "
                                "batches) run their projections with our streaming kernel instead of cuBLAS, each "
                                "RMSNorm folded into the qkv / gate_up projection after it (kernels/"
                                "skinny_matmul.py): six launches a layer instead of eight. Off until measured on a "
                                "GPU")
    skinny_matmul_pdl: bool = Field(False, description="with skinny_matmul: launch those kernels, and the "
                                    "one-launch decode attention between them (decode_fusion), by programmatic "
                                    "dependent launch (compute capability 9.0+): each pulls what the kernel before "
                                    "it does not write into L2 (a projection up to 64 KiB of its weight slice a "
                                    "program, the attention its first cached keys) while that kernel finishes, "
                                    "and waits for that kernel's output only to read it. Off until measured on a "
                                    "GPU")
    prefill_graphs: bool = Field(True, description="also capture steps that carry prompt tokens, one CUDA graph "
                                 "per token bucket up to max_num_batched_tokens (4,096 at most); off: such "
                                 "steps run eagerly, one kernel launch at a time")
    compile_mode: Literal["off", "default", "max-autotune"] = Field(
        "off", description="torch.compile the forward of the decode CUDA graphs of up to "
        "compile_max_batch_size rows (server/compiled_forward.py). max-autotune: inductor times its Triton "
        "GEMM templates against cuBLAS per projection shape and keeps the faster (slower start-up); "
        "default: compiled glue, cuBLAS GEMMs; off: the model as written")
    compile_max_batch_size: int = Field(32, ge=1, description="largest decode graph that compile_mode applies to")
    enable_prefix_caching: bool = Field(True, description="share the KV blocks of a prompt's leading full "
                                        "blocks with later requests that start with the same tokens: they "
                                        "prefill only the rest (server/blocks.py)")
    overlap_scheduling: bool = Field(True, description="launch a step before the host has seen the "
                                     "previous one's tokens, so the host's bookkeeping overlaps the GPU "
                                     "(steps that replay a CUDA graph; stops take effect a step later; "
                                     "H100, 1B shape: batch-64 decode 30.7k -> 37.5k tok/s)")
    num_speculative_tokens: int = Field(0, ge=0, le=16, description="n-gram speculative decoding (prompt "
                                        "lookup, server/speculative.py): each decoding sequence drafts up to this "
                                        "many tokens from an earlier occurrence of its last tokens (under a grammar: "
                                        "the tokens it forces), verified in one step; 0 = off. Steps with drafts "
                                        "are not overlapped")
    num_prediction_tokens: int = Field(8, ge=0, le=64, description="a request's prediction (OpenAI's Predicted "
                                       "Outputs: text the reply is expected to mostly repeat) is drafted from, up "
                                       "to this many tokens a step from where the output stands in it "
                                       "(server/prediction.py), verified as n-gram drafts are, with or without "
                                       "num_speculative_tokens; 0 = predictions are accepted and ignored. Steps "
                                       "overlap as usual while no running request has a prediction")
    speculative_disable_by_batch_size: int | None = Field(
        None, ge=1, description="no drafts (n-gram or prediction) while this many sequences or more run (the lookup "
        "costs 10-15 us of host time a sequence a step, and a large batch keeps the GPU busy without them); their "
        "steps overlap again. None: always draft")
    prompt_lookup_max: int = Field(4, ge=1, description="longest suffix (tokens) speculation looks up")
    prompt_lookup_min: int = Field(2, ge=1, description="shortest suffix (tokens) speculation looks up")
    prompt_lookup_adaptive: bool = Field(False, description="each sequence drafts fewer tokens after a draft "
                                         "fails, and waits longer between lookups while none is kept "
                                         "(server/speculative.py); a prediction's drafts shrink the same way, "
                                         "without the waits")

    @field_validator("block_size")
    @classmethod
    def _block_size(cls, v: int) -> int:
        if v < 8 or v > 128 or v & (v - 1):
            raise ValueError(f"block_size={v}: must be a power of 2 between 8 and 128")
        return v

    @field_validator("kv_cache_memory", mode="before")
    @classmethod
    def _kv_cache_memory(cls, v):
        return parse_bytes(v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check(self) -> "EngineConfig":
        if self.max_num_batched_tokens < self.block_size:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= "
                             f"block_size={self.block_size}")
        if self.skinny_matmul_pdl and not self.skinny_matmul:
            raise ValueError("skinny_matmul_pdl = true launches the skinny_matmul kernels early: it needs "
                             "skinny_matmul = true")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min={self.prompt_lookup_min} must be <= prompt_lookup_max="
                             f"{self.prompt_lookup_max}")
        return self

    @property
    def max_step_drafts(self) -> int:
        """The most drafts (n-gram or prediction) all sequences feed in one step (speculative.Proposer): each
        sequence's k while that is few (a small server drafts all it can), else max_num_seqs, since each draft
        is a sampled row whose logits the GPU memory profile must hold (max_sampled_rows)."""
        k = max(self.num_speculative_tokens, self.num_prediction_tokens)
        return min(self.max_num_seqs * k, max(self.max_num_seqs, 64))

    @property
    def max_sampled_rows(self) -> int:
        """The most rows one step samples: one a sequence plus one a draft, within the step's tokens. GPU memory
        is profiled at it (ModelRunner._profile_step)."""
        return min(self.max_num_batched_tokens, self.max_num_seqs + self.max_step_drafts)

    def resolve_max_model_len(self, model: "ModelConfig") -> int:
        """The serving context length: the configured one, checked against what the model supports."""
        if self.max_model_len is None:
            return model.max_context
        if self.max_model_len > model.max_positions:
            stretched = model.max_positions > model.max_position_embeddings
            where = (f"context of {model.max_positions} positions (YaRN: original_max_position_embeddings x factor)"
                     if stretched else f"max_position_embeddings={model.max_positions}")
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's {where}")
        if self.max_model_len > model.max_context:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's sliding_window="
                             f"{model.sliding_window}: sliding-window attention is not implemented, so sequences "
                             "stay within the window, where full attention computes the same")
        return self.max_model_len


def resolve_model_dir(config: EngineConfig) -> str:
    if config.model is not None:
        if not Path(config.model).is_dir():
            raise FileNotFoundError(f"model: {config.model} is not a directory (expected an HF-style model "
                                    "directory with config.json, *.safetensors and a tokenizer)")
        return config.model
    from model.fetch import DEFAULT_MODEL, default_cache_dir, fetch_model  # lazy: only the default model
    return str(fetch_model(DEFAULT_MODEL, config.model_cache_dir or default_cache_dir()))
