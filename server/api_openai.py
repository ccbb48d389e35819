"""OpenAI-compatible routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions.

Chat prompts go through the model's own chat template (a request carrying its own template is refused).
With a reasoning_parser, a chat reply's thinking goes to reasoning_content (server/reasoning_parsers.py).
A chat request's prediction (OpenAI's Predicted Outputs) is drafted from (server/prediction.py).
Errors use OpenAI's {"error": {...}} shape with status 400 for invalid requests.
"""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from model.chat_template import ContinuationError
from model.token_bytes import token_string
from server.completion_logprobs import CompletionPrompt, generated_logprobs, joined, prompt_logprobs
from server.disconnects import ClientDisconnected, aborter, unless_disconnected
from server.generation import (Collected, check_prompt_length, check_token_ids, collect_all, delta_texts,
                               encode_prompt, kept_tail, submit_all)
from server.http_errors import ApiError
from server.openai_common import (PredictionTally, admission_names, check_common, continuous_usage, finish_reason,
                                  grammar_field, logprob_value, now_s, prompt_truncation, sampling_params,
                                  sse_choices, usage)
from server.outputs import RequestOutput, TokenLogprob
from server.reasoning_parsers import ReasoningStream, applies as reasoning_applies
from server.request_log import engine_ids, response_id
from server.schemas_openai import ChatCompletionRequest, CompletionRequest
from server.schemas_openai_out import (ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionResponse,
                                       ChatDelta, ChatLogprobs, ChatTokenLogprob,
                                       CompletionChoice, CompletionResponse, ModelCard, ModelList, OpenAIError,
                                       TopLogprob)
from server.sse import EventStreamResponse
from server.state import ServerState
from server.tool_calls import ChoiceReply, auto_parser, tool_grammar, tool_schema_field

_ERRORS = {400: {"model": OpenAIError}, 404: {"model": OpenAIError}, 429: {"model": OpenAIError},
           503: {"model": OpenAIError}}


# completions ---------------------------------------------------------------------------------------------
def _completion_prompts(state: ServerState, req: CompletionRequest) -> list[CompletionPrompt]:
    raw = req.prompt
    if isinstance(raw, str):
        items: list = [raw]
    elif raw and all(isinstance(x, int) for x in raw):
        items = [raw]
    else:
        items = list(raw)
    if not items:
        raise ApiError("validation", "prompt: empty list", "prompt")
    out, keep = [], prompt_truncation(state, req)
    for i, item in enumerate(items):
        field = "prompt" if len(items) == 1 else f"prompt.{i}"
        if isinstance(item, str):
            ids = encode_prompt(state, item, field, check_length=False, within_chars=keep is None)
            kept = kept_tail(ids, keep)
            check_prompt_length(state, len(kept), field)
            out.append(CompletionPrompt(item, ids, False) if kept is ids else  # a cut one echoes what is left
                       CompletionPrompt(state.engine.tokenizer.decode(kept, skip_special_tokens=False), kept, True))
        else:
            ids = check_token_ids(state, list(item), field, keep_last=keep)
            text = state.engine.tokenizer.decode(ids, skip_special_tokens=False) if req.echo else ""
            out.append(CompletionPrompt(text, ids, True))
    return out


