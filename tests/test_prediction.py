"""Predicted Outputs (server/prediction.py): a request's prediction drafted for speculative decoding.

Where the output stands in its prediction against a brute-force reference; the proposer's drafts; the engine
with predictions (the plain run's own output, that output edited, garbage) against the engine without, token
for token and logprob for logprob, with overlap scheduling on and off, with and without the n-gram lookup,
under preemption and output constraints; steps overlap while no request has a prediction; and the chat route
(the `prediction` field, its 400s, usage.completion_tokens_details) on the fake engine and the tiny model, by
httpx and by the openai SDK.
"""
from __future__ import annotations

import json
import random

import httpx
import numpy as np
import openai
import pytest

from server.engine_config import EngineConfig
from server.llm import LLM
from server.prediction import Predictions, realign
from server.sampling_params import SamplingParams
from server.sequence import Sequence, SequenceStatus
from server.speculative import Proposer
from tests.fake_engine import FakeTokenizer
from tests.live_server import engine_server, fake_server
from tests.test_cuda_graphs import engine_prompts
from tests.test_overlap import assert_same_results

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=48, ignore_eos=True)


# where the output stands ---------------------------------------------------------------------------------
def realign_reference(pred: list[int], out: list[int], pos: int, seen: int, followed: int) -> tuple[int, int, int]:
    """The module docstring's rule, spelled out: advance over new tokens that continue the prediction; else,
    from where the output diverged, the longest of its last 4..2 tokens found in the prediction, its first
    occurrence ending at or after there, else its last before; else its last token, at most 8 past there, when
    at most 8 tokens came since the output last continued the prediction."""
    n = len(out)
    new = out[seen:]
    same = 0
    while same < len(new) and pos + same < len(pred) and pred[pos + same] == new[same]:
        same += 1
    if same:
        followed = seen + same
    if same == len(new):
        return pos + same, n, followed
    hint, seen = pos + same, seen + same
    for m in range(min(4, n), 1, -1):
        ends = [i for i in range(m, len(pred) + 1) if pred[i - m:i] == out[n - m:]]
        if ends:
            later = [i for i in ends if i >= hint]
            return (later[0] if later else ends[-1]), n, followed
    near = [i for i in range(hint, hint + 9) if 1 <= i <= len(pred) and pred[i - 1] == out[-1]]
    return (near[0], n, followed) if near and n - followed <= 8 else (hint, seen, followed)


def aligned(pred: list[int], out: list[int], pos: int = 0, seen: int = 0, prompt=(7, 7, 7),
            followed: int | None = None) -> tuple[int, int]:
    """(pos, seen) after realign; followed: seen unless given."""
    got = realign(np.asarray(pred, np.int64), list(prompt) + out, len(prompt), pos, seen,
                  seen if followed is None else followed)
    return got[:2]


def test_realign_cases():
    pred = [10, 11, 12, 13, 14, 15, 16, 17]
    assert aligned(pred, []) == (0, 0)
    assert aligned(pred, [10, 11, 12]) == (3, 3)  # the output continues the prediction
    assert aligned(pred, [10, 11, 12, 13], pos=3, seen=3) == (4, 4)
    assert aligned(pred, [10, 11, 99], pos=2, seen=2) == (2, 2)  # a changed token: diverged after 2, at 2
    assert aligned(pred, [10, 11, 99], pos=0, seen=0) == (2, 2)
    assert aligned(pred, [10, 11, 99, 13], pos=2, seen=2) == (4, 4)  # back on the next token that is in it
    assert aligned(pred, [10, 11, 12, 14], pos=3, seen=3) == (5, 4)  # a deleted token
    assert aligned(pred, [10, 11, 99, 12], pos=2, seen=2) == (3, 4)  # an inserted one
    assert aligned(pred, pred + [18]) == (8, 8)  # past its end, on a token it does not have
    assert aligned([7, 10, 3, 10, 4], [10], pos=3, seen=0, prompt=(7,)) == (4, 1)  # the prompt is never matched
    rep = [1, 2, 3, 9, 1, 2, 3, 8, 1, 2, 4]
    assert aligned(rep, [5, 1, 2, 3], pos=0, seen=0) == (3, 4)  # the first at or after the divergence (0) ...
    assert aligned(rep, [5, 1, 2, 3], pos=5, seen=0) == (7, 4)  # ... (5): the one ending at 7
    assert aligned(rep, [5, 1, 2, 3], pos=9, seen=0) == (7, 4)  # none after 9: the last before it
    assert aligned([3, 9, 9, 1, 2, 3], [1, 2, 3], pos=0, seen=0) == (6, 3)  # the longest beats a nearer shorter
    far = list(range(10, 30))
    assert aligned(far, [10, 11, 99, 16], pos=2, seen=2) == (7, 4)  # one token, 5 past the divergence
    assert aligned(far, [10, 11, 99, 25], pos=2, seen=2) == (2, 2)  # 14 past: not trusted alone
    assert aligned(far, [10, 11, 12, 13, 99, 11], pos=4, seen=4) == (4, 4)  # nor behind
    assert aligned(far, [10, 11, 99, 24, 25], pos=2, seen=2) == (16, 5)  # two tokens: anywhere
    assert aligned(far, [10, 11] + [99] * 7 + [12], pos=2, seen=2) == (3, 10)  # 8 tokens after the divergence
    assert aligned(far, [10, 11] + [99] * 8 + [12], pos=2, seen=2) == (2, 2)  # 9: it went elsewhere
    assert aligned(far, [10, 11] + [99] * 8 + [12, 13], pos=2, seen=2) == (4, 12)  # two tokens still do
    # a one-token match refused at once does not restart the count: 9 tokens since it last followed
    assert aligned(far, [10, 11] + [99] * 6 + [12, 99, 12], pos=3, seen=9, followed=2) == (3, 9)
    assert aligned(far, [10, 11] + [99] * 6 + [12, 99, 12], pos=3, seen=9, followed=9) == (3, 11)


