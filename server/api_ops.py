"""Operational routes: /health (and /ping), /metrics, /version, /info, /tokenize, /detokenize (the last two
in vLLM's shapes)."""
from __future__ import annotations

from importlib import metadata

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from server.http_errors import TRANSIENT_S, ApiError
from server.metrics import CONTENT_TYPE
from server.sampling_params import MAX_STOP_SEQUENCES
from server.api_openai import chat_text
from server.generation import check_in_vocabulary
from server.openai_common import check_model
from server.schemas_openai import ChatCompletionRequest
from server.schemas_tokenize import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from server.state import Phase, ServerState, resolved_setting


def package_version() -> str:
    try:
        return metadata.version("gqa-serve")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def health_payload(state: ServerState) -> tuple[int, dict]:
    if state.phase is Phase.READY:
        if not state.engine.is_alive:
            return 503, {"status": "dead", "detail": "the engine loop has stopped"}
        stall = state.stall()
        return (200, {"status": "ok"}) if stall is None else (503, {"status": "stalled", "detail": stall})
    if state.phase is Phase.FAILED:
        return 503, {"status": "failed", "detail": state.load_error}
    return 503, {"status": state.phase.value}


def info_payload(state: ServerState) -> dict:
    engine, cfg = state.engine, state.config
    mc, cap = engine.model_config, engine.kv_capacity
    ec = engine.config
    dtype, device = resolved_setting(engine, "dtype"), resolved_setting(engine, "device")
    longest = state.longest_sequence  # what one request can use: a cache smaller than the context
    return {
        # TGI's Info fields first (what its clients read), then ours
        "model_id": state.model_name, "model_sha": None, "model_pipeline_tag": "text-generation",
        "model_dtype": f"torch.{dtype}", "model_device_type": device.split(":")[0],
        "max_concurrent_requests": ec.max_num_seqs + ec.max_waiting_requests, "max_best_of": 1,
        "max_stop_sequences": MAX_STOP_SEQUENCES, "max_input_tokens": longest - 1,
        "max_total_tokens": longest, "max_client_batch_size": cfg.max_choices,
        "validation_workers": 1, "router": "gqa-serve", "sha": None, "docker_label": None,
        "model_path": state.model_path,
        "architecture": mc.architecture,
        "dtype": dtype,
        "device": device,
        "num_attention_heads": mc.num_attention_heads,
        "num_kv_heads": mc.num_kv_heads,
        "checkpoint_num_kv_heads": mc.num_key_value_heads,
        "head_dim": mc.head_dim,
        "vocab_size": mc.vocab_size,
        "max_model_len": state.max_model_len,
        # what sets the context: RoPE scaling (YaRN stretches it) and a sliding window (caps it)
        "rope_scaling": None if mc.rope_scaling.rope_type == "default" else {
            "rope_type": mc.rope_scaling.rope_type, "factor": mc.rope_scaling.factor,
            "original_max_position_embeddings": None if mc.rope_scaling.rope_type == "linear"
            else mc.rope_scaling.original_max_position_embeddings},
        "sliding_window": mc.sliding_window,
        "block_size": cap.block_size,
        "kv_cache": {"num_blocks": cap.num_blocks, "tokens": cap.tokens, "bytes_per_token": cap.bytes_per_token,
                     "max_concurrency": round(cap.tokens / max(1, state.max_model_len), 2)},
        "limits": {"max_num_seqs": ec.max_num_seqs, "max_num_batched_tokens": ec.max_num_batched_tokens,
                   "max_waiting_requests": ec.max_waiting_requests, "max_payload_bytes": cfg.max_payload_bytes,
                   "max_prompt_chars": state.prompt_char_limit, "max_choices": cfg.max_choices},
        "scheduling_policy": ec.scheduling_policy,
        "speculative": {"method": "ngram", "num_speculative_tokens": ec.num_speculative_tokens,
                        "prompt_lookup_max": ec.prompt_lookup_max, "prompt_lookup_min": ec.prompt_lookup_min,
                        "disable_by_batch_size": ec.speculative_disable_by_batch_size,
                        "adaptive": ec.prompt_lookup_adaptive}
        if ec.num_speculative_tokens else None,
        "num_prediction_tokens": ec.num_prediction_tokens,  # drafts a step from a request's `prediction`
        "sampling_defaults": state.sampling_defaults,  # from generation_config.json, for OpenAI requests
        "version": package_version(),
    }


def ops_router() -> APIRouter:
    router = APIRouter(tags=["operations"])

    # /ping: /health under the name SageMaker's and vLLM's probes use (GET, or POST as SageMaker may send it)
    @router.api_route("/ping", methods=["GET", "POST"])
    @router.get("/health")
    async def health(request: Request) -> JSONResponse:
        status, payload = health_payload(request.app.state.server)
        # as the API routes' 503s: worth a retry while loading, draining or stalled; not once dead or failed
        passing = status == 503 and payload["status"] in ("loading", "draining", "stalled")
        return JSONResponse(payload, status_code=status,
                            headers={"Retry-After": str(TRANSIENT_S)} if passing else None)

    @router.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(request.app.state.server.metrics.render(), media_type=CONTENT_TYPE)

    @router.get("/version")
    async def version() -> dict:
        return {"version": package_version()}  # vLLM's route

    @router.get("/info")
    async def info(request: Request) -> JSONResponse:
        state: ServerState = request.app.state.server
        state.require_ready()
        return JSONResponse(info_payload(state))

    @router.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(request: Request, body: TokenizeRequest) -> TokenizeResponse:
        state: ServerState = request.app.state.server
        state.require_ready()
        check_model(state, body.model)
        tok = state.engine.tokenizer
        ids = list(tok.encode(tokenize_text(state, body), add_special_tokens=body.add_special_tokens
                              if body.add_special_tokens is not None else body.messages is None))
        strs = [tok.id_to_piece(i) for i in ids] if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=state.max_model_len, tokens=ids, token_strs=strs)

    @router.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize(request: Request, body: DetokenizeRequest) -> DetokenizeResponse:
        state: ServerState = request.app.state.server
        state.require_ready()
        check_model(state, body.model)
        check_in_vocabulary(state, body.tokens, "tokens")
        return DetokenizeResponse(prompt=state.engine.tokenizer.decode(
            body.tokens, skip_special_tokens=bool(body.skip_special_tokens)))

    return router


def tokenize_text(state: ServerState, body: TokenizeRequest) -> str:
    """The text /tokenize encodes: the prompt as sent, or the messages through the chat template."""
    given = [name for name in ("prompt", "inputs", "messages") if getattr(body, name) is not None]
    if len(given) != 1:
        raise ApiError("validation", f"{given[1] if given else 'prompt'}: send exactly one of prompt, inputs "
                                     "and messages", given[1] if given else "prompt")
    if body.messages is None:
        chat_only = next((name for name in ("tools", "chat_template_kwargs", "continue_final_message")
                          if getattr(body, name) not in (None, False)), None)
        if chat_only is not None:
            raise ApiError("validation", f"{chat_only}: only with messages", chat_only)
        text = body.prompt if body.prompt is not None else body.inputs
        if len(text) > state.prompt_char_limit:
            raise ApiError("validation", f"{given[0]}: {len(text):,} characters, over the limit of "
                                         f"{state.prompt_char_limit:,} (max_prompt_chars)", given[0])
        return text
    return chat_text(state, ChatCompletionRequest(
        messages=body.messages, tools=body.tools, chat_template_kwargs=body.chat_template_kwargs,
        add_generation_prompt=body.add_generation_prompt, continue_final_message=body.continue_final_message))
