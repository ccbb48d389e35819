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
    llm = make_llm(model_dir, overlap=overlap, kv_cache_memory="96KiB", **engine_kwargs)
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
            entry = got.setdefault(out.request_id, [[], "", None, []])
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
