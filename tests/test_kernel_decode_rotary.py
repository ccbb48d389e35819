"""Decode attention with rotary + cache write folded in (kernels/decode_rotary.py) against its reference
composition and against the two kernels it replaces.

On CPU the kernel runs in the Triton interpreter, in float32 and float16. Each case: random q/k/v as column
slices of one fused row (as the model hands them over), contexts of 1 to 150 tokens with a shuffled block
table, a padding row (slot -1, seq_len 0) in the batch, and random cached K/V around the new tokens' slots,
which start as NaN: a new token that is not written, or written after the loop read it, turns its
sequence's output NaN. The output starts as NaN too, and unused cache slots stay NaN (a stray write or read
shows).
"""
from __future__ import annotations

import pytest
import torch

from kernels import reference as ref
from kernels.attention_decode import paged_decode_attention
from kernels.decode_rotary import decode_rotary_attention
from kernels.rotary_cache import rotary_and_write_kv
from tests.test_kernel_rotary_cache import CUDA, DEVICE, MAX_POS, rope_table, seed_of

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


def make_step(contexts, heads, kv_heads, head_dim, block_size, dtype, seed, cache_dtype=None, device=DEVICE):
    """One decode step: contexts count the new token (0 = a padding row). Returns the kernel's arguments
    but scale and max_seq_len, as a dict, with NaN in every cache slot no cached token owns."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(contexts)
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = (x.view(batch, n, head_dim) for x, n in ((q, heads), (k, kv_heads), (v, kv_heads)))
    blocks_per_seq = [-(-c // block_size) for c in contexts]
    num_blocks = sum(blocks_per_seq) + 2
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(batch, max(blocks_per_seq) + 1, dtype=torch.int32)
    shape = (num_blocks * block_size, kv_heads, head_dim)
    k_cache, v_cache = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    cached = torch.zeros(num_blocks * block_size, dtype=torch.bool)  # slots that hold a cached token
    slots, used = [], 0
    for b, (ctx, n) in enumerate(zip(contexts, blocks_per_seq)):
        tables[b, :n] = perm[used:used + n]
        used += n
        seq_slots = [int(tables[b, p // block_size]) * block_size + p % block_size for p in range(ctx)]
        cached[seq_slots[:-1]] = True
        slots.append(seq_slots[-1] if ctx else -1)
    k_cache[~cached] = float("nan")
    v_cache[~cached] = float("nan")
    k_cache, v_cache = (x.view(num_blocks, block_size, kv_heads, head_dim) for x in (k_cache, v_cache))
    positions = torch.tensor([max(c - 1, 0) for c in contexts])
    cache_dtype = cache_dtype or dtype
    to = dict(device=device)
    return dict(q=q.to(**to), k=k.to(**to), v=v.to(**to), positions=positions.to(**to),
                cos_sin_cache=rope_table(head_dim, max(MAX_POS, max(contexts)), device=device),
                k_cache=k_cache.to(cache_dtype).to(**to), v_cache=v_cache.to(cache_dtype).to(**to),
                slot_mapping=torch.tensor(slots, **to),
                seq_lens=torch.tensor(contexts, dtype=torch.int32, **to), block_tables=tables.to(**to))


def clone_step(step):
    return {n: (t.clone() if n in ("k_cache", "v_cache") else t) for n, t in step.items()}


def run_fused(step, scale, **kw):
    out = torch.full(step["q"].shape, float("nan"), dtype=step["q"].dtype, device=step["q"].device)
    got = decode_rotary_attention(**step, scale=scale, max_seq_len=int(step["seq_lens"].max()), out=out, **kw)
    assert got is out
    return out


def run_unfused(step, scale, **kw):
    """The two kernels the fused one replaces, as a decode step ran them."""
    q = rotary_and_write_kv(step["q"], step["k"], step["v"], step["positions"], step["cos_sin_cache"],
                            step["k_cache"], step["v_cache"], step["slot_mapping"])
    return paged_decode_attention(q, step["k_cache"], step["v_cache"], step["seq_lens"], step["block_tables"],
                                  scale, int(step["seq_lens"].max()), **kw)


def assert_caches(got, expect, dtype):
    for name in ("k_cache", "v_cache"):
        torch.testing.assert_close(got[name].float(), expect[name].float(), equal_nan=True, **TOL[dtype])


CONTEXTS = [1, 6, 40, 0, 150]  # includes the new token; 0 = a padding row of a captured batch
# (num_heads, num_kv_heads, head_dim, block_size): GQA ratios 1, 4, 8; head dims 64, 80, 96, 128
CONFIGS = [(4, 4, 64, 16), (8, 2, 80, 8), (8, 1, 96, 16), (16, 2, 128, 4)]
IDS = ["g1-d64", "g4-d80", "g8-d96", "g8-d128"]


@pytest.mark.skipif(CUDA, reason="the exact comparison is the interpreter's; the GPU test below uses tolerances")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("num_splits", [None, 1, 3])
@pytest.mark.parametrize("reduce", ["reduce-kernel", "last-split-reduces"])
def test_decode_rotary_attention(reduce, num_splits, cfg, dtype):
    heads, kv_heads, head_dim, block_size = cfg
    step = make_step(CONTEXTS, heads, kv_heads, head_dim, block_size, dtype, seed=seed_of(num_splits, cfg, dtype))
    scale = head_dim ** -0.5
    expect_step, unfused_step = clone_step(step), clone_step(step)
    expect = ref.decode_rotary_attention(**expect_step, scale=scale)
    tickets = torch.zeros(len(CONTEXTS) * kv_heads + 5, dtype=torch.int32) if reduce == "last-split-reduces" else None
    out = run_fused(step, scale, num_splits=num_splits, block_n=16, tickets=tickets)
    assert tickets is None or (tickets == 0).all(), "the last split resets its counter for the next launch"
    assert not out.isnan().any(), "an output row was never written, or the new token was read before its write"
    real = torch.tensor(CONTEXTS) > 0  # the reference has no output for an empty context (NaN)
    torch.testing.assert_close(out[real].float(), expect[real].float(), **TOL[dtype])
    assert (out[~real] == 0).all(), "a padding row attends to nothing"
    assert_caches(step, expect_step, dtype)
    written = (~step["k_cache"].isnan()).all(-1).all(-1).sum().item()
    assert written == sum(max(c, 0) for c in CONTEXTS), "the new tokens' slots, and only those, are written"
    # bit for bit what the unfused pair gives (same rounding of the rotated q and k); the last split sums the
    # partials in its own order, so there only to float32 rounding
    unfused = run_unfused(unfused_step, scale, num_splits=num_splits, block_n=16)
    if tickets is None:
        assert torch.equal(out, unfused)
    else:
        torch.testing.assert_close(out, unfused, atol=1e-6, rtol=1e-6)
    assert torch.equal(step["k_cache"].nan_to_num(), unfused_step["k_cache"].nan_to_num())


@pytest.mark.skipif(CUDA, reason="interpreter case")
@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float16), (torch.float16, torch.float8_e4m3fn)],
                         ids=["fp32-fp16", "fp16-fp8"])
def test_decode_rotary_into_a_narrower_cache(dtype, cache_dtype):
    """The cache gets k rounded to k's dtype, then to the cache's: the same bytes as the unfused pair."""
    step = make_step([3, 70, 17], 8, 2, 64, 16, dtype, seed=11, cache_dtype=cache_dtype)
    unfused_step = clone_step(step)
    out = run_fused(step, 0.125, num_splits=2, block_n=16)
    unfused = run_unfused(unfused_step, 0.125, num_splits=2, block_n=16)
    assert not out.isnan().any()
    assert torch.equal(out, unfused)
    for name in ("k_cache", "v_cache"):
        assert torch.equal(step[name].view(torch.uint8), unfused_step[name].view(torch.uint8))


def test_last_split_reduces_again_on_a_second_launch():
    """The ticket counters a launch leaves behind serve the next launch (a graph replays with the same
    buffer): twice over the same inputs, the same output, with every split count."""
    tickets = torch.zeros(64, dtype=torch.int32, device=DEVICE)  # this test runs on a GPU too
    for num_splits in (2, 3, 5):
        step = make_step([9, 150, 77], 8, 2, 64, 8, torch.float32, seed=num_splits)
        first = run_fused(clone_step(step), 0.125, num_splits=num_splits, block_n=16, tickets=tickets)
        second = run_fused(clone_step(step), 0.125, num_splits=num_splits, block_n=16, tickets=tickets)
        plain = run_fused(clone_step(step), 0.125, num_splits=num_splits, block_n=16)
        assert torch.equal(first, second) and not first.isnan().any()
        torch.testing.assert_close(first, plain, atol=1e-6, rtol=1e-6)  # the reduce kernel's maths, reordered
    assert (tickets == 0).all()


@pytest.mark.skipif(CUDA, reason="interpreter case")
@pytest.mark.parametrize("num_splits", [7, 13])
def test_last_split_reads_only_the_splits_that_hold_keys(monkeypatch, num_splits):
    """More splits than a short context fills (as at batch 1 under a large max_model_len): the empty splits
    write no partials and the last split's reduce reads the used ones only. The partial buffers start as NaN,
    so a read of an unwritten split turns the output NaN; the result is the reduce kernel's."""
    import kernels.decode_rotary as decode_rotary
    real_split_partials = decode_rotary.split_partials

    def poisoned(*args):
        parts = real_split_partials(*args)
        for p in parts:
            p.fill_(float("nan"))
        return parts

    step = make_step([9, 150, 0, 77, 1], 8, 2, 64, 8, torch.float32, seed=num_splits)
    tickets = torch.zeros(16, dtype=torch.int32)
    monkeypatch.setattr(decode_rotary, "split_partials", poisoned)
    out = run_fused(clone_step(step), 0.125, num_splits=num_splits, block_n=16, tickets=tickets)
    monkeypatch.undo()
    assert not out.isnan().any(), "the reduce read a split that holds no keys"
    plain = run_fused(clone_step(step), 0.125, num_splits=num_splits, block_n=16)
    torch.testing.assert_close(out, plain, atol=1e-6, rtol=1e-6)
    assert (tickets == 0).all()


