"""scheduling_policy "priority": queue order, preemption victims, room made for urgent arrivals, and that
equal priorities schedule exactly as FCFS. Driven by test_scheduler's fake model, which checks every
sequence's KV context before it samples."""
import random

import pytest

from server.blocks import BlockAllocator
from server.outputs import AdmissionError
from server.sampling_params import SamplingParams
from server.scheduler import Scheduler
from server.sequence import Sequence, SequenceStatus
from tests.test_scheduler import FakeModel, run_all, step


def make(policy="priority", num_blocks=64, block_size=8, max_num_seqs=8, budget=32, max_model_len=512):
    sched = Scheduler(BlockAllocator(num_blocks, block_size), max_num_seqs=max_num_seqs,
                      max_num_batched_tokens=budget, max_model_len=max_model_len, scheduling_policy=policy)
    return sched, FakeModel(block_size)


def add(sched, rid, n_prompt, n_out, priority=0):
    seq = Sequence(rid, [3 + (i * 7) % 300 for i in range(n_prompt)],
                   SamplingParams(max_new_tokens=n_out, priority=priority))
    sched.add(seq)
    return seq


def finish_order(sched, model) -> list[str]:
    order = []
    while sched.has_unfinished():
        running = {s.request_id for s in sched.running}
        step(sched, model)
        order += sorted(r for r in running if r not in sched.requests)
    return order


def test_fcfs_refuses_a_priority_naming_the_field():
    sched, _ = make("fcfs")
    with pytest.raises(AdmissionError) as e:
        add(sched, "p", 4, 2, priority=-1)
    assert e.value.field == "priority" and "scheduling_policy" in str(e.value)
    add(sched, "zero", 4, 2, priority=0)


@pytest.mark.parametrize("priority", [0, 7])
def test_equal_priorities_schedule_exactly_as_fcfs(priority):
    """The same random traffic (tiny pool: preemptions; aborts) through both policies, step by step."""
    rng = random.Random(priority)
    fcfs, fm = make("fcfs", num_blocks=20, max_num_seqs=6, budget=40)
    prio, pm = make("priority", num_blocks=20, max_num_seqs=6, budget=40)
    next_id = 0
    for _ in range(1500):
        if next_id < 150 and rng.random() < 0.4:
            n_prompt, n_out = rng.randint(1, 60), rng.randint(1, 50)
            add(fcfs, f"r{next_id}", n_prompt, n_out)
            add(prio, f"r{next_id}", n_prompt, n_out, priority)
            next_id += 1
        if fcfs.requests and rng.random() < 0.03:
            victim = rng.choice(sorted(fcfs.requests))
            fcfs.abort(victim)
            prio.abort(victim)
        if fcfs.has_unfinished():
            a, b = step(fcfs, fm), step(prio, pm)
            assert [(s.seq.request_id, s.num_new_tokens) for s in a.scheduled] == \
                   [(s.seq.request_id, s.num_new_tokens) for s in b.scheduled]
            assert a.preempted == b.preempted
    assert fcfs.num_preemptions_total > 0


def test_the_queue_is_served_by_priority_then_arrival():
    sched, model = make(max_num_seqs=1, budget=64)
    add(sched, "first", 4, 3, priority=-5)
    step(sched, model)  # admitted before the others arrive, and more urgent than all: never preempted
    for rid, priority in [("a", 5), ("b", 1), ("c", 5), ("d", 1), ("e", -2)]:
        add(sched, rid, 4, 3, priority)
    assert [s.request_id for s in sched.waiting] == ["e", "b", "d", "a", "c"]
    assert finish_order(sched, model) == ["first", "e", "b", "d", "a", "c"]


