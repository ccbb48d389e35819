"""Decode CUDA graphs: padding rules, static buffers, and the graph path against the eager path.

On CPU the graph path runs with the eager model in place of the replay (DecodeGraphRunner.use_eager),
so everything but torch.cuda.graph itself is exercised: padding, the copies into the static buffers, the
captured max_seq_len (a fixed split count with empty splits), and the engine end to end.
The GPU section captures real graphs (skipped without CUDA).
"""
from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from kernels import reference as ref
from model.batch import StepBatch, build_step_batch
from model.kv_cache import KVCache
from model.llama import load_model
from server.cuda_graphs import DecodeGraphRunner, DecodeInputs, capture_sizes, is_graphable, pad_decode_batch
from server.llm import LLM
from server.sampling_params import SamplingParams

CUDA = torch.cuda.is_available()
BLOCK = 4


def test_capture_sizes():
    assert capture_sizes(256, 2048) == [1, 2, 4] + list(range(8, 257, 8))
    assert capture_sizes(20, 2048) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(3, 2048) == [1, 2, 3]
    assert capture_sizes(1024, 64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]  # token budget caps it
    assert capture_sizes(1024, 4096)[-1] == 512


def decode_batch(lens: list[int], tables: list[list[int]], tokens: list[int] | None = None) -> StepBatch:
    """One new token for each sequence after lens[b] - 1 cached tokens."""
    tokens = tokens or [5 + b for b in range(len(lens))]
    return build_step_batch([[t] for t in tokens], [n - 1 for n in lens], tables, BLOCK)


def test_pad_decode_batch_rules():
    batch = decode_batch([3, 9], [[7], [2, 5, 1]])
    padded = pad_decode_batch(batch, 4, max_seq_len=512)
    assert padded.num_seqs == padded.num_tokens == 4 and padded.max_seq_len == 512 and padded.is_decode_only
    assert padded.input_ids.tolist() == [5, 6, 0, 0]
    assert padded.positions.tolist() == [2, 8, 0, 0]
    assert padded.slot_mapping.tolist() == [7 * BLOCK + 2, 1 * BLOCK + 0, -1, -1]
    assert padded.seq_lens.tolist() == [3, 9, 0, 0]
    assert padded.block_tables.tolist() == [[7, 0, 0], [2, 5, 1], [0, 0, 0], [0, 0, 0]]
    assert padded.query_start_loc.tolist() == [0, 1, 2, 3, 4]
    assert padded.logits_indices.tolist() == [0, 1, 2, 3]
    prefill = build_step_batch([[1, 2, 3]], [0], [[0]], BLOCK)
    assert not is_graphable(prefill) and is_graphable(batch)