def test_all_padding_writes_nothing():
    step = make_step([0, 0], 4, 2, 64, 8, torch.float32, seed=3)
    before = step["k_cache"].clone()
    out = run_fused(step, 0.125)
    assert (out == 0).all()
    assert torch.equal(step["k_cache"].isnan(), before.isnan())


# ---------------------------------------------------------------- in the model
def prefill_then_decode(model, block_size: int = 4):
    """A prefill step then a decode-only step (one row a padding row: slot -1, seq_len 0, as a captured
    batch pads) through a NaN-poisoned cache with shuffled blocks -> (decode logits, cache storage)."""
    from model.batch import build_step_batch
    from model.kv_cache import KVCache
    cache = KVCache.allocate(model.config, 24, block_size, torch.float32, "cpu")
    cache.storage.fill_(float("nan"))
    free = torch.randperm(24, generator=torch.Generator().manual_seed(0)).tolist()
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n in (14, 6, 9)]
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, model.config.vocab_size, (n,), generator=gen).tolist() for n in (14, 6, 9)]
    with torch.inference_mode():
        model(build_step_batch([s[:-1] for s in seqs], [0, 0, 0], tables, block_size), cache)
        decode = build_step_batch([s[-1:] for s in seqs], [13, 5, 8], tables, block_size)
        assert decode.max_query_len == 1
        decode.slot_mapping[1] = -1  # a padding row
        decode.seq_lens[1] = 0
        logits = model(decode, cache)
    return logits, cache.storage


