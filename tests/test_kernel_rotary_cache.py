"""The fused rotary + KV-cache write (kernels/rotary_cache.py) against its reference composition.

On CPU the kernel runs in the Triton interpreter (tests/conftest.py), in float32 and float16. q, k and v
are column slices of one fused [T, (H + 2 KVH) D] tensor, as the model hands them over. The rotated q
buffer and both caches start as NaN, and the caches sit inside one storage with guard blocks on both
sides, so a forgotten store, a stray one, or a padding row that writes (slot -1 addresses the row before
the cache) all show up in the full comparison.
"""
from __future__ import annotations

import zlib

import pytest
import torch

from kernels import reference as ref
from kernels.cache import write_kv_cache
from kernels.rotary import apply_rotary
from kernels.rotary_cache import rotary_and_write_kv

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}
MAX_POS = 300


def rope_table(head_dim: int, max_pos: int = MAX_POS, device=DEVICE) -> torch.Tensor:
    """cos_sin_cache [max_pos, D] = cat(cos, sin), float32 as model/attention.py builds it."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(max_pos).float(), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device)


def make_inputs(tokens, heads, kv_heads, head_dim, dtype, cache_dtype, block_size, seed, num_padding=3,
                device=DEVICE):
    """Strided q, k, v views of one random fused tensor, random positions, shuffled slots (some -1), and a
    NaN-poisoned storage [2, num_blocks + 2, block_size, KVH, D] whose inner blocks are the two caches."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype).to(device)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = (x.view(tokens, n, head_dim) for x, n in ((q, heads), (k, kv_heads), (v, kv_heads)))
    positions = torch.randint(0, MAX_POS, (tokens,), generator=gen).to(device)
    num_blocks = -(-tokens // block_size) + 2  # spare blocks: slots no token owns must stay poisoned
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[torch.randperm(tokens, generator=gen)[:min(num_padding, tokens)]] = -1
    storage = torch.full((2, num_blocks + 2, block_size, kv_heads, head_dim), float("nan"), device=device)
    return q, k, v, positions, slots.to(device), storage.to(cache_dtype)


def caches(storage: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return storage[0, 1:-1], storage[1, 1:-1]  # guard blocks 0 and -1 of each half are never addressed


def run_both(q, k, v, positions, storage, slots, cos_sin, qk_norm=None):
    """(q_out, storage) from the kernel and from the reference, each starting from the same poison."""
    expect_storage = storage.clone()
    q_expect = ref.rotary_and_write_kv(q, k, v, positions, cos_sin, *caches(expect_storage), slots, qk_norm=qk_norm)
    q_out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)
    res = rotary_and_write_kv(q, k, v, positions, cos_sin, *caches(storage), slots, q_out=q_out, qk_norm=qk_norm)
    assert res is q_out
    return q_out, q_expect, storage, expect_storage


def assert_same(got, expect, dtype):
    """Equal values (within dtype tolerance) and NaN exactly where the reference left the poison."""
    torch.testing.assert_close(got.float(), expect.float(), equal_nan=True, **TOL[dtype])


def seed_of(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


# (num_heads, num_kv_heads, head_dim, block_size): GQA ratios 1, 4, 8; head dims 64, 80, 96, 128
CONFIGS = [(4, 4, 64, 16), (8, 2, 80, 8), (8, 1, 96, 16), (16, 2, 128, 4), (3, 3, 80, 16)]
IDS = ["g1-d64", "g4-d80", "g8-d96", "g8-d128", "g1-h3-d80"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("tokens", [13, 1])
def test_rotary_and_write_kv(tokens, cfg, dtype):
    heads, kv_heads, head_dim, block_size = cfg
    q, k, v, pos, slots, storage = make_inputs(tokens, heads, kv_heads, head_dim, dtype, dtype, block_size,
                                               seed=seed_of(tokens, cfg, dtype), num_padding=3 if tokens > 1 else 0)
    if tokens > 1:  # (a one-row view reports a normalised row stride)
        assert q.stride(0) == k.stride(0) == v.stride(0) == (heads + 2 * kv_heads) * head_dim  # fused-row views
    q_out, q_expect, got, expect = run_both(q, k, v, pos, storage, slots, rope_table(head_dim))
    assert not torch.isnan(q_out).any(), "some rotated q rows were never written (padding rows included)"
    assert_same(q_out, q_expect, dtype)
    assert_same(got, expect, dtype)
    written = (~got.isnan()).flatten(0, 2).all(-1).all(-1).sum().item()  # [2 * blocks * bs] rows
    assert written == 2 * int((slots >= 0).sum())  # v is a plain copy: exactly the real rows changed


def norm_weights(head_dim: int, dtype, seed: int, device=DEVICE):
    """Qwen3's q/k norm: (q weight, k weight, eps), random and different so that a swap shows."""
    gen = torch.Generator().manual_seed(seed)
    q_weight, k_weight = (torch.rand(head_dim, generator=gen) + 0.5 for _ in range(2))
    return q_weight.to(dtype).to(device), k_weight.to(dtype).to(device), 0.5  # an eps misread would show


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_rotary_and_write_kv_with_qk_norm(cfg, dtype):
    """Qwen3: each head of q and k RMS-normed in the kernel before its rotation, as rms_norm then the rest."""
    heads, kv_heads, head_dim, block_size = cfg
    q, k, v, pos, slots, storage = make_inputs(13, heads, kv_heads, head_dim, dtype, dtype, block_size,
                                               seed=seed_of("norm", cfg, dtype))
    q.mul_(3.0)  # rows far from unit RMS, so a missing norm cannot pass
    qk_norm = norm_weights(head_dim, dtype, seed=seed_of("w", cfg))
    q_out, q_expect, got, expect = run_both(q, k, v, pos, storage, slots, rope_table(head_dim), qk_norm)
    assert not torch.isnan(q_out).any()
    assert_same(q_out, q_expect, dtype)
    assert_same(got, expect, dtype)
    plain = ref.rotary_and_write_kv(q, k, v, pos, rope_table(head_dim), *caches(storage.clone()), slots)
    assert (plain.float() - q_out.float()).abs().max() > 0.1  # the norm changed something


def test_all_padding_rotates_q_and_leaves_the_cache_alone():
    q, k, v, pos, slots, storage = make_inputs(5, 4, 2, 64, torch.float32, torch.float32, 8, seed=1)
    slots.fill_(-1)
    q_out, q_expect, got, _ = run_both(q, k, v, pos, storage, slots, rope_table(64))
    assert_same(q_out, q_expect, torch.float32)
    assert got.isnan().all()


def test_zero_tokens():
    q, k, v, pos, slots, storage = make_inputs(0, 4, 2, 64, torch.float32, torch.float32, 8, seed=2)
    out = rotary_and_write_kv(q, k, v, pos, rope_table(64), *caches(storage), slots)
    assert out.shape == (0, 4, 64) and storage.isnan().all()


def test_in_place_q():
    """q_out may be q itself (each program reads its row before it writes it)."""
    q, k, v, pos, slots, storage = make_inputs(7, 8, 2, 80, torch.float32, torch.float32, 8, seed=4)
    q_expect = ref.apply_rotary(q, k, pos, rope_table(80))[0]
    assert rotary_and_write_kv(q, k, v, pos, rope_table(80), *caches(storage), slots, q_out=q) is q
    assert_same(q, q_expect, torch.float32)


@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float16), (torch.float16, torch.float32)])
def test_cache_dtype_differs(dtype, cache_dtype):
    """Cast on store, through k's dtype first, exactly as apply_rotary then write_kv_cache round."""
    q, k, v, pos, slots, storage = make_inputs(11, 8, 2, 96, dtype, cache_dtype, 8, seed=5)
    q_out, q_expect, got, expect = run_both(q, k, v, pos, storage, slots, rope_table(96))
    assert_same(q_out, q_expect, dtype)
    assert got.dtype == cache_dtype
    assert_same(got, expect, cache_dtype)  # an fp32 cache must hold k rounded to fp16, as unfused it did


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_fp8_cache_matches_the_unfused_kernels(dtype):
    """A float8 cache gets the same bytes as our two unfused kernels store. (The interpreter's own fp8
    rounding differs from torch's at some values, for cache.py too, so the byte-exact oracle here is the
    unfused pair; the GPU test compares against the torch reference.)"""
    q, k, v, pos, slots, storage = make_inputs(9, 8, 2, 64, dtype, torch.float8_e4m3fn, 16, seed=6)
    cos_sin = rope_table(64)
    unfused = storage.clone()
    q_expect, k_rot = apply_rotary(q, k, pos, cos_sin)
    write_kv_cache(k_rot, v, *caches(unfused), slots)
    q_out = rotary_and_write_kv(q, k, v, pos, cos_sin, *caches(storage), slots)
    assert torch.equal(q_out, q_expect)
    assert torch.equal(storage.view(torch.uint8), unfused.view(torch.uint8))


