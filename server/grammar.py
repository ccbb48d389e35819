"""Grammar-constrained generation (TGI's `grammar`, OpenAI's `response_format`) through llguidance.

A request's Grammar (a JSON schema, a regex or a Lark grammar) becomes one llguidance matcher per
sequence. Before each sampling step the matcher gives the tokens allowed next as a bitmask row, which the
sampler applies as -inf on the others (model/sampler.py); after it, the sampled token advances the matcher.
A sequence ends ("eos_token") as soon as its grammar can take nothing more. Because the mask depends on
the previous token, a step with a constrained row samples only once the host has the step before it (its
forward may still run ahead: deferred sampling, engine.py).

The tokenizer view llguidance needs is built once, when the server's engine starts (0.4 s for SmolLM2's
49k vocabulary, 2-core EPYC; it holds the GIL, so built later it would stall every stream). Then a JSON
schema compiles in about 1 ms (once per distinct grammar), and a row's mask takes 0.04 ms on the engine
thread (median over a 31-token object; 3 ms the first time).
"""
from __future__ import annotations

import functools
import json
import logging
import threading
from typing import Any

import torch

from server.outputs import AdmissionError
from server.sampling_params import Grammar

logger = logging.getLogger(__name__)

# JSON as json.dumps writes it: a model cannot wander into unbounded whitespace, and the text parses as is
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_source(grammar: Grammar) -> str:
    """The llguidance grammar for a request's Grammar; ValueError says what is wrong with it."""
    import llguidance
    if grammar.type == "json":
        try:
            schema = json.loads(grammar.value, parse_constant=_refuse_constant)
        except json.JSONDecodeError as exc:
            raise ValueError(f"the JSON schema does not parse: {exc}") from None
        except RecursionError:
            raise ValueError("the JSON schema is nested too deeply to parse") from None
        if not isinstance(schema, dict):
            raise ValueError("the JSON schema must be an object")
        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_LAYOUT)
    if grammar.type == "regex":
        return llguidance.LLMatcher.grammar_from_regex(grammar.value)
    return llguidance.LLMatcher.grammar_from_lark(grammar.value)


def _refuse_constant(name: str):
    """NaN and Infinity are Python's extensions to JSON, not JSON."""
    raise ValueError(f"the JSON schema does not parse: {name} is not JSON")


class GrammarCompiler:
    """Checks and compiles grammars against one tokenizer; safe to share between threads."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: tuple[int, ...]):
        self._tokenizer = tokenizer          # model.tokenizer.Tokenizer (its backend is a tokenizers.Tokenizer)
        # mask rows cover every logit, and every token id the tokenizer knows (llguidance sizes rows by it)
        self.mask_vocab_size = max(vocab_size, getattr(tokenizer, "vocab_size", 0))
        self._eos = list(eos_token_ids)
        self._lock = threading.Lock()
        self._ll_tokenizer: Any = None
        self._unusable: str | None = None  # why llguidance could not read the tokenizer
        self._checked = functools.lru_cache(maxsize=256)(self._check)
        self._executor: Any = None  # llguidance.LLExecutor: fills many rows' masks on its own threads

    @property
    def vocabulary_indexed(self) -> bool:
        return self._ll_tokenizer is not None

    def warm(self) -> None:
        """Index the vocabulary now (see the module's docstring). A tokenizer llguidance cannot read (no
        eos token, a stand-in) does not stop the server: grammars are then refused, saying why."""
        try:
            self.ll_tokenizer()
        except AdmissionError as exc:
            logger.warning("requests with a grammar will be refused: %s", exc)

    def ll_tokenizer(self) -> Any:
        with self._lock:
            if self._ll_tokenizer is None and self._unusable is None:
                import llguidance
                try:
                    self._ll_tokenizer = llguidance.LLTokenizer(self._tokenizer.backend_json(),
                                                                n_vocab=self.mask_vocab_size, eos_token=self._eos)
                except Exception as exc:  # noqa: BLE001 - any reason is the tokenizer's, reported per request
                    self._unusable = f"{type(exc).__name__}: {exc}"
            if self._unusable is not None:
                raise AdmissionError(f"grammar: this model's tokenizer cannot be used for grammars "
                                     f"({self._unusable})", "grammar")
            return self._ll_tokenizer

    def check(self, grammar: Grammar) -> str:
        """The grammar's llguidance source, validated once per distinct grammar (clients send one schema
        again and again); AdmissionError naming the field if it is not a valid grammar."""
        return self._checked(grammar)

    def _check(self, grammar: Grammar) -> str:
        import llguidance
        try:
            source = grammar_source(grammar)
        except ValueError as exc:
            raise AdmissionError(f"grammar: {exc}", "grammar") from None
        error = llguidance.LLMatcher.validate_grammar(source, self.ll_tokenizer())
        if error and not error.startswith("WARNING"):
            raise AdmissionError(f"grammar: not a valid {grammar.type} grammar: {error.strip()}", "grammar")
        probe = llguidance.LLMatcher(self.ll_tokenizer(), source, log_level=0)
        probe.compute_bitmask()  # some grammars validate but cannot start (a $ref that only refers to itself)
        if probe.is_error():
            raise AdmissionError(f"grammar: this {grammar.type} grammar cannot be run: "
                                 f"{probe.get_error().strip().splitlines()[0]}", "grammar")
        return source

    def matcher(self, grammar: Grammar) -> "SequenceGrammar":
        """A fresh matcher for one sequence (AdmissionError if the grammar is invalid)."""
        import llguidance
        matcher = llguidance.LLMatcher(self.ll_tokenizer(), self.check(grammar), log_level=0)
        if matcher.is_error():
            raise AdmissionError(f"grammar: not a valid {grammar.type} grammar: {matcher.get_error()}", "grammar")
        with self._lock:
            if self._executor is None:
                self._executor = llguidance.LLExecutor()
        return SequenceGrammar(matcher, self.mask_vocab_size, self._executor)


class GrammarFailed(RuntimeError):
    """A sequence's grammar could not take its sampled token."""


