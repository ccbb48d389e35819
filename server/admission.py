"""Admission checks that need no engine state: a request that can never run is refused before it queues."""
from __future__ import annotations

import logging

from model.config import ConfigError
from server.grammar import GrammarCompiler
from server.outputs import AdmissionError
from server.sampling_params import SamplingParams
from server.scheduler import Scheduler

log = logging.getLogger(__name__)


def token_ids_within(tokenizer, eos_token_ids: tuple[int, ...], vocab_size: int) -> tuple[int, ...]:
    """At start-up: the tokenizer's bos id, which it puts in every prompt, must have an embedding (else every
    request would be refused); eos ids past the vocabulary can never be sampled and are dropped, with a
    warning. Returns the eos ids kept."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and bos >= vocab_size:
        raise ConfigError(f"tokenizer: its bos token id {bos} is outside the model's vocabulary (vocab_size "
                          f"{vocab_size} in config.json): the tokenizer files do not match the weights")
    kept = tuple(i for i in eos_token_ids if i < vocab_size)
    if kept != eos_token_ids:
        log.warning("eos token ids %s are outside the vocabulary (%d); ignoring them",
                                            sorted(set(eos_token_ids) - set(kept)), vocab_size)
    return kept


def check_request(prompt_token_ids: list[int], params: SamplingParams, vocab_size: int,
                  scheduler: Scheduler, grammars: GrammarCompiler | None = None) -> None:
    """A request that can never run raises AdmissionError naming the field: ids outside the vocabulary (in
    the prompt, logit_bias, stop_token_ids, allowed_token_ids or bad words), bad_words never turned into ids,
    a grammar that does not compile, or too long for max_model_len / the whole KV cache (no engine state read:
    any thread, any process)."""
    bad = next((t for t in prompt_token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise AdmissionError(f"inputs: token id {bad} is outside the vocabulary (0..{vocab_size - 1})")
    bad = next((t for t in params.logit_bias if t >= vocab_size), None)
    if bad is not None:
        raise AdmissionError(f"logit_bias: token id {bad} is outside the vocabulary (0..{vocab_size - 1})",
                             "logit_bias")
    bad = next((t for t in params.stop_token_ids if t >= vocab_size), None)
    if bad is not None:  # never generated, and min_tokens would ban it by index
        raise AdmissionError(f"stop_token_ids: token id {bad} is outside the vocabulary (0..{vocab_size - 1})",
                             "stop_token_ids")
    _check_constraint_ids(params, vocab_size)
    if params.grammar is not None:
        if grammars is None:
            raise AdmissionError("grammar: this engine was built without a grammar compiler", "grammar")
        grammars.check(params.grammar)
    scheduler.check_admission(len(prompt_token_ids), params)


def _check_constraint_ids(params: SamplingParams, vocab_size: int) -> None:
    bad = next((t for t in params.allowed_token_ids or () if t >= vocab_size), None)
    if bad is not None:  # (the mask has no bit for it)
        raise AdmissionError(f"allowed_token_ids: token id {bad} is outside the vocabulary (0..{vocab_size - 1})",
                             "allowed_token_ids")
    if params.bad_words and not params.bad_words_token_ids:  # the engine applies ids only (it never tokenizes)
        raise AdmissionError("bad_words: not turned into token ids; fill bad_words_token_ids first "
                             "(server/bad_words.with_bad_words_token_ids)", "bad_words")
    bad = next((t for ids in params.bad_words_token_ids for t in ids if t >= vocab_size), None)
    if bad is not None:  # the tokenizer knows ids the model does not: the ban would index past the logits
        raise AdmissionError(f"bad_words_token_ids: token id {bad} is outside the vocabulary "
                             f"(0..{vocab_size - 1})", "bad_words_token_ids")
