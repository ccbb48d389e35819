"""Triton kernels against their torch twins in kernels/reference.py.

On CPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), in float32
and float16 at small shapes; the GPU section repeats the attention checks in bfloat16 at real sizes.
Every output is poisoned with NaN first, so an element the kernel forgets to write fails the comparison.
"""
from __future__ import annotations

import json
import zlib

import pytest
import torch

from kernels import reference as ref
from kernels.activation import silu_and_mul
from kernels.attention_decode import paged_decode_attention
from kernels.attention_prefill import paged_prefill_attention
from kernels.cache import write_kv_cache
from kernels.dispatch import paged_attention
from kernels.norm import rms_norm
from kernels.rotary import apply_rotary

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16]
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


def seed_of(*parts) -> int:
    return zlib.crc32(repr(parts).encode())  # stable across processes, unlike hash()


def make_paged(new_lens, cached_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, seed,
               device=DEVICE, spare_blocks=3):
    """Random q and a paged cache whose blocks are a random permutation (non-contiguous tables)."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [n + c for n, c in zip(new_lens, cached_lens)]
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks  # spare blocks hold junk a wrong read would pick up
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(seq_lens), max(blocks_per_seq) + 1, dtype=torch.int32)  # padded with 0
    used = 0
    for b, n in enumerate(blocks_per_seq):
        tables[b, :n] = perm[used:used + n]
        used += n
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    q = torch.randn(sum(new_lens), num_heads, head_dim, generator=gen).to(dtype)
    starts = torch.tensor([0] + new_lens, dtype=torch.int64).cumsum(0).to(torch.int32)
    to = dict(device=device)
    return (q.to(**to), k_cache.to(**to), v_cache.to(**to), starts.to(**to),
            torch.tensor(seq_lens, dtype=torch.int32, device=device), tables.to(**to))


def assert_close(out, expected, dtype):
    assert not torch.isnan(out).any(), "some outputs were never written"
    torch.testing.assert_close(out.float(), expected.float(), **TOL[dtype])


# (num_heads, num_kv_heads, head_dim, block_size): GQA ratios 1, 4, 8; power-of-2 and padded head dims
ATTN_CONFIGS = [(2, 2, 16, 16), (8, 2, 80, 8), (8, 1, 64, 16), (4, 1, 32, 8)]
ATTN_IDS = ["g1-d16-bs16", "g4-d80-bs8", "g8-d64-bs16", "g4-d32-bs8"]

# (new tokens per sequence, cached tokens per sequence)
PREFILL_BATCHES = {
    "fresh": ([1, 7, 33, 70], [0, 0, 0, 0]),
    "prefix": ([1, 7, 33, 70], [0, 5, 20, 3]),
    "mixed": ([1, 19, 0, 1], [40, 13, 4, 2]),  # decode rows, a chunk after a prefix, an idle sequence
}


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("cfg", ATTN_CONFIGS, ids=ATTN_IDS)
@pytest.mark.parametrize("batch", list(PREFILL_BATCHES))
def test_prefill_attention(batch, cfg, dtype):
    new_lens, cached = PREFILL_BATCHES[batch]
    h, kvh, d, bs = cfg
    q, kc, vc, qsl, sl, bt = make_paged(new_lens, cached, h, kvh, d, bs, dtype, seed=seed_of(batch, cfg))
    out = torch.full_like(q, float("nan"))
    scale = d ** -0.5
    res = paged_prefill_attention(q, kc, vc, qsl, sl, bt, scale, max(new_lens), out=out)
    assert res is out
    assert_close(out, ref.paged_attention(q, kc, vc, qsl, sl, bt, scale, max(new_lens)), dtype)


@pytest.mark.parametrize("heavy_first", [False, True], ids=["tile-order", "heavy-first"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
def test_prefill_small_tiles(dtype, heavy_first):
    """Many query and key tiles per sequence: both loop phases and the tile edges (in either launch order)."""
    new_lens, cached = [70, 33, 5], [21, 0, 40]
    q, kc, vc, qsl, sl, bt = make_paged(new_lens, cached, 8, 2, 32, 8, dtype, seed=7)
    out = torch.full_like(q, float("nan"))
    paged_prefill_attention(q, kc, vc, qsl, sl, bt, 0.2, 70, out=out, block_m=16, block_n=16,
                            heavy_first=heavy_first)
    assert_close(out, ref.paged_attention(q, kc, vc, qsl, sl, bt, 0.2, 70), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("cfg", ATTN_CONFIGS, ids=ATTN_IDS)
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_decode_attention(num_splits, cfg, dtype):
    context = [1, 6, 40, 150]  # includes the new token
    h, kvh, d, bs = cfg
    q, kc, vc, qsl, sl, bt = make_paged([1] * 4, [c - 1 for c in context], h, kvh, d, bs, dtype,
                                        seed=seed_of(num_splits, cfg))
    out = torch.full_like(q, float("nan"))
    scale = d ** -0.5
    paged_decode_attention(q, kc, vc, sl, bt, scale, max(context), out=out, num_splits=num_splits)
    assert_close(out, ref.paged_attention(q, kc, vc, qsl, sl, bt, scale, 1), dtype)


def test_decode_more_splits_than_tiles():
    """Splits past a short sequence's context are empty and must contribute nothing."""
    q, kc, vc, qsl, sl, bt = make_paged([1, 1], [2, 90], 4, 2, 16, 8, torch.float32, seed=3)
    out = torch.full_like(q, float("nan"))
    paged_decode_attention(q, kc, vc, sl, bt, 0.25, 91, out=out, num_splits=4, block_n=16)
    assert_close(out, ref.paged_attention(q, kc, vc, qsl, sl, bt, 0.25, 1), torch.float32)


