"""Prefix caching (BlockAllocator's registered prompt blocks): what is shared, what is evicted, what is never
shared, and that an engine with it gives the tokens of one without it."""
import random

import pytest

from server.blocks import BlockAllocator
from server.sampling_params import SamplingParams
from server.scheduler import Scheduler
from server.scheduler_output import SchedulerOutput
from server.sequence import Sequence
from tests.test_scheduler import step

BS = 4


def seq(rid: str, tokens: list[int], **params) -> Sequence:
    return Sequence(rid, tokens, SamplingParams(max_new_tokens=params.pop("max_new_tokens", 4), **params))


def computed(alloc: BlockAllocator, s: Sequence, num_tokens: int | None = None) -> Sequence:
    """Give s blocks for its prompt up to num_tokens, registered as the scheduler does, and compute them."""
    num_tokens = s.num_prompt_tokens if num_tokens is None else num_tokens
    n = num_tokens - s.num_computed_tokens
    assert alloc.allocate_slots(s, n)
    alloc.register_scheduled_blocks(s, n)
    s.num_computed_tokens = num_tokens
    return s


PROMPT = list(range(10, 20))  # 10 tokens: 2 full blocks of 4 and a partial one


def test_a_later_prompt_shares_the_full_blocks_and_computes_the_rest():
    a = BlockAllocator(16, BS, enable_prefix_caching=True)
    first = computed(a, seq("a", PROMPT))
    second = seq("b", PROMPT + [99])
    assert a.take_cached_prefix(second) == 8
    assert second.block_table == first.block_table[:2] and second.num_computed_tokens == 8
    assert [a.ref_count(b) for b in first.block_table] == [2, 2, 1]
    # the same 10 tokens again: 2 blocks are all it can take (the last token must run to sample)
    assert a.take_cached_prefix(seq("c", PROMPT)) == 8
    # a prompt of exactly 2 blocks takes 1: its 8th token must still be computed
    assert a.take_cached_prefix(seq("d", PROMPT[:8])) == 4


def test_a_block_matches_only_after_the_same_whole_prefix():
    a = BlockAllocator(16, BS, enable_prefix_caching=True)
    computed(a, seq("a", PROMPT))
    other_start = [7, 7, 7, 7] + PROMPT[4:]  # block 2 has the same tokens, after another block 1
    assert a.take_cached_prefix(seq("b", other_start)) == 0
    # block 2's tokens at the start: the same tokens at another position (other K after RoPE, other context)
    assert a.take_cached_prefix(seq("b2", PROMPT[4:8] + [1, 2, 3])) == 0
    assert a.take_cached_prefix(seq("c", PROMPT[:4] + [5] + PROMPT[5:])) == 4  # stops at the first change


def test_freed_blocks_stay_cached_until_the_pool_needs_them():
    a = BlockAllocator(4, BS, enable_prefix_caching=True)
    first = computed(a, seq("a", PROMPT))  # 3 blocks: 2 full ones registered, the partial one not
    blocks = list(first.block_table)
    a.free(first)
    assert a.num_free_blocks == 4 and a.usage == 0.0 and a.num_cached_blocks == 2
    again = seq("b", PROMPT)
    assert a.take_cached_prefix(again) == 8 and again.block_table == blocks[:2]
    assert a.num_free_blocks == 2
    a.free(again)
    # never-registered blocks go first, then the least recently freed registered ones, which drop out; a
    # sequence's blocks are freed tail first, so its tail goes before the prefix others may share
    got = a.allocate(3)
    assert got[:2] == [3, blocks[2]] and got[2] == blocks[1]
    c = seq("c", PROMPT)
    assert a.num_cached_blocks == 1 and a.take_cached_prefix(c) == 4 and c.block_table == blocks[:1]
    a.free(c)
    a.free_blocks(got)
    assert a.num_free_blocks == 4