@pytest.mark.parametrize("seed", range(10))
def test_realign_equals_the_reference(seed):
    rng = random.Random(seed)
    for _ in range(300):
        pred = [rng.randrange(4) for _ in range(rng.randint(0, 24))]
        out: list[int] = []
        while len(out) < rng.randint(0, 24):  # runs of the prediction, edited
            start = rng.randint(0, len(pred))
            out += pred[start:start + rng.randint(0, 8)] + [rng.randrange(5) for _ in range(rng.randint(0, 2))]
        seen = rng.randint(0, len(out))
        followed = rng.randint(0, seen)
        pos = rng.randint(0, len(pred))
        prompt = [rng.randrange(5) for _ in range(rng.randint(0, 5))]
        want = realign_reference(pred, out, pos, seen, followed)
        got = realign(np.asarray(pred, np.int64), prompt + out, len(prompt), pos, seen, followed)
        assert got == want, (pred, out, pos, seen, followed, prompt)


# the proposer --------------------------------------------------------------------------------------------
def decoding(outputs: list[int], prediction=(), max_new_tokens: int = 50, **params) -> Sequence:
    seq = Sequence("s", [1, 2, 3], SamplingParams(max_new_tokens=max_new_tokens, prediction_token_ids=prediction,
                                                  **params))
    seq.token_ids += outputs
    seq.num_computed_tokens = len(seq.token_ids) - 1
    seq.status = SequenceStatus.RUNNING
    return seq


def step(seq: Sequence, *kept: int) -> None:
    seq.token_ids += kept
    seq.num_computed_tokens = len(seq.token_ids) - 1


def test_the_proposer_drafts_a_prediction_from_where_the_output_stands():
    proposer = Proposer(0, 2, 4, num_prediction_tokens=3, vocab_size=100)
    pred = (10, 11, 12, 13, 14, 15, 99, 200, 16, 17, 18, 19, 20)
    seq, other = decoding([10], pred), decoding([5, 6, 5, 6])
    assert not proposer.active(2)
    for s in (seq, other):
        proposer.watch(s)
    assert proposer.active(2) and seq.prediction is not None and other.prediction is None
    proposer.propose([seq, other])
    assert seq.draft_token_ids == [11, 12, 13] and seq.prediction.drafted
    assert other.draft_token_ids == []  # no prediction, and the lookup is off: it never drafts
    step(seq, 11, 12, 13, 14)
    proposer.propose([seq])
    assert seq.draft_token_ids == [15, 99]  # 200 is outside the vocabulary: cut there
    step(seq, 15, 50)  # diverged on a token the prediction does not have: nothing to draft
    proposer.propose([seq])
    assert seq.draft_token_ids == [] and (seq.prediction.pos, seq.prediction.seen) == (6, 6)
    step(seq, 17)  # back on its text
    proposer.propose([seq])
    assert seq.draft_token_ids == [18, 19, 20] and seq.prediction.pos == 10
    near_end = decoding([10, 11], pred, max_new_tokens=4)  # 2 outputs of 4: one draft at most
    proposer.watch(near_end)
    proposer.propose([near_end])
    assert near_end.draft_token_ids == [12]
    seq.status = SequenceStatus.FINISHED
    near_end.status = SequenceStatus.WAITING  # (preempted)
    assert not proposer.active(2) and proposer.predictions.seqs == [near_end]
    batch_bound = Proposer(0, 2, 4, disable_by_batch_size=2, num_prediction_tokens=3)
    limited = decoding([10], pred)
    batch_bound.watch(limited)
    assert batch_bound.active(1) and not batch_bound.active(2)
    batch_bound.propose([limited, other])
    assert limited.draft_token_ids == []


