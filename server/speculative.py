"""N-gram speculative decoding (prompt lookup): drafts from the sequence's own tokens, verified in one step.

Before each step, a decoding sequence whose last n tokens (n from prompt_lookup_max down to prompt_lookup_min)
occurred earlier in its prompt or output proposes the tokens that followed their latest earlier occurrence,
up to num_speculative_tokens (`propose_ngram`). Text that copies its context (quoting, editing, code, a
summary's names) repeats such runs; vLLM's `ngram` method and transformers' `prompt_lookup_num_tokens` do the
same. The drafts are not part of seq.token_ids: they sit in seq.draft_token_ids for one step, in which the
sequence feeds its last token and the drafts (a chunk over its cached context, like a prefill) and samples
a token at each of those positions. Row j samples from the state plain decoding would be in after the first
j drafts (`DraftRow`: output index, penalties' token counts, min_new_tokens), so:

- draft j is accepted while it equals the token row j - 1 sampled, and the token sampled after the last
  accepted draft is kept too: 1 to k + 1 tokens a step (`num_accepted`);
- a draft is a single proposed token (a point mass), for which rejection sampling reduces to that equality,
  so the output has the distribution of plain decoding; a greedy or seeded request gets the same tokens
  (a seeded row's uniforms hash its seed and output index, model/sampler.py), up to the rounding of a
  multi-token step against a one-token one.

A grammar-constrained sequence drafts first what its grammar forces next (llguidance's fast-forward
tokens: the keys and punctuation a JSON schema fixes); where nothing is forced, the lookup's drafts up to
the first one its grammar refuses (a value copied from the prompt, in extraction). Each of its draft rows is
masked as its matcher would be after the drafts before it (grammar.DraftGrammar: consumed, masked, rolled
back), so those drafts are verified like any other and its output is plain decoding's too. allowed_token_ids
and bad_words work the same way: each draft row is masked as plain decoding would be after the drafts before it
(a DraftRow's tokens include them, so bad words' bans follow), so a refused token is never sampled and hence
never accepted; drafts are cut at the first one they refuse (`unrefused_drafts`), which could not be kept.

Drafts that fail cost a verification step's extra rows for nothing (on a CPU, where compute is the limit, a
step of 5 rows costs about 2x one of 1), so with prompt_lookup_adaptive each sequence adapts its lookups to
how they fared (`adapt_lookup`): after a draft fails at row j, its next lookup drafts at most j + 1 tokens,
doubling again with each one kept whole; after a lookup with none kept it waits 1, 2, 4, ... up to
MAX_LOOKUP_SKIP decode steps before looking up again. What a grammar forces is drafted regardless: it is
always kept.

Rejected drafts' K/V stay in slots past the sequence's end, where later tokens overwrite them; they are
never registered in the prefix cache (only blocks of accepted tokens are). A step with drafts is never left
in flight (overlap scheduling): how many tokens it keeps decides the next step's inputs. With
speculative_disable_by_batch_size, nothing drafts while that many sequences run, and steps may overlap again.
A request's prediction (OpenAI's Predicted Outputs) is drafted from before the lookup: server/prediction.py.
"""
from __future__ import annotations

import numpy as np

from server.bad_words import banned_next
from server.grammar import DraftGrammar
from server.prediction import Predictions, prediction_drafts
from server.sequence import Sequence

MAX_LOOKUP_SKIP = 16  # decode steps a sequence whose lookups keep failing waits at most before the next


