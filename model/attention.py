"""GQAAttention: one module for MHA (kv heads = heads), GQA, and MQA (one kv head).

Query head h reads kv head h // (num_heads // num_kv_heads); K/V are never repeated: the cache holds
num_kv_heads heads and the attention ops map query heads onto them.
"""
from __future__ import annotations

import torch
from torch import nn

from model.batch import StepBatch
from model.config import ModelConfig
from model.norm import RMSNorm


class GQAAttention(nn.Module):
    def __init__(self, config: ModelConfig, ops):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim ** -0.5
        self.ops = ops
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        # q, k and v are one matmul; the checkpoint's q_proj/k_proj/v_proj load into row slices of it.
        self.qkv_proj = nn.Linear(config.hidden_size, q_size + 2 * kv_size, bias=config.attention_bias)
        # LLaMA's attention_bias covers o_proj too; Qwen2 has biases on q/k/v only.
        o_bias = config.attention_bias and config.architecture != "Qwen2ForCausalLM"
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=o_bias)
        self.split_sizes = (q_size, kv_size, kv_size)
        # Qwen3 normalises each head's q and k over head_dim (one weight shared by the heads) before RoPE,
        # which bounds the attention logits; K/V-head pooling and replication leave k_norm as it is
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, ops) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, ops) if config.qk_norm else None

    def split_qkv(self, qkv: torch.Tensor):
        """qkv [T, (H + 2 KVH) D], qkv_proj's output -> q [T, H, D], k [T, KVH, D], v [T, KVH, D], unrotated
        and (qk_norm) unnormed.

        Strided views of the one qkv matmul's output (column slices): the ops take strides, not copies.
        """
        num_tokens = qkv.shape[0]
        q, k, v = qkv.split(self.split_sizes, dim=-1)
        return (q.view(num_tokens, self.num_heads, self.head_dim),
                k.view(num_tokens, self.num_kv_heads, self.head_dim),
                v.view(num_tokens, self.num_kv_heads, self.head_dim))

    def qk_norm(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(q weight, k weight, eps) of Qwen3's per-head norm, which the ops apply before RoPE; None without."""
        return None if self.q_norm is None else (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)

    def project_qkv(self, hidden: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor):
        """hidden [T, hidden] -> q [T, H, D], k [T, KVH, D] (both rotated), v [T, KVH, D].

        For callers that want the rotated k itself (model/explain.py); forward never materialises it.
        """
        q, k, v = self.split_qkv(self.qkv_proj(hidden))
        if self.q_norm is not None:
            q, k = self.q_norm(q)[0], self.k_norm(k)[0]
        q, k = self.ops.apply_rotary(q, k, positions, cos_sin_cache)
        return q, k, v

    def forward(self, qkv: torch.Tensor, batch: StepBatch, kv: tuple[torch.Tensor, torch.Tensor],
                cos_sin_cache: torch.Tensor) -> torch.Tensor:
        """qkv [T, (H + 2 KVH) D]: qkv_proj's output, which DecoderLayer computes with the norm before it (one
        launch on the small-batch path; hook qkv_proj for this layer's normed input) -> [T, hidden]."""
        q, k, v = self.split_qkv(qkv)
        k_cache, v_cache = kv
        # (norm,) rotate q and k, write rotated k and v to their cache slots, attend: one or two launches on
        # the Triton path (model/ops.py)
        out = self.ops.write_kv_and_attend(q, k, v, batch, cos_sin_cache, k_cache, v_cache, self.scale,
                                           self.qk_norm())  # [T, H, D]
        return self.ops.linear(out.reshape(qkv.shape[0], self.num_heads * self.head_dim), self.o_proj)
