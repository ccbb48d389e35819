"""Random traffic through the engine with overlap scheduling gives the synchronous engine's tokens.

Requests of every kind (greedy, seeded sampling with logprobs, penalties, grammars, stop ids and strings,
min_new_tokens, logit_bias) arrive over time, some sharing a prefix (the prefix cache), some aborted, into a
KV pool small enough to preempt. Under overlap, steps launch ahead of the host, and steps with penalty or
grammar rows sample only after the in-flight step's tokens are appended (deferred sampling). Every request
that is not aborted must come out exactly as from the synchronous engine, and every block must come back.
"""
from __future__ import annotations

import random

import pytest

from server.sampling_params import Grammar, SamplingParams
from tests.test_cuda_graphs import engine_prompts
from tests.test_grammar import REGEX, json_grammar, matches
from tests.test_overlap import make_llm


def traffic(seed: int, repeats: bool = False):
    """(request id, arrival step, prompt, params) for 20 requests, and the ids to abort at which step.
    repeats: a third of the requests are greedy and say a phrase three times (the tiny model's outputs then
    loop, so drafts are accepted)."""
    rng = random.Random(seed)
    prompts = engine_prompts(20, seed=100 + seed)
    shared = prompts[0][:18]
    requests = []
    for i, prompt in enumerate(prompts):
        if i % 3 == 0:
            prompt = shared + prompt[1:]
        elif i % 3 == 1 and repeats:
            prompt = [1] + prompt[1:9] * 3
        kind = rng.randrange(7)
        n = rng.randint(6, 30)
        if kind == 0:
            p = SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True)
        elif kind == 1:
            p = SamplingParams(temperature=0.9, seed=i, max_new_tokens=n, logprobs=2, ignore_eos=True)
        elif kind == 2:
            p = SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True,
                               repetition_penalty=rng.choice([1.0, 1.4]), frequency_penalty=rng.choice([0.0, 0.6]),
                               presence_penalty=0.3)
        elif kind == 3:
            p = SamplingParams(temperature=0.7, seed=i, max_new_tokens=40,
                               grammar=json_grammar() if rng.random() < 0.5 else Grammar(type="regex", value=REGEX))
        elif kind == 4:
            p = SamplingParams(temperature=0.0, max_new_tokens=n, stop_token_ids=[rng.randrange(3, 384)],
                               stop=["ab"], min_new_tokens=3)
        elif kind == 5:
            p = SamplingParams(temperature=0.8, seed=i, max_new_tokens=n, ignore_eos=True,
                               logit_bias={rng.randrange(3, 384): 5.0, rng.randrange(3, 384): -100.0})
        else:
            p = SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True, frequency_penalty=1.0,
                               logprobs=1)
        if repeats and i % 3 == 1:  # greedy: the loop it falls into is what drafts find
            p = SamplingParams(temperature=0.0, max_new_tokens=30, ignore_eos=True, logprobs=i % 2 or None)
        requests.append((f"r{i}", rng.randint(0, 25), prompt, p))
    aborts = {f"r{i}": rng.randint(2, 30) for i in rng.sample(range(20), 3)}
    return requests, aborts


def run(model_dir, overlap: bool, requests, aborts, **engine_kwargs):
    return drive(make_llm(model_dir, overlap=overlap, kv_cache_memory="96KiB", **engine_kwargs), requests, aborts)


def drive(llm, requests, aborts):
    """Step the engine: requests arrive and aborts land at their steps; each request's (token ids, text,
    finish reason, [(logprob token, top ids)], prompt logprobs), and the engine."""
    engine = llm.engine
    got: dict[str, list] = {}
    step = 0
    while step <= 30 or engine.has_unfinished():
        for rid, arrival, prompt, params in requests:
            if arrival == step:
                engine.add_request(rid, prompt, params)
        for rid, when in aborts.items():
            if when == step:
                engine.abort(rid)
        for out in engine.step():
            entry = got.setdefault(out.request_id, [[], "", None, [], None])
            if out.prompt_logprobs is not None:
                entry[4] = list(out.prompt_logprobs)
            entry[0] += out.new_token_ids
            entry[1] += out.new_text
            entry[3] += [(lp.token_id, [t for t, _ in lp.top]) for lp in out.new_logprobs or ()]
            if out.finished:
                entry[2] = out.finish_reason
        step += 1
        assert step < 2000
    return got, engine


@pytest.mark.parametrize("seed", range(3))
def test_random_traffic_under_overlap_gives_the_synchronous_tokens(tiny_llama_dir, seed):
    requests, aborts = traffic(seed)
    want, _ = run(tiny_llama_dir, False, requests, aborts)
    got, engine = run(tiny_llama_dir, True, requests, aborts)
    kept = [rid for rid, *_ in requests if rid not in aborts]
    assert {rid: got[rid] for rid in kept} == {rid: want[rid] for rid in kept}
    for rid, _, _, params in requests:
        if params.grammar is not None and rid not in aborts and got[rid][2] == "eos_token":
            assert matches(got[rid][1], params.grammar)
    c = engine.counters
    assert c.overlapped_steps > 20 and c.deferred_sampling_steps > 5
    assert engine.scheduler.num_preemptions_total > 0 and engine.scheduler.prefix_cache_hits_total > 0
    assert engine.allocator.num_free_blocks == engine.kv_capacity.num_blocks and not engine.has_unfinished()


