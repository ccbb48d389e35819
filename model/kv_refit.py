"""kv_head_method="refit": pool KV heads by fitting calibration activations, not by averaging weights.

Why not a plain least-squares fit of the pooled K projection? Minimising sum_i ||X W_i^T - X W'^T||^2 over
one shared W' gives W' = mean(W_i) for every X (the normal equations are sum_i (W' - W_i) X^T X = 0):
activation weighting alone reproduces mean pooling. What mean pooling wastes is the freedom on the other
side of each product, which costs nothing because it is not cached:

Keys (RoPE-aware). Split head_dim into its D/2 rotary pairs (j, j + D/2) and read each pair as a complex
number; RoPE multiplies pair j of q and k by e^{i theta_j pos} and the logit is sum_j Re(conj(q_j) k_j).
A map on k that commutes with every rotation is a complex scalar per pair, and k_j -> b k_j,
q_j -> q_j / conj(b) leaves every logit unchanged at every position. So for each group and pair we look
for one merged key z' = X w' and per-head scalars b_i with z_i ~ b_i z', and fold conj(b_i) into the
query rows of the heads that read head i. The error it leaves in a logit is Re(conj(q) e^{i phi} (z_i -
b_i z')); averaged over the relative phase phi (uniform for all but the slowest pairs) its square is
|q|^2 |z_i - b_i z'|^2 / 2, so the objective is sum_i w_i ||z_i - b_i z'||^2 with w_i = E|q_j|^2 summed
over head i's query heads: a rank-1 approximation of the weighted complex matrix [sqrt(w_i) z_i]
(its top eigenvector). Mean pooling is the point b_i = 1 of that family, so refit's objective is never
worse.

Values (no RoPE). Query head h adds O_h v_i(s) to its output, O_h being its o_proj columns. A merged v'
with per-head maps B_i (folded into O_h) leaves sum_h ||O_h (v_i - B_i v')||^2; with M_i = sum_h O_h^T O_h
that is a reduced-rank regression: v' spans the top head_dim principal directions of [V_i M_i^{1/2}]_i,
then B_i = M_i^{-1/2} E_i. Mean pooling is again the point (v' = mean, B_i = I) of the family.

Everything needs only each layer's second moment of [x, 1] (x = the attention input after the norm; the 1
carries the biases), collected in one pass of the native model over a calibration text that must be
disjoint from any evaluation text.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from model.batch import build_step_batch
from model.config import ModelConfig
from model.kv_cache import KVCache
from model.kv_heads import check_num_kv_heads


@dataclass(frozen=True)
class AttentionWeights:
    """One layer's projections in float64, bias as an extra last input column (zeros without bias)."""
    q: torch.Tensor  # [H*D, hidden+1]
    k: torch.Tensor  # [KVH*D, hidden+1]
    v: torch.Tensor  # [KVH*D, hidden+1]
    o: torch.Tensor  # [hidden, H*D]


@dataclass(frozen=True)
class PooledAttention:
    weights: AttentionWeights      # q and o with the compensation folded in
    key_scale: torch.Tensor        # [H, D/2] complex128: q_j of head h was multiplied by it (1 = untouched)
    value_map: torch.Tensor        # [H, D, D]: o_proj columns of head h were multiplied by it (I = untouched)


@dataclass(frozen=True)
class RefitLoss:
    """The calibration objective of one layer, for mean pooling and for refit (lower is better)."""
    key_mean: float
    key_refit: float
    value_mean: float
    value_refit: float


def attention_weights(attn) -> AttentionWeights:
    w = attn.qkv_proj.weight.detach().double()
    b = attn.qkv_proj.bias
    b = torch.zeros(w.shape[0], dtype=torch.float64) if b is None else b.detach().double()
    aug = torch.cat([w, b.to(w.device)[:, None]], dim=1)
    q, k, v = aug.split(attn.split_sizes, dim=0)
    return AttentionWeights(q, k, v, attn.o_proj.weight.detach().double())