def test_an_urgent_arrival_preempts_the_newest_of_the_lowest_priority_for_a_slot():
    sched, model = make(max_num_seqs=3, budget=64)
    low_old = add(sched, "low_old", 6, 40, priority=9)
    mid = add(sched, "mid", 6, 40, priority=4)
    low_new = add(sched, "low_new", 6, 40, priority=9)
    step(sched, model)
    step(sched, model)
    later_low = add(sched, "later_low", 6, 5, priority=9)
    same = add(sched, "same", 6, 5, priority=9)  # as low as the running ones: it waits, preempting nobody
    out = step(sched, model)
    assert out.preempted == () and same.status is SequenceStatus.WAITING
    urgent = add(sched, "urgent", 6, 5, priority=0)
    out = step(sched, model)
    assert out.preempted == ("low_new",) and urgent.status is SequenceStatus.RUNNING
    assert "urgent" in {s.seq.request_id for s in out.scheduled}
    assert low_old.status is mid.status is SequenceStatus.RUNNING
    # the preempted one goes before the later arrivals of its priority, and keeps its outputs to recompute
    assert [s.request_id for s in sched.waiting] == ["low_new", "later_low", "same"]
    run_all(sched, model)
    assert all(s.num_output_tokens == s.params.max_new_tokens for s in (low_old, mid, low_new, later_low, same))
    assert sched.allocator.num_free_blocks == 64


def test_an_urgent_arrival_preempts_for_blocks_and_block_pressure_takes_the_lowest_priority():
    # 6 blocks of 8: two running sequences fill them as they grow
    sched, model = make(num_blocks=6, block_size=8, max_num_seqs=8, budget=64)
    low = add(sched, "low", 8, 40, priority=5)
    step(sched, model)
    high = add(sched, "high", 8, 40, priority=1)  # admitted last: FCFS's victim, the newest
    step(sched, model)
    assert [s.request_id for s in sched.running] == ["low", "high"]
    while sched.num_preemptions_total == 0:
        step(sched, model)
    assert low.num_preemptions == 1 and high.num_preemptions == 0
    run_all(sched, model)
    assert high.num_preemptions == 0
    sched, model = make(num_blocks=6, block_size=8, max_num_seqs=8, budget=64)
    hog = add(sched, "hog", 30, 10, priority=2)
    step(sched, model)  # 4 blocks held, 2 free
    urgent = add(sched, "urgent", 20, 3, priority=0)  # needs 3 for its prompt
    out = step(sched, model)
    assert out.preempted == ("hog",) and urgent.status is SequenceStatus.RUNNING
    run_all(sched, model)
    assert hog.num_output_tokens == 10 and urgent.num_output_tokens == 3


def test_room_counts_the_block_a_running_sequence_takes_for_its_next_token():
    sched, model = make(num_blocks=6, block_size=8, max_num_seqs=8, budget=64)
    hog = add(sched, "hog", 32, 10, priority=2)
    step(sched, model)  # 4 blocks full, 2 free, and its next token needs a fifth
    assert hog.num_tokens == 33 and len(hog.block_table) == 4 and sched.allocator.num_free_blocks == 2
    urgent = add(sched, "urgent", 16, 3, priority=0)  # 2 blocks: they are free, until hog takes one
    out = step(sched, model)
    assert out.preempted == ("hog",) and urgent.status is SequenceStatus.RUNNING


def test_a_sequence_preempted_to_make_room_is_not_readmitted_in_the_same_step():
    """Its last token may still be in flight (overlap scheduling): re-admitted at once, it would get a new block
    table before that step's tokens land (the engine then indexed the new, shorter table: an IndexError)."""
    sched, model = make(num_blocks=4, block_size=16, max_num_seqs=8, budget=32)
    v = add(sched, "v", 20, 40, priority=1)
    while v.num_tokens < 49:
        step(sched, model)  # 3 blocks held, its next token needs the fourth
    h = add(sched, "h", 20, 3, priority=0)  # 2 blocks: room only once v is gone, then 12 tokens of budget left
    out = step(sched, model)
    assert out.preempted == ("v",) and h.status is SequenceStatus.RUNNING
    assert "v" not in {s.seq.request_id for s in out.scheduled} and v.status is SequenceStatus.WAITING
    run_all(sched, model)
    assert v.num_output_tokens == 40 and sched.allocator.num_free_blocks == 4