def test_a_steps_drafts_stay_within_the_rows_gpu_memory_is_profiled_for():
    """A step samples a row a sequence plus a row a draft; GPU memory was profiled for max_num_seqs rows, which
    a full batch with drafts passed (predictions are on by default): a step's drafts are now bounded (each
    sequence's k on a small server, max_num_seqs on a large one) and the profile samples that many more rows."""
    proposer = Proposer(0, 2, 4, num_prediction_tokens=8, max_step_drafts=5)
    seqs = [decoding([10], tuple(range(10, 40))) for _ in range(3)]
    for s in seqs:
        proposer.watch(s)
    proposer.propose(seqs)
    assert [len(s.draft_token_ids) for s in seqs] == [5, 0, 0]
    large = EngineConfig(max_num_seqs=256, max_num_batched_tokens=8192)  # 8 prediction drafts each by default
    assert (large.max_step_drafts, large.max_sampled_rows) == (256, 512)
    small = EngineConfig(max_num_seqs=4, max_num_batched_tokens=128)  # every sequence its 8 drafts
    assert (small.max_step_drafts, small.max_sampled_rows) == (32, 36)
    assert EngineConfig(max_num_seqs=1).max_step_drafts == 8  # batch 1 drafts all of k
    assert EngineConfig(max_num_seqs=16, max_num_batched_tokens=20).max_sampled_rows == 20
    off = EngineConfig(max_num_seqs=8, max_num_batched_tokens=64, num_prediction_tokens=0)
    assert (off.max_step_drafts, off.max_sampled_rows) == (0, 8)


def test_a_lost_prediction_falls_back_to_the_lookup_and_constraints_cut_its_drafts():
    from tests.test_speculative import StandInGrammar
    proposer = Proposer(4, 2, 4, num_prediction_tokens=3, vocab_size=1000)
    seq = decoding([5, 6, 7, 5, 6], (40, 41, 42, 43))
    proposer.watch(seq)
    proposer.propose([seq])
    assert seq.draft_token_ids == [7, 5, 6] and not seq.prediction.drafted  # the lookup's
    cut = decoding([40], (40, 41, 42, 43, 44), bad_words_token_ids=((43,),), bad_words=("x",))
    proposer.watch(cut)
    proposer.propose([cut])
    assert cut.draft_token_ids == [41, 42]  # bad_words refuse 43
    allowed = decoding([40], (40, 41, 42, 43, 44), allowed_token_ids=(40, 41, 42))
    proposer.watch(allowed)
    proposer.propose([allowed])
    assert allowed.draft_token_ids == [41, 42]
    constrained = decoding([40], (40, 41, 42, 43, 44))
    proposer.watch(constrained)
    constrained.grammar = StandInGrammar([], refused_from=42)
    proposer.propose([constrained])
    assert constrained.draft_token_ids == [41] and constrained.prediction.drafted
    constrained.grammar = StandInGrammar([8, 9])  # what the grammar forces comes first
    proposer.propose([constrained])
    assert constrained.draft_token_ids == [8, 9] and not constrained.prediction.drafted