def collect_grams(model, token_ids: list[int], *, window: int = 512, block_size: int = 16) -> list[torch.Tensor]:
    """E[[x,1][x,1]^T] of every layer's attention input over token_ids, [hidden+1, hidden+1] float64 each."""
    if len(token_ids) < 2:
        raise ValueError("calibration needs at least 2 tokens")
    window = min(window, model.config.max_context)  # past it there are no positions to run
    device, size = model.lm_head.weight.device, model.config.hidden_size + 1
    grams = [torch.zeros(size, size, dtype=torch.float64, device=device) for _ in model.model.layers]

    def hook_for(index: int):
        def hook(_module, args):
            x = args[0].double()
            x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)  # [T, hidden+1]
            grams[index].add_(x.T @ x)
        return hook

    handles = [layer.self_attn.qkv_proj.register_forward_pre_hook(hook_for(i))
               for i, layer in enumerate(model.model.layers)]
    cache = KVCache.allocate(model.config, -(-window // block_size), block_size, model.lm_head.weight.dtype, device)
    table = list(range(cache.num_blocks))
    try:
        for begin in range(0, len(token_ids), window):
            batch = build_step_batch([token_ids[begin:begin + window]], [0], [table], block_size, device)
            with torch.inference_mode():
                model(batch, cache)
    finally:
        for handle in handles:
            handle.remove()
    return [g / len(token_ids) for g in grams]


def _pairs(rows: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """[heads*D, n] real -> [heads, D/2, n] complex: pair j = row j + i * row j + D/2 (rotate-half RoPE)."""
    r = rows.reshape(heads, 2, head_dim // 2, -1)
    return torch.complex(r[:, 0], r[:, 1])


def _unpairs(c: torch.Tensor) -> torch.Tensor:
    """Inverse of _pairs: [heads, D/2, n] complex -> [heads*D, n] real."""
    return torch.stack([c.real, c.imag], dim=1).reshape(-1, c.shape[-1])


def _cnorm(z: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """E|x.z|^2 for complex rows z [..., n] under the real second moment gram [n, n]."""
    return (torch.einsum("...x,xy,...y->...", z.real, gram, z.real)
            + torch.einsum("...x,xy,...y->...", z.imag, gram, z.imag))


def _query_energy(w: AttentionWeights, gram: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """E|q_hj|^2 per query head and rotary pair, [H, D/2]."""
    return _cnorm(_pairs(w.q, num_heads, head_dim), gram)


def key_loss(native: AttentionWeights, pooled: PooledAttention, gram: torch.Tensor, num_heads: int,
             head_dim: int) -> float:
    """sum_h sum_j E|q_hj|^2 E|k_{i(h)j} - conj(a_hj) k'_{t(h)j}|^2 (a: key_scale): the logit-error proxy."""
    src, dst = native.k.shape[0] // head_dim, pooled.weights.k.shape[0] // head_dim
    k_src, k_dst = _pairs(native.k, src, head_dim), _pairs(pooled.weights.k, dst, head_dim)
    heads = torch.arange(num_heads)
    delta = k_src[heads // (num_heads // src)] - pooled.key_scale.conj()[..., None] * k_dst[heads // (num_heads // dst)]
    return float((_query_energy(native, gram, num_heads, head_dim) * _cnorm(delta, gram)).sum())


def value_loss(native: AttentionWeights, pooled: PooledAttention, gram: torch.Tensor, num_heads: int,
               head_dim: int) -> float:
    """sum_h E||O_h (v_{i(h)} - B_h v'_{t(h)})||^2 (B: value_map): the output error before attention mixes it."""
    src, dst = native.v.shape[0] // head_dim, pooled.weights.v.shape[0] // head_dim
    total = 0.0
    for h in range(num_heads):
        v_i = native.v.reshape(src, head_dim, -1)[h // (num_heads // src)]
        v_t = pooled.weights.v.reshape(dst, head_dim, -1)[h // (num_heads // dst)]
        o_h = native.o[:, h * head_dim:(h + 1) * head_dim]
        err = o_h @ (v_i - pooled.value_map[h] @ v_t)  # [hidden, hidden+1]
        total += float(torch.einsum("ax,xy,ay->", err, gram, err))
    return total


def mean_pool(native: AttentionWeights, num_heads: int, head_dim: int, dst: int) -> PooledAttention:
    """Ainslie et al.'s mean pooling expressed as a PooledAttention (q and o untouched)."""
    src = native.k.shape[0] // head_dim

    def pool(rows):
        return rows.reshape(dst, src // dst, head_dim, -1).mean(dim=1).reshape(dst * head_dim, -1)

    weights = AttentionWeights(native.q, pool(native.k), pool(native.v), native.o)
    scale = torch.ones(num_heads, head_dim // 2, dtype=torch.complex128)
    value_map = torch.eye(head_dim, dtype=torch.float64).expand(num_heads, head_dim, head_dim)
    return PooledAttention(weights, scale, value_map)


def _sqrt_psd(m: torch.Tensor, ridge: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """(M^{1/2}, M^{-1/2}) of a PSD matrix, with a relative ridge so the inverse exists."""
    vals, vecs = torch.linalg.eigh(m)
    vals = vals.clamp_min(ridge * max(float(vals.max()), 1e-300))
    return (vecs * vals.sqrt()) @ vecs.T, (vecs * vals.rsqrt()) @ vecs.T


def refit_pool(native: AttentionWeights, gram: torch.Tensor, num_heads: int, head_dim: int,
               dst: int) -> PooledAttention:
    """Pool src kv heads into dst (dst divides src) minimising key_loss and value_loss (module docstring)."""
    src = native.k.shape[0] // head_dim
    group, q_per_src = src // dst, num_heads // src
    gram_c = gram.to(torch.complex128)
    k_src = _pairs(native.k, src, head_dim)                           # [src, D/2, n]
    energy = _query_energy(native, gram, num_heads, head_dim)         # [H, D/2]
    energy = energy.reshape(src, q_per_src, -1).sum(dim=1)            # [src, D/2]: per kv head
    energy = energy.clamp_min(1e-12 * float(energy.max()))
    q_pairs = _pairs(native.q, num_heads, head_dim)                   # [H, D/2, n]
    v_src = native.v.reshape(src, head_dim, -1)                       # [src, D, n]
    o_heads = native.o.reshape(native.o.shape[0], num_heads, head_dim).permute(1, 0, 2)  # [H, hidden, D]

    k_dst, v_dst = [], []
    scale = torch.ones(num_heads, head_dim // 2, dtype=torch.complex128)
    value_map = torch.empty(num_heads, head_dim, head_dim, dtype=torch.float64)
    for t in range(dst):
        members = range(t * group, (t + 1) * group)
        # keys: per pair j, top eigenvector of the weighted complex Gram [g, g]
        z = k_src[t * group:(t + 1) * group]                          # [g, D/2, n]
        root_w = energy[t * group:(t + 1) * group].sqrt()             # [g, D/2]
        cov = torch.einsum("ajx,xy,bjy->jab", z.conj(), gram_c, z)    # [D/2, g, g] Hermitian
        cov = root_w.T[:, :, None] * cov * root_w.T[:, None, :]
        _, vecs = torch.linalg.eigh(cov)
        top = vecs[:, :, -1]                                          # [D/2, g]
        k_dst.append(torch.einsum("ja,aj,ajx->jx", top, root_w.to(top.dtype), z))
        # values: reduced-rank regression in the o_proj-weighted metric
        roots, inv_roots, blocks = [], [], []
        for i in members:
            heads = range(i * q_per_src, (i + 1) * q_per_src)
            m = sum(o_heads[h].T @ o_heads[h] for h in heads)         # [D, D]
            root, inv_root = _sqrt_psd(m)
            roots.append(root)
            inv_roots.append(inv_root)
            blocks.append(v_src[i].T @ root)                          # [n, D]
        p = torch.cat(blocks, dim=1)                                  # [n, g*D]
        _, vecs = torch.linalg.eigh(p.T @ gram @ p)
        e = vecs[:, -head_dim:].flip(-1)                              # [g*D, D] top directions
        v_dst.append((p @ e).T)                                       # [D, n]
        for a, i in enumerate(members):
            b = inv_roots[a] @ e[a * head_dim:(a + 1) * head_dim]     # [D, D]
            for h in range(i * q_per_src, (i + 1) * q_per_src):
                scale[h] = top[:, a] / root_w[a]
                value_map[h] = b
    new_q = _unpairs(q_pairs * scale[..., None])
    new_o = torch.einsum("ohd,hde->ohe", o_heads.permute(1, 0, 2), value_map).reshape(native.o.shape)
    weights = AttentionWeights(new_q, _unpairs(torch.stack(k_dst)), torch.cat(v_dst), new_o)
    return PooledAttention(weights, scale, value_map)


def _assign(attn, pooled: AttentionWeights) -> None:
    """Write pooled float64 weights into a (num_kv_heads = dst) attention module."""
    fused = torch.cat([pooled.q, pooled.k, pooled.v])
    qkv = attn.qkv_proj
    qkv.weight.copy_(fused[:, :-1].to(qkv.weight))
    if qkv.bias is not None:
        qkv.bias.copy_(fused[:, -1].to(qkv.bias))
    attn.o_proj.weight.copy_(pooled.o.to(attn.o_proj.weight))


def check_refit_applies(config: ModelConfig) -> None:
    if config.qk_norm:  # refit's least squares assume keys linear in the layer input; a q/k norm breaks that
        raise ValueError(f"kv_head_method='refit' cannot pool {config.architecture}'s heads: its per-head q/k "
                         "norm makes keys nonlinear in the layer input; use kv_head_method='mean'")


def refit_model(native_model, target_model, grams: list[torch.Tensor]) -> list[RefitLoss]:
    """Overwrite target_model's attention (loaded with fewer kv heads) with the refit of native_model's."""
    config = target_model.config
    src, dst = native_model.config.num_kv_heads, config.num_kv_heads
    if dst >= src or src % dst:
        raise ValueError(f"refit pools heads: target num_kv_heads={dst} must divide and be below {src}")
    check_refit_applies(config)
    heads, head_dim = config.num_attention_heads, config.head_dim
    losses = []
    for layer_n, layer_t, gram in zip(native_model.model.layers, target_model.model.layers, grams, strict=True):
        native = attention_weights(layer_n.self_attn)
        gram = gram.to(native.q.device)
        mean, refit = mean_pool(native, heads, head_dim, dst), refit_pool(native, gram, heads, head_dim, dst)
        losses.append(RefitLoss(key_loss(native, mean, gram, heads, head_dim),
                                key_loss(native, refit, gram, heads, head_dim),
                                value_loss(native, mean, gram, heads, head_dim),
                                value_loss(native, refit, gram, heads, head_dim)))
        with torch.no_grad():
            _assign(layer_t.self_attn, refit.weights)
    return losses


def load_refit_model(model_dir: str | Path, num_kv_heads: int, calibration_ids: list[int], *,
                     native_model=None, window: int = 512, **load_kwargs):
    """load_model(..., num_kv_heads) with kv heads pooled by refit on calibration_ids.

    Returns (model, per-layer RefitLoss). At or above the checkpoint's count there is nothing to fit
    and the result is load_model's (replication is exact). native_model, when given, must be the same
    checkpoint loaded at its native count (saves a load).
    """
    from model.llama import load_model

    config = ModelConfig.from_pretrained(model_dir)
    check_num_kv_heads(config.num_attention_heads, config.num_key_value_heads, num_kv_heads)
    if num_kv_heads < config.num_key_value_heads:
        check_refit_applies(config)  # before any loading
    target = load_model(model_dir, num_kv_heads=num_kv_heads, kv_head_method="mean", **load_kwargs)
    if num_kv_heads >= config.num_key_value_heads:
        return target, []
    if native_model is None:
        native_model = load_model(model_dir, **load_kwargs)
    grams = collect_grams(native_model, calibration_ids, window=window)
    return target, refit_model(native_model, target, grams)


DEFAULT_CALIBRATION_TEXT = Path(__file__).resolve().parent / "data" / "calibration.txt"


def load_with_kv_head_method(model_dir: str | Path, *, num_kv_heads: int | None, kv_head_method: str = "mean",
                             calibration_text: str | Path | None = None, calibration_tokens: int = 2048,
                             **load_kwargs):
    """The serving entry: load_model, except that refit pooling calibrates on calibration_text (a file)."""
    from model.llama import load_model
    from model.tokenizer import Tokenizer

    if kv_head_method != "refit" or num_kv_heads is None:
        return load_model(model_dir, num_kv_heads=num_kv_heads, kv_head_method=kv_head_method, **load_kwargs)
    # The default is public-domain Shakespeare shipped with the package (not the part kv-report scores).
    text = Path(calibration_text or DEFAULT_CALIBRATION_TEXT).read_text(encoding="utf-8")
    ids = Tokenizer.from_pretrained(model_dir).encode(text, add_special_tokens=False)[:calibration_tokens]
    model, _ = load_refit_model(model_dir, num_kv_heads, ids, **load_kwargs)
    return model