def test_two_sequences_that_compute_one_block_register_one_copy():
    a = BlockAllocator(16, BS, enable_prefix_caching=True)
    x, y = seq("x", PROMPT + [1, 2, 3]), seq("y", PROMPT + [1, 2, 3])  # 13 tokens: 3 full blocks each
    computed(a, x, 8)
    computed(a, y, 8)  # y computed its own copy (it held its blocks before x registered these)
    computed(a, y, 13)  # y's third block chains from its own (duplicate) second block
    assert a.num_cached_blocks == 3
    z = seq("z", PROMPT + [1, 2, 3, 4])
    assert a.take_cached_prefix(z) == 12 and z.block_table == x.block_table[:2] + y.block_table[2:3]
    a.free(y)  # y's duplicate blocks were never registered: they go straight back to the free list
    assert a.num_free_blocks == 16 - 2 - 1  # x's 2 blocks and y's third (z holds it) stay in use
    assert a.num_cached_blocks == 3 and not a._evictable


def test_what_is_never_taken():
    a = BlockAllocator(16, BS, enable_prefix_caching=True)
    computed(a, seq("a", PROMPT))
    assert a.take_cached_prefix(seq("logprobs", PROMPT, prompt_logprobs=1)) == 0  # needs every position
    off = BlockAllocator(16, BS)
    computed(off, seq("a", PROMPT))
    assert off.num_cached_blocks == 0 and off.take_cached_prefix(seq("b", PROMPT)) == 0
    failed = computed(a, seq("f", [5] * 9))
    a.drop_cached(failed)  # its step failed: its K/V may never have been written
    assert a.take_cached_prefix(seq("g", [5] * 9)) == 0


def test_a_chain_broken_by_a_failure_is_not_extended():
    """b shares a's first block; a's step fails and unregisters it. b's later blocks have no registered
    block before them, so they are not registered (hashed without their prefix they would match the
    same tokens at the start of another prompt)."""
    a = BlockAllocator(16, BS, enable_prefix_caching=True)
    first = computed(a, seq("a", PROMPT[:5]))  # registers block [10..13]
    b = seq("b", PROMPT)
    assert a.take_cached_prefix(b) == 4
    a.drop_cached(first)
    computed(a, b)  # b computes blocks 2 and 3 of its prompt
    assert a.num_cached_blocks == 0
    assert a.take_cached_prefix(seq("c", PROMPT[4:8] + [1, 2])) == 0


def test_an_admission_that_does_not_fit_gives_back_the_blocks_it_took():
    alloc = BlockAllocator(6, BS, enable_prefix_caching=True)
    sched = Scheduler(alloc, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)
    holder = computed(alloc, seq("a", PROMPT))  # 3 blocks
    alloc.allocate(2)  # another sequence's: 1 block left
    big = seq("b", PROMPT + list(range(40, 50)), max_new_tokens=1)  # 5 blocks: 2 cached, 3 more to find
    sched.add(big)
    assert sched.schedule().is_empty
    assert big.block_table == [] and big.num_computed_tokens == 0
    assert [alloc.ref_count(b) for b in holder.block_table] == [1, 1, 1]
    assert sched.prefix_cache_queries_total == 0  # counted when admitted, not per attempt


def test_generated_blocks_are_shared_too():
    """A finished request's answer is cached with its prompt: the next turn of a chat (prompt + answer + more)
    finds both. Blocks are registered when the host has seen the step that filled them (test_scheduler's
    step() does what LLMEngine._complete does)."""
    alloc = BlockAllocator(16, BS, enable_prefix_caching=True)
    sched = Scheduler(alloc, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)
    model = FakeModel()
    first = seq("turn1", PROMPT, max_new_tokens=9)  # 10 + 9 tokens; the last one's K/V is never computed
    sched.add(first)
    while sched.has_unfinished():
        step(sched, model)
    assert alloc.num_cached_blocks == 18 // BS  # 4 full blocks among the 18 computed tokens
    turn2 = seq("turn2", first.token_ids + [7, 8, 9])
    sched.add(turn2)
    out = step(sched, model)  # FakeModel checks the shared context when turn2 samples
    assert out.scheduled[0].num_new_tokens == 22 - 16 and sched.prefix_cache_hits_total == 16


