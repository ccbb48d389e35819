"""Overlap scheduling: a decode step is launched before the host has seen the previous step's tokens.

The engine with overlap must produce exactly what the synchronous engine produces, through every way a
sequence ends or is disturbed while a step is in flight: eos / stop ids / stop strings / max_new_tokens,
preemption, abort, logprobs, seeded sampling, penalties. On CPU the graph path runs with the eager model as its replay
(use_graph_path_eagerly), which is the path overlap needs; the placeholder ids are read from the device
buffer of sampled ids exactly as a captured graph reads them.
"""
from __future__ import annotations

import pytest

from server.llm import LLM
from server.sampling_params import SamplingParams
from tests.test_cuda_graphs import engine_prompts


def make_llm(model_dir, overlap: bool, kv_cache_memory: str = "2MiB", **engine_kwargs) -> LLM:
    llm = LLM(str(model_dir), dtype="float32", device="cpu", kv_cache_memory=kv_cache_memory,
              max_num_batched_tokens=64, max_num_seqs=8, overlap_scheduling=overlap, **engine_kwargs)
    llm.engine.runner.use_graph_path_eagerly()
    return llm


def varied_params(model_dir, prompts) -> list[SamplingParams]:
    """Stops that really fire mid-generation: stop ids and strings taken from a first greedy run."""
    probe = make_llm(model_dir, overlap=False).generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=40))
    params = []
    for i, r in enumerate(probe):
        kind = i % 6
        if kind == 0:
            params.append(SamplingParams(temperature=0.0, max_new_tokens=20 + 3 * i, ignore_eos=True))
        elif kind == 1:
            params.append(SamplingParams(temperature=0.0, max_new_tokens=40, stop_token_ids=[r.token_ids[14]]))
        elif kind == 2 and len(r.text) > 40:
            params.append(SamplingParams(temperature=0.0, max_new_tokens=40, stop=[r.text[36:39]]))
        elif kind == 3:
            params.append(SamplingParams(temperature=0.8, seed=i, max_new_tokens=35, logprobs=2))
        elif kind == 4:
            params.append(SamplingParams(temperature=0.0, max_new_tokens=40, min_new_tokens=20,
                                         stop_token_ids=[r.token_ids[24]]))
        else:  # penalties read the output tokens' values: such a row samples once the host has them
            params.append(SamplingParams(temperature=0.0, max_new_tokens=8, repetition_penalty=1.3,
                                         frequency_penalty=0.2))
    return params


def summary(results):
    """Tokens, text, stops and chosen logprob ids exactly; the logprob values apart (rows are padded to other
    batch sizes when a step runs ahead, so the float sums may differ in the last bits)."""
    def ids(lp):
        return lp.token_id, tuple(t for t, _ in lp.top)
    return [(r.token_ids, r.text, r.finish_reason, r.stop_reason,
             None if r.logprobs is None else [ids(lp) for lp in r.logprobs]) for r in results]


def logprob_values(results) -> list[float]:
    return [v for r in results for lp in r.logprobs or () for v in (lp.logprob, *(x for _, x in lp.top))]


def assert_same_results(got, want) -> None:
    assert summary(got) == summary(want)
    assert logprob_values(got) == pytest.approx(logprob_values(want), abs=1e-4)


