"""TGI-compatible routes: POST /generate, POST /generate_stream, and POST / (TGI's compat route).

Sampling follows TGI: greedy unless do_sample is true or temperature/top_k/top_p ask for sampling; unlike
TGI, temperature 0 (greedy) and top_p 1.0 are accepted. A sampled request without a seed gets a random
one, reported in details.seed.
"""
from __future__ import annotations

import json
import random
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from model.detokenizer import IncrementalDetokenizer
from server.disconnects import ClientDisconnected, aborter, unless_disconnected
from server.generation import (Collected, build_params, collect_all, encode_prompt,
                               resolve_max_new_tokens, submit, submit_all)
from server.http_errors import ApiError, error_json, failure_error
from server.outputs import RequestOutput
from server.request_log import engine_ids, response_id
from server.sampling_params import SamplingParams
from server.schema_common import finite_logprob
from server.schemas_tgi import (CompatGenerateRequest, Details, ErrorResponse, GenerateParameters,
                                GenerateRequest, GenerateResponse, PrefillToken, StreamDetails, StreamResponse,
                                Token)
from server.sse import EventStreamResponse, sse_data
from server.state import ServerState, resolved_setting

DEFAULT_MAX_NEW_TOKENS = 100
FINISH_REASON = {"length": "length", "eos_token": "eos_token", "stop": "stop_sequence"}
_NAMES = {name: f"parameters.{name}" for name in SamplingParams.model_fields}
_NAMES["logprobs"] = "parameters.top_n_tokens"
_ERRORS = {422: {"model": ErrorResponse}, 429: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}


@dataclass(frozen=True)
class Prepared:
    prompt: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int | None


def _refuse_unsupported(p: GenerateParameters) -> None:
    checks = (("adapter_id", p.adapter_id is not None, "adapters are not supported"),
              ("best_of", p.best_of not in (None, 1), "only best_of=1 is supported"),
              ("watermark", bool(p.watermark), "watermarking is not supported"),
              ("typical_p", p.typical_p not in (None, 1.0), "typical sampling is not supported (use null)"))
    for name, bad, why in checks:
        if bad:
            raise ApiError("validation", f"parameters.{name}: {why}", f"parameters.{name}")


def prepare(state: ServerState, prompt: str, p: GenerateParameters, *, want_logprobs: bool,
            field: str = "inputs") -> Prepared:
    _refuse_unsupported(p)
    ids = encode_prompt(state, prompt, field, keep_last=p.truncate)
    sampling = bool(p.do_sample) or p.temperature not in (None, 1.0) or p.top_k not in (None, 0) \
        or p.top_p not in (None, 1.0)
    if p.temperature == 0.0:
        sampling = False
    seed = (p.seed if p.seed is not None else random.getrandbits(63)) if sampling else None
    max_new = resolve_max_new_tokens(state, len(ids), p.max_new_tokens, "parameters.max_new_tokens",
                                     DEFAULT_MAX_NEW_TOKENS)
    top_n = p.top_n_tokens or 0
    params = build_params(
        _NAMES, temperature=(p.temperature if p.temperature is not None else 1.0) if sampling else 0.0,
        top_k=p.top_k or 0, top_p=p.top_p if p.top_p is not None else 1.0,
        repetition_penalty=p.repetition_penalty if p.repetition_penalty is not None else 1.0,
        frequency_penalty=p.frequency_penalty or 0.0, max_new_tokens=max_new,
        # TGI's seeds are u64, the engine's below 2**63: the upper half folds onto the lower, as the OpenAI
        # routes fold negative seeds; details.seed reports the one sent
        seed=None if seed is None else seed % 2**63,
        stop=tuple(p.stop or ()), include_stop_str_in_output=True, logprobs=top_n if (want_logprobs or top_n) else None,
        prompt_logprobs=bool(p.details and p.decoder_input_details), grammar=_grammar(p))
    return Prepared(prompt, ids, params, seed)


def _grammar(p: GenerateParameters) -> dict | None:
    """TGI's grammar as SamplingParams.grammar (which build_params validates)."""
    g = p.grammar
    if g is None:
        return None
    if g.type == "regex" and not isinstance(g.value, str):
        raise ApiError("validation", "parameters.grammar: a regex grammar's value is a string", "parameters.grammar")
    return {"type": g.type, "value": json.dumps(g.value) if isinstance(g.value, dict) else g.value}