def test_adaptive_prediction_drafts_shrink_after_a_refusal_and_never_wait():
    from server.speculative import adapt_lookup
    proposer = Proposer(0, 2, 4, adaptive=True, num_prediction_tokens=8)
    seq = decoding([10], tuple(range(10, 60)))
    proposer.watch(seq)
    proposer.propose([seq])
    assert len(seq.draft_token_ids) == 8
    adapt_lookup(seq, 8, 2, wait=False)  # refused at its third: next time 3
    step(seq, 11, 12, 13)
    proposer.propose([seq])
    assert seq.draft_token_ids == [14, 15, 16]
    adapt_lookup(seq, 3, 0, wait=False)  # none kept: 1, and no waiting (a lookup would wait a step)
    step(seq, 14)
    proposer.propose([seq])
    assert seq.draft_token_ids == [15] and seq.lookup_skip == 0
    adapt_lookup(seq, 1, 1, wait=False)
    step(seq, 15, 16)
    proposer.propose([seq])
    assert seq.draft_token_ids == [17, 18]  # doubling again


def test_the_engine_config_and_sampling_params_check_their_fields():
    with pytest.raises(ValueError, match="num_prediction_tokens"):
        EngineConfig(num_prediction_tokens=-1)
    with pytest.raises(ValueError, match="prediction_token_ids: token ids must be non-negative"):
        SamplingParams(prediction_token_ids=(3, -1))
    assert EngineConfig().num_prediction_tokens == 8


# the engine ----------------------------------------------------------------------------------------------
def make_llm(model_dir, overlap: bool = False, **kw) -> LLM:
    cfg = dict(dtype="float32", device="cpu", kv_cache_memory="2MiB", max_num_batched_tokens=64, max_num_seqs=8,
               overlap_scheduling=overlap)
    cfg.update(kw)
    llm = LLM(str(model_dir), **cfg)
    if overlap:
        llm.engine.runner.use_graph_path_eagerly()  # the graph path, which overlap needs (tests/test_overlap.py)
    return llm


@pytest.fixture(scope="module")
def plain(tiny_llama_dir):
    return make_llm(tiny_llama_dir, num_prediction_tokens=0)


def predicted(params: SamplingParams, tokens) -> SamplingParams:
    return params.model_copy(update={"prediction_token_ids": tuple(tokens)})


def edited(tokens: list[int], seed: int) -> list[int]:
    """tokens with a changed token, a deleted one and an inserted one in the middle."""
    rng = random.Random(seed)
    out = list(tokens)
    mid = len(out) // 3
    out[mid] = (out[mid] + 1) % 384
    del out[mid + 8]
    out.insert(mid + 16, rng.randrange(384))
    return out


def run(llm: LLM, prompts, params: list[SamplingParams]) -> tuple[list[list[int]], list]:
    """Each request's tokens and last output (its prediction totals), through the engine's steps."""
    engine, tag = llm.engine, random.getrandbits(32)
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(f"{tag}-{i}", p, sp)
    tokens: dict[str, list[int]] = {}
    last = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            last[out.request_id] = out
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    return [tokens[i] for i in ids], [last[i] for i in ids]


def prediction_counts(outputs) -> tuple[int, int]:
    return sum(o.accepted_prediction_tokens for o in outputs), sum(o.rejected_prediction_tokens for o in outputs)


@pytest.mark.parametrize("k", [0, 4], ids=["predictions-only", "with-lookup"])
@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_greedy_tokens_and_logprobs_with_a_prediction_equal_plain_decodings(tiny_llama_dir, plain, overlap, k):
    """The plain run's own output, that output edited, garbage and no prediction at all, side by side: the same
    tokens and logprobs as the engine without predictions."""
    prompts = engine_prompts(8, seed=11)
    base = [GREEDY.model_copy(update={"logprobs": 2, "max_new_tokens": 40 + i}) for i in range(8)]
    want = plain.generate(prompts, base)
    rng = random.Random(5)
    guesses = [w.token_ids if i % 4 == 0 else edited(w.token_ids, i) if i % 4 == 1
               else [rng.randrange(3, 384) for _ in range(40)] if i % 4 == 2 else () for i, w in enumerate(want)]
    llm = make_llm(tiny_llama_dir, overlap, num_speculative_tokens=k)
    got = llm.generate(prompts, [predicted(p, g) for p, g in zip(base, guesses)])
    assert_same_results(got, want)
    assert llm.engine.counters.accepted_draft_tokens > 40
    assert llm.engine.allocator.num_free_blocks == llm.engine.kv_capacity.num_blocks