def test_a_placeholder_is_never_registered():
    """Overlap scheduling: a recompute's last token may still be -1 when it is scheduled; the block it
    ends is registered later, by the engine, once the host has its id."""
    a = BlockAllocator(16, BS, enable_prefix_caching=True)
    s = seq("a", PROMPT[:6])
    s.token_ids += [50, -1]  # 8 tokens: the second block ends with the placeholder
    assert a.allocate_slots(s, 8)
    a.register_scheduled_blocks(s, 8)
    assert a.num_cached_blocks == 1
    s.token_ids[-1] = 51
    a.register_full_blocks(s, 4, 8)
    assert a.num_cached_blocks == 2


def test_a_preempted_sequence_takes_back_its_own_prompt_and_output():
    alloc = BlockAllocator(16, BS, enable_prefix_caching=True)
    sched = Scheduler(alloc, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)
    model = FakeModel()
    s = seq("a", PROMPT, max_new_tokens=12)
    sched.add(s)
    for _ in range(8):  # the prompt, then 7 decodes: 18 tokens, 17 computed
        step(sched, model)
    assert s.num_tokens == 18
    sched._preempt(s, {})
    out = step(sched, model)  # readmitted: 16 tokens from the cache, its prompt's and its own output's
    assert out.scheduled[0].seq is s and out.scheduled[0].num_new_tokens == 2
    assert sched.prefix_cache_hits_total == 16 and sched.prefix_cache_queries_total == 10 + 18
    while sched.has_unfinished():
        step(sched, model)
    assert s.num_output_tokens == 12 and alloc.num_free_blocks == 16


class FakeModel:
    """A KV cache of slot -> (position, token): before a sequence samples, every position of its context
    must hold its own token, whether this sequence wrote it or a shared block did. A block handed to
    another sequence while still registered, or a hit on the wrong prefix, fails here."""

    def __init__(self) -> None:
        self.cache: dict[int, tuple[int, int]] = {}

    def run(self, out: SchedulerOutput) -> dict[str, int]:
        slot = lambda s, p: s.block_table[p // BS] * BS + p % BS  # noqa: E731
        sampled = {}
        for s in out.scheduled:  # as each layer does: the whole step's K/V are written, then read
            q, start = s.seq, s.seq.num_computed_tokens
            for pos in range(start, start + s.num_new_tokens):
                self.cache[slot(q, pos)] = (pos, q.token_ids[pos])
        for s in out.scheduled:
            q = s.seq
            if s.samples:
                assert all(self.cache[slot(q, p)] == (p, q.token_ids[p]) for p in range(q.num_tokens))
                sampled[q.request_id] = 3 + hash((q.request_id, q.num_output_tokens)) % 300
        return sampled


@pytest.mark.parametrize("seed", range(4))
def test_shared_prefixes_through_eviction_and_preemption(seed):
    """Requests built from a few shared prefixes, a pool small enough to evict and preempt: every context is
    intact when it samples, the caches hits, and every block comes back."""
    rng = random.Random(seed)
    alloc = BlockAllocator(20, BS, enable_prefix_caching=True)
    sched = Scheduler(alloc, max_num_seqs=6, max_num_batched_tokens=16, max_model_len=64)
    model = FakeModel()
    prefixes = [[rng.randrange(3, 300) for _ in range(rng.randint(4, 20))] for _ in range(3)]
    pending = [rng.choice(prefixes) + [rng.randrange(3, 300) for _ in range(rng.randint(1, 9))]
               for _ in range(40)]
    finished = 0
    for i in range(5000):
        while pending and rng.random() < 0.5:
            sched.add(seq(f"r{len(pending)}-{i}", pending.pop(), max_new_tokens=rng.randint(1, 8)))
        if not pending and not sched.has_unfinished():
            break
        finished += sum(s.seq.is_finished for s in step(sched, model).scheduled)
    assert finished == 40 and not sched.has_unfinished()
    assert alloc.num_free_blocks == 20 and all(alloc.ref_count(b) == 0 for b in range(20))
    assert 0 < sched.prefix_cache_hits_total < sched.prefix_cache_queries_total
    assert sched.num_preemptions_total > 0  # the pool is sized to preempt (1 to 5 times in these seeds)


# ---- the engine on the tiny model ----------------------------------------------------------------------

def test_the_engine_with_prefix_caching_gives_the_tokens_of_one_without(tiny_llama_dir):
    from server.llm import LLM
    rng = random.Random(0)
    system = [1] + [rng.randrange(3, 384) for _ in range(45)]  # 46 tokens: 2 full blocks of 16 and a bit
    prompts = [system + [rng.randrange(3, 384) for _ in range(rng.randint(1, 20))] for _ in range(6)]
    params = SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True)
    cfg = dict(dtype="float32", device="cpu", kv_cache_memory="2MiB", max_num_batched_tokens=256)
    plain = LLM(str(tiny_llama_dir), enable_prefix_caching=False, **cfg)
    want = [r.token_ids for r in plain.generate(prompts, params, use_tqdm=False)]
    cached = LLM(str(tiny_llama_dir), **cfg)
    first = cached.generate(prompts[:1], params, use_tqdm=False)[0].token_ids  # registers the system prompt
    rest = [r.token_ids for r in cached.generate(prompts[1:], params, use_tqdm=False)]
    assert [first] + rest == want
    sched = cached.engine.scheduler
    assert sched.prefix_cache_hits_total == 5 * 32  # each later prompt found the 2 full blocks
    assert sched.prefix_cache_queries_total == sum(map(len, prompts))
    assert plain.engine.scheduler.prefix_cache_queries_total == 0
    stats = cached.engine.allocator
    assert stats.num_free_blocks == stats.num_blocks and stats.num_cached_blocks >= 2


