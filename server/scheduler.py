"""Scheduler: which sequences run this step, and how many tokens each (continuous batching).

One flat step mixes decode tokens of running sequences with prefill chunks (of new sequences and of
running ones still prefilling) under max_num_batched_tokens and max_num_seqs. Decodes go first, then
partial prefills, then new admissions in FCFS order, so a long prompt is spread over several steps and
never stalls decoding. When the pool runs dry the most recently admitted running sequence is preempted by
recompute: its blocks are freed and it rejoins the front of the queue to prefill prompt + output again.

scheduling_policy "priority" (vLLM's): each request's `priority` orders the queue, lower first, FCFS
within one value; the victim of a preemption is the most recently admitted sequence of the lowest priority
running; and a waiting request that finds no room (max_num_seqs, or blocks for its first chunk) preempts
running ones of a strictly lower priority. With every priority equal it schedules exactly as "fcfs".
"""
from __future__ import annotations

import bisect
from collections import deque

from server.blocks import BlockAllocator
from server.outputs import AdmissionError, OverloadedError
from server.sampling_params import SamplingParams
from server.scheduler_output import ScheduledSeq, SchedulerOutput
from server.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, allocator: BlockAllocator, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, max_waiting_requests: int = 1024, scheduling_policy: str = "fcfs"):
        self.allocator = allocator
        self.by_priority = scheduling_policy == "priority"
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.max_waiting_requests = max_waiting_requests
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last one is preempted first
        self.requests: dict[str, Sequence] = {}
        self.num_preemptions_total = 0
        self.prefix_cache_queries_total = 0  # tokens of admissions (a recompute's outputs too) looked up in the cache
        self.prefix_cache_hits_total = 0     # of those, tokens found there (not computed)

    # ---- admission -------------------------------------------------------------------------------
    def check_admission(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        """Refuse a request that can never run (raises AdmissionError naming the field); no state needed."""
        if params.priority and not self.by_priority:
            raise AdmissionError(f"priority: {params.priority} asks for priority scheduling, and this server "
                                 "schedules first come, first served (scheduling_policy = \"fcfs\"); send 0 "
                                 "or leave it out", "priority")
        if num_prompt_tokens == 0:
            raise AdmissionError("inputs: the prompt is empty (0 tokens)", "inputs")
        if num_prompt_tokens >= self.max_model_len:
            raise AdmissionError(f"inputs: the prompt has {num_prompt_tokens} tokens; max_model_len is "
                                 f"{self.max_model_len}, which leaves no room for a new token", "inputs")
        total = num_prompt_tokens + params.max_new_tokens
        if total > self.max_model_len:
            raise AdmissionError(
                f"max_new_tokens: {num_prompt_tokens} prompt tokens + max_new_tokens {params.max_new_tokens} "
                f"= {total} exceeds max_model_len {self.max_model_len}; ask for at most "
                f"{self.max_model_len - num_prompt_tokens} new tokens", "max_new_tokens")
        # The last sampled token is never fed back, so it needs no KV slot.
        blocks = self.allocator.blocks_for(total - 1)
        if self.allocator.blocks_for(num_prompt_tokens) > self.allocator.num_blocks:  # no max_new_tokens fits
            capacity = self.allocator.num_blocks * self.allocator.block_size
            raise AdmissionError(f"inputs: the prompt has {num_prompt_tokens} tokens; the whole KV cache holds "
                                 f"{capacity} (kv_cache_memory), which leaves no room for a new token", "inputs")
        if blocks > self.allocator.num_blocks:
            raise AdmissionError(
                f"max_new_tokens: {num_prompt_tokens} prompt tokens + max_new_tokens {params.max_new_tokens} "
                f"need {blocks} KV blocks; the whole cache has {self.allocator.num_blocks}", "max_new_tokens")

    def add(self, seq: Sequence, queue_bound: bool = True) -> None:
        """queue_bound: refuse (OverloadedError) when max_waiting_requests are waiting. The async engines
        pass False for the requests they already admitted against that bound, counting their adds still in
        flight: by the time an add lands, a preemption or a step may have moved the queue, and an admitted
        request must not come back as a failure (it was a 500 instead of the 429 the bound exists for)."""
        if seq.request_id in self.requests:
            raise ValueError(f"duplicate request_id {seq.request_id!r}")
        if queue_bound and len(self.waiting) >= self.max_waiting_requests:
            raise OverloadedError(f"{len(self.waiting)} requests are waiting (max_waiting_requests="
                                  f"{self.max_waiting_requests}); retry later")
        self.check_admission(seq.num_prompt_tokens, seq.params)
        seq.status = SequenceStatus.WAITING
        self._enqueue(seq, front=False)
        self.requests[seq.request_id] = seq

    def _enqueue(self, seq: Sequence, front: bool) -> None:
        """A new request goes behind those of its priority, a preempted one before them (FCFS: the queue's
        back or front)."""
        if not self.by_priority:
            self.waiting.appendleft(seq) if front else self.waiting.append(seq)
            return
        find = bisect.bisect_left if front else bisect.bisect_right
        self.waiting.insert(find(self.waiting, seq.params.priority, key=_priority), seq)

    def _victim(self) -> Sequence:
        """The sequence a preemption takes: the newest admitted (of the lowest priority)."""
        if not self.by_priority:
            return self.running[-1]
        lowest = max(map(_priority, self.running))
        return next(s for s in reversed(self.running) if s.params.priority == lowest)

    def _make_room_for_waiting(self) -> tuple[list[str], int]:
        """Priority scheduling: preempt running sequences of a lower priority than the queue's head while the
        head finds no room (a sequence slot, and free blocks for its first chunk), unless the sequences left
        would use the whole token budget anyway. Done before anything is scheduled, so no victim has
        registered blocks this step that an admission could share. Returns the preempted, and the blocks the
        head's first chunk needs when it outranks a running sequence: drafts must leave them free."""
        preempted: list[str] = []
        a, head = self.allocator, self.waiting[0]  # (victims queue behind the head: it stays the head)
        chunk_blocks = a.blocks_for(min(head.num_uncomputed_tokens, self.max_num_batched_tokens))
        wanted = sum(len(s.token_ids) - s.num_computed_tokens for s in self.running)  # the running set's tokens
        while self.running:
            victim = self._victim()
            if victim.params.priority <= head.params.priority:  # (checked first: the cheap, common answer)
                return preempted, chunk_blocks if preempted else 0
            # the running sequences take their next blocks first, this step
            growth = sum(max(0, a.blocks_for(len(s.token_ids)) - len(s.block_table)) for s in self.running)
            left = wanted - (len(victim.token_ids) - victim.num_computed_tokens)
            if (len(self.running) < self.max_num_seqs and a.num_free_blocks >= chunk_blocks + growth) \
                    or left >= self.max_num_batched_tokens:
                return preempted, chunk_blocks
            self._preempt(victim, {})
            preempted.append(victim.request_id)
            wanted = left
        return preempted, chunk_blocks

    # ---- one step --------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget, num_drafts = self.max_num_batched_tokens, 0
        chosen: dict[str, ScheduledSeq] = {}
        preempted: list[str] = []
        made_room, reserve = self._make_room_for_waiting() if self.by_priority and self.waiting else ([], 0)
        # Running sequences: decodes first, then unfinished prefills; both in admission order.
        decodes: list[Sequence] = []
        prefills: list[Sequence] = []
        for s in self.running:
            (decodes if len(s.token_ids) - s.num_computed_tokens == 1 else prefills).append(s)
        for seq in decodes + prefills:  # (runs for every sequence every step: kept to plain arithmetic)
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            num_tokens = len(seq.token_ids)
            if num_tokens - seq.num_prompt_tokens >= seq.params.max_new_tokens:
                continue  # its last token is in flight (overlap scheduling): nothing more to compute
            uncomputed = num_tokens - seq.num_computed_tokens
            drafts = len(seq.draft_token_ids)  # speculative tokens after its last one (server/speculative.py)
            if drafts and (1 + drafts > budget or not self._allocate_draft_slots(seq, drafts, reserve)):
                seq.draft_token_ids, drafts = [], 0  # no room for them this step: a plain decode
            n = min(uncomputed + drafts, budget)
            while not self.allocator.allocate_slots(seq, n):
                victim = self._victim()
                budget += self._preempt(victim, chosen)
                preempted.append(victim.request_id)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                chosen[seq.request_id] = ScheduledSeq(seq, n, uncomputed > 1, n == uncomputed + drafts)
                budget -= n
                num_drafts += drafts
                if uncomputed > 1 or seq.num_computed_tokens < seq.num_prompt_tokens:  # a prompt chunk or a
                    self.allocator.register_scheduled_blocks(seq, n)  # recompute: its full blocks can be shared
        # New admissions, FCFS; none after a preemption (the pool is already short), and never a sequence
        # preempted to make room this step: its last token may still be in flight (overlap scheduling)
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if made_room and seq.request_id in made_room:
                break
            cached = self.allocator.take_cached_prefix(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            if not self.allocator.allocate_slots(seq, n):
                self.allocator.free(seq)  # gives back the cached blocks it took
                seq.num_computed_tokens = 0
                break
            if self.allocator.enable_prefix_caching and seq.prompt_logprobs is None:
                self.prefix_cache_queries_total += seq.num_tokens
                self.prefix_cache_hits_total += cached
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chosen[seq.request_id] = self._entry(seq, n)
            budget -= n
            self.allocator.register_scheduled_blocks(seq, n)  # later admissions of this step may share them
        scheduled = tuple(chosen.values())
        if preempted:  # a preempted sequence left `chosen` with its drafts
            num_drafts = sum(len(s.seq.draft_token_ids) for s in scheduled)
        return SchedulerOutput(scheduled, self.max_num_batched_tokens - budget, tuple(made_room + preempted),
                               num_drafts)

    def _allocate_draft_slots(self, seq: Sequence, drafts: int, reserve: int = 0) -> bool:
        """Slots for a decoding sequence's last token and drafts, from blocks no running sequence could need
        for its own next token this step, nor an urgent waiting request for its first chunk (`reserve`):
        drafts never cause a preemption."""
        a = self.allocator
        needed = a.blocks_for(seq.num_computed_tokens + 1 + drafts) - len(seq.block_table)
        return needed <= 0 or (needed + len(self.running) + reserve <= a.num_free_blocks
                               and a.allocate_slots(seq, 1 + drafts))

    @staticmethod
    def _entry(seq: Sequence, n: int) -> ScheduledSeq:
        uncomputed = len(seq.token_ids) - seq.num_computed_tokens
        return ScheduledSeq(seq, n, uncomputed > 1, n == uncomputed)

    def _preempt(self, seq: Sequence, chosen: dict[str, ScheduledSeq]) -> int:
        """Free seq's blocks and requeue it at the front; returns the budget it gave back."""
        self.running.remove(seq)
        entry = chosen.pop(seq.request_id, None)
        if entry is not None and entry.is_prefill:  # blocks it registered this step will not be written
            self.allocator.drop_cached(seq)  # (a guard: the newest prefill is scheduled last, so never yet)
        self.allocator.free(seq)
        seq.num_computed_tokens = 0
        seq.draft_token_ids = []
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self._enqueue(seq, front=True)
        self.num_preemptions_total += 1
        return entry.num_new_tokens if entry else 0

    def finish_step(self, output: SchedulerOutput) -> None:
        """The step is launched: its tokens' K/V are written before any later step reads them. (A sequence
        with drafts counts them too; the engine takes back the rejected ones when it sees the step.)"""
        for s in output.scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens

    # ---- leaving -----------------------------------------------------------------------------------
    def finish(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        """Finish a sequence (stop, abort, error): frees its blocks now."""
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        if reason == "error":  # its step failed: what it registered may never have been written
            self.allocator.drop_cached(seq)
        self.allocator.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        del self.requests[seq.request_id]

    def abort(self, request_id: str) -> Sequence | None:
        seq = self.requests.get(request_id)
        if seq is not None:
            self.finish(seq, "abort")
        return seq

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.requests)


def _priority(seq: Sequence) -> int:
    return seq.params.priority
