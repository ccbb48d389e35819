"""Plain-torch twins of every kernel: the CPU path and the test oracle.

Shapes used throughout (see ARCHITECTURE.md):
  T  tokens in the flat batch, B sequences, H query heads, KVH kv heads, D head_dim
  k_cache / v_cache: [num_blocks, block_size, KVH, D]
  query_start_loc [B+1] int32, seq_lens [B] int32 (context length *after* this step's tokens),
  block_tables [B, max_blocks] int32, slot_mapping [T] int64 (block * block_size + offset; < 0 = skip).

Query token i (0-based within its sequence's L new tokens) sits at absolute position
seq_lens[b] - L + i and attends to keys 0..that position: this covers a whole prefill, a prefill chunk
after cached tokens, and one-token decode with the same rule.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Scatter new K/V [T, KVH, D] into their cache slots; slots < 0 (padding) are skipped."""
    if bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    # index_copy_ on the [slots, KVH, D] view: on CPU an order of magnitude cheaper than index_put.
    for cache, new in ((k_cache, k), (v_cache, v)):
        _as_bytes_if_fp8(cache.view(-1, *cache.shape[2:])).index_copy_(
            0, slot_mapping, _as_bytes_if_fp8(new.to(cache.dtype)))


def _as_bytes_if_fp8(t: torch.Tensor) -> torch.Tensor:
    """CPU index_copy_/index_select have no float8 kernels; one-byte types move as raw bytes instead."""
    return t.view(torch.uint8) if t.element_size() == 1 and t.is_floating_point() else t


def _index_blocks(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """cache[blocks] via index_select (advanced indexing is ~30x slower on CPU for this gather)."""
    return _as_bytes_if_fp8(cache).index_select(0, blocks).view(cache.dtype)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first seq_len tokens of one sequence from the paged cache -> [seq_len, KVH, D]."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    return _index_blocks(cache, block_table[:num_blocks]).flatten(0, 1)[:seq_len]


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                    scale: float, max_query_len: int | None = None) -> torch.Tensor:
    """Causal attention of q [T, H, D] over the paged cache -> [T, H, D] (q's dtype).

    GQA without copying K/V: query head h reads kv head h // (H // KVH).
    """
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max().item()) if q.shape[0] else 0
    if max_query_len == 1 and q.shape[0] == seq_lens.shape[0]:
        return _decode_attention(q, k_cache, v_cache, seq_lens, block_tables, scale)
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        qs, qe = starts[b], starts[b + 1]
        if qe == qs:
            continue
        out[qs:qe] = _one_sequence(q[qs:qe], k_cache, v_cache, block_tables[b], seq_len, scale)
    return out


def _one_sequence(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                  seq_len: int, scale: float) -> torch.Tensor:
    num_q, num_heads, _ = q.shape
    k = gather_kv(k_cache, block_table, seq_len)  # [S, KVH, D]
    v = gather_kv(v_cache, block_table, seq_len)
    q_pos = torch.arange(seq_len - num_q, seq_len, device=q.device)
    mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]  # [L, S]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).float(), k.transpose(0, 1).float(), v.transpose(0, 1).float(),
        attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != num_heads)
    return out.transpose(0, 1).to(q.dtype)  # [L, H, D]


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                      block_tables: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per sequence, vectorised over the batch (the CPU decode hot path)."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    max_len = int(seq_lens.max().item())
    max_blocks = (max_len + block_size - 1) // block_size
    table = block_tables[:, :max_blocks].reshape(-1)

    def gather(cache: torch.Tensor) -> torch.Tensor:  # -> [B, S, KVH, D]
        return _index_blocks(cache, table).view(batch, -1, num_kv_heads, head_dim)[:, :max_len].float()

    k, v = gather(k_cache), gather(v_cache)
    qg = q.float().view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [B, KVH, G, D]
    scores = torch.matmul(qg, k.permute(0, 2, 3, 1)) * scale  # [B, KVH, G, S]
    if batch > 1:  # shorter sequences end before max_len: mask their tail
        valid = torch.arange(max_len, device=q.device)[None, :] < seq_lens[:, None]  # [B, S]
        scores.masked_fill_(~valid[:, None, None, :], float("-inf"))
        # Slots past a sequence's end hold whatever the pool left there (NaN included): a zero weight
        # times NaN is NaN, so they are cleared, not just masked. In place: v is the gather's own copy.
        v.masked_fill_(~valid[:, :, None, None], 0.0)
    out = torch.matmul(scores.softmax(-1), v.transpose(1, 2))  # [B, KVH, G, D]
    return out.reshape(batch, num_heads, head_dim).to(q.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm fused with the residual add: returns (norm(x + residual) * weight, x + residual).

    With residual None the second value is x itself. Statistics in float32, as in HF LLaMA.
    """
    if residual is not None:
        x = x + residual
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype), x


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[T, 2I] (gate | up) -> silu(gate) * up [T, I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                 cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding, HF's rotate-half (NeoX) convention.

    q [T, H, D], k [T, KVH, D], positions [T], cos_sin_cache [max_pos, D] = cat(cos, sin) over D/2 freqs.
    Returns new tensors in the inputs' dtype; the rotation itself runs in float32.
    """
    cos, sin = cos_sin_cache[positions].float().chunk(2, dim=-1)  # [T, D/2] each
    cos, sin = cos[:, None, :], sin[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def rotary_and_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                        cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor, q_out: torch.Tensor | None = None,
                        qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> torch.Tensor:
    """apply_rotary, then write_kv_cache of the rotated k and v; returns the rotated q [T, H, D].

    The oracle of kernels/rotary_cache.py, composed from the two unfused twins above so it shares no code
    with the fused kernel. q_out, when given, receives the rotated q (the kernel's optional output buffer).
    qk_norm: (q weight [D], k weight [D], eps): rms_norm over each head of q and k first (Qwen3).
    """
    if qk_norm is not None:
        q_weight, k_weight, eps = qk_norm
        q, k = rms_norm(q, q_weight, eps)[0], rms_norm(k, k_weight, eps)[0]
    q_rot, k_rot = apply_rotary(q, k, positions, cos_sin_cache)
    write_kv_cache(k_rot, v, k_cache, v_cache, slot_mapping)
    return q_rot if q_out is None else q_out.copy_(q_rot)


def decode_rotary_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                            cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            slot_mapping: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                            scale: float) -> torch.Tensor:
    """One new token per sequence: rotary_and_write_kv, then paged_attention -> [B, H, D]. The oracle of
    kernels/decode_rotary.py."""
    q_rot = rotary_and_write_kv(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping)
    query_start_loc = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    return paged_attention(q_rot, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale, max_query_len=1)


def rms_norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                    weight: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear(rms_norm(x + residual)), x + residual): what kernels/skinny_matmul.py folds into one launch."""
    normed, residual = rms_norm(x, norm_weight, eps, residual)
    return F.linear(normed, weight, bias), residual


def silu_mul_linear(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """linear(silu(gate) * up) over gate_up [T, 2I]."""
    return F.linear(silu_and_mul(gate_up), weight, bias)
