"""What /v1/completions and /v1/chat/completions share: refusals, SamplingParams mapping (bad_words turned
into token ids here, where the tokenizer is), prompt truncation, token strings, usage, and the SSE framing of
a merged stream of choices (`data: {...}` events then `data: [DONE]`)."""
from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from pydantic import BaseModel

from model.token_bytes import token_string
from server.bad_words import with_bad_words_token_ids
from server.generation import Collected, merge_streams, resolve_max_new_tokens, build_params
from server.http_errors import ApiError, error_json, failure_error
from server.outputs import RequestOutput
from server.reasoning_parsers import applies as reasoning_applies
from server.sampling_params import SamplingParams
from server.schema_common import finite_logprob
from server.schemas_openai import ChatCompletionRequest, SamplingFields
from server.schemas_openai_out import CompletionTokensDetails, Usage
from server.sse import sse_data
from server.state import ServerState
from server.tool_parsers import model_writes_calls

FINISH_REASON = {"length": "length", "stop": "stop", "eos_token": "stop"}


def admission_names(prompt_field: str, max_tokens_field: str, grammar_field: str = "response_format") -> dict:
    """The engine's field names -> this request's, for submit_all's refusals (the scheduler's KV-cache check
    names `inputs` and `max_new_tokens`, TGI's words)."""
    return {"inputs": prompt_field, "max_new_tokens": max_tokens_field, "grammar": grammar_field,
            "bad_words_token_ids": "bad_words"}


def finish_reason(reason: str | None) -> str | None:
    return FINISH_REASON.get(reason, "stop") if reason else None


def now_s() -> int:
    return int(time.time())


# Model names clients send when they do not know the served one: huggingface_hub's InferenceClient sends
# "dummy" (older versions "tgi") when given a server URL, as TGI serves whatever model is asked for
PLACEHOLDER_MODELS = ("dummy", "tgi")


def check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model not in (state.model_name, state.model_path, *PLACEHOLDER_MODELS):
        raise ApiError("not_found", f"model: '{model}' is not served here; this server serves "
                                    f"'{state.model_name}'", "model")


def check_common(state: ServerState, req: SamplingFields, num_choices: int) -> None:
    check_model(state, req.model)
    if req.stream_options is not None and not req.stream:
        raise ApiError("validation", "stream_options: only with stream true", "stream_options")
    if num_choices > state.config.max_choices:
        raise ApiError("validation", f"n: {num_choices} choices in all, more than the limit of "
                                     f"{state.config.max_choices} (max_choices)", "n")


def sampling_params(state: ServerState, req: SamplingFields, prompt_len: int, *, max_tokens: int | None,
                    max_tokens_field: str, logprobs: int | None, logprobs_field: str,
                    choice: int, prompt_logprobs: bool = False, grammar: dict | None = None,
                    prediction: tuple[int, ...] = ()) -> SamplingParams:
    """grammar: one of the route's own (tool calls) in place of response_format's; prediction: the chat
    request's (prediction_ids)."""
    max_new = resolve_max_new_tokens(state, prompt_len, max_tokens, max_tokens_field, None)
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    # n > 1 with a seed: one reproducible but distinct stream per choice
    seed = None if req.seed is None else (req.seed + choice) % 2**63
    names = {"max_new_tokens": max_tokens_field, "min_new_tokens": "min_tokens", "logprobs": logprobs_field,
             "grammar": grammar_field(req)}
    bias = {}
    for key, value in (req.logit_bias or {}).items():
        try:
            token = int(key)
        except ValueError:  # also "²" and digits past int()'s limit, which str.isdigit() would let through
            raise ApiError("validation", f"logit_bias: keys are token ids; {key!r} is not one",
                           "logit_bias") from None
        bias[token] = value
    model = state.sampling_defaults  # the model's generation_config.json, then OpenAI's defaults

    def unset(value, field: str, default: float):
        return model.get(field, default) if value is None else value
    params = build_params(
        names, temperature=unset(req.temperature, "temperature", 1.0), top_p=unset(req.top_p, "top_p", 1.0),
        top_k=unset(req.top_k, "top_k", 0), min_p=unset(req.min_p, "min_p", 0.0),
        repetition_penalty=unset(req.repetition_penalty, "repetition_penalty", 1.0),
        presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
        seed=seed, max_new_tokens=max_new, min_new_tokens=req.min_tokens or 0, stop=stop,
        stop_token_ids=tuple(req.stop_token_ids or ()), ignore_eos=bool(req.ignore_eos), logprobs=logprobs,
        skip_special_tokens=req.skip_special_tokens is not False and not _keeps_special_tokens(state, req),
        prompt_logprobs=prompt_logprobs, priority=req.priority or 0,
        logit_bias=bias, grammar=grammar or _grammar(req),
        allowed_token_ids=None if req.allowed_token_ids is None else tuple(req.allowed_token_ids),
        bad_words=tuple(req.bad_words or ()), prediction_token_ids=prediction)
    return with_bad_words_token_ids(params, state.engine.tokenizer)  # (the engine takes ids)