@pytest.mark.parametrize("k", [0, 4])
def test_seeded_sampling_with_a_prediction_equals_plain_decoding(tiny_llama_dir, plain, k):
    prompts = engine_prompts(6, seed=12)
    params = [SamplingParams(temperature=0.8, top_k=8, seed=i, max_new_tokens=40, repetition_penalty=1.1)
              for i in range(6)]
    want = plain.generate(prompts, params)
    llm = make_llm(tiny_llama_dir, num_speculative_tokens=k)
    guesses = [w.token_ids if i % 2 else edited(w.token_ids, i) for i, w in enumerate(want)]
    got, last = run(llm, prompts, [predicted(p, g) for p, g in zip(params, guesses)])
    assert got == [w.token_ids for w in want]
    assert prediction_counts(last)[0] > 60


def test_an_oracle_prediction_is_accepted_almost_whole_in_far_fewer_steps(tiny_llama_dir, plain):
    prompt = engine_prompts(1, seed=13)[0]
    params = GREEDY.model_copy(update={"max_new_tokens": 64})
    want = plain.generate([prompt], params)[0].token_ids
    llm = make_llm(tiny_llama_dir)
    steps = llm.engine.counters.num_steps
    got, last = run(llm, [prompt], [predicted(params, want)])
    steps = llm.engine.counters.num_steps - steps
    assert got == [want]
    accepted, rejected = prediction_counts(last)
    # 8 drafts a step, all kept, and the token after them: 1 + 7 x 9 tokens (the first from the prompt's step)
    assert (accepted, rejected) == (56, 0) and steps == 8
    assert last[0].num_output_tokens == 64


def test_an_edited_prediction_resynchronizes_after_each_change(tiny_llama_dir, plain):
    """The output differs from the prediction at three places (a changed token, a dropped one, an added one):
    each is refused once, and the drafts resume after it."""
    prompt = engine_prompts(1, seed=14)[0]
    params = GREEDY.model_copy(update={"max_new_tokens": 64})
    want = plain.generate([prompt], params)[0].token_ids
    guess = edited(want, 3)
    llm = make_llm(tiny_llama_dir)
    got, last = run(llm, [prompt], [predicted(params, guess)])
    accepted, rejected = prediction_counts(last)
    assert got == [want]
    assert accepted > 64 // 3 + 16 and 0 < rejected <= 3 * 8  # kept past the changes; each cost a step at most


def test_a_garbage_prediction_changes_nothing(tiny_llama_dir, plain):
    prompts = engine_prompts(4, seed=15)
    want = [r.token_ids for r in plain.generate(prompts, GREEDY)]
    rng = random.Random(0)
    llm = make_llm(tiny_llama_dir)
    got, last = run(llm, prompts, [predicted(GREEDY, [rng.randrange(3, 384) for _ in range(300)]) for _ in prompts])
    assert got == want
    accepted, rejected = prediction_counts(last)
    assert accepted <= rejected  # (a match by chance, now and then)


def test_adaptive_prediction_drafts_keep_plain_tokens_and_waste_fewer_rows(tiny_llama_dir, plain):
    prompts = engine_prompts(6, seed=20)
    want = [r.token_ids for r in plain.generate(prompts, GREEDY)]
    rng = random.Random(1)
    guesses = [edited(w, i) if i % 2 else [rng.randrange(3, 384) for _ in range(200)] for i, w in enumerate(want)]
    rejected = []
    for adaptive in (False, True):
        llm = make_llm(tiny_llama_dir, prompt_lookup_adaptive=adaptive)
        got, last = run(llm, prompts, [predicted(GREEDY, g) for g in guesses])
        assert got == want
        rejected.append(prediction_counts(last)[1])
    assert rejected[1] < rejected[0], rejected


def test_predictions_survive_preemption(tiny_llama_dir, plain):
    """An 8-block pool and a 16-token step budget: sequences are preempted and recomputed mid-prediction."""
    prompts = engine_prompts(10, seed=16)
    params = GREEDY.model_copy(update={"max_new_tokens": 40})
    want = [r.token_ids for r in plain.generate(prompts, params)]
    small = make_llm(tiny_llama_dir, kv_cache_memory=8 * 16 * 512, max_num_batched_tokens=16)
    got, last = run(small, prompts, [predicted(params, w if i % 2 else edited(w, i)) for i, w in enumerate(want)])
    assert got == want
    assert small.engine.scheduler.num_preemptions_total > 0 and prediction_counts(last)[0] > 150
    assert small.engine.allocator.num_free_blocks == small.engine.allocator.num_blocks