@pytest.mark.skipif(CUDA, reason="Triton on CPU tensors needs the interpreter; test_gpu_model covers CUDA")
def test_model_decode_step_fused_equals_unfused_and_torch(tiny_llama_dir):
    from model.llama import load_model
    torch_logits, torch_cache = prefill_then_decode(load_model(tiny_llama_dir, attention_backend="torch"))
    model = load_model(tiny_llama_dir, attention_backend="triton")
    unfused_logits, unfused_cache = prefill_then_decode(model)
    model.ops.decode_fusion = True
    calls = []
    real = model.ops._decode_rotary
    model.ops._decode_rotary = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    logits, cache = prefill_then_decode(model)
    assert len(calls) == model.config.num_hidden_layers, "the decode step took the fused kernel in every layer"
    assert torch.equal(logits, unfused_logits)
    assert torch.equal(cache.nan_to_num(), unfused_cache.nan_to_num())
    assert torch.equal(cache.isnan(), unfused_cache.isnan())
    real_rows = [0, 2]
    torch.testing.assert_close(logits[real_rows], torch_logits[real_rows], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cache, torch_cache, atol=1e-5, rtol=1e-5, equal_nan=True)


@pytest.mark.skipif(CUDA, reason="interpreter case; test_gpu_model covers CUDA")
def test_engine_setting_reaches_the_kernel_and_keeps_the_tokens(tiny_llama_dir):
    """EngineConfig.decode_fusion: the engine's decode steps take the fused kernel (splits reduced by the
    last one: the interpreter's split heuristic gives several splits at these batch sizes), and greedy
    tokens of requests of different lengths batched together equal the default engine's."""
    from tests.tiny_models import greedy_token_ids, tiny_triton_llm
    runs = []
    for fuse in (False, True):
        llm = tiny_triton_llm(tiny_llama_dir, decode_fusion=fuse)
        ops = llm.engine.runner.model.ops
        assert ops.decode_fusion is fuse
        calls = []
        real = ops._decode_rotary
        ops._decode_rotary = lambda *a, **kw: calls.append(1) or real(*a, **kw)
        runs.append(greedy_token_ids(llm))
        assert bool(calls) is fuse
        assert (ops.tickets == 0).all()
    assert runs[0] == runs[1] and all(len(t) == 6 for t in runs[0])