@pytest.mark.parametrize("kv_cache_memory", ["2MiB", "96KiB"])
def test_overlap_gives_what_the_synchronous_engine_gives(tiny_llama_dir, kv_cache_memory):
    prompts = engine_prompts(8, seed=3)  # all fit at once (max_num_seqs=8), so decode steps overlap
    params = varied_params(tiny_llama_dir, prompts)
    want = make_llm(tiny_llama_dir, overlap=False, kv_cache_memory=kv_cache_memory).generate(prompts, params)
    llm = make_llm(tiny_llama_dir, overlap=True, kv_cache_memory=kv_cache_memory)
    got = llm.generate(prompts, params)
    assert_same_results(got, want)
    assert {r.finish_reason for r in got} >= {"length", "stop"}
    engine = llm.engine
    assert engine.counters.overlapped_steps >= 10
    assert engine.counters.deferred_sampling_steps > 0  # the penalty rows' steps ran ahead too
    from server.async_engine import engine_stats
    from server.metrics import ServerMetrics
    stats = engine_stats(engine)
    text = ServerMetrics(lambda: stats).render().decode()
    assert f"gqaserve_overlapped_steps_total {float(engine.counters.overlapped_steps)}" in text
    assert f"gqaserve_deferred_sampling_steps_total {float(engine.counters.deferred_sampling_steps)}" in text
    if kv_cache_memory == "96KiB":
        assert engine.scheduler.num_preemptions_total > 0
    assert engine.allocator.num_free_blocks == engine.kv_capacity.num_blocks  # nothing leaked
    assert not engine.has_unfinished()


@pytest.mark.parametrize("kv_cache_memory", ["2MiB", "96KiB"])
def test_steps_with_prompt_tokens_overlap_too(tiny_llama_dir, kv_cache_memory):
    """14 requests for 8 places and a 64-token budget: newcomers' prompts (whole or chunked) join running
    decodes in steps launched while the previous one is in flight; their decode rows take the in-flight ids
    from the device. With a small cache, preempted sequences come back the same way (recompute)."""
    prompts = engine_prompts(14, seed=4)
    params = varied_params(tiny_llama_dir, prompts)
    params[5] = params[11] = SamplingParams(temperature=0.0, max_new_tokens=25)  # no penalties in this test
    want = make_llm(tiny_llama_dir, overlap=False, kv_cache_memory=kv_cache_memory).generate(prompts, params)
    llm = make_llm(tiny_llama_dir, overlap=True, kv_cache_memory=kv_cache_memory)
    got = llm.generate(prompts, params)
    assert_same_results(got, want)
    engine, prefill = llm.engine, llm.engine.runner.prefill_graphs
    assert prefill.ahead >= 3  # steps with prompt tokens that read ids of the step in flight
    assert engine.counters.overlapped_steps >= 20
    if kv_cache_memory == "96KiB":
        assert engine.scheduler.num_preemptions_total > 0
    assert engine.allocator.num_free_blocks == engine.kv_capacity.num_blocks
    assert not engine.has_unfinished()


def test_abort_while_a_step_is_in_flight(tiny_llama_dir):
    llm = make_llm(tiny_llama_dir, overlap=True)
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_new_tokens=40, ignore_eos=True)
    for i, p in enumerate(engine_prompts(4, seed=5)):
        engine.add_request(str(i), p, params)
    got: dict[str, list[int]] = {}
    while engine._in_flight is None:
        for o in engine.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
    aborted = engine.abort("1")
    assert aborted is not None and aborted.finish_reason == "abort"
    n_aborted = len(got.get("1", []))
    while engine.has_unfinished():
        for o in engine.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
    assert len(got.get("1", [])) == n_aborted  # the in-flight token of an aborted request is dropped
    assert all(len(got[k]) == 40 for k in ("0", "2", "3"))
    assert engine.allocator.num_free_blocks == engine.kv_capacity.num_blocks
    assert engine.counters.overlapped_steps > 0


def test_a_step_that_fails_in_flight_ends_its_requests_and_the_engine_goes_on(tiny_llama_dir):
    llm = make_llm(tiny_llama_dir, overlap=True)
    engine, runner = llm.engine, llm.engine.runner
    real, calls = runner.launch, []

    class Lost:  # the step launched, then the device failed before its ids came back
        graphed = True

        def __init__(self, pending):
            self.sampling = pending.sampling

        def result(self):
            raise RuntimeError("device lost")

    def launch(sched):
        pending = real(sched)
        calls.append(pending.graphed)
        return Lost(pending) if sum(calls) == 4 else pending  # the 4th graphed step fails when waited for
    runner.launch = launch
    params = SamplingParams(temperature=0.0, max_new_tokens=30, ignore_eos=True)
    for i, p in enumerate(engine_prompts(3, seed=9)):
        engine.add_request(str(i), p, params)
    last = {}
    while engine.has_unfinished():
        for o in engine.step():
            last[o.request_id] = o
    assert {o.finish_reason for o in last.values()} == {"error"}
    assert all("device lost" in o.error for o in last.values())
    assert engine.allocator.num_free_blocks == engine.kv_capacity.num_blocks
    got = llm.generate(engine_prompts(2, seed=10), params)  # the engine goes on
    assert [len(r.token_ids) for r in got] == [30, 30]