def test_constrained_requests_with_a_prediction_keep_plain_tokens(tiny_llama_dir, plain):
    """A JSON schema, a regex, allowed_token_ids and bad_words: drafts cut where they refuse, forced tokens
    first; the output stays plain decoding's."""
    from server.sampling_params import Grammar
    from tests.test_grammar import json_grammar
    prompts = engine_prompts(4, seed=17)
    params = [SamplingParams(temperature=0.0, max_new_tokens=40, grammar=json_grammar()),
              SamplingParams(temperature=0.0, max_new_tokens=40,
                             grammar=Grammar(type="regex", value=r"(yes|no) [a-c]{2}[0-9]! (done|finished)")),
              GREEDY.model_copy(update={"allowed_token_ids": tuple(range(3, 200))}),
              GREEDY.model_copy(update={"bad_words": ("e",)})]
    want = plain.generate(prompts, params)
    guesses = [edited(w.token_ids, i) if len(w.token_ids) > 30 else w.token_ids for i, w in enumerate(want)]
    llm = make_llm(tiny_llama_dir)
    got = llm.generate(prompts, [predicted(p, g) for p, g in zip(params, guesses)])
    assert [(r.token_ids, r.text) for r in got] == [(r.token_ids, r.text) for r in want]
    assert llm.engine.counters.accepted_draft_tokens > 20


def test_steps_overlap_while_no_running_request_has_a_prediction(tiny_llama_dir, plain):
    """num_prediction_tokens 8 and no lookup, overlap scheduling on: traffic without predictions overlaps its
    steps as an engine without them does; a request with one drafts while it runs (those steps are not left in
    flight), and once it ends the others' steps overlap again."""
    prompts = engine_prompts(6, seed=18)
    params = [GREEDY.model_copy(update={"max_new_tokens": 40})] * 6
    want = plain.generate(prompts, params)
    llm = make_llm(tiny_llama_dir, overlap=True)
    assert llm.engine.config.num_prediction_tokens == 8 and llm.engine.config.num_speculative_tokens == 0
    assert_same_results(llm.generate(prompts, params), want)
    c = llm.engine.counters
    assert c.overlapped_steps >= 30 and c.draft_tokens == 0
    overlapped = c.overlapped_steps
    short = params[0].model_copy(update={"max_new_tokens": 12})  # the predicted request ends early
    mixed = [predicted(short, want[0].token_ids[:12])] + params[1:]
    got, last = run(llm, prompts, mixed)
    assert got == [want[0].token_ids[:12]] + [w.token_ids for w in want[1:]]
    assert prediction_counts(last)[0] >= 8 and c.overlapped_steps - overlapped >= 20


def test_the_engines_proposer_takes_the_configs_step_draft_bound(tiny_llama_dir):
    assert make_llm(tiny_llama_dir, max_num_seqs=3).engine.proposer.max_step_drafts == 24  # 3 x 8


def test_a_prediction_with_nothing_to_draft_lets_the_batchs_steps_overlap(tiny_llama_dir, plain):
    """One request whose prediction never matched kept every step of the batch out of flight until it ended
    (0 of 61 steps overlapped against 60 without it): it now waits 1, 2, 4, ... steps before looking again."""
    prompts = engine_prompts(4, seed=33)
    params = GREEDY.model_copy(update={"max_new_tokens": 60})
    want = [plain.generate([p], params)[0].token_ids for p in prompts]
    runs = {}
    for label, first in (("none", params), ("stale", predicted(params, (5, 6, 7, 8)))):
        llm = make_llm(tiny_llama_dir, overlap=True)
        got = [r.token_ids for r in llm.generate(prompts, [first] + [params] * 3)]
        assert got == want, label
        runs[label] = llm.engine.counters.overlapped_steps
    assert runs["none"] >= 55 and runs["stale"] >= 0.8 * runs["none"], runs


def test_num_prediction_tokens_0_ignores_predictions(tiny_llama_dir, plain):
    prompt = engine_prompts(1, seed=19)[0]
    want = plain.generate([prompt], GREEDY)[0].token_ids
    got, last = run(plain, [prompt], [predicted(GREEDY, want)])
    assert got == [want] and prediction_counts(last) == (0, 0) and plain.engine.proposer is None


