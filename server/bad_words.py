"""vLLM's bad_words: words the output must never contain, applied as one token ban at a time.

At the door (`with_bad_words_token_ids`, by whoever holds the tokenizer: the OpenAI routes), each word is
tokenized as it is and after a space (" " + word: the same word inside a text, where BPE tokenizers fold the
space into the word's first token), without special tokens; a sequence that comes out twice is kept once.
While decoding (`banned_next`), each sequence's last token is banned at a step when the output so far (the
generated tokens, not the prompt) ends with all of the sequence's tokens but that last one; a one-token
sequence is banned at every step. A ban of the second kind depends on the output's values, so a request with
a sequence of several tokens reads its own tokens (Sequence.reads_own_tokens: under overlap scheduling its
sampling waits for the host to have them); one-token sequences alone are a static ban.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from server.sampling_params import SamplingParams


def bad_words_token_ids(tokenizer, words: Iterable[str]) -> tuple[tuple[int, ...], ...]:
    """Each word's token sequences, as it is and after a space, in order, each sequence once."""
    found: dict[tuple[int, ...], None] = {}  # (a dict keeps the order)
    for word in words:
        for text in (word, " " + word):
            ids = tuple(tokenizer.encode(text, add_special_tokens=False))
            if ids:
                found.setdefault(ids, None)
    return tuple(found)


def with_bad_words_token_ids(params: SamplingParams, tokenizer) -> SamplingParams:
    """params with bad_words_token_ids filled from its bad_words (itself when it has no words, or has the
    ids already)."""
    if not params.bad_words or params.bad_words_token_ids:
        return params
    ids = bad_words_token_ids(tokenizer, params.bad_words)
    return SamplingParams.model_validate({**dict(params), "bad_words_token_ids": ids})


def reads_output(sequences: tuple[tuple[int, ...], ...]) -> bool:
    """Whether the bans depend on the output's values (some sequence has several tokens)."""
    return any(len(s) > 1 for s in sequences)


def banned_next(token_ids: Sequence[int], num_prompt_tokens: int,
                sequences: tuple[tuple[int, ...], ...]) -> list[int]:
    """The ids banned from the next token of a request whose tokens so far (prompt, then output) are
    token_ids."""
    num_output = len(token_ids) - num_prompt_tokens
    banned = []
    for seq in sequences:
        before = len(seq) - 1
        if before == 0 or (before <= num_output and tuple(token_ids[-before:]) == seq[:-1]):
            banned.append(seq[-1])
    return banned
