"""Graphs for steps with prompt tokens: the prefill kernel's fixed work list, the padded static buffers, and
the padded step against the eager one, from the kernel up to the engine.

On CPU the graph path runs with the eager model in place of the replay (PrefillGraphRunner.use_eager) and
the kernel in the Triton interpreter, so everything but torch.cuda.graph itself is exercised. The GPU
section captures real graphs (skipped without CUDA).
"""
from __future__ import annotations

import random

import pytest
import torch

from kernels import reference as ref
from kernels.prefill_tiles import NO_ROWS, max_tiles, prefill_block_m, tile_map
from model.batch import build_step_batch
from model.kv_cache import KVCache
from model.llama import load_model
from server.llm import LLM
from server.prefill_graphs import PrefillGraphRunner, PrefillInputs, token_buckets
from server.sampling_params import SamplingParams
from tests.test_kernels import TOL, make_paged

CUDA = torch.cuda.is_available()
BLOCK = 4


def test_token_buckets():
    assert token_buckets(2048) == [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1280, 1536,
                                   1792, 2048]
    assert token_buckets(100) == [16, 24, 32, 48, 64, 96, 100]  # the budget itself closes the list
    assert token_buckets(16) == [16] and token_buckets(8) == [8]
    assert token_buckets(1 << 16)[-1] == 4096  # larger steps run eagerly


# ---------------------------------------------------------------- the work list


@pytest.mark.parametrize("seed", range(6))
def test_tile_map_covers_every_row_once_within_the_bound(seed):
    rng = random.Random(seed)
    group, block_m = rng.choice([1, 4, 8]), rng.choice([16, 64, 128])
    q_lens = [rng.choice([1, 1, rng.randint(1, 300)]) for _ in range(rng.randint(1, 40))]
    size = max_tiles(sum(q_lens), len(q_lens), group, block_m)
    flat = tile_map(q_lens, group, block_m, size)
    entries = list(zip(flat[::2], flat[1::2]))
    assert len(entries) == size
    real = [(b, r) for b, r in entries if r != NO_ROWS]
    covered = sorted((b, row) for b, r in real for row in range(r, min(r + block_m, q_lens[b] * group)))
    assert covered == [(b, row) for b, n in enumerate(q_lens) for row in range(n * group)]
    assert all(r % block_m == 0 for _, r in real)
    assert entries[len(real):] == [(0, NO_ROWS)] * (size - len(real))  # padding only at the end
    with pytest.raises(ValueError, match="do not fit"):
        tile_map(q_lens, group, block_m, len(real) - 1)


def test_prefill_block_m_follows_the_eager_launcher():
    assert prefill_block_m(63, 128) == 16 and prefill_block_m(64, 128) == 64
    assert prefill_block_m(128, 128) == 128 and prefill_block_m(128, 80) == 128  # 80 pads to 128 lanes
    assert prefill_block_m(4096, 64) == 64
    # float32 queries: 32-row tiles, 16 for short queries (tests/test_kernel_compile.py: no register spills)
    assert prefill_block_m(4096, 128, float32=True) == 32 and prefill_block_m(31, 64, float32=True) == 16


# ---------------------------------------------------------------- the kernel with a work list