def test_a_deferred_sampling_that_fails_ends_its_requests_and_the_engine_goes_on(tiny_llama_dir):
    """A step with penalty rows runs its forward ahead and samples after the in-flight step completes; if that
    sampling raises, the step's requests end with the error, the in-flight step's tokens are still delivered,
    and the engine serves the next requests."""
    llm = make_llm(tiny_llama_dir, overlap=True)
    engine, runner = llm.engine, llm.engine.runner
    real, calls = runner.launch_sampling, []

    def launch_sampling(forward):
        calls.append(len(forward.sampling))
        if len(calls) == 3:
            raise RuntimeError("sampling broke")
        return real(forward)
    runner.launch_sampling = launch_sampling
    plain = SamplingParams(temperature=0.0, max_new_tokens=30, ignore_eos=True)
    penalised = SamplingParams(temperature=0.0, max_new_tokens=30, ignore_eos=True, frequency_penalty=0.5)
    for i, p in enumerate(engine_prompts(3, seed=9)):
        engine.add_request(str(i), p, penalised if i == 1 else plain)
    counts, last = {}, {}
    while engine.has_unfinished():
        for o in engine.step():
            counts[o.request_id] = counts.get(o.request_id, 0) + len(o.new_token_ids)
            last[o.request_id] = o
    assert engine.counters.deferred_sampling_steps >= 2  # the 1st sampling was the prefill's own
    assert {o.finish_reason for o in last.values()} == {"error"}
    assert all("sampling broke" in o.error for o in last.values())
    assert all(0 < n < 30 for n in counts.values())
    assert engine.allocator.num_free_blocks == engine.kv_capacity.num_blocks
    runner.launch_sampling = real
    got = llm.generate(engine_prompts(2, seed=10), [plain, penalised])  # the engine goes on
    assert [len(r.token_ids) for r in got] == [30, 30]


def test_an_eager_step_refuses_a_token_the_host_has_not_seen(tiny_llama_dir):
    from server.scheduler_output import ScheduledSeq, SchedulerOutput
    from server.sequence import Sequence
    runner = make_llm(tiny_llama_dir, overlap=False).engine.runner
    seq = Sequence("x", [1, 5, 6], SamplingParams(max_new_tokens=4))
    seq.token_ids.append(-1)
    seq.num_computed_tokens = 2
    with pytest.raises(RuntimeError, match="has not seen"):
        runner.prepare(SchedulerOutput((ScheduledSeq(seq, 2, True, True),), 2))


def test_a_one_token_chunk_that_owes_prompt_logprobs_waits_for_the_step_in_flight(tiny_llama_dir):
    """15 decoding sequences leave 1 token of a 16-token budget: a late request's prompt goes in 1-token
    chunks, decode-shaped steps that owe prompt logprobs. Those run eagerly, so they must not be launched
    ahead of the host (their decode rows' ids would still be placeholders)."""
    ps = engine_prompts(16, seed=7)
    results = []
    for overlap in (False, True):
        llm = LLM(str(tiny_llama_dir), dtype="float32", device="cpu", kv_cache_memory="2MiB",
                  max_num_batched_tokens=16, max_num_seqs=16, overlap_scheduling=overlap)
        llm.engine.runner.use_graph_path_eagerly()
        engine, out, first = llm.engine, {}, {}
        for i in range(15):
            engine.add_request(str(i), ps[i], SamplingParams(temperature=0.0, max_new_tokens=40))
        while any(s.num_output_tokens == 0 for s in engine.scheduler.running) or engine.scheduler.waiting:
            for o in engine.step():
                out.setdefault(o.request_id, []).extend(o.new_token_ids)
        engine.add_request("late", ps[15][:6], SamplingParams(temperature=0.0, max_new_tokens=20,
                                                               prompt_logprobs=True))
        while engine.has_unfinished():
            for o in engine.step():
                out.setdefault(o.request_id, []).extend(o.new_token_ids)
                first.setdefault(o.request_id, o)
        results.append((out, [round(x, 4) if x is not None else None for x in first["late"].prompt_logprobs]))
        if overlap:
            assert engine.counters.overlapped_steps > 10
    assert results[0] == results[1] and len(results[1][0]["late"]) == 20 and len(results[1][1]) == 6


