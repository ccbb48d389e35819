"""Request and response bodies of the TGI-compatible routes (Hugging Face text-generation-inference).

Field names and shapes follow TGI so its clients (huggingface_hub.InferenceClient.text_generation) work
unchanged; fields TGI has and this server does not implement (watermark, adapters, best_of > 1,
typical_p < 1) are accepted only at their neutral value and refused otherwise, naming the field.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from server.sampling_params import MAX_STOP_SEQUENCES, MAX_TOP_LOGPROBS
from server.schema_common import RequestModel, ResponseModel, Text

MAX_BATCH_INPUTS = 128  # static bound for the schema; the configured max_choices is checked at run time


class GrammarSpec(RequestModel):
    type: Literal["json", "regex"] = Field(..., description="json: value is a JSON schema; regex: a regex")
    value: dict[str, Any] | str = Field(..., description="the JSON schema (an object or its JSON text), or the "
                                                         "regex the whole output must match")


class GenerateParameters(RequestModel):
    adapter_id: Text | None = Field(None, description="LoRA adapters are not supported: must be null")
    best_of: int | None = Field(None, ge=1, description="only 1 is supported")
    decoder_input_details: bool | None = Field(False, description="return the prompt tokens in details.prefill")
    details: bool | None = Field(False, description="return finish reason, token ids, logprobs, seed")
    do_sample: bool | None = Field(False, description="sample; otherwise greedy unless temperature, top_k or "
                                                      "top_p ask for sampling (as TGI does)")
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    grammar: GrammarSpec | None = Field(None, description="constrain the output to a JSON schema or a regex")
    max_new_tokens: int | None = Field(None, ge=1, description="default: 100, capped by the context left")
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    return_full_text: bool | None = Field(False, description="prepend the prompt to generated_text")
    seed: int | None = Field(None, ge=0, le=2**64 - 1, description="TGI's u64")
    stop: list[Text] | None = Field(None, max_length=MAX_STOP_SEQUENCES,
                                    description=f"at most {MAX_STOP_SEQUENCES} stop sequences")
    temperature: float | None = Field(None, ge=0.0, le=100.0, description="0: greedy")
    top_k: int | None = Field(None, ge=0, description="0: off")
    top_n_tokens: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                     description="also return the n most likely tokens at each step")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    truncate: int | None = Field(None, ge=1, description="keep only the last `truncate` prompt tokens")
    typical_p: float | None = Field(None, gt=0.0, le=1.0, description="not supported: null or 1.0")
    watermark: bool | None = Field(False, description="not supported: must be false")


class GenerateRequest(RequestModel):
    inputs: Text | list[Text] = Field(..., description="a prompt, or a list of prompts (batched; /generate only)")
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool | None = Field(False, description="on POST /: stream as /generate_stream does")


class CompatGenerateRequest(GenerateRequest):
    """POST / (TGI's compat route): the same body; `stream` picks /generate or /generate_stream."""


# responses ---------------------------------------------------------------------------------------------
FinishReason = Literal["length", "eos_token", "stop_sequence"]


class PrefillToken(ResponseModel):
    id: int
    text: str
    logprob: float | None = None


class Token(ResponseModel):
    id: int
    text: str
    logprob: float | None = None
    special: bool = False


class Details(ResponseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    prefill: list[PrefillToken] = []
    tokens: list[Token] = []
    top_tokens: list[list[Token]] = []


class GenerateResponse(ResponseModel):
    generated_text: str
    details: Details | None = None


class StreamDetails(ResponseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    input_length: int


class StreamResponse(ResponseModel):
    index: int
    token: Token
    top_tokens: list[Token] = []
    generated_text: str | None = None
    details: StreamDetails | None = None


class ErrorResponse(ResponseModel):
    error: str
    error_type: str
