"""POST /v1/responses: OpenAI's Responses API on the chat route's machinery, stateless.

The request becomes a chat request (ResponsesRequest.chat_request) and goes the chat route's way: the chat
template (chat_text), tool calls (tool_grammar, auto_parser), the reasoning split and sampling_params. One
ChoiceReply turns the output into reasoning, content and calls, which OutputItems (server/responses_output.py)
turns into the Response's output items and, streaming, into its events, so both ways give the same items. The
chat pieces name chat fields in their errors; those are renamed to this request's (messages -> input,
max_tokens -> max_output_tokens, response_format -> text.format, tools.0.function.parameters ->
tools.0.parameters).
"""
from __future__ import annotations

import itertools
import json
import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing, contextmanager
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from server.api_openai import chat_logprobs, chat_text
from server.disconnects import ClientDisconnected, aborter, unless_disconnected
from server.generation import collect_all, encode_prompt, submit_all
from server.http_errors import ApiError, failure_error
from server.middleware import request_id
from server.openai_common import admission_names, check_common, now_s, sampling_params
from server.outputs import RequestOutput, TokenLogprob
from server.reasoning_parsers import ReasoningStream, applies as reasoning_applies
from server.request_log import engine_ids
from server.responses_output import OutputItems
from server.schemas_openai_out import ChatTokenLogprob, OpenAIError
from server.schemas_responses import (IncompleteDetails, ReasoningConfig, ResponseError, ResponseObject,
                                      ResponsesRequest, ResponsesTextConfig, ResponsesTextFormat, ResponsesUsage)
from server.sse import EventStreamResponse, sse_data
from server.state import ServerState
from server.tool_calls import ChoiceReply, auto_parser, tool_grammar, tool_schema_field

_CHAT_FIELD_NAMES = ((re.compile(r"^messages\b"), "input"), (re.compile(r"^max_tokens\b"), "max_output_tokens"),
                     (re.compile(r"^response_format(\.[\w.]+)?"), "text.format"),
                     (re.compile(r"^tools\.(\d+)\.function\."), r"tools.\1."))


def responses_field(chat_field: str) -> str:
    """A chat request's field name -> the Responses request's."""
    for pattern, name in _CHAT_FIELD_NAMES:
        chat_field = pattern.sub(name, chat_field, count=1)
    return chat_field


@contextmanager
def _named_as_responses() -> Iterator[None]:
    """Errors of the chat pieces, naming this request's fields (the message starts with the field, as
    every ApiError's does)."""
    try:
        yield
    except ApiError as exc:
        if exc.param is None:
            raise
        param = responses_field(exc.param)
        message = param + exc.message[len(exc.param):] if exc.message.startswith(exc.param) else exc.message
        raise ApiError(exc.kind, message, param, exc.retry_after_s) from None
    except ValidationError as exc:  # chat_request: a value this schema takes and the chat schema does not
        why = exc.errors(include_url=False)[0]["msg"]
        raise ApiError("validation", f"input: cannot be served as chat messages ({why})", "input") from None


def _refuse_unservable(req: ResponsesRequest) -> None:
    fmt = req.text.format if req.text is not None else None
    refusals = (("previous_response_id", req.previous_response_id is not None,
                 "must be null: nothing is stored here; send the whole conversation as input items"),
                ("background", bool(req.background), "must not be true: background responses need storage, "
                                                     "which this server does not have"),
                ("text.format.name", fmt is not None and fmt.type == "json_schema" and fmt.name is None,
                 "required with type json_schema"))
    for name, bad, why in refusals:
        if bad:
            raise ApiError("validation", f"{name}: {why}", name)


def _echoed(state: ServerState, req: ResponsesRequest, rid: str) -> dict[str, Any]:
    """The fields every Response of this request carries: its ids, and its settings as OpenAI echoes them
    (temperature and top_p as they apply: the model's defaults when unset)."""
    defaults = state.sampling_defaults
    return dict(id=rid, created_at=now_s(), model=state.model_name, instructions=req.instructions,
                max_output_tokens=req.max_output_tokens, top_logprobs=req.top_logprobs,
                temperature=req.temperature if req.temperature is not None else defaults.get("temperature", 1.0),
                top_p=req.top_p if req.top_p is not None else defaults.get("top_p", 1.0),
                tools=req.tools or [], tool_choice=req.tool_choice or _unset_tool_choice(state, req),
                parallel_tool_calls=req.parallel_tool_calls is not False,
                text=req.text or ResponsesTextConfig(format=ResponsesTextFormat(type="text")),
                reasoning=req.reasoning or ReasoningConfig(), metadata=req.metadata or {}, user=req.user,
                service_tier=req.service_tier or "auto", prompt_cache_key=req.prompt_cache_key,
                safety_identifier=req.safety_identifier)


def _unset_tool_choice(state: ServerState, req: ResponsesRequest) -> str:
    """What an unset tool_choice does: "auto" (OpenAI's default), or "none" when tools are given and no parser
    can find the model's calls (server/tool_calls.py)."""
    return "none" if req.tools and state.tool_parser is None else "auto"


def _ending(state: ServerState, output: OutputItems, reason: str | None, prompt_tokens: int,
            output_tokens: int) -> dict[str, Any]:
    """status, incomplete_details and usage of a finished reply."""
    # the split is made on text, so the thinking's tokens are counted by encoding its text again
    reasoning = output.reasoning_text and len(state.engine.tokenizer.encode(output.reasoning_text,
                                                                            add_special_tokens=False))
    usage = ResponsesUsage(input_tokens=prompt_tokens, output_tokens=output_tokens,
                           output_tokens_details={"reasoning_tokens": min(reasoning or 0, output_tokens)},
                           total_tokens=prompt_tokens + output_tokens)
    incomplete = IncompleteDetails(reason="max_output_tokens") if reason == "length" else None
    return dict(status="incomplete" if incomplete else "completed", incomplete_details=incomplete, usage=usage)


