"""Scheduler: which sequences run this step, and how many tokens each (continuous batching).

One flat step mixes decode tokens of running sequences with prefill chunks (of new sequences and of
running ones still prefilling) under max_num_batched_tokens and max_num_seqs. Decodes go first, then
partial prefills, then new admissions in FCFS order, so a long prompt is spread over several steps and
never stalls decoding. When the pool runs dry the most recently admitted running sequence is preempted by
recompute: its blocks are freed and it rejoins the front of the queue to prefill prompt + output again.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

from server.blocks import BlockAllocator
from server.outputs import AdmissionError, OverloadedError
from server.sampling_params import SamplingParams
from server.sequence import Sequence, SequenceStatus


class ScheduledSeq(NamedTuple):  # a tuple: built for every sequence every step, so cheap to make
    seq: Sequence
    num_new_tokens: int      # tokens fed this step, from seq.num_computed_tokens on (its drafts included)
    is_prefill: bool         # more than the one newest token (a prompt chunk or a recompute)
    samples: bool            # this step reaches the sequence's end: a token is sampled


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: tuple[ScheduledSeq, ...]
    num_batched_tokens: int
    preempted: tuple[str, ...] = ()  # request ids preempted while scheduling this step
    num_draft_tokens: int = 0        # speculative tokens fed after sequences' last ones (server/speculative.py)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @cached_property
    def decode_only(self) -> bool:
        """Every sequence feeds one token (the shape a captured decode graph takes)."""
        return bool(self.scheduled) and all(s.num_new_tokens == 1 for s in self.scheduled)

    @cached_property
    def has_prefill(self) -> bool:
        """Some sequence is mid-prompt (or recomputing): only then can prompt logprobs be owed."""
        return any(s.is_prefill for s in self.scheduled)

    def fed_tokens(self) -> tuple[list[list[int]], list[int]]:
        """Each scheduled sequence's tokens this step (its drafts after its last one: server/speculative.py),
        and the rows of the flat step whose logits are sampled (a sequence's last token's, then each draft's)."""
        fed, logits_rows, end = [], [], 0
        for s in self.scheduled:
            start, drafts = s.seq.num_computed_tokens, s.seq.draft_token_ids
            ids = s.seq.token_ids[start:start + s.num_new_tokens]
            fed.append(ids + drafts if drafts else ids)
            end += s.num_new_tokens
            if s.samples:
                if drafts:
                    logits_rows.extend(range(end - 1 - len(drafts), end - 1))
                logits_rows.append(end - 1)
        return fed, logits_rows

    def prompt_logprob_rows(self) -> tuple[list[int], list[int], list] | None:
        """(rows of the step's flat batch, the prompt token each row predicts, [(sequence, count)]) for
        prompt logprobs still owed; None when no sequence in the step owes any. Worked out once per step
        (ModelRunner.runs_ahead and launch both ask)."""
        return self._prompt_logprob_rows

    @cached_property
    def _prompt_logprob_rows(self) -> tuple[list[int], list[int], list] | None:
        if not self.has_prefill:  # a decode row sits past its prompt (a last 1-token chunk owes nothing)
            return None
        rows: list[int] = []
        targets: list[int] = []
        owners = []
        offset = 0
        for s in self.scheduled:
            seq = s.seq
            done = seq.prompt_logprobs
            if done is not None and len(done) < seq.num_prompt_tokens:
                start = seq.num_computed_tokens
                # position p predicts token p + 1: the next owed token is len(done), after a recompute
                # the earlier ones are not computed again
                first = max(start, len(done) - 1)
                end = min(start + s.num_new_tokens, seq.num_prompt_tokens - 1)
                if end > first:
                    rows.extend(range(offset + first - start, offset + end - start))
                    targets.extend(seq.token_ids[first + 1:end + 1])
                    owners.append((seq, end - first))
            offset += s.num_new_tokens
        return (rows, targets, owners) if owners else None


class Scheduler:
    def __init__(self, allocator: BlockAllocator, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, max_waiting_requests: int = 1024):
        self.allocator = allocator
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
        self.waiting.append(seq)
        self.requests[seq.request_id] = seq

    # ---- one step --------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget, num_drafts = self.max_num_batched_tokens, 0
        chosen: dict[str, ScheduledSeq] = {}
        preempted: list[str] = []
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
            if drafts and (1 + drafts > budget or not self._allocate_draft_slots(seq, drafts)):
                seq.draft_token_ids, drafts = [], 0  # no room for them this step: a plain decode
            n = min(uncomputed + drafts, budget)
            while not self.allocator.allocate_slots(seq, n):
                victim = self.running[-1]
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
        # New admissions, FCFS; none after a preemption (the pool is already short).
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
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
        return SchedulerOutput(scheduled, self.max_num_batched_tokens - budget, tuple(preempted), num_drafts)

    def _allocate_draft_slots(self, seq: Sequence, drafts: int) -> bool:
        """Slots for a decoding sequence's last token and drafts, from blocks no running sequence could need
        for its own next token this step: drafts never cause a preemption."""
        a = self.allocator
        needed = a.blocks_for(seq.num_computed_tokens + 1 + drafts) - len(seq.block_table)
        return needed <= 0 or (needed + len(self.running) <= a.num_free_blocks and a.allocate_slots(seq, 1 + drafts))

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
        self.waiting.appendleft(seq)
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