# ---------------------------------------------------------------- GPU: bfloat16 at real size
@pytest.mark.skipif(not CUDA, reason="needs CUDA (bfloat16 at real sizes)")
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "fp8"])
@pytest.mark.parametrize("batch,context,head_dim", [(1, 512, 64), (64, 1000, 128), (7, 3000, 96)])
@pytest.mark.parametrize("last_split_reduces", [False, True], ids=["reduce-kernel", "last-split-reduces"])
def test_gpu_decode_rotary_bf16(last_split_reduces, batch, context, head_dim, cache_dtype):
    contexts = [context - 13 * i for i in range(batch)]
    step = make_step(contexts, 32, 8, head_dim, 16, torch.bfloat16, seed=batch, cache_dtype=cache_dtype)
    expect_step, unfused_step = clone_step(step), clone_step(step)
    scale = head_dim ** -0.5
    expect = ref.decode_rotary_attention(**expect_step, scale=scale)
    tickets = torch.zeros(batch * 8, dtype=torch.int32, device=DEVICE) if last_split_reduces else None
    out = run_fused(step, scale, num_splits=None if batch == 64 else 8, tickets=tickets)
    unfused = run_unfused(unfused_step, scale, num_splits=None if batch == 64 else 8)
    assert tickets is None or (tickets == 0).all()
    assert not out.isnan().any()
    err = ((out.float() - expect.float()).norm() / expect.float().norm()).item()  # every row is real here
    assert err < 1e-2, err
    torch.testing.assert_close(out.float(), unfused.float(), atol=2e-2, rtol=2e-2)
    tol = dict(atol=1e-2, rtol=1e-2) if cache_dtype == torch.bfloat16 else dict(atol=2 ** -9, rtol=0.13)
    for name in ("k_cache", "v_cache"):
        torch.testing.assert_close(step[name].float(), expect_step[name].float(), equal_nan=True, **tol)



@pytest.mark.skipif(not CUDA or torch.cuda.get_device_capability() < (9, 0), reason="PDL needs a GPU of sm_90+")
@pytest.mark.parametrize("batch,context,head_dim", [(1, 512, 64), (16, 1000, 128)])
def test_gpu_decode_rotary_with_programmatic_dependent_launch(batch, context, head_dim):
    """pdl=True (EngineConfig.skinny_matmul_pdl): the launch may start before the kernel just before it has
    ended, and reads only the step's inputs and cached keys until it waits on that kernel. That kernel here
    writes q, k and v (copies into NaN-filled buffers, as the qkv projection would): the output and the
    caches are the plain launch's, bit for bit."""
    contexts = [context - 13 * i for i in range(batch)]
    step = make_step(contexts, 32, 8, head_dim, 16, torch.bfloat16, seed=batch)
    plain_step, pdl_step = clone_step(step), clone_step(step)
    scale = head_dim ** -0.5
    tickets = torch.zeros(batch * 8, dtype=torch.int32, device=DEVICE)
    plain = run_fused(plain_step, scale, num_splits=8, tickets=tickets)
    for name in ("q", "k", "v"):
        pdl_step[name] = torch.full_like(step[name], float("nan"))
    out = torch.full_like(plain, float("nan"))
    for name in ("q", "k", "v"):
        pdl_step[name].copy_(step[name])
    decode_rotary_attention(**pdl_step, scale=scale, max_seq_len=context, out=out, num_splits=8, tickets=tickets,
                            pdl=True)
    assert torch.equal(out, plain)
    assert (tickets == 0).all()
    for name in ("k_cache", "v_cache"):
        assert torch.equal(pdl_step[name].nan_to_num(), plain_step[name].nan_to_num())
