"""The `logprobs` object of a /v1/completions choice: OpenAI's legacy shape of four parallel lists (tokens,
token_logprobs, top_logprobs, text_offset), for the generated tokens and, with echo, the prompt's first.

text_offset is where each token starts in the choice's text. Summing the lengths of tokens decoded one by
one would drift from that text: a character split over several byte tokens decodes to one U+FFFD per token,
a special token (the BOS a tokenizer adds to a text prompt) is not in the echoed prompt string, and a
matched stop string is cut from the text but not from the tokens. So offsets follow the text each token
completes (the engine's deltas for generated tokens, an incremental detokenizer for the prompt).
"""
from __future__ import annotations

from dataclasses import dataclass

from model.detokenizer import IncrementalDetokenizer
from server.openai_common import logprob_value, token_str
from server.outputs import TokenLogprob
from server.schemas_openai_out import CompletionLogprobs
from server.state import ServerState


@dataclass(frozen=True)
class CompletionPrompt:
    text: str                      # what echo prepends to the choice's text
    token_ids: list[int]
    text_has_special_tokens: bool  # a text prompt is echoed as sent; token ids as decoded with specials


def text_offsets(tokens: list[str], pieces: list[str], start: int) -> list[int]:
    """`pieces[i]`: the text token i completed; `start`: where the first piece begins. A token starts where
    its own string begins at the end of its piece, so text[offset:offset + len(token)] == token; one whose
    string does not end its piece (part of a character, a special token the text leaves out, a cut stop
    string) starts where the text before it ended."""
    offsets = []
    for token, piece in zip(tokens, pieces):
        offsets.append(start + len(piece) - len(token) if token and piece.endswith(token) else start)
        start += len(piece)
    return offsets


def generated_logprobs(state: ServerState, token_ids: list[int], token_texts: list[str],
                       lps: list[TokenLogprob], start: int) -> CompletionLogprobs:
    """`token_texts`: the text each token completed (server.generation.delta_texts); `start`: where the
    first of them begins in the choice's text."""
    tokens = [token_str(state, t) for t in token_ids]
    return CompletionLogprobs(
        tokens=tokens, token_logprobs=[logprob_value(lp.logprob) for lp in lps],
        top_logprobs=[{token_str(state, tid): logprob_value(v) for tid, v in lp.top} for lp in lps],
        text_offset=text_offsets(tokens, token_texts, start))


def prompt_logprobs(state: ServerState, prompt: CompletionPrompt,
                    values: list[float | None] | None) -> CompletionLogprobs:
    """The echoed prompt's part. `values`: RequestOutput.prompt_logprobs, the logprob of each prompt token
    given the ones before it. The first token has none (nothing precedes it), so both its token_logprobs
    and top_logprobs entries are null, as OpenAI and vLLM send them. The engine scores only the prompt's own
    token at each position, not a top-n, so each top_logprobs entry holds that token alone (vLLM's prompt
    entries likewise always include the actual token), whatever `logprobs` asked for."""
    ids = prompt.token_ids
    scores = [None] + [logprob_value(v) for v in (values or [])[1:len(ids)]]
    scores += [None] * (len(ids) - len(scores))  # an engine that sent none: null rather than made up
    tokens = [token_str(state, t) for t in ids]
    return CompletionLogprobs(tokens=tokens, token_logprobs=scores,
                              top_logprobs=[None if v is None else {tok: v} for tok, v in zip(tokens, scores)],
                              text_offset=prompt_text_offsets(state, prompt, tokens))


def prompt_text_offsets(state: ServerState, prompt: CompletionPrompt, tokens: list[str]) -> list[int]:
    """Where each prompt token starts in the echoed text, clamped to it in case the tokenizer does not
    reproduce a text prompt exactly (normalisation, unknown characters)."""
    detokenizer = IncrementalDetokenizer(state.engine.tokenizer, [],
                                         skip_special_tokens=not prompt.text_has_special_tokens)
    pieces = [detokenizer.add(token_id) for token_id in prompt.token_ids]
    return [min(offset, len(prompt.text)) for offset in text_offsets(tokens, pieces, 0)]


def joined(first: CompletionLogprobs, then: CompletionLogprobs | None) -> CompletionLogprobs:
    if then is None:
        return first
    return CompletionLogprobs(tokens=first.tokens + then.tokens,
                              token_logprobs=first.token_logprobs + then.token_logprobs,
                              top_logprobs=first.top_logprobs + then.top_logprobs,
                              text_offset=first.text_offset + then.text_offset)
