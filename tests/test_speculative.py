"""N-gram speculative decoding (server/speculative.py): the proposer against a brute-force lookup, and the
engine with drafts against the same engine without them, token for token, on the tiny random LLaMA (CPU,
float32), through chunked prefill, preemption, the prefix cache, the prefill graphs' static buffers and HTTP
streaming; the real SmolLM2 against transformers in test_smollm2.py."""
from __future__ import annotations

import random

import numpy as np
import pytest

from server.engine_config import EngineConfig
from server.llm import LLM
from server.sampling_params import SamplingParams
from server.sequence import Sequence
from server.speculative import Proposer, num_accepted, propose_ngram

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=40)


def lookup_reference(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """The longest suffix first, its latest earlier occurrence that some token follows."""
    L = len(tokens)
    for n in range(max_n, min_n - 1, -1):
        if n >= L:
            continue
        for i in range(L - n - 1, -1, -1):
            if tokens[i:i + n] == tokens[L - n:]:
                return tokens[i + n:i + n + k]
    return []


def propose(tokens: list[int], k: int = 4, min_n: int = 2, max_n: int = 4) -> list[int]:
    return propose_ngram(np.asarray(tokens, np.int64), k, min_n, max_n)


def test_propose_ngram_cases():
    assert propose([5, 6, 7, 8, 9, 5, 6]) == [7, 8, 9, 5]
    assert propose([5, 6, 7, 8, 9, 5, 6], k=2) == [7, 8]
    assert propose([1, 2, 3, 1, 2, 4, 1, 2]) == [4, 1, 2]  # the latest of equally long matches
    assert propose([9, 1, 2, 3, 7, 7, 2, 3, 8, 1, 2, 3]) == [7, 7, 2, 3]  # the longest beats a later shorter
    assert propose([1, 2, 3, 4]) == []  # no earlier occurrence
    assert propose([1, 2, 5, 2]) == []  # a 1-token match is below min_n
    assert propose([1, 2, 5, 2], min_n=1) == [5, 2]
    assert propose([4, 4, 4, 4]) == [4]  # a run: the match may overlap the suffix
    assert propose([3]) == [] and propose([3, 3], min_n=1) == [3]


@pytest.mark.parametrize("seed", range(20))
def test_propose_ngram_equals_brute_force(seed):
    rng = random.Random(seed)
    for _ in range(200):
        tokens = [rng.randrange(3) for _ in range(rng.randint(1, 30))]
        k, min_n = rng.randint(1, 5), rng.randint(1, 3)
        max_n = rng.randint(min_n, 5)
        assert propose(tokens, k, min_n, max_n) == lookup_reference(tokens, k, min_n, max_n), (tokens, k, min_n, max_n)


def test_num_accepted():
    assert num_accepted([4, 5, 6], [4, 5, 6, 7]) == 3
    assert num_accepted([4, 5, 6], [4, 9, 6, 7]) == 1
    assert num_accepted([4, 5, 6], [1, 5, 6, 7]) == 0
    assert num_accepted([], [3]) == 0


def test_proposer_respects_max_new_tokens_and_skips_what_may_not_draft():
    proposer = Proposer(4, 2, 4)
    seq = Sequence("a", [1, 2, 3, 1, 2, 3, 1, 2], SamplingParams(max_new_tokens=10))
    seq.num_computed_tokens = 7  # decoding: its last token is the one to feed
    proposer.propose([seq])
    assert seq.draft_token_ids == [3, 1, 2]
    seq.token_ids += [9] * 7 + [1, 2]  # 9 outputs of 10: one more token, no room for a draft
    seq.num_computed_tokens = len(seq.token_ids) - 1
    proposer.propose([seq])
    assert seq.draft_token_ids == []
    mid_prompt = Sequence("b", [1, 2, 3, 1, 2], SamplingParams(max_new_tokens=10))
    proposer.propose([mid_prompt])
    assert mid_prompt.draft_token_ids == []


def test_adaptive_lookups_shrink_after_a_failed_draft_and_back_off_while_none_is_kept():
    from server.speculative import MAX_LOOKUP_SKIP, adapt_lookup
    proposer = Proposer(4, 2, 4, adaptive=True)
    seq = Sequence("a", [1, 2, 3, 4, 5, 6, 7, 1, 2], SamplingParams(max_new_tokens=50))
    seq.num_computed_tokens = len(seq.token_ids) - 1

    def drafts():
        proposer.propose([seq])
        return seq.draft_token_ids

    assert drafts() == [3, 4, 5, 6]
    adapt_lookup(seq, 4, 2)  # rejected at the third: next time at most 3
    assert drafts() == [3, 4, 5]
    adapt_lookup(seq, 3, 3)  # all kept: the limit doubles (up to num_speculative_tokens)
    assert drafts() == [3, 4, 5, 6]
    waits = []
    for _ in range(7):  # none kept, again and again: 1 draft, after waiting 1, 2, 4, 8, 16, 16 steps
        adapt_lookup(seq, len(seq.draft_token_ids), 0)
        skipped = 0
        while not drafts():
            skipped += 1
        assert seq.draft_token_ids == [3]
        waits.append(skipped)
    assert waits == [1, 2, 4, 8, 16, MAX_LOOKUP_SKIP, MAX_LOOKUP_SKIP]
    adapt_lookup(seq, 1, 1)  # one kept: no more waiting, and the limit grows again
    assert drafts() == [3, 4]
    plain = Proposer(4, 2, 4)  # not adaptive: the state is kept but not used
    plain.propose([seq])
    assert seq.draft_token_ids == [3, 4, 5, 6]
    forced = Sequence("f", [1, 2, 3, 1, 2], SamplingParams(max_new_tokens=10))  # a grammar's forced tokens:
    forced.num_computed_tokens, forced.grammar = 4, StandInGrammar([5, 6, 7])  # drafted while backing off
    forced.lookup_limit, forced.lookup_skip = 1, 8
    proposer.propose([forced])
    assert forced.draft_token_ids == [5, 6, 7] and forced.lookup_skip == 8


class StandInGrammar:
    """A stand-in matcher: forces `forced` next, and takes only tokens below `refused_from`."""
    def __init__(self, forced, refused_from=1000):
        self.forced, self.refused_from = forced, refused_from

    def forced_tokens(self, limit):
        return self.forced[:limit]

    def valid_prefix(self, tokens):
        n = 0
        while n < len(tokens) and tokens[n] < self.refused_from:
            n += 1
        return tokens[:n]


def test_a_constrained_sequence_drafts_what_its_grammar_forces_else_what_it_takes_of_a_lookup():
    proposer = Proposer(4, 2, 4)
    constrained = Sequence("c", [1, 2, 3, 1, 2], SamplingParams(max_new_tokens=10))
    constrained.num_computed_tokens, constrained.grammar = 4, StandInGrammar([5, 6, 7, 8, 9])
    proposer.propose([constrained])
    assert constrained.draft_token_ids == [5, 6, 7, 8]  # the lookup would give [3, 1, 2]
    constrained.token_ids += [9] * 8  # 8 outputs of 10: room for one draft
    constrained.num_computed_tokens = len(constrained.token_ids) - 1
    proposer.propose([constrained])
    assert constrained.draft_token_ids == [5]
    free = Sequence("d", [1, 2, 3, 1, 2], SamplingParams(max_new_tokens=10))  # nothing forced: the lookup
    free.num_computed_tokens, free.grammar = 4, StandInGrammar([])
    proposer.propose([free])
    assert free.draft_token_ids == [3, 1, 2]
    free.grammar = StandInGrammar([], refused_from=3)  # ... up to the first token the grammar refuses
    proposer.propose([free])
    assert free.draft_token_ids == []
    free = Sequence("e", [1, 2, 0, 1, 2], SamplingParams(max_new_tokens=10))
    free.num_computed_tokens, free.grammar = 4, StandInGrammar([], refused_from=3)
    proposer.propose([free])
    assert free.draft_token_ids == [0, 1, 2]
    free.grammar = StandInGrammar([], refused_from=2)
    proposer.propose([free])
    assert free.draft_token_ids == [0, 1]


def test_draft_rows_get_the_masks_of_the_matcher_after_their_drafts(plain):
    """Row j of a constrained sequence is masked as its matcher would be after drafts[:j]; the matcher
    itself is left as it was (rolled back); a row past a draft the grammar refuses allows everything
    (the row before it cannot sample that draft, so it is never kept) and the matcher stays usable."""
    import torch

    from server.grammar import DraftGrammar, allowed_bitmask
    from server.sampling_params import Grammar
    from tests.test_grammar import json_grammar

    compiler, encode = plain.engine.grammars, plain.engine.tokenizer.encode
    for grammar in (json_grammar(), Grammar(type="regex", value=r"(yes|no) [a-c]{2}[0-9]!")):
        g = compiler.matcher(grammar)
        text = '{"ok": true, "pick": "red"}' if grammar.type == "json" else "yes bc1!"
        drafts = encode(text, add_special_tokens=False)[:5]
        forced_before = g.matcher.compute_ff_tokens()
        rows = [g] + [DraftGrammar(g, drafts[:j]) for j in range(1, len(drafts) + 1)]
        got = allowed_bitmask([None] + rows[::-1])  # any row order
        for j in range(len(drafts) + 1):
            fresh = compiler.matcher(grammar)
            for t in drafts[:j]:
                assert not fresh.advance(t)
            assert torch.equal(got[len(drafts) + 1 - j], allowed_bitmask([fresh])[0]), (grammar.type, j)
        assert (got[0] == -1).all() and g.matcher.compute_ff_tokens() == forced_before
        bad = [drafts[0], encode("}", add_special_tokens=False)[0], drafts[1]]  # refused at its 2nd token
        mask = allowed_bitmask([g, DraftGrammar(g, bad[:1]), DraftGrammar(g, bad[:2]), DraftGrammar(g, bad)])
        assert not (mask[1] == -1).all() and (mask[2] == -1).all() and (mask[3] == -1).all()
        assert not g.matcher.is_error() and not g.advance(drafts[0]) and not g.advance(drafts[1])


def test_draft_rows_sample_as_the_plain_sequences_they_stand_for():
    """Row j of a sequence with drafts has the sampling state of the sequence that already holds its first j
    drafts: output index (a seeded row's uniforms), penalties' counts, min_new_tokens' banned ids, logprobs."""
    import torch

    from model.sampler import sample
    from server.sampling_batch import build_sampling_tensors
    from server.speculative import DraftRow

    params = SamplingParams(temperature=0.7, seed=3, repetition_penalty=1.5, frequency_penalty=0.7,
                            presence_penalty=0.2, min_new_tokens=4, stop_token_ids=[7], max_new_tokens=20,
                            logprobs=1)
    seq = Sequence("a", [1, 2, 3], params)
    seq.token_ids += [7, 8]  # two outputs so far
    seq.draft_token_ids = [8, 7, 8]
    rows = [seq] + [DraftRow(seq, j) for j in range(1, 4)]
    plain = []
    for j in range(4):
        p = Sequence(f"p{j}", [1, 2, 3], params)
        p.token_ids += [7, 8] + seq.draft_token_ids[:j]
        plain.append(p)
    vocab, cpu = 16, torch.device("cpu")
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(0))
    got, want = (build_sampling_tensors(r, vocab, (2,), cpu) for r in (rows, plain))
    assert got.output_index.tolist() == want.output_index.tolist() == [2, 3, 4, 5]
    assert torch.equal(got.output_tokens, want.output_tokens) and torch.equal(got.prompt_tokens, want.prompt_tokens)
    assert torch.equal(got.banned_tokens, want.banned_tokens)  # rows 0 and 1 are below min_new_tokens
    a = sample(logits.clone(), got, torch.Generator().manual_seed(1))
    b = sample(logits.clone(), want, torch.Generator().manual_seed(1))
    assert torch.equal(a.token_ids, b.token_ids) and torch.equal(a.logprobs, b.logprobs)


