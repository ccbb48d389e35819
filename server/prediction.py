"""Predicted Outputs (OpenAI's `prediction`): a request's expected text, drafted for speculative decoding.

A request may carry tokens its output is expected to mostly repeat (SamplingParams.prediction_token_ids: a
document or code to rewrite with small changes). They are only a latency hint: each step, a decoding sequence
drafts the next num_prediction_tokens of them from where its output stands in the prediction, and those drafts
are verified exactly as the n-gram lookup's are (server/speculative.py), so the output is plain decoding's
(greedy and seeded requests: the same tokens). The engine drafts from predictions with or without
num_speculative_tokens; a sequence whose output stands nowhere in its prediction falls back to the lookup if
that is on. What a grammar forces is drafted first; a prediction's drafts are cut where the grammar,
allowed_token_ids or bad_words would refuse one, and before an id the model does not have. With
prompt_lookup_adaptive, a sequence drafts at most one more than its last drafts kept (doubling while they are
kept whole), as its lookups do (speculative.adapt_lookup), but never waits to draft.

A step with drafts is never left in flight (overlap scheduling: the host must see its kept tokens before the
next step's drafts and alignment); so steps are kept out of flight while a request with a prediction may draft
(Proposer.active), and traffic without predictions overlaps as it does with num_prediction_tokens 0. A
sequence with nothing to draft from its prediction (its output stands nowhere in it, or at its end) waits 1,
2, 4, ... up to MAX_PREDICTION_SKIP steps before it looks again (wait_to_draft), and the steps overlap
meanwhile. With
speculative_disable_by_batch_size, nothing drafts from a prediction either at that batch size (its steps then
overlap, and the alignment catches up from the output when drafting resumes).

Where the output stands (`realign`, once per step before drafting, from the output tokens themselves, so
steps without drafts, several tokens kept at once and a preemption's recompute all read the same): the
position `pos` in the prediction where the output is expected to continue, 0 before any output. When the
output's new tokens are the prediction's at pos, pos moves past them. Otherwise the output diverged (a changed
word, an insertion, a deletion) and it re-synchronizes on its own last tokens: the longest run of its last
MAX_MATCH, ..., 2 tokens that occurs in the prediction, and of that run's occurrences the first at or after
where the output had got to (else the last before it: a passage written again); failing that, its last token
alone, only near where the output left the prediction: at most NEAR tokens past that place in the
prediction, and at most NEAR tokens of output since the output last continued the prediction (after a changed
or inserted word the output is back in the prediction just past where it left it; a few tokens on after a
short deletion). pos goes just past the match. Up to 4 tokens tell most of a document's repeated phrases apart
(prompt_lookup_max's default, for the same reason), and one token resumes the drafts on the first token after
an edit; but a single token (a space, a newline, a common word) occurs all over a document, so it is trusted
only there: far from it, or once the output has gone on elsewhere for a while (writing something new, or on
past the prediction's end, where each such match would be refused in turn), it would mostly be a jump to the
wrong place. A wrong match costs one verification step's extra rows (its drafts are refused, and the next step
re-synchronizes again). With no match, the sequence drafts nothing from its prediction that step.

Counted per sequence, under the names of OpenAI's usage.completion_tokens_details (whose own definition, the
prediction's tokens that did or did not appear in the completion, we cannot know without aligning the two
texts; these count our drafts: a position drafted and refused at two steps counts twice): accepted_prediction_tokens,
the prediction's drafts that verification kept and that became output tokens; rejected_prediction_tokens, its
drafts that verification refused (the token sampled at that row differed). Drafts accepted after a token that
ends the output (a stop) are neither. Tokens of the prediction the output repeats without their being drafted
(the token sampled after a step's drafts, the first output token) are not counted as accepted.
"""
from __future__ import annotations

import numpy as np

from server.sequence import Sequence, SequenceStatus

MAX_MATCH = 4  # longest run of the output's last tokens looked up when it re-synchronizes
NEAR = 8  # a one-token match: tokens past where the output left the prediction, and of output since it followed
MAX_PREDICTION_SKIP = 16  # steps a sequence with nothing to draft from its prediction waits at most (wait_to_draft)


def resync(prediction: np.ndarray, tail: list[int], hint: int, single: bool = True) -> int | None:
    """The position just past the longest run of tail's last MAX_MATCH, ..., 2 tokens in prediction: of its
    occurrences, the first ending at or after hint, else the last before it; else (with `single`) just past
    tail's last token where that is at most NEAR past hint (the first); None when neither occurs.
    prediction: int64 [L]."""
    if not tail:
        return None
    ends = np.flatnonzero(prediction == tail[-1])  # where an occurrence could end
    if ends.size == 0:
        return None
    length = np.ones(ends.size, np.int64)
    alive = np.ones(ends.size, bool)
    for j in range(1, min(MAX_MATCH, len(tail))):
        before = ends - j
        alive &= (before >= 0) & (prediction[np.maximum(before, 0)] == tail[-1 - j])
        if not alive.any():
            break
        length += alive
    best = int(length.max())
    after = ends[length == best] + 1  # ascending
    k = int(np.searchsorted(after, hint))
    if best == 1:  # a single token: only near where the output left the prediction
        return int(after[k]) if single and k < after.size and after[k] <= hint + NEAR else None
    return int(after[k] if k < after.size else after[-1])