async def completions(state: ServerState, request: Request, req: CompletionRequest) -> Response:
    n = req.n or 1
    if req.best_of not in (None, n):
        raise ApiError("validation", "best_of: only best_of equal to n is supported", "best_of")
    if req.suffix is not None:
        raise ApiError("validation", "suffix: not supported (send null)", "suffix")
    state.require_ready()
    prompts = _completion_prompts(state, req)
    check_common(state, req, n * len(prompts))
    # echo with logprobs covers the prompt's tokens too, which the engine then scores
    echo_logprobs = bool(req.echo) and req.logprobs is not None
    rid, created, model = response_id(request, "cmpl"), now_s(), state.model_name
    job_ids = iter(engine_ids(rid, n * len(prompts)))
    jobs, prompt_of = [], []
    for prompt in prompts:
        for i in range(n):
            params = sampling_params(state, req, len(prompt.token_ids), max_tokens=req.max_tokens,
                                     max_tokens_field="max_tokens", logprobs=req.logprobs,
                                     logprobs_field="logprobs", choice=i, prompt_logprobs=echo_logprobs)
            jobs.append((next(job_ids), prompt.token_ids, params))
            prompt_of.append(prompt)
    echo = [p.text if req.echo else "" for p in prompt_of]
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    streams = submit_all(state, jobs, admission_names("prompt", "max_tokens", grammar_field(req)))

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        sent_chars: list[int | None] = [None] * len(jobs)  # None until the choice's first chunk (the echo)

        def chunk(index: int, out: RequestOutput) -> CompletionResponse:
            first = sent_chars[index] is None
            text = (echo[index] + out.new_text) if first else out.new_text
            start = len(echo[index]) if first else sent_chars[index]
            sent_chars[index] = start + len(out.new_text)
            lp = None
            if req.logprobs is not None and out.new_logprobs:
                lp = generated_logprobs(state, out.new_token_ids, delta_texts(out), out.new_logprobs, start)
            if first and echo_logprobs:
                lp = joined(prompt_logprobs(state, prompt_of[index], out.prompt_logprobs), lp)
            choice = CompletionChoice(index=index, text=text, logprobs=lp,
                                      finish_reason=finish_reason(out.finish_reason) if out.finished else None)
            return CompletionResponse(id=rid, created=created, model=model, choices=[choice])

        def usage_chunk(u) -> CompletionResponse:
            return CompletionResponse(id=rid, created=created, model=model, choices=[], usage=u)

        request_ids = [job[0] for job in jobs]
        return EventStreamResponse(sse_choices(streams, prompt_tokens, chunk,
                                               usage_chunk if include_usage else None,
                                               continuous_usage=continuous_usage(req)),
                                   more_ready=lambda: state.engine.outputs_ready(request_ids),
                                   on_abandoned=aborter(state, request_ids))
    try:
        results = await unless_disconnected(request, collect_all(streams))
    except ClientDisconnected:
        return Response(status_code=499)
    choices = []
    for index, got in enumerate(results):
        lp = None
        if req.logprobs is not None:
            lp = generated_logprobs(state, got.token_ids, got.token_texts, got.logprobs, len(echo[index]))
        if echo_logprobs:
            lp = joined(prompt_logprobs(state, prompt_of[index], got.prompt_logprobs), lp)
        choices.append(CompletionChoice(index=index, text=echo[index] + got.text, logprobs=lp,
                                        finish_reason=finish_reason(got.finish_reason)))
    body = CompletionResponse(id=rid, created=created, model=model, choices=choices,
                              usage=usage(prompt_tokens, sum(len(g.token_ids) for g in results)))
    return JSONResponse(body.model_dump())