def test_config_checks_the_lookup_range():
    with pytest.raises(ValueError, match="prompt_lookup_min=3 must be <= prompt_lookup_max=2"):
        EngineConfig(num_speculative_tokens=4, prompt_lookup_min=3, prompt_lookup_max=2)
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        EngineConfig(num_speculative_tokens=-1)


@pytest.mark.parametrize("num_blocks,kept", [(4, False), (5, True)])
def test_drafts_only_take_blocks_no_running_sequence_needs(num_blocks, kept):
    """Two decoding sequences of one full 4-token block each; drafts of 3 need a second block for the first
    one. With 2 blocks free they would leave the other sequence's next block to chance: dropped; with 3 free,
    kept. Either way nothing is preempted."""
    from server.blocks import BlockAllocator
    from server.scheduler import Scheduler

    sched = Scheduler(BlockAllocator(num_blocks, 4), max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)
    seqs = [Sequence(name, [1, 2, 3], SamplingParams(max_new_tokens=10)) for name in "ab"]
    for seq in seqs:
        sched.add(seq)
    sched.finish_step(sched.schedule())  # the prompts
    for seq in seqs:
        seq.token_ids.append(5)  # each sampled a token: 4 tokens, 3 computed
    seqs[0].draft_token_ids = [6, 7, 8]
    out = sched.schedule()
    assert [s.num_new_tokens for s in out.scheduled] == ([4, 1] if kept else [1, 1])
    assert all(s.samples and not s.is_prefill for s in out.scheduled) and not out.preempted
    assert seqs[0].draft_token_ids == ([6, 7, 8] if kept else [])