# ---------------------------------------------------------------- in the model


def mixed_step(model, cache_blocks: int = 24, block_size: int = 4):
    """A prefill step then a mixed step (a chunk after cached tokens + decode rows) through a NaN-poisoned
    cache with shuffled blocks; returns (logits of both steps, the whole cache storage)."""
    from model.batch import build_step_batch
    from model.kv_cache import KVCache
    cache = KVCache.allocate(model.config, cache_blocks, block_size, torch.float32, "cpu")
    cache.storage.fill_(float("nan"))
    free = torch.randperm(cache_blocks, generator=torch.Generator().manual_seed(0)).tolist()
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n in (14, 6, 9)]
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, model.config.vocab_size, (n,), generator=gen).tolist() for n in (14, 6, 9)]
    with torch.inference_mode():
        first = model(build_step_batch([seqs[0][:5], seqs[1][:-1], seqs[2][:-1]], [0, 0, 0], tables, block_size,
                                       all_logits=True), cache)
        second = model(build_step_batch([seqs[0][5:], seqs[1][-1:], seqs[2][-1:]], [5, 5, 8], tables, block_size,
                                        all_logits=True), cache)
    return torch.cat([first, second]), cache.storage


@pytest.mark.skipif(CUDA, reason="Triton on CPU tensors needs the interpreter; test_gpu_model covers CUDA")
def test_model_forward_triton_equals_torch_and_unfused(tiny_llama_dir):
    """The tiny model (fp32, interpreter) on the Triton ops gives the torch ops' logits and cache, and the
    fused op gives bit for bit what the two unfused kernels gave before."""
    from model.llama import load_model
    torch_model = load_model(tiny_llama_dir, attention_backend="torch")
    triton_model = load_model(tiny_llama_dir, attention_backend="triton")
    logits_ref, cache_ref = mixed_step(torch_model)
    logits, cache = mixed_step(triton_model)
    torch.testing.assert_close(logits, logits_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cache, cache_ref, atol=1e-5, rtol=1e-5, equal_nan=True)

    ops = triton_model.ops  # shared by every layer: swap in the unfused pair, as attention ran it before

    def unfused(q, k, v, positions, cos_sin, k_cache, v_cache, slots, qk_norm=None):
        assert qk_norm is None  # (a LLaMA)
        q, k = ops.apply_rotary(q, k, positions, cos_sin)
        write_kv_cache(k, v, k_cache, v_cache, slots)
        return q

    ops.rotary_and_write_kv = unfused
    logits_unfused, cache_unfused = mixed_step(triton_model)
    assert torch.equal(logits, logits_unfused)
    assert torch.equal(cache.isnan(), cache_unfused.isnan())
    assert torch.equal(cache.nan_to_num(), cache_unfused.nan_to_num())