def test_static_buffers_hold_exactly_the_padded_batch():
    """A smaller step after a bigger one: stale real rows must become padding again."""
    inputs = DecodeInputs(8, 5, 512, torch.device("cpu"))
    big = decode_batch([3, 9, 14, 2, 17], [[7], [2, 5, 1], [9, 8, 3, 4], [6], [10, 11, 12, 13, 14]])
    inputs.load(big, 8)
    small = decode_batch([6, 1, 4], [[3, 4], [15], [16]])
    inputs.load(small, 4)
    got, want = inputs.view(4), pad_decode_batch(small, 4, max_seq_len=512)
    for name in ("input_ids", "positions", "slot_mapping", "seq_lens", "query_start_loc", "logits_indices"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert torch.equal(got.block_tables[:, :2], want.block_tables)  # past its width: stale, never read
    assert got.block_tables[3].tolist() == [0] * 5 and got.max_seq_len == 512 and got.max_query_len == 1


# ---------------------------------------------------------------- the model: padded == unpadded


@pytest.fixture(scope="module")
def tiny_models(tiny_llama_dir):
    return {backend: load_model(tiny_llama_dir, attention_backend=backend) for backend in ("torch", "triton")}


def prefilled_cache(model, prompt_lens: list[int], seed: int = 0):
    """A NaN-poisoned cache with shuffled blocks holding the prompts; returns (cache, tables, last tokens)."""
    rng = random.Random(seed)
    num_blocks = sum(-(-(n + 1) // BLOCK) for n in prompt_lens) + 4
    free = list(range(num_blocks))
    rng.shuffle(free)
    cache = KVCache.allocate(model.config, num_blocks, BLOCK, torch.float32, "cpu")
    cache.storage.fill_(float("nan"))
    prompts = [[rng.randrange(3, model.config.vocab_size) for _ in range(n)] for n in prompt_lens]
    tables = [[free.pop() for _ in range(-(-(n + 1) // BLOCK))] for n in prompt_lens]
    with torch.inference_mode():
        model(build_step_batch(prompts, [0] * len(prompts), tables, BLOCK), cache)
    return cache, tables, [p[-1] for p in prompts]


# Triton on CPU tensors needs the interpreter, which conftest turns on only without CUDA; on a GPU machine
# test_gpu_graph_logits_equal_eager covers the Triton model on CUDA.
BACKENDS = ["torch"] + ([] if CUDA else ["triton"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_seqs, padded", [(3, 4), (5, 8)])
def test_padded_step_equals_unpadded_step(tiny_models, backend, num_seqs, padded):
    model = tiny_models[backend]
    lens = [4, 11, 7, 1, 9][:num_seqs]
    cache, tables, last = prefilled_cache(model, lens, seed=num_seqs)
    batch = build_step_batch([[t] for t in last], lens, tables, BLOCK)
    eager_cache, before = KVCache(cache.storage.clone()), cache.storage.clone()
    with torch.inference_mode():
        want = model(batch, eager_cache)
        graphs = DecodeGraphRunner(model, cache, [1, 2, 4, 8], model.config.max_position_embeddings, BLOCK,
                                   torch.device("cpu")).use_eager()
        size = graphs.padded_size(batch)
        got = graphs.run(batch, size)
    assert size == padded and graphs.replays == {padded: 1}
    if backend == "triton":  # the captured max_seq_len asks for more splits than the real one: some are empty
        from kernels.attention_decode import choose_num_splits
        kvh = model.config.num_kv_heads
        assert choose_num_splits(padded, kvh, graphs.inputs.max_seq_len, batch.input_ids.device) > \
            choose_num_splits(num_seqs, kvh, batch.max_seq_len, batch.input_ids.device)
    assert got.shape == want.shape and (got - want).abs().max() < 1e-4
    # Padding rows wrote nothing: exactly the real rows' slots changed (they held the NaN poison), with
    # the unpadded step's values (up to float rounding: the matmuls ran at another M).
    def by_slot(t):  # [layers, 2, blocks, BLOCK, KVH, D] -> [blocks * BLOCK, everything else]
        return t.flatten(2, 3).transpose(0, 2).flatten(1)
    now, then = by_slot(cache.storage), by_slot(before)
    changed = ~((now == then) | (now.isnan() & then.isnan())).all(1)
    assert changed.nonzero().flatten().tolist() == sorted(batch.slot_mapping.tolist())
    assert torch.equal(cache.storage.isnan(), eager_cache.storage.isnan())
    torch.testing.assert_close(cache.storage.nan_to_num(), eager_cache.storage.nan_to_num(), atol=1e-5, rtol=1e-5)


def test_only_decode_steps_within_the_largest_size_take_the_graph_path(tiny_models):
    model = tiny_models["torch"]
    cache = KVCache.allocate(model.config, 16, BLOCK, torch.float32, "cpu")
    graphs = DecodeGraphRunner(model, cache, [1, 2, 4], 512, BLOCK, torch.device("cpu"))
    decode = decode_batch([3, 2, 5], [[0], [1], [2, 3]])
    assert graphs.padded_size(decode) is None  # nothing captured (use_eager / capture not called)
    graphs.use_eager()
    assert graphs.padded_size(decode) == 4
    assert graphs.padded_size(decode_batch([2] * 5, [[i] for i in range(5)])) is None  # > largest
    assert graphs.padded_size(build_step_batch([[1, 2], [3]], [0, 4], [[0], [1, 2]], BLOCK)) is None  # mixed
    too_wide = decode_batch([3], [list(range(129))])  # more blocks than max_model_len allows
    assert graphs.padded_size(too_wide) is None


def test_sampled_rows_subset_is_gathered(tiny_models):
    """A 1-token prefill chunk that does not sample yet: logits only for the rows that do."""
    model = tiny_models["torch"]
    lens = [4, 11, 7]
    cache, tables, last = prefilled_cache(model, lens)
    batch = build_step_batch([[t] for t in last], lens, tables, BLOCK)
    batch = replace(batch, logits_indices=torch.tensor([0, 2]))
    eager_cache = KVCache(cache.storage.clone())
    with torch.inference_mode():
        want = model(batch, eager_cache)
        got = DecodeGraphRunner(model, cache, [4], 512, BLOCK, torch.device("cpu")).use_eager().run(batch, 4)
    assert got.shape == (2, model.config.vocab_size) and (got - want).abs().max() < 1e-4


# ---------------------------------------------------------------- the decode kernel as captured


def test_decode_kernel_with_captured_split_count_and_padding_rows():
    """Captured with max_seq_len = max_model_len: many splits over short contexts (most of them empty),
    and seq_len-0 padding rows, which must come out as exact zeros."""
    from kernels.attention_decode import choose_num_splits, paged_decode_attention
    from tests.test_kernels import make_paged

    context = [1, 6, 40, 150, 1, 1]  # the last two become padding rows below
    q, kc, vc, qsl, sl, bt = make_paged([1] * 6, [c - 1 for c in context], 4, 2, 32, 8, torch.float32,
                                        seed=11)
    sl[4:] = 0
    bt[4:] = 0
    max_model_len = 4096
    assert choose_num_splits(6, 2, max_model_len, q.device) > 1
    expect = ref.paged_attention(q[:4], kc, vc, qsl[:5], sl[:4], bt[:4], 0.2, 1)
    for splits in (None, 16):
        out = torch.full_like(q, float("nan"))
        paged_decode_attention(q, kc, vc, sl, bt, 0.2, max_model_len, out=out, num_splits=splits)
        torch.testing.assert_close(out[:4], expect, atol=1e-4, rtol=1e-4)
        assert torch.equal(out[4:], torch.zeros_like(out[4:]))


# ---------------------------------------------------------------- the engine, token for token

def engine_prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 384) for _ in range(rng.randint(3, 30))] for _ in range(n)]


@pytest.mark.parametrize("num_prompts", [3, 5])
def test_engine_graph_path_equals_eager_engine(tiny_llama_dir, num_prompts):
    cfg = dict(dtype="float32", device="cpu", kv_cache_memory="2MiB", max_num_batched_tokens=256,
               max_num_seqs=8)
    eager, graphed = LLM(str(tiny_llama_dir), **cfg), LLM(str(tiny_llama_dir), **cfg)
    assert eager.engine.runner.graphs is None  # CPU: never captured
    graphed.engine.runner.use_graph_path_eagerly()
    ps = engine_prompts(num_prompts, seed=num_prompts)
    # different lengths, so the decode batch shrinks as sequences finish (5 -> 8, 3 -> 4, 2, 1)
    params = [SamplingParams(temperature=0.0, max_new_tokens=6 + 3 * i) for i in range(num_prompts)]
    want = [r.token_ids for r in eager.generate(ps, params)]
    got = [r.token_ids for r in graphed.generate(ps, params)]
    assert got == want
    replays = graphed.engine.runner.graphs.replays
    assert replays[4] > 0 and replays[1] > 0 and (num_prompts == 3 or replays[8] > 0)


def test_engine_graph_path_with_a_one_token_prefill_chunk(tiny_llama_dir):
    """15 decoding sequences leave 1 token of a 16-token budget: the newcomer's prompt goes in 1-token chunks
    that sample nothing until the last, inside decode-shaped steps that take the graph path."""
    cfg = dict(dtype="float32", device="cpu", kv_cache_memory="2MiB", max_num_batched_tokens=16,
               max_num_seqs=16)
    ps = engine_prompts(16, seed=7)
    ps[15] = ps[15][:5]
    results = []
    for graphed in (False, True):
        llm = LLM(str(tiny_llama_dir), **cfg)
        if graphed:
            llm.engine.runner.use_graph_path_eagerly()
        engine, out = llm.engine, {}
        params = SamplingParams(temperature=0.0, max_new_tokens=60)
        for i in range(15):
            engine.add_request(str(i), ps[i], params)
        while any(s.num_output_tokens == 0 for s in engine.scheduler.running) or engine.scheduler.waiting:
            for o in engine.step():
                out.setdefault(o.request_id, []).extend(o.new_token_ids)
        engine.add_request("late", ps[15], params)
        while engine.has_unfinished():
            for o in engine.step():
                out.setdefault(o.request_id, []).extend(o.new_token_ids)
        results.append(out)
        if graphed:
            assert llm.engine.runner.graphs.replays[16] >= 4  # the late prompt's 1-token chunks, then decodes
    assert results[0] == results[1] and len(results[1]["late"]) == 60


# ---------------------------------------------------------------- GPU: real capture and replay

gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def free_gpu_memory() -> None:
    """Each runner sizes its KV cache from what is free: drop what earlier tests left behind."""
    import gc
    gc.collect()
    torch.cuda.empty_cache()


def gpu_runner(model_dir, **kw):
    from server.engine_config import EngineConfig
    from server.model_runner import ModelRunner
    cfg = dict(model=str(model_dir), device="cuda", dtype="bfloat16", max_num_seqs=32, max_num_batched_tokens=256,
               gpu_memory_utilization=0.05, block_size=16)
    cfg.update(kw)
    return ModelRunner(EngineConfig(**cfg), str(model_dir))


@gpu
def test_gpu_graph_logits_equal_eager(tiny_llama_dir):
    free_gpu_memory()
    runner = gpu_runner(tiny_llama_dir)
    graphs = runner.graphs
    assert graphs is not None and sorted(graphs.graphs) == [1, 2, 4, 8, 16, 24, 32]
    rng = random.Random(0)
    next_block = 1
    for num_seqs in (1, 3, 17):
        lens = [rng.randint(1, 300) for _ in range(num_seqs)]
        tables = []
        for n in lens:
            k = -(-(n + 1) // runner.block_size)
            tables.append(list(range(next_block, next_block + k)))
            next_block += k
        prompts = [[rng.randrange(3, 384) for _ in range(n)] for n in lens]
        with torch.inference_mode():
            runner.model(build_step_batch(prompts, [0] * num_seqs, tables, runner.block_size, "cuda"),
                         runner.kv_cache)
            batch = build_step_batch([[p[-1]] for p in prompts], lens, tables, runner.block_size, "cuda")
            before = sum(graphs.replays.values())
            want = runner.model(batch, runner.kv_cache).clone()  # rewrites the same K/V into the same slots
            got = graphs.run(batch, graphs.padded_size(batch)).clone()
        assert sum(graphs.replays.values()) == before + 1
        assert got.shape == want.shape and not torch.isnan(got).any()
        rel = ((got - want).norm() / want.norm()).item()
        assert rel < 2e-2, (num_seqs, rel)
    assert graphs.replays == {1: 1, 4: 1, 24: 1}


@gpu
@pytest.mark.parametrize("overlap", [False, True])
def test_gpu_engine_with_graphs_equals_enforce_eager(tiny_llama_dir, overlap):
    """float32, so greedy ties cannot flip between the padded and unpadded matmuls. With overlap scheduling
    the sampled ids reach the host by an event-synchronised copy while the next step runs."""
    cfg = dict(dtype="float32", device="cuda", gpu_memory_utilization=0.05, max_num_seqs=16,
               max_num_batched_tokens=256)
    ps = engine_prompts(5, seed=1)
    params = [SamplingParams(temperature=0.0, max_new_tokens=6 + 3 * i) for i in range(5)]
    free_gpu_memory()
    eager = LLM(str(tiny_llama_dir), enforce_eager=True, **cfg)
    assert eager.engine.runner.graphs is None
    want = [r.token_ids for r in eager.generate(ps, params)]
    del eager
    free_gpu_memory()
    graphed = LLM(str(tiny_llama_dir), overlap_scheduling=overlap, **cfg)
    assert graphed.engine.runner.graphs is not None
    assert [r.token_ids for r in graphed.generate(ps, params)] == want
    assert sum(graphed.engine.runner.graphs.replays.values()) > 0
    assert (graphed.engine.counters.overlapped_steps > 0) == overlap


@gpu
def test_gpu_deferred_sampling_under_overlap_equals_enforce_eager(tiny_llama_dir):
    """Rows with penalties and a grammar among plain ones: with overlap their steps replay the graph ahead and
    sample after the in-flight step's ids reach the host (deferred sampling), on real CUDA graphs and
    streams; the tokens are the eager engine's."""
    from server.grammar import Grammar
    from tests.test_grammar import REGEX, matches
    cfg = dict(dtype="float32", device="cuda", gpu_memory_utilization=0.05, max_num_seqs=16,
               max_num_batched_tokens=256)
    ps = engine_prompts(6, seed=2)
    params = [SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True) for _ in range(3)]
    params += [SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True, frequency_penalty=0.7),
               SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True, repetition_penalty=1.3),
               SamplingParams(temperature=0.0, max_new_tokens=24, grammar=Grammar(type="regex", value=REGEX))]
    free_gpu_memory()
    eager = LLM(str(tiny_llama_dir), enforce_eager=True, **cfg)
    want = [r.token_ids for r in eager.generate(ps, params)]
    del eager
    free_gpu_memory()
    graphed = LLM(str(tiny_llama_dir), overlap_scheduling=True, **cfg)
    got = graphed.generate(ps, params)
    assert [r.token_ids for r in got] == want
    assert matches(got[5].text, params[5].grammar)
    assert graphed.engine.counters.deferred_sampling_steps >= 10
