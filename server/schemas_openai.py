"""Request bodies of the OpenAI-compatible routes (/v1/completions, /v1/chat/completions).

OpenAI's field names and ranges (chat's prediction too: server/prediction.py), plus the extensions benchmark
tools send (ignore_eos, top_k, min_p, repetition_penalty, min_tokens, stop_token_ids, skip_special_tokens) and
vLLM's guided_json, guided_regex, guided_choice, structured_outputs, continue_final_message, allowed_token_ids,
bad_words and truncate_prompt_tokens. Unknown fields are refused with a message naming them; OpenAI fields this
server does not implement are accepted only at their neutral value (suffix null; tool_choice 'auto' only where
a tool-call parser applies: server/tool_calls.py).
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator

from server.sampling_params import MAX_BAD_WORD_CHARS, MAX_BAD_WORDS, MAX_STOP_SEQUENCES, MAX_TOP_LOGPROBS
from server.schema_common import RequestModel, Text, TokenId

MAX_N = 128  # static bound for the schema; the configured max_choices is checked at run time
MAX_CHOICES = 1024  # guided_choice's strings
Stop = Text | list[Text] | None


class StreamOptions(RequestModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = Field(False, description="with include_usage: usage on every chunk "
                                                "too (vLLM's extension)")
    include_obfuscation: bool | None = Field(None, description="accepted; chunks carry no obfuscation padding")


class JsonSchemaFormat(RequestModel):
    name: Text = Field(..., max_length=64)
    description: Text | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="the JSON schema; none: any object")
    strict: bool | None = Field(None, description="accepted; the output always matches the schema")


class ResponseFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = Field(None, description="with type json_schema")
    value: dict[str, Any] | None = Field(None, description="with type json_object: a JSON schema the object "
                                         "matches (TGI's shape, which huggingface_hub's chat_completion sends)")


class StructuredOutputs(RequestModel):
    """vLLM's newer structured_outputs object: one of its keys, as the guided_* field of that name."""
    json_: dict[str, Any] | Text | None = Field(None, alias="json", description="as guided_json")
    regex: Text | None = Field(None, description="as guided_regex")
    choice: list[Text] | None = Field(None, min_length=1, max_length=MAX_CHOICES, description="as guided_choice")


class SamplingFields(RequestModel):
    """Fields both endpoints share."""
    model: Text | None = Field(None, description="must name the served model when given")
    max_tokens: int | None = Field(None, ge=1, description="default: fill the context")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="default 1.0; 0: greedy")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(1, ge=1, le=MAX_N)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Stop = Field(None, description=f"a string or at most {MAX_STOP_SEQUENCES} strings")
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(None, description="token id (a string) -> a value in [-100, "
                                                "100] added to its logit before sampling")
    user: Text | None = None
    response_format: ResponseFormat | None = Field(None, description="json_object: the output is a JSON "
                                                   "object; json_schema: it matches json_schema.schema")
    # extensions (vLLM's names)
    ignore_eos: bool | None = False
    top_k: int | None = Field(None, ge=-1, description="0 or -1: off")
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    min_tokens: int | None = Field(None, ge=0)
    stop_token_ids: list[TokenId] | None = Field(None, max_length=MAX_STOP_SEQUENCES)
    skip_special_tokens: bool | None = True
    priority: int | None = Field(None, ge=-(2**31), le=2**31 - 1, description="with scheduling_policy "
                                 "\"priority\": lower is served first; under \"fcfs\" only 0 is accepted")
    # vLLM's guided decoding: at most one of these and response_format (server/openai_common.py)
    guided_json: dict[str, Any] | Text | None = Field(None, description="the output is JSON matching this "
                                                      "schema (an object, or its JSON text)")
    guided_regex: Text | None = Field(None, description="the output matches this regex in full")
    guided_choice: list[Text] | None = Field(None, min_length=1, max_length=MAX_CHOICES,
                                             description="the output is exactly one of these strings")
    structured_outputs: StructuredOutputs | None = Field(None, description="vLLM's newer shape: one of json, "
                                                         "regex, choice")
    # vLLM's sampling extras
    allowed_token_ids: list[TokenId] | None = Field(None, description="only these token ids may be sampled "
                                                    "(logprobs stay the model's)")
    bad_words: list[Text] | None = Field(None, description=f"at most {MAX_BAD_WORDS} words (each at most "
                                         f"{MAX_BAD_WORD_CHARS} characters) the output must not contain")
    truncate_prompt_tokens: int | None = Field(None, description="keep only the last k tokens of the prompt "
                                               "(of the rendered chat prompt); -1: max_model_len")

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _truncation(cls, value: int | None) -> int | None:
        if value is not None and value < 1 and value != -1:
            raise ValueError(f"{value} keeps no token: give at least 1, or -1 for max_model_len")
        return value