# ---------------------------------------------------------------- the engine, token for token


def make_llm(model_dir, **kw) -> LLM:
    cfg = dict(dtype="float32", device="cpu", kv_cache_memory="2MiB", max_num_batched_tokens=256)
    cfg.update(kw)
    return LLM(str(model_dir), **cfg)


def looping_prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Prompts that repeat a phrase three times: the tiny model's greedy outputs then fall into loops too."""
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 384) for _ in range(rng.randint(4, 12))] * 3 for _ in range(n)]


@pytest.fixture(scope="module")
def plain(tiny_llama_dir):
    return make_llm(tiny_llama_dir)


@pytest.fixture(scope="module", params=[False, True], ids=["lookup", "adaptive-lookup"])
def spec(tiny_llama_dir, request):
    return make_llm(tiny_llama_dir, num_speculative_tokens=4, prompt_lookup_adaptive=request.param)


def counts(llm: LLM) -> tuple[int, int, int]:
    c = llm.engine.counters
    return c.draft_tokens, c.accepted_draft_tokens, c.num_steps


@pytest.mark.parametrize("params", [
    GREEDY,
    SamplingParams(temperature=0.5, top_k=2, seed=5, max_new_tokens=40),
    SamplingParams(temperature=0.3, seed=11, max_new_tokens=40, repetition_penalty=1.05, frequency_penalty=0.1,
                   min_new_tokens=30, stop_token_ids=[198]),
], ids=["greedy", "seeded-top-k", "seeded-penalties-min-tokens"])
def test_drafts_keep_plain_decodings_tokens(plain, spec, params):
    """Greedy and seeded requests get plain decoding's very tokens (rows sample as plain decoding would
    after the accepted drafts: output index, penalty counts, min_new_tokens), and drafts were kept."""
    prompts = looping_prompts(8)
    want = [r.token_ids for r in plain.generate(prompts, params)]
    before = counts(spec)
    got = spec.generate(prompts, params)
    drafted, accepted, _ = (a - b for a, b in zip(counts(spec), before))
    assert [r.token_ids for r in got] == want
    # (the penalized rows rarely repeat: their few kept drafts come late, when adaptive lookups back off)
    assert drafted > 0 and (accepted > 0 or spec.engine.config.prompt_lookup_adaptive and params.min_new_tokens)
    assert all(len(r.token_ids) <= params.max_new_tokens for r in got)
    assert spec.engine.allocator.num_free_blocks == spec.engine.allocator.num_blocks