def realign(prediction: np.ndarray, tokens: list[int], start: int, pos: int, seen: int,
            followed: int) -> tuple[int, int, int]:
    """Where the output tokens[start:] stands in prediction, given that after its first `seen` tokens it stood
    at pos (and, if it has more, diverged there), and that its first `followed` tokens last continued the
    prediction. Returns (pos, seen, followed) as those: seen is the output's length when it stands somewhere,
    else where it diverged, with pos where it had got to (the module's docstring)."""
    n = len(tokens) - start
    if seen == n:
        return pos, seen, followed
    # compared in place: once the output has left the prediction it only grows past where it diverged, and
    # slicing all of that each step cost 43 us at 4,000 tokens of it (2-core Xeon)
    first, same, most = start + seen, 0, min(n - seen, len(prediction) - pos)
    while same < most and prediction[pos + same] == tokens[first + same]:
        same += 1
    if same:
        followed = seen + same
    if same == n - seen:
        return pos + same, n, followed
    pos, seen = pos + same, seen + same  # where it diverged
    found = resync(prediction, tokens[max(start, len(tokens) - MAX_MATCH):], pos, single=n - followed <= NEAR)
    return (pos, seen, followed) if found is None else (found, n, followed)


class PredictionState:
    """One sequence's prediction: its tokens, where its output stands in them, its wait, and its counts."""
    __slots__ = ("tokens", "pos", "seen", "followed", "skip", "wait", "drafted", "accepted", "rejected")

    def __init__(self, tokens: np.ndarray):
        self.tokens = tokens  # int64 [L]
        # the output stood at pos after its first `seen` outputs (fewer than it has when it diverged there), and
        # its first `followed` outputs last continued the prediction (realign)
        self.pos = self.seen = self.followed = 0
        self.skip, self.wait = 0, 1  # steps before it looks again, and the next such wait (wait_to_draft)
        self.drafted = False  # this step's drafts are the prediction's
        self.accepted = self.rejected = 0  # its drafts kept and refused (the module's docstring)


class Predictions:
    """The requests with a prediction, until they finish (a Proposer's)."""

    def __init__(self):
        self.seqs: list[Sequence] = []

    def watch(self, seq: Sequence) -> None:
        seq.prediction = PredictionState(np.asarray(seq.params.prediction_token_ids, np.int64))
        self.seqs.append(seq)

    def may_draft(self) -> bool:
        """Whether a running one may draft at the next step (none is waiting out wait_to_draft)."""
        return any(s.prediction.skip == 0 for s in self.running())

    def count_down(self) -> list[Sequence]:
        """The running ones, a step nearer the end of their waits (wait_to_draft)."""
        running = self.running()
        for seq in running:
            if seq.prediction.skip:
                seq.prediction.skip -= 1
        return running

    def running(self) -> list[Sequence]:
        """Those running now (the finished ones are let go)."""
        seqs = self.seqs
        if seqs and any(s.is_finished for s in seqs):
            seqs[:] = [s for s in seqs if not s.is_finished]
        return [s for s in seqs if s.status is SequenceStatus.RUNNING]


def prediction_drafts(seq: Sequence, room: int, vocab_size: int) -> list[int]:
    """Up to room tokens of seq's prediction from where its output stands in it (realigned first, on the
    sequence); [] when it stands nowhere or at the prediction's end. Cut before an id outside the vocabulary
    and where seq's grammar refuses one (never sampled, so never kept); seq.prediction.drafted says whether
    any is left."""
    state, start = seq.prediction, seq.num_prompt_tokens
    state.pos, state.seen, state.followed = realign(state.tokens, seq.token_ids, start, state.pos, state.seen,
                                                    state.followed)
    if state.seen != len(seq.token_ids) - start:  # it stands nowhere
        state.drafted = False
        wait_to_draft(state)
        return []
    drafts = state.tokens[state.pos:state.pos + room].tolist()
    if drafts and max(drafts) >= vocab_size:
        drafts = drafts[:next(j for j, t in enumerate(drafts) if t >= vocab_size)]
    if drafts and seq.grammar is not None:
        drafts = seq.grammar.valid_prefix(drafts)
    state.drafted = bool(drafts)
    if drafts:
        state.wait = 1
    else:
        wait_to_draft(state)
    return drafts


def wait_to_draft(state: PredictionState) -> None:
    """Its sequence has nothing to draft from its prediction (its output stands nowhere in it, or at its end): it does
    not look again for 1, 2, 4, ... up to MAX_PREDICTION_SKIP steps, in which its steps may overlap (a step
    that may draft is never left in flight: Proposer.active), then looks once more after a step the host
    has seen whole. Without the wait, one request whose prediction no longer matched kept every step of the
    batch out of flight until it ended."""
    state.skip, state.wait = state.wait, min(2 * state.wait, MAX_PREDICTION_SKIP)