# a cache narrower than the queries: fp8 (kv_cache_dtype="fp8_e4m3") and fp16 under fp32 queries. The kernels
# widen K/V to the queries' dtype in registers (tl.dot takes no fp8 operand against a 16-bit one).
NARROW = [(torch.float16, torch.float8_e4m3fn), (torch.float32, torch.float8_e4m3fn),
          (torch.float32, torch.float16)]


@pytest.mark.parametrize("dtype,cache_dtype", NARROW, ids=["fp16-fp8", "fp32-fp8", "fp32-fp16"])
@pytest.mark.parametrize("kind", ["prefill", "decode", "decode-3-splits"])
def test_attention_over_a_narrower_cache(kind, dtype, cache_dtype):
    new_lens, cached = PREFILL_BATCHES["prefix"] if kind == "prefill" else ([1] * 4, [0, 5, 39, 149])
    q, kc, vc, qsl, sl, bt = make_paged(new_lens, cached, 8, 2, 80, 8, dtype, seed=seed_of(kind, str(cache_dtype)))
    kc, vc = kc.to(cache_dtype), vc.to(cache_dtype)
    out = torch.full_like(q, float("nan"))
    scale = 80 ** -0.5
    if kind == "prefill":
        paged_prefill_attention(q, kc, vc, qsl, sl, bt, scale, max(new_lens), out=out)
    else:
        paged_decode_attention(q, kc, vc, sl, bt, scale, int(sl.max()), out=out,
                               num_splits=3 if kind.endswith("splits") else 1)
    assert_close(out, ref.paged_attention(q, kc, vc, qsl, sl, bt, scale, max(new_lens)), dtype)