# chat ----------------------------------------------------------------------------------------------------
def chat_text(state: ServerState, req: ChatCompletionRequest) -> str:
    """The request's messages (and tools) through the model's chat template, after the checks on them."""
    refusals = (("chat_template", req.chat_template is not None, "custom chat templates are not accepted; "
                                                                 "the model's own template is used"),
                ("top_logprobs", req.top_logprobs is not None and not req.logprobs, "requires logprobs=true"),
                ("continue_final_message", req.continue_final_message and req.add_generation_prompt is not False,
                 "cannot be combined with add_generation_prompt true (its default); send it false"))
    for name, bad, why in refusals:
        if bad:
            raise ApiError("validation", f"{name}: {why}", name)
    tok = state.engine.tokenizer
    if not tok.has_chat_template:
        raise ApiError("validation", "messages: this model has no chat template; use /v1/completions", "messages")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text(),
                 **{k: v for k, v in (("tool_calls", m.tool_calls), ("tool_call_id", m.tool_call_id),
                                      ("reasoning_content", m.reasoning_content or m.reasoning)) if v}}
                for m in req.messages]
    extra = dict(req.chat_template_kwargs or {})  # template variables (Qwen3's enable_thinking, ...)
    reserved = sorted(set(extra) & {"messages", "tools", "add_generation_prompt", "continue_final_message"})
    if reserved:
        raise ApiError("validation", f"chat_template_kwargs.{reserved[0]}: set by the request's own field, not "
                                     "here", f"chat_template_kwargs.{reserved[0]}")
    if req.tools:
        extra["tools"] = [t.model_dump(exclude_none=True) for t in req.tools]
    if req.reasoning_effort is not None:
        extra["reasoning_effort"] = req.reasoning_effort
    limit = state.prompt_char_limit  # (not for a prompt truncate_prompt_tokens cuts, as encode_prompt)
    if sum(len(m["content"]) + len(m.get("reasoning_content", "")) for m in messages) > limit \
            and getattr(req, "truncate_prompt_tokens", None) is None:
        raise ApiError("validation", f"messages: over the limit of {limit:,} characters (max_prompt_chars)",
                       "messages")
    if req.continue_final_message:  # the final message left open, for the model to continue (vLLM's)
        extra["continue_final_message"] = True
    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=req.add_generation_prompt is not False,
                                       **extra)
    except ContinuationError as exc:
        raise ApiError("validation", f"continue_final_message: {exc}", "continue_final_message") from None
    except Exception as exc:  # noqa: BLE001 - a template's raise_exception() is the caller's fault
        raise ApiError("validation", f"messages: the chat template refused them ({exc})", "messages") from None
    return text


def chat_logprobs(state: ServerState, token_ids: list[int], lps: list[TokenLogprob]) -> ChatLogprobs:
    def entry(tid: int, value: float) -> TopLogprob:
        raw = state.engine.tokenizer.token_bytes(tid)  # the token's own bytes: joined, they rebuild the content
        return TopLogprob(token=token_string(raw), logprob=logprob_value(value), bytes=list(raw))

    content = []
    for tid, lp in zip(token_ids, lps):
        e = entry(tid, lp.logprob)
        content.append(ChatTokenLogprob(token=e.token, logprob=e.logprob, bytes=e.bytes,
                                        top_logprobs=[entry(t, v) for t, v in lp.top]))
    return ChatLogprobs(content=content)