def test_logprobs_and_finish_reasons_equal_plain_decoding(plain, spec):
    prompts = looping_prompts(4, seed=1)
    params = [SamplingParams(temperature=0.0, max_new_tokens=30, logprobs=2),
              SamplingParams(temperature=0.0, max_new_tokens=30, stop_token_ids=[293]),
              SamplingParams(temperature=0.0, max_new_tokens=7), SamplingParams(temperature=0.0, max_new_tokens=1)]
    want, got = plain.generate(prompts, params), spec.generate(prompts, params)
    for w, g in zip(want, got):
        assert (g.token_ids, g.finish_reason) == (w.token_ids, w.finish_reason)
    for w, g in zip(want[0].logprobs, got[0].logprobs):
        assert w.token_id == g.token_id and w.logprob == pytest.approx(g.logprob, abs=1e-4)
        assert [t for t, _ in w.top] == [t for t, _ in g.top]


def test_steps_that_owe_prompt_logprobs_verify_drafts_too(plain, spec, monkeypatch):
    """A request owing prompt logprobs makes its steps compute every row's hidden state (the eager path that
    also returns extra rows); decoding sequences' drafts ride along and are verified the same way."""
    prompts = looping_prompts(3, seed=8) + [looping_prompts(1, seed=9)[0] * 6]
    params = [GREEDY] * 3 + [SamplingParams(temperature=0.0, max_new_tokens=4, prompt_logprobs=1)]
    from tests.test_prompt_logprobs import run_engine

    # a 24-token budget: the long prompt comes in chunks beside the decodes
    want, _ = run_engine(spec.engine.model_dir, prompts, params, kv_cache_memory="2MiB", max_num_batched_tokens=24)
    from server.model_runner import ModelRunner
    mixed = []
    original = ModelRunner.launch_forward

    def recording(self, sched):
        mixed.append(sched.prompt_logprob_rows() is not None and any(s.seq.draft_token_ids for s in sched.scheduled))
        return original(self, sched)

    monkeypatch.setattr(ModelRunner, "launch_forward", recording)
    got, engine = run_engine(spec.engine.model_dir, prompts, params, kv_cache_memory="2MiB",
                             max_num_batched_tokens=24, num_speculative_tokens=4)
    assert any(mixed), "no step had both drafts and owed prompt logprobs"
    assert got[3] == pytest.approx(want[3], abs=1e-4) and len(got[3]) == len(prompts[3])
    assert engine.counters.accepted_draft_tokens > 0
    assert [r.token_ids for r in spec.generate(prompts, params)] == [r.token_ids for r in plain.generate(prompts, params)]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_constrained_requests_draft_their_forced_tokens_and_keep_plain_tokens(plain, spec, temperature):
    """Under a JSON schema or a regex, a sequence drafts what its grammar forces next (`{"ok": ` and the
    like), each draft row sampled under its own mask: the same tokens as plain decoding, in fewer steps."""
    from server.sampling_params import Grammar
    from tests.test_grammar import json_grammar, matches

    grammars = [json_grammar(), Grammar(type="regex", value=r"(yes|no) [a-c]{2}[0-9]! (done|finished)")] * 3
    prompts = looping_prompts(len(grammars), seed=6)
    params = [SamplingParams(temperature=temperature, seed=i, max_new_tokens=40, grammar=g, logprobs=1)
              for i, g in enumerate(grammars)]
    steps = []
    results = []
    for llm in (plain, spec):
        before = counts(llm)
        results.append(llm.generate(prompts, params))
        steps.append([a - b for a, b in zip(counts(llm), before)])
    want, got = results
    assert [(r.token_ids, r.text, r.finish_reason) for r in got] == \
        [(r.token_ids, r.text, r.finish_reason) for r in want]
    for w, g in zip(want, got):
        assert [[t for t, _ in lp.top] for lp in g.logprobs] == [[t for t, _ in lp.top] for lp in w.logprobs]
        assert [lp.logprob for lp in g.logprobs] == pytest.approx([lp.logprob for lp in w.logprobs], abs=1e-4)
    assert all(matches(r.text, p.grammar) for r, p in zip(got, params) if r.finish_reason == "eos_token")
    drafted, accepted, num_steps = steps[1]
    assert accepted > 10 and drafted >= accepted and num_steps < steps[0][2], steps


