"""The attention explorer's computation: softmax(QK^T / sqrt(d_k)) made explicit, one layer at a time.

A reference path for teaching and reports, never the serving hot path. The residual stream comes from the
model's own forward (through a small private paged cache, with a pre-hook that records what enters each
layer's qkv_proj); attention is then recomputed here in the textbook form, from the same projections:

    q, k, v = qkv_proj(x) (q and k rotated)    scores[h, i, j] = q[i, h] . k[j, g(h)] / sqrt(d_k), j <= i
    weights = softmax(scores)                  z[i, h] = sum_j weights[h, i, j] v[j, g(h)]
    output[i] = o_proj(concat_h z[i, h])       g(h) = h // (num_heads // num_kv_heads)   (GQA)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from model.attention import GQAAttention
from model.batch import build_step_batch
from model.kv_cache import KVCache

_BLOCK_SIZE = 16


@dataclass(frozen=True)
class KVGroup:
    """One KV head and the query heads that read it."""
    kv_head: int
    query_heads: tuple[int, ...]


@dataclass(frozen=True)
class HeadStep:
    """One query head's walk for one query token i (keys 0..i only: the causal mask)."""
    head: int
    kv_head: int
    q: torch.Tensor        # [D] rotated query
    scores: torch.Tensor   # [i+1] q . k_j / sqrt(d_k)
    weights: torch.Tensor  # [i+1] softmax(scores)
    z: torch.Tensor        # [D] sum_j weights_j v_j


@dataclass(frozen=True)
class QueryWalkthrough:
    """Every head's step for one query token, then the concatenation and the output projection."""
    query_index: int
    heads: tuple[HeadStep, ...]
    concat: torch.Tensor  # [H * D]
    output: torch.Tensor  # [hidden] o_proj(concat): the attention block's output for this token


@dataclass(frozen=True)
class LayerAttention:
    layer: int
    heads: tuple[int, ...]     # the query heads whose maps are in `weights`
    weights: torch.Tensor      # [len(heads), T, T] causal softmax weights, zero above the diagonal
    walkthrough: QueryWalkthrough


def kv_groups(num_heads: int, num_kv_heads: int) -> tuple[KVGroup, ...]:
    per_group = num_heads // num_kv_heads
    return tuple(KVGroup(g, tuple(range(g * per_group, (g + 1) * per_group))) for g in range(num_kv_heads))


def kv_head_of(num_heads: int, num_kv_heads: int) -> list[int]:
    per_group = num_heads // num_kv_heads
    return [h // per_group for h in range(num_heads)]


def capture_layer_inputs(model, token_ids: list[int], num_layers: int | None = None) -> list[torch.Tensor]:
    """Run the prompt through the first `num_layers` layers (all when None); return what enters each of
    their qkv projections, [T, hidden] each.

    That input is input_layernorm(residual stream), so the recomputation below starts from exactly the
    activations the model itself attends over. The layers run as CausalLM.hidden_states runs them,
    through a private paged cache, but stop after the deepest layer asked for.
    """
    layers = model.model.layers[:num_layers]
    captured: list[torch.Tensor] = []

    def hook(_module, args):
        captured.append(args[0].detach().clone())

    num_blocks = max(1, -(-len(token_ids) // _BLOCK_SIZE))
    device = model.model.embed_tokens.weight.device
    cache = KVCache.allocate(model.config, num_blocks, _BLOCK_SIZE, model.model.embed_tokens.weight.dtype, device)
    batch = build_step_batch([token_ids], [0], [list(range(num_blocks))], _BLOCK_SIZE, device=device)
    cos_sin = model.rotary.cos_sin_cache
    handles = [layer.self_attn.qkv_proj.register_forward_pre_hook(hook) for layer in layers]
    try:
        with torch.inference_mode():
            hidden, residual = model.model.embed_tokens(batch.input_ids), None
            for i, layer in enumerate(layers):
                hidden, residual = layer(hidden, residual, batch, cache.layer(i), cos_sin)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def explicit_attention(attn: GQAAttention, hidden: torch.Tensor, cos_sin_cache: torch.Tensor):
    """hidden [T, hidden] -> (q [T, H, D], k [T, KVH, D], v [T, KVH, D], weights [H, T, T]) in float32."""
    num_tokens = hidden.shape[0]
    positions = torch.arange(num_tokens, device=hidden.device)
    with torch.inference_mode():
        q, k, v = attn.project_qkv(hidden, positions, cos_sin_cache)
    q, k, v = q.float(), k.float(), v.float()
    heads_k = k[:, kv_head_index(attn, hidden.device)]  # [T, H, D]: each query head's kv head
    scores = torch.einsum("ihd,jhd->hij", q, heads_k) / attn.head_dim ** 0.5  # [H, T, T]
    causal = torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=hidden.device).tril()
    weights = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    return q, k, v, weights


def kv_head_index(attn: GQAAttention, device: torch.device) -> torch.Tensor:
    return torch.tensor(kv_head_of(attn.num_heads, attn.num_kv_heads), device=device)


def walk_query(attn: GQAAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: int
               ) -> QueryWalkthrough:
    """The step-by-step computation of query token `index`, every head, then concat and o_proj."""
    steps = []
    scale = attn.head_dim ** -0.5
    for head, kv_head in enumerate(kv_head_of(attn.num_heads, attn.num_kv_heads)):
        q_h = q[index, head]                           # [D]
        keys, values = k[:index + 1, kv_head], v[:index + 1, kv_head]  # [i+1, D]
        scores = keys @ q_h * scale                    # [i+1]
        weights = scores.softmax(dim=-1)
        steps.append(HeadStep(head, kv_head, q_h, scores, weights, weights @ values))
    concat = torch.cat([s.z for s in steps])           # [H * D], head-major as o_proj expects
    with torch.inference_mode():
        output = attn.o_proj(concat.to(attn.o_proj.weight.dtype)).float()
    return QueryWalkthrough(index, tuple(steps), concat, output)


def explain_layers(model, token_ids: list[int], layers: list[int], heads: list[int] | None,
                   query_index: int, inputs: list[torch.Tensor] | None = None) -> list[LayerAttention]:
    """Attention maps of `heads` (all when None) in each of `layers`, and the walk of `query_index`.

    `inputs` are capture_layer_inputs' result when the caller kept it (a token click on the same prompt).
    Indices are the caller's to validate (AttentionExplainer does, naming the field at fault).
    """
    if inputs is None or len(inputs) <= max(layers):
        inputs = capture_layer_inputs(model, token_ids, max(layers) + 1)
    cos_sin = model.rotary.cos_sin_cache
    chosen = list(range(model.config.num_attention_heads)) if heads is None else list(heads)
    results = []
    for layer in layers:
        attn = model.model.layers[layer].self_attn
        q, k, v, weights = explicit_attention(attn, inputs[layer], cos_sin)
        results.append(LayerAttention(layer, tuple(chosen), weights[chosen],
                                      walk_query(attn, q, k, v, query_index)))
    return results