KERNEL_CASES = [  # (new tokens per sequence, cached before them, heads, kv heads, head dim, block size)
    ([37, 1, 1, 9], [0, 13, 70, 5], 8, 2, 32, 8),   # a prompt, two decode rows, a chunk after a prefix
    ([70, 1], [20, 33], 4, 4, 64, 16),              # GQA ratio 1
    ([5, 50, 1], [0, 0, 100], 8, 1, 16, 4),         # ratio 8 (MQA)
    ([23], [0], 4, 2, 80, 8),                       # head dim 80: padded lanes
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", range(len(KERNEL_CASES)))
@pytest.mark.parametrize("block_m", [None, 16])
def test_prefill_kernel_with_a_padded_work_list(case, dtype, block_m):
    """The step padded as a graph runs it: more q rows than tokens, a work list longer than its entries.
    Real rows equal the reference; padding rows stay as poisoned (no program writes them)."""
    from kernels.dispatch import paged_attention
    new, cached, heads, kv_heads, head_dim, bs = KERNEL_CASES[case]
    q, kc, vc, qsl, sl, bt = make_paged(new, cached, heads, kv_heads, head_dim, bs, dtype, seed=case)
    real, group = q.shape[0], heads // kv_heads
    bucket = real + 11
    block_m = block_m or prefill_block_m(bucket * group, head_dim)
    size = max_tiles(bucket, len(new) + 2, group, block_m) + 3
    tiles = torch.tensor(tile_map(new, group, block_m, size), dtype=torch.int32)
    q_padded = torch.cat([q, torch.randn(bucket - real, heads, head_dim).to(dtype)])
    out = torch.full_like(q_padded, float("nan"))
    got = paged_attention(q_padded, kc, vc, qsl, sl, bt, 0.3, bucket, 0, out=out, tiles=tiles, tile_rows=block_m)
    assert got is out
    expect = ref.paged_attention(q, kc, vc, qsl, sl, bt, 0.3)
    assert not out[:real].isnan().any(), "some real rows were never written"
    torch.testing.assert_close(out[:real].float(), expect.float(), **TOL[dtype])
    assert out[real:].isnan().all()


# ---------------------------------------------------------------- the static buffers


def step_rows(rng, q_lens, cached, max_blocks):
    return [([rng.randrange(3, 300) for _ in range(n)], c,
             rng.sample(range(200), min(max_blocks, -(-(n + c) // BLOCK))), -1) for n, c in zip(q_lens, cached)]


def test_static_buffers_hold_exactly_the_padded_step():
    """A smaller step after a bigger one: the view equals build_step_batch's step on the real part, padding
    past it (slot -1, no queries, an inert work list), whatever the bigger step left behind."""
    rng = random.Random(3)
    inputs = PrefillInputs([16, 32, 64], max_seqs=8, max_blocks_per_seq=20, group=2, head_dim=16,
                           device=torch.device("cpu"))
    inputs.load(step_rows(rng, [30, 1, 1, 20, 1], [0, 9, 40, 17, 3], 20), BLOCK, [29, 30, 31, 51, 52], 64)
    rows = step_rows(rng, [9, 1, 3], [0, 12, 5], 20)
    assert inputs.bucket_for(13, 3) == 16 and inputs.bucket_for(65, 1) is None and inputs.bucket_for(8, 9) is None
    inputs.load(rows, BLOCK, [8, 9], 16)
    got = inputs.view(16)
    want = build_step_batch([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], BLOCK)
    for name in ("input_ids", "positions", "slot_mapping"):
        assert getattr(got, name)[:13].tolist() == getattr(want, name).tolist(), name
    assert got.input_ids[13:].tolist() == [0] * 3 and got.positions[13:].tolist() == [0] * 3
    assert got.slot_mapping[13:].tolist() == [-1] * 3
    assert got.query_start_loc.tolist() == want.query_start_loc.tolist() + [13] * 5
    assert got.seq_lens.tolist() == want.seq_lens.tolist() + [0] * 5
    for b, (_, _, table, _) in enumerate(rows):
        assert got.block_tables[b, :len(table)].tolist() == table
    assert inputs.logits_rows(2).tolist() == [8, 9]
    assert got.attention_tile_rows == prefill_block_m(32, 16) == 16
    flat = got.attention_tiles.tolist()
    assert flat == tile_map([9, 1, 3], 2, 16, len(flat) // 2)


# ---------------------------------------------------------------- the model: padded == eager


@pytest.fixture(scope="module")
def tiny_models(tiny_llama_dir):
    return {backend: load_model(tiny_llama_dir, attention_backend=backend) for backend in ("torch", "triton")}


BACKENDS = ["torch"] + ([] if CUDA else ["triton"])  # Triton on CPU tensors needs the interpreter


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_prefill_step_equals_eager_step(tiny_models, backend):
    """A mixed step (a new prompt, a chunk after cached tokens, two decode rows) through the static path:
    the sampled rows' logits and every K/V slot equal the eager step's; padding writes nothing."""
    model = tiny_models[backend]
    rng = random.Random(5)
    q_lens, cached = [13, 6, 1, 1], [0, 9, 17, 4]
    num_blocks = sum(-(-(n + c) // BLOCK) for n, c in zip(q_lens, cached)) + 4
    order = list(range(num_blocks))
    rng.shuffle(order)
    tables, used = [], 0
    for n, c in zip(q_lens, cached):
        k = -(-(n + c) // BLOCK)
        tables.append(order[used:used + k])
        used += k
    cache = KVCache.allocate(model.config, num_blocks, BLOCK, torch.float32, "cpu")
    cache.storage.normal_()  # the cached prefixes' K/V: random, not zeros
    slots_before = cache.storage.clone()
    tokens = [[rng.randrange(3, 300) for _ in range(n)] for n in q_lens]
    logits_rows = [12, 19, 20]  # the prompt's last, the two decode rows (the chunk samples nothing)
    eager_cache = KVCache(cache.storage.clone())
    with torch.inference_mode():
        want = model(build_step_batch(tokens, cached, tables, BLOCK, logits_indices=logits_rows), eager_cache)
        graphs = PrefillGraphRunner(model, cache, [16, 32], 8, 256, BLOCK, torch.device("cpu")).use_eager()
        got = graphs.run([(t, c, table, -1) for t, c, table in zip(tokens, cached, tables)], logits_rows)
    assert graphs.replays == {32: 1}
    assert got.shape == want.shape and (got - want).abs().max() < 1e-4
    written = cache.storage != slots_before
    assert torch.equal(written, eager_cache.storage != slots_before)  # the same slots, and only those
    torch.testing.assert_close(cache.storage, eager_cache.storage, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- the engine, token for token


def test_engine_prefill_graph_path_equals_eager_engine(tiny_llama_dir):
    """Prompts of up to 60 tokens against a 32-token budget: whole prompts, chunks after cached tokens and
    decodes share steps. Buckets 16..32 take them all; tokens equal the eager engine's."""
    cfg = dict(dtype="float32", device="cpu", kv_cache_memory="2MiB", max_num_batched_tokens=32, max_num_seqs=8)
    rng = random.Random(11)
    prompts = [[1] + [rng.randrange(3, 384) for _ in range(rng.randint(2, 60))] for _ in range(6)]
    params = [SamplingParams(temperature=0.0, max_new_tokens=4 + 2 * i) for i in range(6)]
    eager, graphed = LLM(str(tiny_llama_dir), **cfg), LLM(str(tiny_llama_dir), **cfg)
    graphed.engine.runner.use_graph_path_eagerly()
    want = [r.token_ids for r in eager.generate(prompts, params)]
    got = [r.token_ids for r in graphed.generate(prompts, params)]
    assert got == want
    prefill = graphed.engine.runner.prefill_graphs
    assert set(prefill.replays) <= {16, 24, 32} and prefill.replays[32] >= 4  # full-budget steps and chunks
    # /metrics' gqaserve_engine_steps_total{path=...}: every step counted on the path it took
    from server.async_engine import engine_stats
    from server.metrics import ServerMetrics
    stats = engine_stats(graphed.engine)
    assert stats.prefill_graph_steps == sum(prefill.replays.values())
    assert stats.decode_graph_steps == sum(graphed.engine.runner.graphs.replays.values()) > 0
    assert stats.num_steps == stats.decode_graph_steps + stats.prefill_graph_steps  # none ran eagerly
    text = ServerMetrics(lambda: stats).render().decode()
    assert f'gqaserve_engine_steps_total{{path="prefill_graph"}} {float(stats.prefill_graph_steps)}' in text
    assert 'gqaserve_engine_steps_total{path="eager"} 0.0' in text
    eager_stats = engine_stats(eager.engine)
    assert eager_stats.decode_graph_steps == eager_stats.prefill_graph_steps == 0 < eager_stats.num_steps


def test_steps_past_the_largest_bucket_run_eagerly(tiny_llama_dir):
    cfg = dict(dtype="float32", device="cpu", kv_cache_memory="2MiB", max_num_batched_tokens=64, max_num_seqs=4)
    llm = LLM(str(tiny_llama_dir), **cfg)
    runner = llm.engine.runner
    runner.use_graph_path_eagerly()
    runner.prefill_graphs = PrefillGraphRunner(runner.model, runner.kv_cache, [16], 4, runner.max_model_len,
                                               runner.block_size, runner.device).use_eager()
    params = SamplingParams(temperature=0.0, max_new_tokens=3)
    assert len(llm.generate([[1] + list(range(3, 43))], params)[0].token_ids) == 3  # 41 tokens: eager
    assert not runner.prefill_graphs.replays
    assert len(llm.generate([[1, 5, 6]], params)[0].token_ids) == 3  # 3 tokens: bucket 16
    assert runner.prefill_graphs.replays == {16: 1}


# ---------------------------------------------------------------- GPU: real capture and replay

gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")


@gpu
def test_gpu_prefill_graphs_equal_enforce_eager(tiny_llama_dir):
    """float32 so greedy ties cannot flip between padded and unpadded matmuls; prompts longer than the budget
    so chunks after cached tokens replay too, launched while the previous step is in flight."""
    import gc
    cfg = dict(dtype="float32", device="cuda", gpu_memory_utilization=0.05, max_num_seqs=16,
               max_num_batched_tokens=64)
    rng = random.Random(2)
    prompts = [[1] + [rng.randrange(3, 384) for _ in range(rng.randint(2, 150))] for _ in range(7)]
    params = [SamplingParams(temperature=0.0, max_new_tokens=5 + 3 * i) for i in range(7)]
    gc.collect()
    torch.cuda.empty_cache()
    eager = LLM(str(tiny_llama_dir), enforce_eager=True, **cfg)
    want = [r.token_ids for r in eager.generate(prompts, params)]
    del eager
    gc.collect()
    torch.cuda.empty_cache()
    graphed = LLM(str(tiny_llama_dir), **cfg)
    prefill = graphed.engine.runner.prefill_graphs
    assert prefill is not None and sorted(prefill.graphs) == [16, 24, 32, 48, 64]
    got = [r.token_ids for r in graphed.generate(prompts, params)]
    assert got == want
    assert sum(prefill.replays.values()) >= 7 and prefill.replays[64] > 0
    assert prefill.ahead > 0  # overlap scheduling: chunks joined by decode rows whose ids were in flight