def test_a_looping_sequence_takes_fewer_steps(plain, spec):
    prompt = looping_prompts(1)[0]
    steps = []
    for llm in (plain, spec):
        before = counts(llm)
        out = llm.generate([prompt], GREEDY)[0].token_ids
        steps.append(counts(llm)[2] - before[2])
    assert out == plain.generate([prompt], GREEDY)[0].token_ids
    assert steps[0] == 40 and steps[1] < steps[0], steps


def test_generated_blocks_in_the_prefix_cache_hold_accepted_tokens(tiny_llama_dir, spec):
    """A follow-up prompt that starts with an earlier request's prompt and output reuses its generated
    blocks: had a rejected draft's K/V been registered, its tokens would differ from an engine without a
    prefix cache."""
    fresh = make_llm(tiny_llama_dir, enable_prefix_caching=False)
    prompt = looping_prompts(1, seed=2)[0]
    first = spec.generate([prompt], GREEDY)[0].token_ids
    follow_up = prompt + first + [5, 6, 7]
    hits = spec.engine.scheduler.prefix_cache_hits_total
    assert spec.generate([follow_up], GREEDY)[0].token_ids == fresh.generate([follow_up], GREEDY)[0].token_ids
    assert spec.engine.scheduler.prefix_cache_hits_total - hits >= 16 * ((len(prompt) + 40) // 16)


def test_small_budget_and_preemption(tiny_llama_dir, plain):
    """A 16-token step budget (drafts dropped when they do not fit) and a 10-block pool (preemption)."""
    prompts = looping_prompts(8, seed=3)
    params = SamplingParams(temperature=0.0, max_new_tokens=26)
    want = [r.token_ids for r in plain.generate(prompts, params)]
    small = make_llm(tiny_llama_dir, num_speculative_tokens=4, kv_cache_memory=10 * 16 * 512,
                     max_num_batched_tokens=16)
    assert [r.token_ids for r in small.generate(prompts, params)] == want
    assert small.engine.scheduler.num_preemptions_total > 0 and small.engine.counters.accepted_draft_tokens > 0
    assert small.engine.allocator.num_free_blocks == small.engine.allocator.num_blocks


def test_prefill_graph_path_samples_every_draft_row(tiny_llama_dir, plain):
    """The graphs' static buffers (with the eager model as replay): a step with drafts is a chunk per
    sequence with a logits row per fed token, more rows than sequences."""
    graphed = make_llm(tiny_llama_dir, num_speculative_tokens=4, max_num_batched_tokens=64, max_num_seqs=8)
    graphed.engine.runner.use_graph_path_eagerly()
    prompts = looping_prompts(6, seed=4)
    assert [r.token_ids for r in graphed.generate(prompts, GREEDY)] == \
        [r.token_ids for r in plain.generate(prompts, GREEDY)]
    assert graphed.engine.counters.accepted_draft_tokens > 0
    assert sum(graphed.engine.runner.prefill_graphs.replays.values()) > 1  # the prompts' step and draft steps


def test_no_drafts_at_large_batches_and_those_steps_overlap(tiny_llama_dir, plain):
    """speculative_disable_by_batch_size 3 on the graph path (overlap scheduling on): while 3 or more
    sequences run, steps overlap and nothing drafts; once the short requests end, the long one drafts."""
    llm = make_llm(tiny_llama_dir, num_speculative_tokens=4, speculative_disable_by_batch_size=3,
                   max_num_batched_tokens=64, max_num_seqs=8)
    llm.engine.runner.use_graph_path_eagerly()
    prompts = looping_prompts(6)  # the first one's output loops
    params = [GREEDY] + [SamplingParams(temperature=0.0, max_new_tokens=6)] * 5
    assert [r.token_ids for r in llm.generate(prompts, params)] == \
        [r.token_ids for r in plain.generate(prompts, params)]
    c = llm.engine.counters
    assert c.overlapped_steps > 0 and c.accepted_draft_tokens > 0


def test_verified_drafts_are_counted_by_position():
    from server.engine import EngineCounters
    from server.speculative import record_verified
    c = EngineCounters()
    for drafted, kept in ((4, 2), (0, 0), (3, 3), (4, 0)):  # (0, 0): a sequence beside the drafting ones
        record_verified(c, drafted, kept)
    assert (c.num_drafts, c.draft_tokens, c.accepted_draft_tokens) == (3, 11, 5)
    assert c.accepted_by_position[:4] == [2, 2, 1, 0]


def test_metrics_count_drafts(spec):
    from server.async_engine import engine_stats
    from server.metrics import ServerMetrics
    spec.generate(looping_prompts(2, seed=5), GREEDY)
    stats = engine_stats(spec.engine)
    assert stats.draft_tokens >= stats.accepted_draft_tokens > 0
    text = ServerMetrics(lambda: stats).render().decode()
    assert f"gqaserve_spec_decode_num_draft_tokens_total {float(stats.draft_tokens)}" in text
    assert f"gqaserve_spec_decode_num_accepted_tokens_total {float(stats.accepted_draft_tokens)}" in text
    # by position (as vLLM's ..._per_pos): position j kept only after j - 1 was, and they add up
    per_pos = stats.accepted_by_position
    k, predicted = spec.engine.config.num_speculative_tokens, spec.engine.config.num_prediction_tokens
    assert len(per_pos) == max(k, predicted) and sum(per_pos) == stats.accepted_draft_tokens  # (predictions' too)
    assert list(per_pos) == sorted(per_pos, reverse=True) and stats.num_drafts >= per_pos[0] > 0
    assert f"gqaserve_spec_decode_num_drafts_total {float(stats.num_drafts)}" in text
    for j, value in enumerate(per_pos):
        assert f'gqaserve_spec_decode_num_accepted_tokens_per_pos_total{{position="{j}"}} {float(value)}' in text


def test_http_stream_with_drafts_equals_the_plain_server(tiny_llama_dir):
    """Several tokens of one request per step reach the stream as one chunk each, in order: OpenAI
    completions over token-id prompts, streamed and whole, and a TGI stream under a JSON schema (forced
    tokens as drafts), against a server without drafts."""
    import json

    from tests.test_grammar import SCHEMA

    import httpx

    from server.app import create_app
    from server.async_engine import AsyncEngine
    from server.config import ServerConfig
    from tests.live_server import LiveServer, metric

    results = []
    for k in (0, 4):
        engine = AsyncEngine(EngineConfig(model=str(tiny_llama_dir), device="cpu", dtype="float32",
                                          kv_cache_memory="4MiB", num_speculative_tokens=k))
        texts = []
        with LiveServer(create_app(engine, ServerConfig(stats_log_interval_s=0))) as server:
            model = httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"]
            for prompt in looping_prompts(4, seed=6):
                body = {"model": model, "prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
                whole = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
                chunks = []
                with httpx.stream("POST", server.url + "/v1/completions", json=body | {"stream": True},
                                  timeout=60) as r:
                    for line in r.iter_lines():
                        if line.startswith("data:") and line != "data: [DONE]":
                            chunks.append(json.loads(line[5:])["choices"][0]["text"])
                assert whole["usage"]["completion_tokens"] == 24 and "".join(chunks) == whole["choices"][0]["text"]
                texts.append(whole["choices"][0]["text"])
            # a TGI stream under a JSON schema: its forced tokens are drafts, streamed a token an event
            before = metric(server.url, "gqaserve_spec_decode_num_accepted_tokens_total")
            tokens = []
            grammar = {"type": "json", "value": SCHEMA}
            body = {"inputs": "To be", "parameters": {"max_new_tokens": 40, "grammar": grammar, "seed": 3,
                                                       "temperature": 0.7}}
            with httpx.stream("POST", server.url + "/generate_stream", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        event = json.loads(line[5:])
                        tokens.append(event["token"]["id"])
                        final = event["generated_text"]
            assert set(json.loads(final)) == set(SCHEMA["properties"])
            kept = metric(server.url, "gqaserve_spec_decode_num_accepted_tokens_total") - before
            assert kept > 5 if k else kept == 0
            texts.append((tokens, final))
            drafted = metric(server.url, "gqaserve_spec_decode_num_draft_tokens_total")
            info = httpx.get(server.url + "/info", timeout=10).json()
            assert info["speculative"] == (None if k == 0 else {
                "method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2,
                "disable_by_batch_size": None, "adaptive": False})
        results.append((texts, drafted))
    assert results[1][0] == results[0][0]
    assert results[0][1] == 0 and results[1][1] > 0


def test_the_stats_line_gives_the_interval_s_draft_acceptance():
    from server.app import stats_line
    from server.async_engine import EngineStats
    before = EngineStats(0, 0, 0.0, 10, 10, 0, 0, 0, 0, 0, draft_tokens=100, accepted_draft_tokens=90)
    now = EngineStats(0, 0, 0.0, 10, 10, 0, 0, 0, 0, 0, draft_tokens=300, accepted_draft_tokens=140)
    assert stats_line(now, before, 1.0).endswith("| drafts kept 25.0% (50/200)")
    assert "drafts" not in stats_line(before, before, 1.0)  # nothing drafted in the interval: no rate


def test_a_steps_kept_drafts_share_its_step_time_and_its_inter_token_gap(spec):
    """Each kept draft is its own output, all made in one step: the ITL histogram spread the step's gap over
    them (k samples of gap / k); it took one sample of the whole gap and k - 1 of about zero."""
    import asyncio
    import types

    from server.config import ServerConfig
    from server.generation import _tracked
    from server.metrics import ServerMetrics
    from server.outputs import RequestOutput

    engine = spec.engine
    for i, prompt in enumerate(looping_prompts(8)):
        engine.add_request(f"steps-{i}", prompt, GREEDY)
    most = 0
    while engine.has_unfinished():
        outputs = engine.step()
        assert len({o.step_time for o in outputs}) <= 1 and all(o.step_time is not None for o in outputs)
        most = max([most] + [sum(o.request_id == r.request_id for o in outputs) for r in outputs])
    assert most > 1  # a request kept drafts: several outputs of one step

    metrics = ServerMetrics(lambda: None)
    state = types.SimpleNamespace(metrics=metrics, engine=types.SimpleNamespace(abort=lambda request_id: None),
                                  config=ServerConfig())
    steps = [[1], [2, 3, 4], [5]]  # the tokens each step made; 30 ms between steps

    async def stream():
        for i, tokens in enumerate(steps):
            await asyncio.sleep(0.03)
            for token in tokens:
                yield RequestOutput("r", [token], "x", finished=token == 5, finish_reason="length", step_time=i)

    async def consume():
        return [out async for out in _tracked(state, "r", stream(), arrival=0.0, prompt_tokens=1)]

    assert len(asyncio.run(consume())) == 5
    sample = metrics.registry.get_sample_value
    assert sample("gqaserve_inter_token_latency_seconds_count") == 4
    assert sample("gqaserve_inter_token_latency_seconds_bucket", {"le": "0.005"}) == 0  # 3 x 10+ ms, 1 x 30+ ms