def prediction_ids(state: ServerState, req: ChatCompletionRequest) -> tuple[int, ...]:
    """A chat request's prediction as token ids, without special tokens (none when it has none, or the engine
    ignores predictions: num_prediction_tokens 0); refused past max_prompt_chars or max_model_len tokens."""
    if req.prediction is None or not state.engine.config.num_prediction_tokens:
        return ()
    text, limit = req.prediction.text(), state.prompt_char_limit
    if len(text) > limit:
        raise ApiError("validation", f"prediction: {len(text):,} characters, over the limit of {limit:,} "
                                     "(max_prompt_chars)", "prediction")
    ids = state.engine.tokenizer.encode(text, add_special_tokens=False)
    if len(ids) > state.max_model_len:  # (no output could repeat more)
        raise ApiError("validation", f"prediction: {len(ids):,} tokens, more than max_model_len "
                                     f"({state.max_model_len:,})", "prediction")
    return tuple(ids)


class PredictionTally:
    """A chat request's prediction: its token ids (`ids`, prediction_ids), and its tokens accepted and rejected
    (RequestOutput's totals) summed over its choices, for usage.completion_tokens_details, which is there only
    when the request has a prediction."""

    def __init__(self, state: ServerState, req: ChatCompletionRequest, n: int):
        self.has_prediction, self.ids = req.prediction is not None, prediction_ids(state, req)
        self.totals = [(0, 0)] * n

    def record(self, index: int, out: RequestOutput) -> None:
        if self.has_prediction:  # (the totals so far; the largest seen stand)
            a, r = self.totals[index]
            self.totals[index] = (max(a, out.accepted_prediction_tokens), max(r, out.rejected_prediction_tokens))

    def record_collected(self, results: list[Collected]) -> None:
        """A non-streamed response's choices, each collected whole (generation.Collected keeps the totals)."""
        self.totals = [(got.accepted_prediction_tokens, got.rejected_prediction_tokens) for got in results]

    def usage(self, u: Usage) -> Usage:
        if not self.has_prediction:
            return u
        details = CompletionTokensDetails(accepted_prediction_tokens=sum(a for a, _ in self.totals),
                                          rejected_prediction_tokens=sum(r for _, r in self.totals))
        return u.model_copy(update={"completion_tokens_details": details})


def prompt_truncation(state: ServerState, req: SamplingFields) -> int | None:
    """How many of the prompt's last tokens truncate_prompt_tokens keeps (-1: max_model_len); None: all."""
    keep = req.truncate_prompt_tokens
    if keep is None:
        return None
    if keep > state.max_model_len:  # (vLLM refuses it too: the prompt could not fit anyway)
        raise ApiError("validation", f"truncate_prompt_tokens: {keep:,} is more than max_model_len "
                                     f"({state.max_model_len:,})", "truncate_prompt_tokens")
    return state.max_model_len if keep == -1 else keep


def _keeps_special_tokens(state: ServerState, req: SamplingFields) -> bool:
    """A chat request whose calls the model writes (tools, tool_choice "auto" or unset: tool_calls.auto_parser)
    for a parser whose call marker is a special token (mistral's [TOOL_CALLS]) is decoded with special tokens
    kept, or the marker would vanish (vLLM does the same); so is a chat request split by a reasoning parser
    whose <think> markers are special tokens. Token stops (eos) never enter the text either way."""
    reasoning = state.reasoning_parser
    if getattr(reasoning, "special_tokens", False) and reasoning_applies(req, reasoning):
        return True
    return model_writes_calls(req) and getattr(state.tool_parser, "special_token", None) is not None


def _constraints(req: SamplingFields) -> list[tuple[str, str, Any]]:
    """(field, kind, value) for each way the request constrains its output: response_format (not text),
    vLLM's guided_json / guided_regex / guided_choice, structured_outputs' json / regex / choice."""
    fmt, so = req.response_format, req.structured_outputs
    given = [("response_format", "format", fmt if fmt is not None and fmt.type != "text" else None),
             ("guided_json", "json", req.guided_json), ("guided_regex", "regex", req.guided_regex),
             ("guided_choice", "choice", req.guided_choice)]
    if so is not None:
        given += [("structured_outputs.json", "json", so.json_), ("structured_outputs.regex", "regex", so.regex),
                  ("structured_outputs.choice", "choice", so.choice)]
        if so.json_ is None and so.regex is None and so.choice is None:  # vLLM refuses it too
            raise ApiError("validation", "structured_outputs: give one of json, regex and choice",
                           "structured_outputs")
    found = [item for item in given if item[2] is not None]
    if len(found) > 1:
        raise ApiError("validation", f"{found[1][0]}: cannot be combined with {found[0][0]}; constrain the "
                                     "output one way", found[1][0])
    return found