@pytest.mark.parametrize("disable_by_batch_size", [None, 4])
@pytest.mark.parametrize("seed", range(2))
def test_random_traffic_with_drafts_gives_the_plain_tokens(tiny_llama_dir, seed, disable_by_batch_size):
    """The same traffic with n-gram drafts (server/speculative.py), on every step (None: no step overlaps) or
    while fewer than 4 sequences run (steps above that overlap, and a step that drafted must not be left in
    flight when new requests push the batch past 4): drafting steps verify several tokens a sequence amid
    preemption, aborts, the prefix cache and grammars (which do not draft); every kept request's tokens,
    text, logprobs and finish reason equal plain decoding's."""
    requests, aborts = traffic(seed, repeats=True)
    want, _ = run(tiny_llama_dir, False, requests, aborts)
    got, engine = run(tiny_llama_dir, True, requests, aborts, num_speculative_tokens=4, prompt_lookup_min=1,
                      speculative_disable_by_batch_size=disable_by_batch_size)
    kept = [rid for rid, *_ in requests if rid not in aborts]
    assert {rid: got[rid] for rid in kept} == {rid: want[rid] for rid in kept}
    c = engine.counters
    if disable_by_batch_size is None:
        assert c.accepted_draft_tokens > 10 and c.overlapped_steps == 0
    else:
        assert c.draft_tokens > 0 and c.overlapped_steps > 20
    assert engine.scheduler.num_preemptions_total > 0 and engine.scheduler.prefix_cache_hits_total > 0
    assert engine.allocator.num_free_blocks == engine.kv_capacity.num_blocks and not engine.has_unfinished()


SETTINGS = [  # each: the engine's settings, and the drafts / graph path / overlap that only the tested one has
    (dict(kv_cache_memory="48KiB", max_num_batched_tokens=16, max_num_seqs=4, block_size=8, num_kv_heads=1,
          kv_cache_dtype="float16"),
     dict(num_speculative_tokens=2, prompt_lookup_min=1, speculative_disable_by_batch_size=2)),
    (dict(kv_cache_memory="96KiB", max_num_batched_tokens=24, max_num_seqs=16, block_size=16, num_kv_heads=4,
          kv_cache_dtype="bfloat16", enable_prefix_caching=False),
     dict(num_speculative_tokens=4)),
    (dict(kv_cache_memory="2MiB", max_num_batched_tokens=256, max_num_seqs=2, block_size=32), {}),
    (dict(kv_cache_memory="48KiB", max_num_batched_tokens=32, max_num_seqs=8, block_size=16,
          kv_cache_dtype="float16"),
     dict(num_speculative_tokens=4, prompt_lookup_min=1, speculative_disable_by_batch_size=3)),
]


def with_filters(requests, seed: int):
    """The traffic with top-k / top-p / min-p on some sampled rows and prompt logprobs on some requests."""
    rng = random.Random(seed)
    out = []
    for i, (rid, arrival, prompt, p) in enumerate(requests):
        extra = {}
        if p.temperature > 0 and p.grammar is None and rng.random() < 0.6:
            extra.update(top_k=rng.choice([0, 1, 5, 50]), top_p=rng.choice([1.0, 0.9, 0.5]),
                         min_p=rng.choice([0.0, 0.1]))
        if i % 6 == 2:
            extra["prompt_logprobs"] = True
        out.append((rid, arrival, prompt, p.model_copy(update=extra) if extra else p))
    return out


@pytest.mark.parametrize("case", range(len(SETTINGS)))
def test_engine_settings_with_overlap_graphs_and_drafts_give_the_synchronous_plain_tokens(tiny_llama_dir, case):
    """Settings the tests above leave at their defaults (a 16-token budget, 8- and 32-token blocks, 1 and 4
    KV heads, 16-bit KV caches, no prefix cache, two sequences at most), each with the graph path, overlap
    and drafts against the same settings synchronous, eager and without drafts: the same tokens, text and
    finish reasons; logprobs to rounding."""
    from server.llm import LLM

    base, extra = SETTINGS[case]
    requests, aborts = traffic(50 + case, repeats=True)
    requests = with_filters(requests, case)
    runs = []
    for kwargs, graphs in ((dict(base, overlap_scheduling=False), False), (dict(base, **extra), True)):
        llm = LLM(str(tiny_llama_dir), dtype="float32", device="cpu", **kwargs)
        if graphs:
            llm.engine.runner.use_graph_path_eagerly()
        runs.append(drive(llm, requests, aborts))
    (want, _), (got, engine) = runs
    owed = 0
    for rid, *_ in requests:
        if rid not in aborts:
            assert got[rid][:3] == want[rid][:3], rid
            assert [t for t, _ in got[rid][3]] == [t for t, _ in want[rid][3]], rid
            if want[rid][4] is not None:
                assert got[rid][4] == pytest.approx(want[rid][4], abs=1e-4), rid
                owed += 1
    assert owed > 0  # some request that was not aborted asked for prompt logprobs
    assert engine.allocator.num_free_blocks == engine.kv_capacity.num_blocks and not engine.has_unfinished()
    c = engine.counters
    drafting_always = extra.get("num_speculative_tokens") and not extra.get("speculative_disable_by_batch_size")
    assert (c.overlapped_steps == 0) if drafting_always else (c.overlapped_steps > 0)  # (drafting steps: never)
    assert (c.accepted_draft_tokens > 0) == bool(extra.get("num_speculative_tokens"))