# ---------------------------------------------------------------- GPU: bfloat16 at real size
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA (bfloat16 at real sizes)")


@gpu
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "fp8"])
@pytest.mark.parametrize("head_dim", [128, 64, 96])
def test_gpu_rotary_and_write_kv_bf16(head_dim, cache_dtype):
    q, k, v, pos, slots, storage = make_inputs(4096, 32, 8, head_dim, torch.bfloat16, cache_dtype, 16,
                                               seed=7, num_padding=300)
    q_out, q_expect, got, expect = run_both(q, k, v, pos, storage, slots, rope_table(head_dim))
    assert not torch.isnan(q_out).any()
    torch.testing.assert_close(q_out.float(), q_expect.float(), atol=1e-2, rtol=1e-2)
    # fp8: one step of its 3-bit mantissa, in case a cvt rounds a tie the other way from torch
    tol = dict(atol=1e-2, rtol=1e-2) if cache_dtype == torch.bfloat16 else dict(atol=2 ** -9, rtol=0.13)
    torch.testing.assert_close(got.float(), expect.float(), equal_nan=True, **tol)


@gpu
@pytest.mark.parametrize("head_dim", [128, 64])
def test_gpu_rotary_and_write_kv_with_qk_norm_bf16(head_dim):
    q, k, v, pos, slots, storage = make_inputs(4096, 32, 8, head_dim, torch.bfloat16, torch.bfloat16, 16,
                                               seed=8, num_padding=300)
    qk_norm = norm_weights(head_dim, torch.bfloat16, seed=9)
    q_out, q_expect, got, expect = run_both(q, k, v, pos, storage, slots, rope_table(head_dim), qk_norm)
    assert not torch.isnan(q_out).any()
    torch.testing.assert_close(q_out.float(), q_expect.float(), atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(got.float(), expect.float(), equal_nan=True, atol=2e-2, rtol=1e-2)