@pytest.mark.parametrize("k", [0, 4], ids=["predictions-only", "with-lookup"])
def test_finished_and_refused_requests_are_let_go(tiny_llama_dir, plain, k):
    """With the lookup on, finished predicted requests were never let go (a server kept every one it had
    served); a request the scheduler refused stayed watched for good."""
    from server.outputs import OverloadedError
    llm = make_llm(tiny_llama_dir, num_speculative_tokens=k, max_waiting_requests=1)
    prompts = engine_prompts(3, seed=23)
    wants = [plain.generate([p], GREEDY)[0].token_ids for p in prompts]
    for p, w in zip(prompts, wants):  # (one at a time: the queue holds one)
        assert run(llm, [p], [predicted(GREEDY, w)])[0] == [w]
    llm.engine.add_request("queued", prompts[0], predicted(GREEDY, wants[0]))
    with pytest.raises(OverloadedError):  # the waiting queue holds one
        llm.engine.add_request("refused", prompts[1], predicted(GREEDY, wants[1]))
    watched = [s.request_id for s in llm.engine.proposer.predictions.seqs]
    assert "refused" not in watched and len(watched) <= 2  # (the last run's own goes at the next step)
    while llm.engine.has_unfinished():
        llm.engine.step()
    llm.engine.step()  # (an idle step: the proposer looks again)
    assert llm.engine.proposer.predictions.seqs == []


# the chat route ------------------------------------------------------------------------------------------
MESSAGES = [{"role": "user", "content": "Rewrite this"}]


@pytest.fixture(scope="module")
def fake():
    with fake_server() as s, httpx.Client(base_url=s.url, timeout=30) as client:
        client.engine = s.engine
        yield client


def recording(monkeypatch, engine) -> list[SamplingParams]:
    seen, add = [], engine.add_request

    def add_request(request_id, prompt_token_ids, params):
        seen.append(params)
        return add(request_id, prompt_token_ids, params)
    monkeypatch.setattr(engine, "add_request", add_request)
    return seen


def error_param(r: httpx.Response) -> str:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["message"].startswith(err["param"]), err
    return err["param"]


def test_chat_takes_a_prediction_as_a_string_or_text_parts(fake, monkeypatch):
    seen = recording(monkeypatch, fake.engine)
    want = tuple(FakeTokenizer().encode("Hello there", add_special_tokens=False))
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]
    for content in ("Hello there", parts):
        r = fake.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 4, "n": 2,
                                                    "prediction": {"type": "content", "content": content}})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens_details"] == {"accepted_prediction_tokens": 0,
                                                                  "rejected_prediction_tokens": 0}
        assert [p.prediction_token_ids for p in seen[-2:]] == [want, want]
    r = fake.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 4})
    assert "completion_tokens_details" not in r.json()["usage"] and seen[-1].prediction_token_ids == ()


@pytest.mark.parametrize("prediction, param", [
    ("Hello", "prediction"),
    ({"type": "text", "content": "Hello"}, "prediction.type"),
    ({"type": "content"}, "prediction.content"),
    ({"type": "content", "content": ""}, "prediction.content"),
    ({"type": "content", "content": []}, "prediction.content"),
    ({"type": "content", "content": [{"type": "text", "text": ""}]}, "prediction.content"),
    ({"type": "content", "content": 5}, "prediction.content"),
    ({"type": "content", "content": [{"type": "image_url", "text": "x"}]}, "prediction.content"),
    ({"type": "content", "content": "x", "extra": 1}, "prediction.extra"),
    ({"type": "content", "content": "ab" * 600}, "prediction"),  # 1,200 tokens; max_model_len 1,024
])
def test_bad_predictions_are_400s_naming_the_field(fake, prediction, param):
    r = fake.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 4, "prediction": prediction})
    assert error_param(r) == param
    assert param == "prediction.extra" or "not permitted" not in r.json()["error"]["message"]  # a known field
    if param == "prediction" and isinstance(prediction, dict):
        assert "max_model_len" in r.json()["error"]["message"]
    # /v1/completions has no prediction (OpenAI's has none either): an unknown field there
    r = fake.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4,
                                          "prediction": {"type": "content", "content": "Hello"}})
    assert error_param(r) == "prediction"


def streamed_usage(client: httpx.Client, body: dict) -> tuple[str, dict]:
    text, usage = "", None
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True,
                                                              "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                usage = event.get("usage") or usage
                text += "".join(c["delta"].get("content") or "" for c in event["choices"])
    return text, usage