def grammar_field(req: SamplingFields, forced_calls: bool = False) -> str:
    """The field the request's grammar comes from, for errors about it (response_format when none does).
    forced_calls: the tool_choice writes calls under its own grammar, which a guided_* field cannot join
    (tool_calls.tool_grammar refuses response_format the same way)."""
    found = _constraints(req)
    if found and forced_calls:
        raise ApiError("validation", f"{found[0][0]}: cannot be combined with a tool_choice that asks for a "
                                     "call (the call's arguments follow the tool's schema)", found[0][0])
    return found[0][0] if found else "response_format"


_REGEX_META = frozenset("\\.+*?()|[]{}^$#&-~")  # llguidance's (Rust regex syntax) metacharacters


def choice_regex(choices: list[str]) -> str:
    """A regex that matches exactly one of the strings (each escaped: the output is the string itself)."""
    return "(" + "|".join("".join("\\" + c if c in _REGEX_META else c for c in s) for s in choices) + ")"


def _grammar(req: SamplingFields) -> dict | None:
    """The output constraint as SamplingParams.grammar: response_format's json_object is any JSON object (or
    TGI's value schema), json_schema its schema; guided_json a schema, guided_regex a regex, guided_choice
    the regex of its strings."""
    fmt = req.response_format
    if fmt is not None and fmt.value is not None and fmt.type != "json_object":
        raise ApiError("validation", "response_format.value: only with type json_object (TGI's shape); type "
                                     "json_schema takes json_schema.schema", "response_format.value")
    found = _constraints(req)
    if not found:
        return None
    _, kind, value = found[0]
    if kind == "json":
        return {"type": "json", "value": value if isinstance(value, str) else json.dumps(value)}
    if kind in ("regex", "choice"):
        return {"type": "regex", "value": value if kind == "regex" else choice_regex(value)}
    if fmt.type == "json_object":
        return {"type": "json", "value": json.dumps(fmt.value) if fmt.value is not None else '{"type": "object"}'}
    if fmt.json_schema is None:
        raise ApiError("validation", "response_format: type json_schema needs a json_schema object",
                       "response_format")
    return {"type": "json", "value": json.dumps(fmt.json_schema.schema_ or {"type": "object"})}


def token_str(state: ServerState, token_id: int) -> str:
    """A /v1/completions logprob token: its text, or "bytes:\\xf0\\x9f" for part of a character, as OpenAI's
    completions write it (one U+FFFD for each would merge different tokens into one top_logprobs key)."""
    return token_string(state.engine.tokenizer.token_bytes(token_id), prefix="bytes:")


def logprob_value(value: float) -> float:
    return finite_logprob(value)  # type: ignore[return-value]


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


def continuous_usage(req: SamplingFields) -> bool:
    """stream_options asks for usage on every chunk (vLLM's continuous_usage_stats, with include_usage)."""
    opts = req.stream_options
    return bool(opts and opts.include_usage and opts.continuous_usage_stats)


async def sse_choices(streams: list[AsyncIterator[RequestOutput]], prompt_tokens: int,
                      chunk: Callable[[int, RequestOutput], BaseModel | None],
                      usage_chunk: Callable[[Usage], BaseModel] | None,
                      first: Callable[[int], BaseModel] | None = None,
                      continuous_usage: bool = False,
                      usage_with: Callable[[Usage], Usage] | None = None) -> AsyncIterator[str]:
    """Frame one merged stream: `chunk(index, output)` builds each event; usage and [DONE] close it. With
    continuous_usage (vLLM's stream_options.continuous_usage_stats) every event carries the usage so far.
    usage_with: what the route adds to a usage (a prediction's completion_tokens_details)."""
    completion_tokens = [0] * len(streams)

    def usage_so_far() -> Usage:
        u = usage(prompt_tokens, sum(completion_tokens))
        return u if usage_with is None else usage_with(u)

    def framed(event: BaseModel) -> str:
        if continuous_usage:
            event = event.model_copy(update={"usage": usage_so_far()})
        return sse_data(event.model_dump_json())
    try:
        if first is not None:
            for index in range(len(streams)):
                yield framed(first(index))
        async with aclosing(merge_streams(streams)) as merged:
            async for index, out in merged:
                if out.finished and out.finish_reason in ("error", "abort"):
                    yield sse_data(error_json(failure_error(out), openai=True))
                    yield sse_data("[DONE]")
                    return
                completion_tokens[index] = out.num_output_tokens or completion_tokens[index] + len(
                    out.new_token_ids)
                event = chunk(index, out)
                if event is not None:
                    yield framed(event)
        if usage_chunk is not None:
            yield sse_data(usage_chunk(usage_so_far()).model_dump_json())
    except ApiError as exc:
        yield sse_data(error_json(exc, openai=True))
    except Exception as exc:  # noqa: BLE001 - once streaming began, errors travel as an event
        yield sse_data(error_json(ApiError("generation", f"generation failed: {type(exc).__name__}"), True))
    yield sse_data("[DONE]")
