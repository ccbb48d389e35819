"""Sequence: one request's mutable engine state (tokens, status, KV blocks, timings, stop/detok state).

token_ids holds prompt + generated tokens in one list, so a recompute after preemption is an ordinary
(chunked) prefill of token_ids[num_computed_tokens:].
"""
from __future__ import annotations

import enum
import time
from typing import Any

import numpy as np

from server.bad_words import reads_output
from server.sampling_params import SamplingParams


def token_bitmask(token_ids: tuple[int, ...]) -> np.ndarray:
    """int32 words in the grammar bitmask's layout (bit j of word w set = token 32w + j is among token_ids),
    as many as the largest id needs. token_ids: non-negative."""
    ids = np.asarray(token_ids, np.int64)
    words = np.zeros(int(ids.max()) // 32 + 1, np.uint32)
    np.bitwise_or.at(words, ids >> 5, np.left_shift(np.uint32(1), (ids & 31).astype(np.uint32)))
    return words.view(np.int32)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    __slots__ = ("request_id", "token_ids", "num_prompt_tokens", "params", "status", "block_table",
                 "num_computed_tokens", "arrival_time", "first_scheduled_time", "first_token_time",
                 "finish_reason", "stop_reason", "detokenizer", "stop_checker", "cumulative_logprob",
                 "num_preemptions", "sampled_row", "grammar", "draft_token_ids", "reads_own_tokens", "argmax_from",
                 "allowed_token_mask", "prediction", "prompt_logprobs",
                 "lookup_limit", "lookup_skip", "lookup_wait",
                 "_table_source", "_table_array", "_table_len", "_table_view", "_tokens_array", "_tokens_len")

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 arrival_time: float | None = None):
        self.request_id = request_id
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self._table_source: list[int] | None = None  # the list _table_array mirrors (block_table_array)
        self._table_array = np.empty(0, np.int32)
        self._table_len = 0
        self._table_view = self._table_array
        self._tokens_array = np.empty(0, np.int64)  # token_ids mirrored for penalties (token_array)
        self._tokens_len = 0
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.detokenizer: Any = None   # IncrementalDetokenizer, set by the engine
        self.stop_checker: Any = None  # StopChecker, set by the engine
        self.cumulative_logprob = 0.0
        self.num_preemptions = 0
        self.sampled_row = -1  # its row among the last graphed step's sampled ids (ModelRunner.launch)
        self.grammar: Any = None  # its llguidance matcher when the request has a grammar (server/grammar.py)
        self.draft_token_ids: list[int] = []  # tokens the next step feeds after token_ids (server/speculative.py)
        # how its prompt lookups have fared (speculative.adapt_lookup): the most lookup drafts it may feed
        # next, the decode steps it waits before looking up again, and the wait after its next lookup if
        # that one keeps nothing either
        self.lookup_limit, self.lookup_skip, self.lookup_wait = 1 << 30, 0, 1
        # its prediction and where its output stands in it, when the engine drafts from one
        self.prediction: Any = None  # server/prediction.PredictionState
        # sampling reads the values of its output tokens: penalties count them, a grammar's matcher has
        # consumed them, a bad word of several tokens bans its last after the others (so under overlap its
        # step's sampling waits for the host to have them)
        self.reads_own_tokens = params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 \
            or params.frequency_penalty != 0.0 or params.grammar is not None \
            or reads_output(params.bad_words_token_ids)
        # allowed_token_ids as the grammar bitmask's words (computed once: the mask is static)
        ids = params.allowed_token_ids
        self.allowed_token_mask = None if ids is None else token_bitmask(ids)
        # the output count from which a plain argmax samples it (greedy, no penalties, bias, grammar, token
        # constraints or logprobs: then min_new_tokens, below which eos/stop ids are banned); never otherwise
        plain = params.temperature == 0.0 and params.logprobs is None and not self.reads_own_tokens \
            and not params.logit_bias and ids is None and not params.bad_words_token_ids
        self.argmax_from = params.min_new_tokens if plain else 1 << 62
        # logprob of each prompt token so far (the first has none), when the request asks; filled by the
        # prefill chunks that compute them, kept across a preemption's recompute
        self.prompt_logprobs: list[float | None] | None = [None] if params.prompt_logprobs else None

    def block_table_array(self) -> np.ndarray:
        """block_table as int32, to copy into the graphs' pinned staging every step: converting the Python
        list each time cost 3.6 us a sequence at 125 blocks (930 us a batch-256 load), copying this about
        0.7 at any length (2-core EPYC). The list only grows (BlockAllocator.allocate_slots extends it) until
        free() swaps in a new one, so only new entries are copied here; a new list object, or one that shrank or
        whose last mirrored entry changed, starts over. (An in-place rewrite at the same length would go unseen: the
        allocator never does one.)"""
        table, n = self.block_table, len(self.block_table)
        if table is self._table_source and n == self._table_len:  # the common case: no new block
            return self._table_view
        done, arr = self._table_len, self._table_array
        if table is not self._table_source or n < done or (done and table[done - 1] != arr[done - 1]):
            self._table_source, arr, done = table, np.empty(max(16, 2 * n), np.int32), 0
        elif n > arr.shape[0]:
            arr = np.empty(2 * n, np.int32)
            arr[:done] = self._table_array[:done]
        arr[done:n] = table[done:]
        self._table_array, self._table_len, self._table_view = arr, n, arr[:n]
        return self._table_view

    def token_array(self) -> np.ndarray:
        """token_ids as int64, for the penalties' token tables each step: only entries appended since the
        last call are copied (a 1,000-token sequence's list took 25 us to convert every step; a batch of
        them, milliseconds). Tokens only change at the tail (a placeholder filled, or placeholders dropped at
        a stop): placeholders are never counted as mirrored, and a shorter list, or a last mirrored entry
        that changed, resyncs from there or starts over."""
        tokens, n, done = self.token_ids, len(self.token_ids), self._tokens_len
        if n < done:
            done = n
        if done and tokens[done - 1] != self._tokens_array[done - 1]:
            done = 0
        if n > self._tokens_array.shape[0]:
            arr = np.empty(max(64, 2 * n), np.int64)
            arr[:done] = self._tokens_array[:done]
            self._tokens_array = arr
        if n > done:
            self._tokens_array[done:n] = tokens[done:]
        while n > done and tokens[n - 1] < 0:  # placeholders (only ever at the tail): copied again next time
            n -= 1
        self._tokens_len = n
        return self._tokens_array[:len(tokens)]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})")