def _token_texts(state: ServerState) -> IncrementalDetokenizer:
    """Each generated token's own text, as TGI's token.text is: decoded with special tokens (an eos reads
    `</s>`), and not held back while it might begin a stop string, as the generated text is (the engine's
    deltas credit held-back text to a later token)."""
    return IncrementalDetokenizer(state.engine.tokenizer, [], skip_special_tokens=False)


def _token(state: ServerState, token_id: int, text: str, logprob: float | None) -> Token:
    special = token_id in state.engine.tokenizer.all_special_ids
    return Token(id=token_id, text=text, logprob=finite_logprob(logprob), special=special)


def _top_tokens(state: ServerState, top: tuple[tuple[int, float], ...]) -> list[Token]:
    decode = state.engine.tokenizer.decode
    return [_token(state, tid, decode([tid], skip_special_tokens=False), lp) for tid, lp in top]


def _finish_reason(reason: str | None) -> str:
    return FINISH_REASON.get(reason or "length", "length")


def build_response(state: ServerState, prep: Prepared, got: Collected, p: GenerateParameters) -> GenerateResponse:
    text = (prep.prompt + got.text) if p.return_full_text else got.text
    if not p.details:
        return GenerateResponse(generated_text=text)
    logprobs = got.logprobs if len(got.logprobs) == len(got.token_ids) else [None] * len(got.token_ids)
    texts = _token_texts(state)
    pieces = [texts.add(tid) for tid in got.token_ids]
    if pieces:
        pieces[-1] += texts.flush()
    tokens = [_token(state, tid, txt, lp.logprob if lp else None)
              for tid, txt, lp in zip(got.token_ids, pieces, logprobs)]
    top = [_top_tokens(state, lp.top) for lp in logprobs if lp] if p.top_n_tokens else []
    prefill: list[PrefillToken] = []
    if p.decoder_input_details:
        decode = state.engine.tokenizer.decode
        plp = got.prompt_logprobs or []
        prefill = [PrefillToken(id=tid, text=decode([tid], skip_special_tokens=False),
                                logprob=finite_logprob(plp[i]) if i < len(plp) and i > 0 else None)
                   for i, tid in enumerate(prep.prompt_ids)]
    details = Details(finish_reason=_finish_reason(got.finish_reason), generated_tokens=len(got.token_ids),
                      seed=prep.seed, prefill=prefill, tokens=tokens, top_tokens=top)
    return GenerateResponse(generated_text=text, details=details)


async def generate(state: ServerState, request: Request, body: GenerateRequest, as_list: bool = False) -> Response:
    """One GenerateResponse per prompt: a list when `inputs` is one (or as_list: TGI's POST / always)."""
    p = body.parameters
    prompts = body.inputs if isinstance(body.inputs, list) else [body.inputs]
    if not prompts:
        raise ApiError("validation", "inputs: the list of prompts is empty", "inputs")
    if len(prompts) > state.config.max_choices:
        raise ApiError("validation", f"inputs: {len(prompts)} prompts, more than the limit of "
                                     f"{state.config.max_choices} (max_choices)", "inputs")
    state.require_ready()
    start = time.monotonic()
    preps = [prepare(state, text, p, want_logprobs=bool(p.details),
                     field="inputs" if len(prompts) == 1 else f"inputs.{i}") for i, text in enumerate(prompts)]
    job_ids = engine_ids(response_id(request, "tgi"), len(preps))
    streams = submit_all(state, [(job_id, x.prompt_ids, x.params) for job_id, x in zip(job_ids, preps)], _NAMES)
    submitted = time.monotonic()
    try:
        results = await unless_disconnected(request, collect_all(streams))
    except ClientDisconnected:
        return Response(status_code=499)
    out = [build_response(state, x, got, p).model_dump() for x, got in zip(preps, results)]
    return JSONResponse(out if as_list or isinstance(body.inputs, list) else out[0],
                        headers=timing_headers(state, preps, results, start, submitted))


def timing_headers(state: ServerState, preps: list[Prepared], results: list[Collected], start: float,
                   submitted: float) -> dict[str, str]:
    """TGI's timing headers on /generate, in its units (milliseconds, truncated; x-compute-time in seconds):
    validation is tokenizing and checking, queue the engine's wait before first scheduling, inference the
    rest. The prompts of a list decode together: the longest queue time counts, and time per token is over
    the longest output."""
    total, validation = time.monotonic() - start, submitted - start
    queue = max(got.queue_time or 0.0 for got in results)
    inference = max(0.0, total - validation - queue)
    generated = [len(got.token_ids) for got in results]

    def ms(seconds: float) -> str:
        return str(int(1000 * seconds))
    return {"x-compute-type": _compute_type(state),
            "x-compute-time": f"{total:.6f}", "x-compute-characters": str(sum(len(x.prompt) for x in preps)),
            "x-total-time": ms(total), "x-validation-time": ms(validation), "x-queue-time": ms(queue),
            "x-inference-time": ms(inference), "x-time-per-token": ms(inference / max(1, *generated)),
            "x-prompt-tokens": str(sum(len(x.prompt_ids) for x in preps)), "x-generated-tokens": str(sum(generated))}


