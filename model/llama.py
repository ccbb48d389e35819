"""The LLaMA-family causal LM (LLaMA, Mistral, Qwen2, Qwen3) over a flat batch of tokens and a paged KV cache.

Read top to bottom: MLP, DecoderLayer, CausalLM, load_model (RMSNorm is model/norm.py, GQAAttention
model/attention.py). Parameter names follow Hugging
Face's (q/k/v and gate/up are fused at load time), so checkpoints load by name.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from model.attention import GQAAttention
from model.batch import StepBatch
from model.config import ModelConfig
from model.kv_cache import KVCache
from model.kv_heads import check_kv_head_method, check_num_kv_heads
from model.norm import RMSNorm
from model.ops import make_ops
from model.rope import RotaryEmbedding


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, ops):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.ops = ops

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up [T, 2I], gate_up_proj's output (DecoderLayer applies it with the norm before it) -> [T, hidden]:
        down_proj(silu(gate) * up)."""
        return self.ops.silu_mul_linear(gate_up, self.down_proj)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, ops):
        super().__init__()
        self.self_attn = GQAAttention(config, ops)
        self.mlp = MLP(config, ops)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.ops = ops

    def forward(self, hidden, residual, batch: StepBatch, kv, cos_sin_cache):
        # each norm with the projection after it: one launch on the small-batch path (model/ops.py)
        qkv, residual = self.ops.rms_norm_linear(hidden, residual, self.input_layernorm, self.self_attn.qkv_proj)
        hidden = self.self_attn(qkv, batch, kv, cos_sin_cache)
        gate_up, residual = self.ops.rms_norm_linear(hidden, residual, self.post_attention_layernorm,
                                                     self.mlp.gate_up_proj)
        return self.mlp(gate_up), residual


class DecoderStack(nn.Module):
    """HF's `model.*` prefix: embeddings, layers, final norm."""

    def __init__(self, config: ModelConfig, ops):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, ops) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig, ops):
        super().__init__()
        self.config = config
        self.ops = ops
        self.model = DecoderStack(config, ops)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary: RotaryEmbedding | None = None  # built on the target device after loading

    def hidden_states(self, batch: StepBatch, kv_cache: KVCache) -> torch.Tensor:
        """Final-norm hidden states of every token, [T, hidden]."""
        cos_sin = self.rotary.cos_sin_cache
        hidden, residual = self.model.embed_tokens(batch.input_ids), None
        for i, layer in enumerate(self.model.layers):
            hidden, residual = layer(hidden, residual, batch, kv_cache.layer(i), cos_sin)
        hidden, _ = self.model.norm(hidden, residual)
        return hidden

    def forward(self, batch: StepBatch, kv_cache: KVCache) -> torch.Tensor:
        """Logits of the rows in batch.logits_indices, [N, vocab] float32."""
        return self.logits(self.hidden_states(batch, kv_cache), batch.logits_indices)

    def logits(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """[len(rows), vocab] float32 logits of those rows of hidden [T, hidden]."""
        return self.ops.linear(hidden[rows], self.lm_head, out_dtype=torch.float32)

    def token_logprobs(self, hidden: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor,
                       chunk: int = 256) -> torch.Tensor:
        """log p(targets[i] | the prefix ending at row rows[i]), [R] float32 (prompt logprobs). The [R, vocab]
        logits are made `chunk` rows at a time, so a long prompt never holds them all at once."""
        parts = [self.logits(hidden, rows[i:i + chunk]).log_softmax(-1).gather(1, targets[i:i + chunk, None])
                 for i in range(0, rows.shape[0], chunk)]
        return torch.cat(parts).squeeze(1)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in choices:
        raise ValueError(f"dtype={dtype!r}: expected auto, float32, bfloat16 or float16")
    return choices[dtype]


def load_model(model_dir: str | Path, *, dtype: str | torch.dtype = torch.float32, device: str = "cpu",
               num_kv_heads: int | None = None, kv_head_method: str = "mean",
               attention_backend: str = "auto", progress: bool = False) -> CausalLM:
    """Build the model on the meta device and fill it from memory-mapped safetensors, one tensor at a time."""
    from model.weights import load_weights

    device = torch.device(device)
    dtype = resolve_dtype(dtype, device)
    config = ModelConfig.from_pretrained(model_dir)
    check_kv_head_method(kv_head_method)
    if num_kv_heads is not None:  # checked here: ModelConfig reads 0 as "not overridden"
        check_num_kv_heads(config.num_attention_heads, config.num_key_value_heads, num_kv_heads)
        config = config.with_num_kv_heads(num_kv_heads)
    ops = make_ops(attention_backend, device)
    with torch.device("meta"):
        model = CausalLM(config, ops)
    load_weights(model, Path(model_dir), dtype=dtype, device=device, kv_head_method=kv_head_method,
                 progress=progress)
    model.rotary = RotaryEmbedding(config, device)
    return model.eval().requires_grad_(False)