def propose_ngram(tokens: np.ndarray, k: int, min_n: int, max_n: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of tokens' longest suffix of at least
    min_n and at most max_n tokens; [] when none occurred. tokens: int64 [L]."""
    last = len(tokens) - 1
    if k <= 0 or last < min_n:
        return []
    ends = np.flatnonzero(tokens[:last] == tokens[last])  # earlier positions holding the last token
    if ends.size == 0:
        return []
    length = np.ones(ends.size, np.int64)  # how long a suffix match ends at each
    alive = np.ones(ends.size, bool)
    for j in range(1, min(max_n, last + 1)):
        before = ends - j
        alive &= (before >= 0) & (tokens[np.maximum(before, 0)] == tokens[last - j])
        if not alive.any():
            break
        length += alive
    best = int(length.max())
    if best < min_n:
        return []
    end = int(ends[np.flatnonzero(length == best)[-1]])  # the latest of the longest
    return tokens[end + 1:end + 1 + k].tolist()


def num_accepted(drafts: list[int], sampled: list[int]) -> int:
    """How many drafts are accepted: draft j while it equals the token sampled at the row before it."""
    m = 0
    while m < len(drafts) and drafts[m] == sampled[m]:
        m += 1
    return m


def adapt_lookup(seq: Sequence, drafted: int, kept: int, wait: bool = True) -> None:
    """After seq's drafts were verified: how many it may draft next time, and how long it waits (the
    module's docstring; a prediction's drafts, wait False, set the limit alone). drafted > 0."""
    if kept == drafted:
        seq.lookup_limit, seq.lookup_wait = min(2 * seq.lookup_limit, 1 << 30), 1
    elif kept or not wait:
        seq.lookup_limit, seq.lookup_wait = kept + 1, 1
    else:
        seq.lookup_limit, seq.lookup_skip = 1, seq.lookup_wait
        seq.lookup_wait = min(2 * seq.lookup_wait, MAX_LOOKUP_SKIP)


class Proposer:
    """Each step's drafts: what a grammar forces, else a prediction's (server/prediction.py), else the lookup's."""

    def __init__(self, num_tokens: int, min_n: int, max_n: int, disable_by_batch_size: int | None = None,
                 adaptive: bool = False, num_prediction_tokens: int = 0, vocab_size: int = 1 << 62,
                 max_step_drafts: int = 1 << 30):
        self.num_tokens, self.min_n, self.max_n = num_tokens, min_n, max_n
        self.disable_by_batch_size, self.adaptive = disable_by_batch_size, adaptive
        self.num_prediction_tokens, self.vocab_size = num_prediction_tokens, vocab_size
        self.max_step_drafts = max_step_drafts  # drafts of all sequences in one step (EngineConfig.max_step_drafts)
        self.predictions = Predictions()

    def watch(self, seq: Sequence) -> None:
        """A new request: one with a prediction drafts from it (unless num_prediction_tokens is 0)."""
        if seq.params.prediction_token_ids and self.num_prediction_tokens:
            self.predictions.watch(seq)

    def active(self, num_running: int) -> bool:
        """Whether sequences draft at this batch size (the lookup costs host time per sequence per step), and
        may: the lookup is on, or a running sequence has a prediction."""
        return self._batch_allows(num_running) and (self.num_tokens > 0 or self.predictions.may_draft())

    def _batch_allows(self, num_running: int) -> bool:
        return self.disable_by_batch_size is None or num_running < self.disable_by_batch_size

    def propose(self, running: list[Sequence]) -> None:
        """Set every running sequence's drafts for the next step ([] for one that may not draft). With the
        lookup off, only sequences with a prediction draft (the others' stay [])."""
        active = self._batch_allows(len(running))
        predicted = self.predictions.count_down() if self.predictions.seqs else []  # (lets the finished go)
        if not self.num_tokens:
            if not predicted:
                return
            running = predicted
        budget = self.max_step_drafts if active else 0
        for seq in running:
            seq.draft_token_ids = self._drafts(seq)[:budget] if budget else []
            budget -= len(seq.draft_token_ids)

    def _drafts(self, seq: Sequence) -> list[int]:
        if seq.prediction is not None:  # (until prediction_drafts says so: forced or lookup drafts are not)
            seq.prediction.drafted = False
        drafts = self._proposed(seq)
        if drafts and (seq.allowed_token_mask is not None or seq.params.bad_words_token_ids):
            drafts = drafts[:unrefused_drafts(seq, drafts)]  # (a refused draft is never kept)
        return drafts

    def _proposed(self, seq: Sequence) -> list[int]:
        tokens = seq.token_ids
        if len(tokens) - seq.num_computed_tokens != 1 or tokens[-1] < 0:
            return []  # mid-prompt, or its last token not seen yet
        # the step keeps at most drafts + 1 tokens: never more outputs than max_new_tokens
        left = seq.params.max_new_tokens - (len(tokens) - seq.num_prompt_tokens) - 1
        predicted = seq.prediction is not None
        room = min(max(self.num_tokens, self.num_prediction_tokens if predicted else 0), left)
        if room <= 0:
            return []
        grammar = seq.grammar
        if grammar is not None:  # what the grammar forces next (its matcher has taken every token), if anything
            forced = grammar.forced_tokens(room)
            if forced:
                return forced
        if predicted and not seq.prediction.skip:  # (cut by the grammar too; adaptive: as adapt_lookup allows)
            limit = min(self.num_prediction_tokens, room, seq.lookup_limit if self.adaptive else room)
            drafts = prediction_drafts(seq, limit, self.vocab_size)
            if drafts:
                return drafts
        if not self.num_tokens:
            return []
        room = min(self.num_tokens, room)
        if self.adaptive:
            if seq.lookup_skip:
                seq.lookup_skip -= 1
                return []
            room = min(room, seq.lookup_limit)
        drafts = propose_ngram(seq.token_array(), room, self.min_n, self.max_n)
        return drafts if grammar is None else grammar.valid_prefix(drafts)  # (a refused draft is never kept)