def test_the_engine_survives_a_room_making_preemption_with_a_token_in_flight(tiny_llama_dir):
    from server.llm import LLM
    llm = LLM(str(tiny_llama_dir), dtype="float32", device="cpu", block_size=16, max_num_batched_tokens=32,
              kv_cache_memory=4 * 16 * 512, enable_prefix_caching=True, overlap_scheduling=True,
              scheduling_policy="priority")
    engine = llm.engine
    assert engine.allocator.num_blocks == 4
    engine.runner.use_graph_path_eagerly(prefill=True)  # the CPU stand-in for graphs: steps overlap
    greedy = dict(temperature=0.0, ignore_eos=True)
    engine.add_request("v", [5 + (i * 7) % 300 for i in range(20)],
                       SamplingParams(max_new_tokens=40, priority=1, prompt_logprobs=True, **greedy))
    while len(engine.scheduler.requests["v"].token_ids) < 49:
        engine.step()
    engine.add_request("h", [9 + (i * 11) % 300 for i in range(20)], SamplingParams(max_new_tokens=3, **greedy))
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            done.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert engine.scheduler.num_preemptions_total >= 1 and len(done["h"]) == 3
    assert engine.allocator.num_free_blocks == 4


def test_no_room_is_made_while_the_sequences_left_would_use_the_whole_token_budget():
    sched, model = make(max_num_seqs=2, budget=32)
    low = add(sched, "low", 10, 40, priority=1)
    step(sched, model)
    add(sched, "long", 200, 4, priority=0)  # its prompt takes the whole budget for 6 more steps
    step(sched, model)
    add(sched, "urgent", 10, 4, priority=0)
    outputs = []
    while sched.requests["long"].num_computed_tokens + 31 < 200:
        out = step(sched, model)
        assert out.preempted == ()  # `urgent` could not run yet: `low` keeps decoding meanwhile
        outputs.append(low.num_output_tokens)
    assert outputs == sorted(outputs) and outputs[-1] > outputs[0]
    run_all(sched, model)
    assert low.num_output_tokens == 40


def test_drafts_leave_free_the_blocks_an_urgent_request_needs():
    sched, model = make(num_blocks=8, block_size=8, max_num_seqs=8, budget=64)
    drafter = add(sched, "drafter", 11, 20, priority=0)
    add(sched, "low", 11, 20, priority=1)
    step(sched, model)  # both prefilled: 2 blocks each, 4 free
    urgent = add(sched, "urgent", 31, 4, priority=0)  # 4 blocks
    drafter.draft_token_ids = [5, 6, 7, 8, 9]  # would take a fifth block
    out = sched.schedule()
    assert out.preempted == () and urgent.status is SequenceStatus.RUNNING and out.num_draft_tokens == 0


def test_random_priorities_with_aborts_finish_everything_and_free_every_block():
    sched, model = make(num_blocks=24, max_num_seqs=6, budget=40, max_model_len=200)
    rng = random.Random(5)
    seqs, next_id, aborted = [], 0, set()
    for _ in range(3000):
        if next_id < 300 and rng.random() < 0.5:
            seqs.append(add(sched, f"r{next_id}", rng.randint(1, 100), rng.randint(1, 60), rng.randint(-2, 2)))
            next_id += 1
        if sched.requests and rng.random() < 0.03:
            victim = rng.choice(sorted(sched.requests))
            sched.abort(victim)
            aborted.add(victim)
        if sched.has_unfinished():
            out = step(sched, model)
            assert len(out.scheduled) <= 6 and out.num_batched_tokens <= 40
        waiting = [s.params.priority for s in sched.waiting]
        assert waiting == sorted(waiting)
    run_all(sched, model)
    assert sched.num_preemptions_total > 0 and next_id == 300
    assert all(s.num_output_tokens == s.params.max_new_tokens for s in seqs if s.request_id not in aborted)
    assert sched.allocator.num_free_blocks == 24 and not sched.running and not sched.waiting