async def _events(state: ServerState, prep: Prepared, stream: AsyncIterator[RequestOutput],
                  p: GenerateParameters) -> AsyncIterator[str]:
    text, index, last_id = "", 0, 0
    texts = _token_texts(state)
    try:
        async with aclosing(stream) as outputs:
            async for out in outputs:
                if out.finished and out.finish_reason in ("error", "abort"):
                    yield sse_data(error_json(failure_error(out), openai=False))
                    return
                text += out.new_text
                ids = out.new_token_ids or [last_id]
                lps = out.new_logprobs or []
                for j, tid in enumerate(ids):
                    index += 1
                    last_id = tid
                    lp = lps[j] if j < len(lps) else None
                    final = out.finished and j == len(ids) - 1
                    piece = texts.add(tid) if out.new_token_ids else ""
                    if final:
                        piece += texts.flush()
                    event = StreamResponse(
                        index=index,
                        token=_token(state, tid, piece, lp.logprob if lp else None),
                        top_tokens=_top_tokens(state, lp.top) if (lp and p.top_n_tokens) else [],
                        generated_text=((prep.prompt + text) if p.return_full_text else text) if final else None,
                        details=StreamDetails(finish_reason=_finish_reason(out.finish_reason),
                                              generated_tokens=out.num_output_tokens, seed=prep.seed,
                                              input_length=len(prep.prompt_ids)) if final and p.details else None)
                    yield sse_data(event.model_dump_json())
                if out.finished:
                    return
    except ApiError as exc:
        yield sse_data(error_json(exc, openai=False))
    except Exception as exc:  # noqa: BLE001 - once streaming began, errors travel as the last event
        yield sse_data(error_json(ApiError("generation", f"generation failed: {type(exc).__name__}"), False))


async def generate_stream(state: ServerState, request: Request, body: GenerateRequest) -> Response:
    if isinstance(body.inputs, list):
        raise ApiError("validation", "inputs: must be a single string when streaming", "inputs")
    state.require_ready()
    prep = prepare(state, body.inputs, body.parameters, want_logprobs=True)
    request_id = engine_ids(response_id(request, "tgi"), 1)[0]
    stream = submit(state, prep.prompt_ids, prep.params, request_id, _NAMES)
    # what TGI sends on a stream (its timing headers need the end, which a stream's headers precede)
    compute = {"x-compute-type": _compute_type(state), "x-compute-characters": str(len(prep.prompt))}
    return EventStreamResponse(_events(state, prep, stream, body.parameters),
                               more_ready=lambda: state.engine.outputs_ready([request_id]), headers=compute,
                               on_abandoned=aborter(state, [request_id]))


def _compute_type(state: ServerState) -> str:
    return resolved_setting(state.engine, "device").split(":")[0]


def tgi_router() -> APIRouter:
    router = APIRouter(tags=["TGI"])
    sse_doc = {200: {"description": "one StreamResponse per token as server-sent events",
                     "content": {"text/event-stream": {}}}}

    @router.post("/generate", response_model=GenerateResponse | list[GenerateResponse], responses=_ERRORS)
    async def generate_route(request: Request, body: GenerateRequest) -> Response:
        return await generate(request.app.state.server, request, body)

    @router.post("/generate_stream", responses={**_ERRORS, **sse_doc})
    async def generate_stream_route(request: Request, body: GenerateRequest) -> Response:
        return await generate_stream(request.app.state.server, request, body)

    @router.post("/", response_model=list[GenerateResponse], responses=_ERRORS)
    async def compat_route(request: Request, body: CompatGenerateRequest) -> Response:
        """TGI's compat route: /generate_stream with `stream`, else /generate's answer in a list (as TGI
        answers it: text_generation.Client.generate reads the list's first item)."""
        state = request.app.state.server
        if body.stream:
            return await generate_stream(state, request, body)
        return await generate(state, request, body, as_list=True)

    return router
