"""What the scheduler hands the runner for one step: the sequences scheduled and how many tokens each."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

from server.sequence import Sequence


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