@pytest.mark.parametrize("kv_cache_memory", ["2MiB", "96KiB"])
def test_prefix_cache_hits_in_steps_launched_ahead(tiny_llama_dir, kv_cache_memory):
    """14 prompts behind one shared 40-token prefix, 8 places: the later ones are admitted with the shared
    blocks registered by steps still in flight and prefill the rest in steps launched ahead; with a small
    cache, preempted ones come back through the cache too. Tokens equal the synchronous engine's without
    the cache (greedy)."""
    import random
    rng = random.Random(5)
    shared = [1] + [rng.randrange(3, 384) for _ in range(39)]
    prompts = [shared + [rng.randrange(3, 384) for _ in range(rng.randint(1, 12))] for _ in range(14)]
    params = [SamplingParams(temperature=0.0, max_new_tokens=10 + i, ignore_eos=True) for i in range(14)]
    plain = LLM(str(tiny_llama_dir), dtype="float32", device="cpu", kv_cache_memory=kv_cache_memory,
                max_num_batched_tokens=64, max_num_seqs=8, overlap_scheduling=False, enable_prefix_caching=False)
    want = plain.generate(prompts, params)
    llm = make_llm(tiny_llama_dir, overlap=True, kv_cache_memory=kv_cache_memory)
    got = llm.generate(prompts, params)
    assert_same_results(got, want)
    engine = llm.engine
    assert engine.scheduler.prefix_cache_hits_total >= 8 * 32  # the 2 shared full blocks, most admissions
    assert engine.runner.prefill_graphs.ahead >= 3 and engine.counters.overlapped_steps >= 20
    if kv_cache_memory == "96KiB":
        assert engine.scheduler.num_preemptions_total > 0
    assert engine.allocator.num_free_blocks == engine.kv_capacity.num_blocks


def test_a_hit_that_leaves_one_token_runs_as_a_decode_row(tiny_llama_dir):
    """A 33-token prompt seen before: 32 tokens come from the cache and the first step computes one, the
    shape of a decode step (the decode graph path), joining running decodes while a step is in flight."""
    import random
    rng = random.Random(6)
    prompts = [[1] + [rng.randrange(3, 384) for _ in range(32)] for _ in range(3)]
    params = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)
    plain = LLM(str(tiny_llama_dir), dtype="float32", device="cpu", kv_cache_memory="2MiB",
                overlap_scheduling=False, enable_prefix_caching=False)
    want = [r.token_ids for r in plain.generate(prompts, params)]
    llm = make_llm(tiny_llama_dir, overlap=True)
    engine = llm.engine
    assert [r.token_ids for r in llm.generate(prompts, params)] == want  # registers the 2 blocks of each
    decode_replays = sum(engine.runner.graphs.replays.values())
    for i, p in enumerate(prompts):
        engine.add_request(f"again{i}", p, params)
    got: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert [got[f"again{i}"] for i in range(3)] == want
    assert engine.scheduler.prefix_cache_hits_total == 3 * 32
    # every step of the second round, the first included, was a decode-graph step
    assert sum(engine.runner.graphs.replays.values()) - decode_replays == 12