class CompletionRequest(SamplingFields):
    prompt: Text | list[Text] | list[TokenId] | list[list[TokenId]] = Field(
        ..., description="a string, a list of strings, token ids, or a list of token-id lists")
    max_tokens: int | None = Field(16, ge=1, description="default 16 (as OpenAI); null: fill the context")
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="top-n logprobs per token")
    echo: bool | None = Field(False, description="prepend the prompt to the text")
    best_of: int | None = Field(None, ge=1, description="only best_of == n is supported")
    suffix: Text | None = Field(None, description="not supported: must be null")


class TextPart(RequestModel):
    type: Literal["text"]
    text: Text


class ChatMessage(RequestModel):
    model_config = ConfigDict(extra="ignore")  # other bookkeeping fields (refusal, audio, ...) are tolerated

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None
    tool_calls: list[dict[str, Any]] | None = Field(None, description="an assistant turn's calls: to the template")
    tool_call_id: Text | None = Field(None, description="a tool turn's call id: to the template")
    reasoning_content: Text | None = Field(None, description="an assistant turn's thinking: to the template, "
                                                             "as reasoning_content (Qwen3's templates read it)")
    reasoning: Text | None = Field(None, description="the same, under vLLM's name (reasoning_content first)")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class Prediction(RequestModel):
    """OpenAI's Predicted Outputs: text the reply is expected to mostly repeat (server/prediction.py)."""
    type: Literal["content"]
    content: Text | list[TextPart] = Field(..., description="a string, or text parts (joined)")

    @field_validator("content")
    @classmethod
    def _not_empty(cls, value: str | list[TextPart]) -> str | list[TextPart]:
        if not (value if isinstance(value, str) else "".join(part.text for part in value)):
            raise ValueError("empty: give the text the reply is expected to repeat, or leave prediction out")
        return value

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class FunctionDef(RequestModel):
    name: Text = Field(..., pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: Text | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema; none: any object")
    strict: bool | None = Field(None, description="accepted; calls always match the schema")


class ToolDef(RequestModel):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(RequestModel):
    name: Text


class NamedToolChoice(RequestModel):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=4096)
    max_completion_tokens: int | None = Field(None, ge=1, description="newer name of max_tokens")
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[ToolDef] | None = Field(None, max_length=128, description="functions the model may call")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="'required' or a named function: the reply is calls (server/tool_calls.py); 'auto': "
                          "the calls the model writes, found by the tool_call_parser; 'none': tools go to the "
                          "template only")
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict[str, Text] | None = None
    service_tier: Text | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = Field(
        None, description="to the chat template as the variable reasoning_effort (gpt-oss's templates read it)")
    prompt_cache_key: Text | None = Field(None, description="accepted; the prefix cache needs no key")
    safety_identifier: Text | None = Field(None, description="accepted, as user")
    modalities: list[Literal["text"]] | None = Field(None, description="text only")
    chat_template: Text | None = Field(None, description="refused: the model's own template is used")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="more variables for the chat "
                                                        "template, e.g. {\"enable_thinking\": false} (Qwen3)")
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = Field(False, description="leave the final message open for the model "
                                                "to continue (a prefill); needs add_generation_prompt false")
    prediction: Prediction | None = Field(None, description="text the reply is expected to mostly repeat (a "
                                          "document or code being edited): drafted for speculative decoding, a "
                                          "latency hint only; usage.completion_tokens_details counts it")