@pytest.mark.parametrize("batch", ["decode", "mixed"])
def test_dispatch(batch):
    new_lens, cached = ([1, 1, 1], [9, 30, 0]) if batch == "decode" else ([1, 12, 1], [9, 4, 0])
    q, kc, vc, qsl, sl, bt = make_paged(new_lens, cached, 4, 2, 32, 16, torch.float32, seed=11)
    out = torch.full_like(q, float("nan"))
    paged_attention(q, kc, vc, qsl, sl, bt, 0.2, max(new_lens), int(sl.max()), out=out)
    assert_close(out, ref.paged_attention(q, kc, vc, qsl, sl, bt, 0.2, max(new_lens)), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("kvh,d,bs", [(2, 16, 16), (3, 80, 8)])
def test_write_kv_cache(kvh, d, bs, dtype):
    gen = torch.Generator().manual_seed(5)
    num_blocks, tokens = 6, 13
    k = torch.randn(tokens, kvh, d, generator=gen).to(dtype).to(DEVICE)
    v = torch.randn(tokens, kvh, d, generator=gen).to(dtype).to(DEVICE)
    slots = torch.randperm(num_blocks * bs, generator=gen)[:tokens].to(torch.int64)
    slots[[2, 7, 12]] = -1  # padding tokens
    slots = slots.to(DEVICE)
    k_cache = torch.randn(num_blocks, bs, kvh, d, generator=gen).to(dtype).to(DEVICE)
    v_cache = torch.randn(num_blocks, bs, kvh, d, generator=gen).to(dtype).to(DEVICE)
    k_expect, v_expect = k_cache.clone(), v_cache.clone()
    ref.write_kv_cache(k, v, k_expect, v_expect, slots)
    write_kv_cache(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_expect) and torch.equal(v_cache, v_expect)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("hidden", [64, 80])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(with_residual, hidden, dtype):
    gen = torch.Generator().manual_seed(hidden)
    x = torch.randn(7, hidden, generator=gen).to(dtype).to(DEVICE)
    w = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype).to(DEVICE)
    res = torch.randn(7, hidden, generator=gen).to(dtype).to(DEVICE) if with_residual else None
    out, res_out = rms_norm(x, w, 1e-6, res)
    expect, expect_res = ref.rms_norm(x, w, 1e-6, res)
    assert out.dtype == expect.dtype
    assert_close(out, expect, dtype)
    if with_residual:
        assert_close(res_out, expect_res, dtype)
    else:
        assert res_out is x


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("inter", [64, 100])
def test_silu_and_mul(inter, dtype):
    gen = torch.Generator().manual_seed(inter)
    x = (2 * torch.randn(5, 2 * inter, generator=gen)).to(dtype).to(DEVICE)
    out = silu_and_mul(x, block=32)  # several column blocks, a ragged last one for 100
    assert_close(out, ref.silu_and_mul(x), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("d", [16, 80])
def test_rotary(d, inplace, dtype):
    gen = torch.Generator().manual_seed(d)
    tokens, max_pos = 9, 64
    q = torch.randn(tokens, 8, d, generator=gen).to(dtype).to(DEVICE)
    k = torch.randn(tokens, 2, d, generator=gen).to(dtype).to(DEVICE)
    positions = torch.randint(0, max_pos, (tokens,), generator=gen).to(DEVICE)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.outer(torch.arange(max_pos).float(), inv_freq)
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(DEVICE)  # [max_pos, D]
    q_expect, k_expect = ref.apply_rotary(q, k, positions, cos_sin)
    q_out, k_out = apply_rotary(q, k, positions, cos_sin, inplace=inplace)
    assert (q_out is q) == inplace
    assert_close(q_out, q_expect, dtype)
    assert_close(k_out, k_expect, dtype)


def test_benchmark_dry_run(capsys, tmp_path):
    """The benchmark's table path on CPU with the reference functions (no timings claimed)."""
    from benchmarks.kernels import main
    rows = main(["--dry-run", "--json", str(tmp_path / "kernels.json")])
    assert {r.kernel for r in rows} == {"decode", "decode, float8_e4m3fn KV", "prefill", "rms_norm+res",
                                        "silu_and_mul", "rotary+kv_write", "rotary+kv_write+qk_norm",
                                        "decode+rotary+kv_write"}
    assert "frac of limit" in capsys.readouterr().out
    assert json.loads((tmp_path / "kernels.json").read_text())["dry_run"] is True


# ---------------------------------------------------------------- GPU: bfloat16 at real sizes
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA (bfloat16 at real sizes)")


def rel_error(out, expected):
    return ((out.float() - expected.float()).norm() / expected.float().norm()).item()


@gpu
@pytest.mark.parametrize("head_dim", [128, 64, 96])
@pytest.mark.parametrize("new_lens,cached", [([1, 100, 1000, 2048], [0, 0, 0, 0]),
                                             ([512, 1, 2000, 37], [3584, 4095, 2096, 1000])])
def test_gpu_prefill_bf16(new_lens, cached, head_dim):
    q, kc, vc, qsl, sl, bt = make_paged(new_lens, cached, 32, 8, head_dim, 16, torch.bfloat16, seed=1)
    out = torch.full_like(q, float("nan"))
    scale = head_dim ** -0.5
    paged_prefill_attention(q, kc, vc, qsl, sl, bt, scale, max(new_lens), out=out)
    expect = ref.paged_attention(q, kc, vc, qsl, sl, bt, scale, max(new_lens))
    assert not torch.isnan(out).any()
    assert rel_error(out, expect) < 1e-2
    out.fill_(float("nan"))
    paged_prefill_attention(q, kc, vc, qsl, sl, bt, scale, max(new_lens), out=out, heavy_first=True)
    assert not torch.isnan(out).any()
    assert rel_error(out, expect) < 1e-2


@gpu
@pytest.mark.parametrize("head_dim", [128, 64, 80])
def test_gpu_prefill_float32_tiles(head_dim):
    """float32 (exact products): the 32 x 16, 8-warp tiles and the 16-row ones for short queries, at real
    sizes, equal the float32 reference (benchmarks/kernel_resources.py: these tiles spill nothing)."""
    new_lens, cached = [700, 1, 13, 300], [0, 900, 40, 1200]
    q, kc, vc, qsl, sl, bt = make_paged(new_lens, cached, 32, 8, head_dim, 16, torch.float32, seed=5)
    scale = head_dim ** -0.5
    for lens in (new_lens, [1, 1, 1, 1]):  # long queries (32-row tiles), then decode-sized ones (16 rows)
        rows = torch.cat([torch.arange(int(qsl[b]), int(qsl[b]) + n) for b, n in enumerate(lens)]).cuda()
        starts = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(torch.int32).cuda()
        seq = (sl - torch.tensor(new_lens, device="cuda") + torch.tensor(lens, device="cuda")).to(torch.int32)
        out = torch.full_like(q[rows], float("nan"))
        paged_prefill_attention(q[rows], kc, vc, starts, seq, bt, scale, max(lens), out=out)
        assert_close(out, ref.paged_attention(q[rows], kc, vc, starts, seq, bt, scale, max(lens)), torch.float32)


@gpu
@pytest.mark.parametrize("head_dim", [128, 64, 96])
def test_gpu_decode_bf16(head_dim):
    context = [1, 17, 256, 1000, 4096, 4095, 3000, 64] * 8
    q, kc, vc, qsl, sl, bt = make_paged([1] * len(context), [c - 1 for c in context], 32, 8, head_dim, 16,
                                        torch.bfloat16, seed=2)
    expect = ref.paged_attention(q, kc, vc, qsl, sl, bt, head_dim ** -0.5, 1)
    for splits in (None, 1, 7):
        out = torch.full_like(q, float("nan"))
        paged_decode_attention(q, kc, vc, sl, bt, head_dim ** -0.5, 4096, out=out, num_splits=splits)
        assert not torch.isnan(out).any()
        assert rel_error(out, expect) < 1e-2


@gpu
@pytest.mark.parametrize("head_dim", [128, 64])
def test_gpu_attention_fp8_cache(head_dim):
    """bf16 queries over a float8_e4m3fn cache, prefill and decode, against the reference on the same cache."""
    new_lens, cached = [512, 1, 2000, 37], [3584, 4095, 2096, 1000]
    q, kc, vc, qsl, sl, bt = make_paged(new_lens, cached, 32, 8, head_dim, 16, torch.bfloat16, seed=4)
    kc, vc = kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn)
    scale = head_dim ** -0.5
    out = torch.full_like(q, float("nan"))
    paged_prefill_attention(q, kc, vc, qsl, sl, bt, scale, max(new_lens), out=out)
    assert not torch.isnan(out).any()
    assert rel_error(out, ref.paged_attention(q, kc, vc, qsl, sl, bt, scale, max(new_lens))) < 1e-2
    starts = torch.arange(len(new_lens) + 1, dtype=torch.int32, device=q.device)
    last = (qsl[1:] - 1).long()  # each sequence's last query row: a decode over its whole context
    for splits in (1, 7):
        out = torch.full_like(q[last], float("nan"))
        paged_decode_attention(q[last], kc, vc, sl, bt, scale, int(sl.max()), out=out, num_splits=splits)
        assert not torch.isnan(out).any()
        assert rel_error(out, ref.paged_attention(q[last], kc, vc, starts, sl, bt, scale, 1)) < 1e-2