def test_requests_admitted_in_one_step_share_what_the_first_computes(tiny_llama_dir):
    """`n` samples of one prompt arrive together: the first computes the prompt, the others share its full
    blocks in the same step (each layer writes the step's K/V before any attention reads them)."""
    from server.llm import LLM
    rng = random.Random(1)
    prompt = [1] + [rng.randrange(3, 384) for _ in range(50)]  # 51 tokens: 3 full blocks of 16
    params = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
    cfg = dict(dtype="float32", device="cpu", kv_cache_memory="2MiB", max_num_batched_tokens=256)
    want = LLM(str(tiny_llama_dir), enable_prefix_caching=False, **cfg).generate([prompt], params)[0].token_ids
    llm = LLM(str(tiny_llama_dir), **cfg)
    outs = llm.generate([prompt] * 4, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == [want] * 4
    assert llm.engine.counters.num_steps == 8  # all four in the first step: one prefill, then 7 decodes
    assert llm.engine.scheduler.prefix_cache_hits_total == 3 * 48


@pytest.mark.parametrize("overlap", [False, True])
def test_a_chat_turn_reads_the_previous_answer_from_the_cache(tiny_llama_dir, overlap):
    """Turn 2 is turn 1's prompt and answer plus a new message: every full block of the 40 + 30 computed
    tokens is found, and the tokens equal an engine's without the cache. With overlap scheduling the blocks
    are registered by steps completed while the next one runs, and the graph path runs (eagerly on CPU)."""
    from server.llm import LLM
    rng = random.Random(2)
    turn1 = [1] + [rng.randrange(3, 384) for _ in range(39)]
    more = [rng.randrange(3, 384) for _ in range(7)]
    params = SamplingParams(temperature=0.0, max_new_tokens=31, ignore_eos=True)
    cfg = dict(dtype="float32", device="cpu", kv_cache_memory="2MiB", overlap_scheduling=overlap)
    plain = LLM(str(tiny_llama_dir), enable_prefix_caching=False, **cfg)
    answer = plain.generate([turn1], params, use_tqdm=False)[0].token_ids
    want = plain.generate([turn1 + answer + more], params, use_tqdm=False)[0].token_ids
    llm = LLM(str(tiny_llama_dir), **cfg)
    if overlap:
        llm.engine.runner.use_graph_path_eagerly()
    assert llm.generate([turn1], params, use_tqdm=False)[0].token_ids == answer
    assert llm.generate([turn1 + answer + more], params, use_tqdm=False)[0].token_ids == want
    assert llm.engine.scheduler.prefix_cache_hits_total == (40 + 31 - 1) // 16 * 16  # 64: 2 blocks of answer
    if overlap:
        assert llm.engine.counters.overlapped_steps > 40


def test_a_block_filled_by_a_step_in_flight_is_registered_once_the_host_has_seen_it(tiny_llama_dir):
    """With overlap scheduling a decode step's token is a placeholder when the step is launched, and its K/V
    are written only when the step runs: the block it fills is registered when that step completes (the
    next step() call), not before."""
    from server.llm import LLM
    llm = LLM(str(tiny_llama_dir), dtype="float32", device="cpu", kv_cache_memory="2MiB")
    llm.engine.runner.use_graph_path_eagerly()
    engine, alloc = llm.engine, llm.engine.allocator
    engine.add_request("a", [1] + list(range(3, 17)), SamplingParams(temperature=0.0, max_new_tokens=6))
    engine.step()  # the 15-token prompt: samples token 15
    engine.step()  # feeds token 15 (the placeholder a moment ago): fills block 0, in flight
    assert engine._in_flight is not None and alloc.num_cached_blocks == 0
    engine.step()  # completes it
    assert alloc.num_cached_blocks == 1


def test_metrics_report_prefix_cache_queries_and_hits(tiny_llama_dir):
    import httpx

    from tests.live_server import engine_server
    text = "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun."
    with engine_server(tiny_llama_dir, kv_cache_memory="4MiB") as s:
        for _ in range(2):
            r = httpx.post(s.url + "/generate", json={"inputs": text, "parameters": {"max_new_tokens": 2}})
            assert r.status_code == 200
        metrics = httpx.get(s.url + "/metrics").text
    n = len(s.engine.tokenizer.encode(text))
    assert f"gqaserve_prefix_cache_queries_total {2 * n}.0" in metrics
    assert f"gqaserve_prefix_cache_hits_total {(n - 1) // 16 * 16}.0" in metrics and n > 16


def test_a_step_that_fails_leaves_nothing_to_share(tiny_llama_dir):
    """The launch of the step that registered a prompt's blocks fails: its K/V were never written, so the
    same prompt later computes them again instead of reading them."""
    from server.llm import LLM
    llm = LLM(str(tiny_llama_dir), dtype="float32", device="cpu", kv_cache_memory="2MiB")
    prompt = [1] + list(range(3, 40))  # 38 tokens: 2 full blocks
    runner = llm.engine.runner
    params = SamplingParams(temperature=0.0, max_new_tokens=3, ignore_eos=True)
    runner.launch, real = (lambda sched: (_ for _ in ()).throw(RuntimeError("device lost"))), runner.launch
    with pytest.raises(RuntimeError, match="device lost"):
        llm.generate([prompt], params, use_tqdm=False)
    runner.launch = real
    assert llm.engine.allocator.num_cached_blocks == 0
    assert llm.generate([prompt], params, use_tqdm=False)[0].finish_reason == "length"
    assert llm.engine.scheduler.prefix_cache_hits_total == 0 and llm.engine.allocator.num_cached_blocks == 2
    assert llm.generate([prompt], params, use_tqdm=False)[0].finish_reason == "length"
    assert llm.engine.scheduler.prefix_cache_hits_total == 32


def test_the_stats_line_gives_the_hit_rate_of_its_interval():
    from server.app import stats_line
    from server.async_engine import EngineStats
    before = EngineStats(0, 0, 0.0, 10, 10, 0, 0, 0, 0, 0, prefix_cache_queries_total=100, prefix_cache_hits_total=90)
    now = EngineStats(0, 0, 0.0, 10, 10, 0, 0, 0, 0, 0, prefix_cache_queries_total=300, prefix_cache_hits_total=140)
    assert stats_line(now, before, 1.0).endswith("| prefix cache hits 25.0%")  # 50 of the interval's 200
    assert "prefix cache" not in stats_line(before, before, 1.0)  # no admission in the interval: no rate
