"""The part of a request both APIs share: prompt checks, submission, metrics, abort (server/disconnects.py
has what a client that leaves adds).

`submit` calls engine.add_request at once, so admission failures become HTTP errors before any response
starts; the stream it returns records latencies and aborts its engine request whenever it is closed or
cancelled before the final output (client gone, n>1 sibling failed, handler error), which frees the
request's KV blocks immediately.
"""
from __future__ import annotations

import asyncio
import re
import time
from contextlib import aclosing
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pydantic import ValidationError

from server.http_errors import ApiError, failure_error
from server.outputs import AdmissionError, EngineDeadError, OverloadedError, RequestOutput, TokenLogprob
from server.request_log import log_ended
from server.sampling_params import SamplingParams
from server.state import Phase, ServerState

# prompt checks -------------------------------------------------------------------------------------------
def encode_prompt(state: ServerState, text: str, field: str, add_special_tokens: bool = True,
                  check_length: bool = True, keep_last: int | None = None,
                  within_chars: bool | None = None) -> list[int]:
    """Tokenize after cheap checks: the character limit keeps huge prompts off the tokenizer. keep_last:
    truncate to that many last tokens first (kept_tail). within_chars: refuse text over the character limit;
    by default unless keep_last truncates it, since cutting a long prompt is what truncation is for (its text
    is still bounded by max_payload_bytes)."""
    if not text:
        raise ApiError("validation", f"{field}: the prompt is empty", field)
    limit = state.prompt_char_limit
    if (keep_last is None if within_chars is None else within_chars) and len(text) > limit:
        raise ApiError("validation", f"{field}: the prompt is {len(text):,} characters, over the limit of "
                                     f"{limit:,} (max_prompt_chars)", field)
    ids = state.engine.tokenizer.encode(text, add_special_tokens=add_special_tokens)
    if not ids:
        raise ApiError("validation", f"{field}: the prompt encodes to no tokens", field)
    ids = kept_tail(list(ids), keep_last)
    if check_length:
        check_prompt_length(state, len(ids), field)
    return ids


def check_token_ids(state: ServerState, ids: list[int], field: str, keep_last: int | None = None) -> list[int]:
    if not ids:
        raise ApiError("validation", f"{field}: the prompt is empty", field)
    check_in_vocabulary(state, ids, field)
    ids = kept_tail(list(ids), keep_last)
    check_prompt_length(state, len(ids), field)
    return ids


def kept_tail(ids: list[int], keep: int | None) -> list[int]:
    """A prompt truncated to its last `keep` tokens (TGI's truncate, vLLM's truncate_prompt_tokens): ids itself
    when it is no longer (or keep is None)."""
    return ids if keep is None or len(ids) <= keep else ids[-keep:]


def check_in_vocabulary(state: ServerState, ids: list[int], field: str) -> None:
    vocab = int(state.engine.tokenizer.vocab_size)
    bad = next((i for i in ids if not 0 <= i < vocab), None)
    if bad is not None:
        raise ApiError("validation", f"{field}: token id {bad} is outside the vocabulary (0..{vocab - 1})", field)


def check_prompt_length(state: ServerState, num_tokens: int, field: str) -> None:
    if num_tokens >= state.longest_sequence:
        raise ApiError("validation", f"{field}: the prompt is {num_tokens:,} tokens but {state.context_limit()} "
                                     "(prompt plus at least 1 new token must fit)", field)


def resolve_max_new_tokens(state: ServerState, prompt_len: int, requested: int | None, field: str,
                           default: int | None) -> int:
    """An explicit value must fit the context (max_model_len, or a smaller KV cache); the default is capped
    to whatever room is left."""
    room = state.longest_sequence - prompt_len
    if requested is None:
        return room if default is None else max(1, min(default, room))
    if requested > room:
        raise ApiError("validation", f"{field}: {requested:,} new tokens plus the {prompt_len:,}-token prompt "
                                     f"do not fit: {state.context_limit()} (at most {room:,} here)", field)
    return requested


def build_params(names: Mapping[str, str], **values) -> SamplingParams:
    """SamplingParams from API values; `names` maps our field names to the API's for error messages."""
    try:
        return SamplingParams(**values)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        message = str(err["msg"]).removeprefix("Value error, ")
        ours = str(err["loc"][0]) if err["loc"] else ""
        if not ours:  # a model-level check: its message starts with the field it is about
            ours = next((f for f in SamplingParams.model_fields if message.startswith(f)), "")
        field = names.get(ours, ours) or "parameters"
        if names:
            pattern = r"\b(" + "|".join(re.escape(n) for n in names) + r")\b"
            message = re.sub(pattern, lambda m: names[m.group(1)], message)
        if not message.startswith(field):
            message = f"{field}: {message}"
        raise ApiError("validation", message, field) from None


# submission and streams ----------------------------------------------------------------------------------
def submit(state: ServerState, prompt_ids: list[int], params: SamplingParams, request_id: str,
           names: Mapping[str, str] | None = None) -> AsyncIterator[RequestOutput]:
    """names: the engine's field names -> the API's, for admission errors (as build_params takes them)."""
    state.require_ready()
    arrival = time.monotonic()
    try:
        stream = state.engine.add_request(request_id, prompt_ids, params)
    except AdmissionError as exc:
        state.metrics.http_rejections.labels("validation").inc()
        field, message = (names or {}).get(exc.field, exc.field), str(exc)
        if field != exc.field and message.startswith(exc.field):
            message = field + message[len(exc.field):]
        raise ApiError("validation", message, field) from None
    except OverloadedError as exc:
        kind = "unavailable" if state.phase is Phase.DRAINING else "overloaded"
        state.metrics.http_rejections.labels(kind).inc()
        raise ApiError(kind, f"server: {exc}") from None
    except EngineDeadError as exc:
        raise ApiError("unavailable", f"engine: {exc}") from None
    return _tracked(state, request_id, stream, arrival, names or {}, prompt_tokens=len(prompt_ids))