@gpu
def test_gpu_small_ops_bf16():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 4096, generator=gen).to(torch.bfloat16).cuda()
    res = torch.randn(512, 4096, generator=gen).to(torch.bfloat16).cuda()
    w = torch.randn(4096, generator=gen).to(torch.bfloat16).cuda()
    out, res_out = rms_norm(x, w, 1e-5, res)
    expect, expect_res = ref.rms_norm(x, w, 1e-5, res)
    assert rel_error(out, expect) < 1e-2 and torch.equal(res_out, expect_res)
    g = torch.randn(512, 2 * 14336, generator=gen).to(torch.bfloat16).cuda()
    assert rel_error(silu_and_mul(g), ref.silu_and_mul(g)) < 1e-2
    k = torch.randn(300, 8, 128, generator=gen).to(torch.bfloat16).cuda()
    v = torch.randn(300, 8, 128, generator=gen).to(torch.bfloat16).cuda()
    slots = torch.randperm(64 * 16, generator=gen)[:300].cuda()
    slots[::7] = -1
    kc, vc = torch.randn(2, 64, 16, 8, 128, generator=gen).to(torch.bfloat16).cuda()
    ke, ve = kc.clone(), vc.clone()
    ref.write_kv_cache(k, v, ke, ve, slots)
    write_kv_cache(k, v, kc, vc, slots)
    assert torch.equal(kc, ke) and torch.equal(vc, ve)
