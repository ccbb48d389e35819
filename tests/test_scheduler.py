"""Scheduler + BlockAllocator driven by a fake model (no weights): chunked prefill, budgets, preemption, leaks.

The fake model keeps a slot -> (request, position, token) map as its "KV cache": every scheduled token is
written to the slot its block table gives, and before a sequence samples, its whole context must be there.
So a wrong block table, a wrong num_computed_tokens or a lost recompute fails loudly. The sampled token is
a function of (request, output index), as a greedy model's would be of the context.
"""
import random

import pytest

from server.blocks import BlockAllocator
from server.outputs import AdmissionError, OverloadedError
from server.sampling_params import SamplingParams
from server.scheduler import Scheduler
from server.scheduler_output import SchedulerOutput
from server.sequence import Sequence, SequenceStatus


class FakeModel:
    def __init__(self, block_size: int):
        self.block_size = block_size
        self.cache: dict[int, tuple[str, int, int]] = {}

    def slot(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    def run(self, out: SchedulerOutput) -> dict[str, int]:
        sampled = {}
        for s in out.scheduled:
            seq, start = s.seq, s.seq.num_computed_tokens
            for pos in range(start, start + s.num_new_tokens):
                self.cache[self.slot(seq, pos)] = (seq.request_id, pos, seq.token_ids[pos])
            if s.samples:
                for pos in range(seq.num_tokens):
                    assert self.cache[self.slot(seq, pos)] == (seq.request_id, pos, seq.token_ids[pos])
                sampled[seq.request_id] = 3 + hash((seq.request_id, seq.num_output_tokens)) % 300
        return sampled


def make(num_blocks=64, block_size=8, max_num_seqs=8, budget=32, max_model_len=512, max_waiting=1024):
    alloc = BlockAllocator(num_blocks, block_size)
    sched = Scheduler(alloc, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                      max_model_len=max_model_len, max_waiting_requests=max_waiting)
    return sched, FakeModel(block_size)


def step(sched: Scheduler, model: FakeModel) -> SchedulerOutput:
    out = sched.schedule()
    sampled = model.run(out)
    sched.finish_step(out)
    bs = sched.allocator.block_size
    for s in out.scheduled:
        if s.samples:
            index = s.seq.num_tokens
            if index % bs == 0:  # as LLMEngine._complete: the step filled a block, now seen by the host
                sched.allocator.register_full_blocks(s.seq, index - bs, index)
            s.seq.token_ids.append(sampled[s.seq.request_id])
            if s.seq.num_output_tokens >= s.seq.params.max_new_tokens:
                sched.finish(s.seq, "length")
    return out


def add(sched, rid, n_prompt, n_out):
    seq = Sequence(rid, [3 + (i * 7) % 300 for i in range(n_prompt)], SamplingParams(max_new_tokens=n_out))
    sched.add(seq)
    return seq


def run_all(sched, model, max_steps=10_000):
    outs = []
    while sched.has_unfinished():
        outs.append(step(sched, model))
        assert len(outs) < max_steps, "no progress"
    return outs


def test_chunked_prefill_does_not_stall_decodes():
    sched, model = make(budget=32)
    a = add(sched, "a", 5, 40)
    step(sched, model)  # a's prefill
    b = add(sched, "b", 100, 4)
    chunks = []
    while b.num_output_tokens == 0:
        out = step(sched, model)
        assert out.num_batched_tokens <= 32
        by_id = {s.seq.request_id: s for s in out.scheduled}
        assert by_id["a"].num_new_tokens == 1 and not by_id["a"].is_prefill  # a decodes every step
        chunks.append(by_id["b"].num_new_tokens)
    assert sum(chunks) == 100 and len(chunks) == 4 and max(chunks) == 31
    run_all(sched, model)
    assert a.num_output_tokens == 40 and b.num_output_tokens == 4


def test_budget_and_max_num_seqs_respected():
    sched, model = make(num_blocks=512, max_num_seqs=5, budget=48)
    rng = random.Random(1)
    seqs = [add(sched, f"r{i}", rng.randint(1, 90), rng.randint(1, 20)) for i in range(30)]
    for out in run_all(sched, model):
        assert 0 < out.num_batched_tokens <= 48
        assert len(out.scheduled) <= 5 and len(sched.running) <= 5
        assert sum(s.num_new_tokens for s in out.scheduled) == out.num_batched_tokens
    assert all(s.num_output_tokens == s.params.max_new_tokens for s in seqs)


def test_fcfs_admission_order():
    sched, model = make(max_num_seqs=2, budget=64)
    for i in range(4):
        add(sched, f"r{i}", 10, 3)
    out = step(sched, model)
    assert [s.seq.request_id for s in out.scheduled] == ["r0", "r1"]


def test_preemption_with_tiny_pool_completes_everything():
    sched, model = make(num_blocks=12, block_size=8, max_num_seqs=8, budget=64)
    rng = random.Random(0)
    seqs = [add(sched, f"r{i}", rng.randint(4, 30), rng.randint(20, 60)) for i in range(12)]
    run_all(sched, model)
    assert sched.num_preemptions_total > 0
    assert all(s.status is SequenceStatus.FINISHED and s.num_output_tokens == s.params.max_new_tokens
               for s in seqs)
    assert sched.allocator.num_free_blocks == 12


def test_preempted_sequence_requeues_at_front_and_recomputes_outputs():
    sched, model = make(num_blocks=4, block_size=8, max_num_seqs=4, budget=64)
    a = add(sched, "a", 8, 20)
    b = add(sched, "b", 8, 20)
    while sched.num_preemptions_total == 0:
        step(sched, model)
    assert sched.waiting[0] is b and b.num_computed_tokens == 0 and b.block_table == []
    n_out = b.num_output_tokens
    run_all(sched, model)
    assert a.num_output_tokens == b.num_output_tokens == 20 and n_out > 0


def test_admission_refusals_name_the_field():
    sched, _ = make(num_blocks=4, block_size=8, max_model_len=64, max_waiting=2)
    with pytest.raises(AdmissionError) as e:
        add(sched, "long", 60, 10)
    assert e.value.field == "max_new_tokens" and "60" in str(e.value) and "64" in str(e.value)
    with pytest.raises(AdmissionError) as e:
        add(sched, "huge", 64, 1)
    assert e.value.field == "inputs"
    with pytest.raises(AdmissionError) as e:  # fits max_model_len, not the pool of 32 tokens
        add(sched, "pool", 30, 20)
    assert e.value.field == "max_new_tokens" and "4" in str(e.value)
    with pytest.raises(AdmissionError):
        add(sched, "empty", 0, 1)
    add(sched, "w1", 4, 1)
    with pytest.raises(ValueError, match="duplicate"):
        add(sched, "w1", 4, 1)
    add(sched, "w2", 4, 1)
    with pytest.raises(OverloadedError):
        add(sched, "w3", 4, 1)


def test_no_leak_after_many_requests_with_aborts_and_refusals():
    sched, model = make(num_blocks=24, block_size=8, max_num_seqs=6, budget=40, max_model_len=200, max_waiting=50)
    rng = random.Random(42)
    live, next_id, refused = [], 0, 0
    for _ in range(3000):
        if next_id < 400 and rng.random() < 0.5:
            try:
                live.append(add(sched, f"r{next_id}", rng.randint(1, 120), rng.randint(1, 80)))
            except (AdmissionError, OverloadedError):
                refused += 1
            next_id += 1
        if live and rng.random() < 0.05:
            victim = live.pop(rng.randrange(len(live)))
            sched.abort(victim.request_id)
            sched.abort(victim.request_id)  # idempotent
        if sched.has_unfinished():
            step(sched, model)
        live = [s for s in live if not s.is_finished]
    run_all(sched, model)
    assert refused > 0 and next_id == 400
    assert sched.allocator.num_free_blocks == 24 and not sched.running and not sched.waiting
    assert sched.requests == {}