def unrefused_drafts(seq: Sequence, drafts: list[int]) -> int:
    """How many of drafts come before the first that seq's allowed_token_ids or bad_words refuse where it would
    stand: one never equals the token sampled before it (that row is masked), so it and those after it
    would only be verified for nothing."""
    allowed, bans = seq.allowed_token_mask, seq.params.bad_words_token_ids
    # the bans read at most the longest word's tokens back: its tail will do (num_prompt_tokens shifted with it)
    back = max((len(b) for b in bans), default=1)
    tokens = seq.token_ids[-back:]
    num_prompt = seq.num_prompt_tokens - (len(seq.token_ids) - len(tokens))
    for j, token in enumerate(drafts):
        if allowed is not None and not (token >> 5 < len(allowed) and int(allowed[token >> 5]) >> (token & 31) & 1):
            return j
        if bans and token in banned_next(tokens, num_prompt, bans):
            return j
        tokens.append(token)
    return len(drafts)


def make_proposer(config, vocab_size: int) -> Proposer | None:
    """The proposer an EngineConfig asks for (None: num_speculative_tokens and num_prediction_tokens are 0)."""
    if not config.num_speculative_tokens and not config.num_prediction_tokens:
        return None
    return Proposer(config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max,
                    config.speculative_disable_by_batch_size, config.prompt_lookup_adaptive,
                    config.num_prediction_tokens, vocab_size, max_step_drafts=config.max_step_drafts)


class DraftRow:
    """The sampling row at draft position j (1..k) of seq: seq as plain decoding would see it after its
    first j drafts were accepted (what build_sampling_tensors and the logprobs read)."""
    __slots__ = ("seq", "j", "sampled_row")
    is_finished = False

    def __init__(self, seq: Sequence, j: int):
        self.seq, self.j, self.sampled_row = seq, j, -1

    @property
    def params(self):
        return self.seq.params

    @property
    def num_prompt_tokens(self) -> int:
        return self.seq.num_prompt_tokens

    @property
    def grammar(self) -> DraftGrammar | None:
        """The mask source of this row: the sequence's matcher after its first j drafts."""
        g = self.seq.grammar
        return None if g is None else DraftGrammar(g, self.seq.draft_token_ids[:self.j])

    @property
    def argmax_from(self) -> int:
        return self.seq.argmax_from

    @property
    def allowed_token_mask(self) -> np.ndarray | None:
        return self.seq.allowed_token_mask  # (static: the same after any drafts)

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_ids + self.seq.draft_token_ids[:self.j]

    @property
    def num_output_tokens(self) -> int:
        return self.seq.num_output_tokens + self.j

    def token_array(self) -> np.ndarray:
        return np.concatenate((self.seq.token_array(), np.asarray(self.seq.draft_token_ids[:self.j], np.int64)))


def verified_tokens(rows: list, placeholders: list[int], token_ids: list[int], logprobs: list, counters):
    """For each sequence of a step's sampling rows (sampling_rows), each token it keeps, in order: (sequence,
    its index in token_ids, token id, logprob). The kept tokens are the accepted drafts and the token sampled
    after them, up to one that finishes the sequence (the caller takes each token before the next is yielded).
    The rejected drafts' K/V slots are given back (num_computed_tokens); drafts are counted (record_verified),
    a prediction's on its sequence too (server/prediction.py)."""
    for start, seq in enumerate(rows):
        if seq.__class__ is DraftRow:
            continue
        drafts, seq.draft_token_ids = seq.draft_token_ids, []
        sampled = token_ids[start:start + 1 + len(drafts)]
        kept = num_accepted(drafts, sampled)
        seq.num_computed_tokens -= len(drafts) - kept
        state = seq.prediction if drafts and seq.prediction is not None and seq.prediction.drafted else None
        if drafts:
            record_verified(counters, len(drafts), kept)
            if state is not None:
                state.rejected += len(drafts) - kept
            adapt_lookup(seq, len(drafts), kept, wait=state is None)
        index = placeholders[start]
        for i in range(kept + 1):
            if i:
                seq.token_ids.append(-1)
            if state is not None and i < kept:
                state.accepted += 1
            yield seq, index + i, sampled[i], logprobs[start + i]
            if seq.is_finished:
                break


def record_verified(counters, drafted: int, kept: int) -> None:
    """Count one sequence's verified drafts (EngineCounters): how many, how many kept, and by position. (A
    drafting step also verifies the sequences beside it that had none: not a draft.)"""
    if not drafted:
        return
    counters.num_drafts += 1
    counters.draft_tokens += drafted
    counters.accepted_draft_tokens += kept
    by_position = counters.accepted_by_position  # (a prediction's drafts may be more than its 16)
    for j in range(min(kept, len(by_position))):
        by_position[j] += 1


def sampling_rows(sched) -> list:
    """A step's sampling rows in order: each sampling sequence, then a DraftRow per draft it feeds."""
    if not sched.num_draft_tokens:  # (the common case, one row a sequence: a plain comprehension)
        return [s.seq for s in sched.scheduled if s.samples]
    rows: list = []
    for s in sched.scheduled:
        if s.samples:
            seq = s.seq
            rows.append(seq)
            if seq.draft_token_ids:
                rows.extend(DraftRow(seq, j) for j in range(1, len(seq.draft_token_ids) + 1))
    return rows