def test_the_streamed_usage_chunk_has_the_details_with_a_prediction_only(fake):
    body = {"messages": MESSAGES, "max_tokens": 4}
    _, usage = streamed_usage(fake, {**body, "prediction": {"type": "content", "content": "Hi"}})
    assert usage["completion_tokens_details"] == {"accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
    _, usage = streamed_usage(fake, body)
    assert usage["completion_tokens"] == 4 and "completion_tokens_details" not in usage


def test_continuous_usage_carries_the_details_on_every_chunk(fake):
    """With continuous_usage_stats the per-chunk usage left the details out (only the last chunk had them)."""
    body = {"messages": MESSAGES, "max_tokens": 4, "stream": True, "prediction": {"type": "content", "content": "Hi"},
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with fake.stream("POST", "/v1/chat/completions", json=body) as r:
        usages = [json.loads(line[6:])["usage"] for line in r.iter_lines() if line.startswith("data: {")]
    assert len(usages) > 4 and all("completion_tokens_details" in u for u in usages), usages


def test_an_aborted_requests_last_output_keeps_its_prediction_totals():
    """An abort's or error's output carried 0 and 0, so its consumer's last totals dropped to nothing."""
    from server.outputs import finished_output
    seq = Sequence("r", [1, 2, 3], SamplingParams(prediction_token_ids=(5, 6)))
    Predictions().watch(seq)
    seq.prediction.accepted, seq.prediction.rejected = 7, 2
    out = finished_output(seq, "abort")
    assert (out.accepted_prediction_tokens, out.rejected_prediction_tokens) == (7, 2)


@pytest.fixture(scope="module")
def live(tiny_llama_dir):
    with engine_server(tiny_llama_dir) as s, httpx.Client(base_url=s.url, timeout=60) as client:
        client.url = s.url
        yield client


def test_the_tiny_model_counts_its_prediction_whole_streamed_and_by_the_openai_sdk(live):
    body = {"messages": [{"role": "user", "content": "To be, or not to be"}], "max_tokens": 40, "temperature": 0,
            "ignore_eos": True}
    plain = live.post("/v1/chat/completions", json=body).json()
    text = plain["choices"][0]["message"]["content"]
    assert "completion_tokens_details" not in plain["usage"]
    with_prediction = {**body, "prediction": {"type": "content", "content": text}}
    r = live.post("/v1/chat/completions", json={**with_prediction, "n": 2}).json()
    assert [c["message"]["content"] for c in r["choices"]] == [text, text]
    details = r["usage"]["completion_tokens_details"]  # (the text's own tokens may differ from the output's)
    assert details["accepted_prediction_tokens"] > 0 and details["accepted_prediction_tokens"] % 2 == 0
    streamed, usage = streamed_usage(live, with_prediction)
    assert streamed == text
    assert 2 * usage["completion_tokens_details"]["accepted_prediction_tokens"] == details["accepted_prediction_tokens"]
    model = live.get("/v1/models").json()["data"][0]["id"]
    with openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0) as client:
        reply = client.chat.completions.create(model=model, messages=body["messages"], max_tokens=40, temperature=0,
                                               prediction={"type": "content", "content": text},
                                               extra_body={"ignore_eos": True})
        assert reply.choices[0].message.content == text
        got = reply.usage.completion_tokens_details
        assert 2 * got.accepted_prediction_tokens == details["accepted_prediction_tokens"]
        assert got.rejected_prediction_tokens == usage["completion_tokens_details"]["rejected_prediction_tokens"]
        plain_reply = client.chat.completions.create(model=model, messages=body["messages"], max_tokens=4)
        assert plain_reply.usage.completion_tokens_details is None


def test_the_speculative_benchmarks_edit_workload_drafts_its_prediction(tiny_llama_dir, tmp_path):
    from benchmarks import speculative
    rows = speculative.main(["--model", str(tiny_llama_dir), "--workloads", "edit", "--num-prompts", "1",
                             "--max-new-tokens", "12", "--num-speculative-tokens", "2", "--num-prediction-tokens",
                             "4", "--adaptive", "--json", str(tmp_path / "s.json")])
    assert [(r["engine"], r["k"]) for r in rows] == [("ours", 0), ("ours", 2), ("ours adaptive", 2),
                                                     ("ours predict", 4), ("ours predict adaptive", 4)]
    assert all(r["same_tokens"] for r in rows)
    predict = rows[3]
    assert predict["accepted_prediction"] + predict["rejected_prediction"] == predict["drafted"]
    assert rows[0]["accepted_prediction"] == rows[0]["rejected_prediction"] == 0