async def chat_completions(state: ServerState, request: Request, req: ChatCompletionRequest) -> Response:
    n = req.n or 1
    state.require_ready()
    check_common(state, req, n)
    prompt = chat_text(state, req)
    ids = encode_prompt(state, prompt, "messages", add_special_tokens=False, keep_last=prompt_truncation(state, req))
    if req.max_completion_tokens is not None:
        max_tokens, field = req.max_completion_tokens, "max_completion_tokens"
    else:
        max_tokens, field = req.max_tokens, "max_tokens"
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    calls = tool_grammar(req)  # the reply is tool calls, written under this grammar
    constrained = grammar_field(req, forced_calls=calls is not None)  # or response_format's, guided_*'s
    parser = auto_parser(req, state.tool_parser)  # or the model writes them, and this finds them
    thinks = reasoning_applies(req, state.reasoning_parser)  # the thinking goes to reasoning_content

    def reply() -> ChoiceReply:
        return ChoiceReply(req, calls is not None, parser,
                           ReasoningStream(state.reasoning_parser, prompt) if thinks else None)
    rid, created, model = response_id(request, "chatcmpl"), now_s(), state.model_name
    predicted = PredictionTally(state, req, n)  # its prediction's ids, then its usage details (server/prediction.py)
    jobs = [(job_id, ids,
             sampling_params(state, req, len(ids), max_tokens=max_tokens, max_tokens_field=field, logprobs=logprobs,
                             logprobs_field="top_logprobs", choice=i, grammar=calls, prediction=predicted.ids))
            for i, job_id in enumerate(engine_ids(rid, n))]
    streams = submit_all(state, jobs, admission_names("messages", field, constrained if calls is None
                                                      else tool_schema_field(req)))

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def first(index: int) -> ChatCompletionChunk:
            choice = ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))
            return ChatCompletionChunk(id=rid, created=created, model=model, choices=[choice])

        replies = [reply() for _ in range(n)]

        def chunk(index: int, out: RequestOutput) -> ChatCompletionChunk | None:
            predicted.record(index, out)
            lp = chat_logprobs(state, out.new_token_ids, out.new_logprobs or []) if logprobs is not None else None
            delta, reason = replies[index].delta(out.new_text, out.finish_reason if out.finished else None)
            if delta is None and not out.finished and not (lp is not None and out.new_logprobs):
                return None
            choice = ChatChunkChoice(index=index, delta=delta or ChatDelta(), logprobs=lp,
                                     finish_reason=reason if out.finished else None)
            return ChatCompletionChunk(id=rid, created=created, model=model, choices=[choice])

        def usage_chunk(u) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=rid, created=created, model=model, choices=[], usage=u)

        request_ids = [job[0] for job in jobs]
        return EventStreamResponse(sse_choices(streams, len(ids), chunk, usage_chunk if include_usage else None,
                                               first=first, continuous_usage=continuous_usage(req),
                                               usage_with=predicted.usage),
                                   more_ready=lambda: state.engine.outputs_ready(request_ids),
                                   on_abandoned=aborter(state, request_ids))
    try:
        results: list[Collected] = await unless_disconnected(request, collect_all(streams))
    except ClientDisconnected:
        return Response(status_code=499)
    predicted.record_collected(results)
    choices = []
    for i, got in enumerate(results):
        message, reason = reply().message(got.text, got.finish_reason)
        choices.append(ChatChoice(index=i, message=message, finish_reason=reason, logprobs=chat_logprobs(
            state, got.token_ids, got.logprobs) if logprobs is not None else None))
    body = ChatCompletionResponse(id=rid, created=created, model=model, choices=choices,
                                  usage=predicted.usage(usage(len(ids), sum(len(g.token_ids) for g in results))))
    return JSONResponse(body.model_dump())


def openai_router() -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["OpenAI"])
    sse_doc = {200: {"description": "JSON, or server-sent events when stream is true",
                     "content": {"text/event-stream": {}}}}

    def card(state: ServerState) -> ModelCard:
        return ModelCard(id=state.model_name, created=now_s(), max_model_len=state.max_model_len)

    @router.get("/models", response_model=ModelList)
    async def models(request: Request) -> ModelList:
        state: ServerState = request.app.state.server
        state.require_ready()
        return ModelList(data=[card(state)])

    @router.get("/models/{model:path}", response_model=ModelCard, responses={404: {"model": OpenAIError}})
    async def model(request: Request, model: str) -> ModelCard:
        """OpenAI's retrieve (client.models.retrieve): the served model's card, under its names."""
        state: ServerState = request.app.state.server
        state.require_ready()
        if model not in (state.model_name, state.model_path):
            raise ApiError("not_found", f"model: '{model}' is not served here; this server serves "
                                        f"'{state.model_name}'", "model")
        return card(state)

    @router.post("/completions", response_model=CompletionResponse, responses={**_ERRORS, **sse_doc})
    async def completions_route(request: Request, body: CompletionRequest) -> Response:
        return await completions(request.app.state.server, request, body)

    @router.post("/chat/completions", response_model=ChatCompletionResponse, responses={**_ERRORS, **sse_doc})
    async def chat_route(request: Request, body: ChatCompletionRequest) -> Response:
        return await chat_completions(request.app.state.server, request, body)

    return router