def submit_all(state: ServerState, jobs: list[tuple[str, list[int], SamplingParams]],
               names: Mapping[str, str] | None = None) -> list[AsyncIterator[RequestOutput]]:
    """Submit several requests; if one is refused, abort the ones already admitted and re-raise."""
    streams = []
    try:
        for request_id, prompt_ids, params in jobs:
            streams.append(submit(state, prompt_ids, params, request_id, names))
    except BaseException:
        for request_id, _, _ in jobs[:len(streams)]:
            state.engine.abort(request_id)
            state.metrics.request_success.labels("abort").inc()  # its stream never starts, so never counts it
        raise
    return streams


async def _tracked(state: ServerState, request_id: str, stream: AsyncIterator[RequestOutput],
                   arrival: float, names: Mapping[str, str] | None = None, *,
                   prompt_tokens: int) -> AsyncIterator[RequestOutput]:
    m = state.metrics
    first_token_at = last_token_time = queue_time = None  # monotonic times; seconds
    # the tokens of one engine step (several with speculative decoding, each its own output) share the gap
    # since the previous step: k tokens give k samples of gap / k
    step, step_tokens, step_gap = None, 0, 0.0
    final, output_tokens = None, 0  # the last output once it came

    def observe_step() -> None:
        for _ in range(step_tokens):
            m.inter_token_latency.observe(step_gap / step_tokens)

    try:
        async for out in stream:
            now = time.monotonic()
            n = len(out.new_token_ids)
            output_tokens += n
            if n:
                if last_token_time is None:
                    m.time_to_first_token.observe(now - arrival)
                    queue_time = out.queue_time if out.queue_time is not None else now - arrival
                    m.request_queue_time.observe(queue_time)
                    step, last_token_time, first_token_at = out.step_time, now, now
                elif out.step_time is not None and out.step_time == step:
                    step_tokens += n
                else:
                    observe_step()
                    step, step_tokens, step_gap, last_token_time = out.step_time, n, now - last_token_time, now
            if out.finished:
                final = out
                observe_step()
                if out.error_field is not None:  # the engine's name for the field -> the API's
                    out = out._replace(error_field=(names or {}).get(out.error_field, out.error_field))
                m.e2e_request_latency.observe(now - arrival)
                m.request_success.labels(out.finish_reason or "unknown").inc()
            yield out
            if final is not None:
                return
    finally:
        if final is None:
            observe_step()
            state.engine.abort(request_id)
            m.request_success.labels("abort").inc()
        if state.config.log_requests:
            log_ended(request_id, final, prompt_tokens=prompt_tokens, output_tokens=output_tokens,
                      queue_time=queue_time, arrival=arrival,
                      first_token_at=first_token_at, now=time.monotonic())


_DONE = object()


async def merge_streams(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave n streams as (index, output); closing the merge cancels (and so aborts) them all."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:
            async for out in only:
                yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                queue.put_nowait((index, out))
        except Exception as exc:  # noqa: BLE001 - re-raised in the consumer
            queue.put_nowait((index, exc))
        finally:
            queue.put_nowait((index, _DONE))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class Collected:
    """A whole completion gathered from its deltas (non-streaming responses)."""
    token_ids: list[int] = field(default_factory=list)
    token_texts: list[str] = field(default_factory=list)  # per token; a delta's text goes on its last token
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_prompt_tokens: int = 0
    prompt_logprobs: list[float | None] | None = None
    queue_time: float | None = None  # seconds from the engine's arrival to first scheduling
    accepted_prediction_tokens: int = 0  # its prediction's drafts kept and refused (server/prediction.py)
    rejected_prediction_tokens: int = 0

    def add(self, out: RequestOutput) -> None:
        self.token_ids.extend(out.new_token_ids)
        self.token_texts.extend(delta_texts(out))
        self.text += out.new_text
        if out.new_logprobs:
            self.logprobs.extend(out.new_logprobs)
        self.num_prompt_tokens = out.num_prompt_tokens or self.num_prompt_tokens
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.queue_time = out.queue_time if out.queue_time is not None else self.queue_time
        self.accepted_prediction_tokens = max(self.accepted_prediction_tokens, out.accepted_prediction_tokens)
        self.rejected_prediction_tokens = max(self.rejected_prediction_tokens, out.rejected_prediction_tokens)
        if out.finished:
            self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason
            raise_if_failed(out)


def delta_texts(out: RequestOutput) -> list[str]:
    n = len(out.new_token_ids)
    return [""] * (n - 1) + [out.new_text] if n else []


def raise_if_failed(out: RequestOutput) -> None:
    if out.finish_reason in ("error", "abort"):
        raise failure_error(out)


async def collect_all(streams: list[AsyncIterator[RequestOutput]]) -> list[Collected]:
    results = [Collected() for _ in streams]
    async with aclosing(merge_streams(streams)) as merged:
        async for index, out in merged:
            results[index].add(out)
    return results