LogprobsOf = Callable[[list[int], list[TokenLogprob] | None], list[ChatTokenLogprob]]


async def _events(state: ServerState, echoed: dict[str, Any], job_id: str, stream: AsyncIterator[RequestOutput],
                  reply: ChoiceReply, logprobs: LogprobsOf, prompt_tokens: int) -> AsyncIterator[str]:
    """The stream's events, each `event: <type>` and `data: {...}` with its sequence_number, as OpenAI sends
    them; a failure after the start is a response.failed event carrying the error."""
    numbers, output, output_tokens = itertools.count(), OutputItems(), 0

    def framed(event: dict) -> str:
        event = {**event, "sequence_number": next(numbers)}
        return f"event: {event['type']}\n" + sse_data(json.dumps(event, ensure_ascii=False))

    def lifecycle(kind: str, **fields: Any) -> str:
        body = ResponseObject(**echoed, output=output.items, **fields)
        return framed({"type": kind, "response": body.model_dump(by_alias=True)})
    try:
        yield lifecycle("response.created", status="in_progress")
        yield lifecycle("response.in_progress", status="in_progress")
        async with aclosing(stream) as outputs:
            async for out in outputs:
                if out.finished and out.finish_reason in ("error", "abort"):
                    raise failure_error(out)
                output_tokens = out.num_output_tokens or output_tokens + len(out.new_token_ids)
                delta, reason = reply.delta(out.new_text, out.finish_reason if out.finished else None)
                for event in output.add(delta, logprobs(out.new_token_ids, out.new_logprobs)):
                    yield framed(event)
                if out.finished:
                    for event in output.close(reason):
                        yield framed(event)
                    ending = _ending(state, output, reason, prompt_tokens, output_tokens)
                    yield lifecycle(f"response.{ending['status']}", **ending)
    except Exception as exc:  # noqa: BLE001 - once streaming began, errors travel as an event
        err = exc if isinstance(exc, ApiError) else ApiError("generation", f"generation failed: {type(exc).__name__}")
        code = "invalid_prompt" if err.kind == "validation" else "server_error"
        for event in output.fail():
            yield framed(event)
        yield lifecycle("response.failed", status="failed",
                        error=ResponseError(code=code, message=err.message, param=err.param))


async def create_response(state: ServerState, request: Request, req: ResponsesRequest) -> Response:
    state.require_ready()
    _refuse_unservable(req)
    with _named_as_responses():
        chat = req.chat_request()
        check_common(state, chat, 1)
        prompt = chat_text(state, chat)
        ids = encode_prompt(state, prompt, "input", add_special_tokens=False)
        calls = tool_grammar(chat)  # the reply is tool calls, written under this grammar
        parser = auto_parser(chat, state.tool_parser)  # or the model writes them, and this finds them
        thinks = reasoning_applies(chat, state.reasoning_parser)
        top = (req.top_logprobs or 0) if req.wants_logprobs else None
        rid = f"resp_{request_id(request.scope) or uuid.uuid4().hex}"
        job_id, echoed = engine_ids(rid, 1)[0], _echoed(state, req, rid)
        params = sampling_params(state, chat, len(ids), max_tokens=req.max_output_tokens,
                                 max_tokens_field="max_output_tokens", logprobs=top, logprobs_field="top_logprobs",
                                 choice=0, grammar=calls)
        grammar_field = "text.format" if calls is None else responses_field(tool_schema_field(chat))
        stream = submit_all(state, [(job_id, ids, params)],
                            admission_names("input", "max_output_tokens", grammar_field))[0]
    reply = ChoiceReply(chat, calls is not None, parser,
                        ReasoningStream(state.reasoning_parser, prompt) if thinks else None)

    def logprobs(token_ids: list[int], values: list[TokenLogprob] | None) -> list[ChatTokenLogprob]:
        if top is None or not values:
            return []
        return chat_logprobs(state, token_ids, values).content or []
    if req.stream:
        return EventStreamResponse(_events(state, echoed, job_id, stream, reply, logprobs, len(ids)),
                                   more_ready=lambda: state.engine.outputs_ready([job_id]),
                                   on_abandoned=aborter(state, [job_id]))
    try:
        got = (await unless_disconnected(request, collect_all([stream])))[0]
    except ClientDisconnected:
        return Response(status_code=499)
    output = OutputItems()
    message, reason = reply.message(got.text, got.finish_reason)
    output.add(message, logprobs(got.token_ids, got.logprobs))
    output.close(reason)
    body = ResponseObject(**echoed, output=output.items,
                          **_ending(state, output, reason, len(ids), len(got.token_ids)))
    return JSONResponse(body.model_dump(by_alias=True))


def responses_router() -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["OpenAI"])
    docs = {**{code: {"model": OpenAIError} for code in (400, 404, 429, 503)}, 200: {
        "description": "JSON, or server-sent events when stream is true", "content": {"text/event-stream": {}}}}

    @router.post("/responses", response_model=ResponseObject, responses=docs)
    async def responses_route(request: Request, body: ResponsesRequest) -> Response:
        """OpenAI's Responses API, stateless: nothing is stored, so each request carries its whole input."""
        return await create_response(request.app.state.server, request, body)

    return router