class SequenceGrammar:
    """One sequence's matcher: the tokens allowed next, and the tokens it has taken."""
    __slots__ = ("matcher", "mask_vocab_size", "executor")

    def __init__(self, matcher: Any, mask_vocab_size: int, executor: Any = None):
        self.matcher = matcher
        self.mask_vocab_size = mask_vocab_size
        self.executor = executor  # its compiler's LLExecutor

    def advance(self, token_id: int) -> bool:
        """Feed a sampled token; True when the grammar is complete and can take nothing more (the sequence
        ends). A token the mask did not allow cannot come, and a grammar that fails mid-way (too complex
        for the parser) allows none: GrammarFailed, which ends the request with an error (the engine),
        not as if its output were complete."""
        if not self.matcher.consume_token(token_id):
            error = (self.matcher.get_error() or "").strip().splitlines()
            raise GrammarFailed(f"the grammar refused token {token_id}" + (f": {error[0]}" if error else ""))
        return self.matcher.is_stopped()

    def forced_tokens(self, limit: int) -> list[int]:
        """Up to `limit` tokens the grammar forces next (llguidance's fast-forward tokens: e.g. the `{"name":`
        a JSON schema must start with), which speculative decoding feeds as drafts (server/speculative.py)."""
        return self.matcher.compute_ff_tokens()[:limit]

    def valid_prefix(self, tokens: list[int]) -> list[int]:
        """The longest prefix of `tokens` the grammar would take from here (the matcher does not move)."""
        return tokens[:self.matcher.validate_tokens(tokens)] if tokens else []


class DraftGrammar:
    """The grammar of a draft's sampling row: `base` once it has taken `drafts` (allowed_bitmask consumes
    them, computes the row's mask and rolls back, so the matcher itself only ever takes kept tokens)."""
    __slots__ = ("base", "drafts")

    def __init__(self, base: SequenceGrammar, drafts: list[int]):
        self.base, self.drafts = base, drafts

    @property
    def mask_vocab_size(self) -> int:
        return self.base.mask_vocab_size


def allowed_bitmask(grammars: list[SequenceGrammar | DraftGrammar | None]) -> torch.Tensor:
    """[B, ceil(V/32)] int32 on the host (V: the grammars' mask_vocab_size): bit j of word w set = token
    32w + j allowed. Rows without a grammar allow everything (-1: all bits set). A DraftGrammar row (a
    draft's, server/speculative.py) gets its matcher's mask after that row's drafts."""
    present = [g for g in grammars if g is not None]
    mask = torch.full((len(grammars), (present[0].mask_vocab_size + 31) // 32), -1, dtype=torch.int32)
    row_bytes = mask.shape[1] * 4
    rows = [(row, g) for row, g in enumerate(grammars) if g.__class__ is SequenceGrammar]
    # written in place (llguidance.torch does the same, but importing it imports torch.compile's
    # machinery: 2.9 s on the first constrained step); several rows on the executor's threads (64 rows
    # of JSON: 0.79 ms against 1.09 one by one on 2 cores)
    if len(rows) > 1 and rows[0][1].executor is not None:
        rows[0][1].executor.unsafe_compute_mask_ptr([(g.matcher, row) for row, g in rows], mask.data_ptr(),
                                                    row_bytes, mask.shape[0])
    else:
        for row, g in rows:
            g.matcher.unsafe_compute_mask_ptr(mask[row].data_ptr(), row_bytes)
    if len(rows) < len(present):  # draft rows, after every matcher's own row: each takes its drafts in turn
        _fill_draft_rows(mask, [(row, g) for row, g in enumerate(grammars) if g.__class__ is DraftGrammar],
                         row_bytes)
    return mask


def _fill_draft_rows(mask: torch.Tensor, rows: list[tuple[int, DraftGrammar]], row_bytes: int) -> None:
    by_matcher: dict[int, list[tuple[int, DraftGrammar]]] = {}
    for row, g in rows:
        by_matcher.setdefault(id(g.base), []).append((row, g))
    for group in by_matcher.values():
        group.sort(key=lambda r: len(r[1].drafts))  # rows j = 1, 2, ...: drafts[:j]
        matcher = group[0][1].base.matcher
        drafts = group[-1][1].drafts
        # consume only what the grammar takes (a refused token would leave the matcher in its error state);
        # a row past a refused draft keeps the all-allowed mask: the row before cannot sample that draft, so
        # nothing from this row is ever kept
        valid = matcher.validate_tokens(drafts)
        taken = 0
        for row, g in group:
            if len(g.drafts) > valid:
                break
            matcher.consume_tokens(g.drafts[taken:])
            taken = len(g.drafts)
            matcher.unsafe_compute_mask_ptr(mask[row].data_ptr(), row_bytes)
        if taken:
            matcher.rollback(taken)
