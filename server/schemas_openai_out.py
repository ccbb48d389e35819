"""Response bodies of the OpenAI-compatible routes, in OpenAI's shapes (what the openai client parses)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SerializerFunctionWrapHandler, computed_field, model_serializer

from server.schema_common import ResponseModel

FinishReason = Literal["stop", "length", "tool_calls"]


class CompletionTokensDetails(ResponseModel):
    """With a chat request's prediction (server/prediction.py has our definitions): its tokens drafted and kept,
    and drafted and refused."""
    accepted_prediction_tokens: int
    rejected_prediction_tokens: int


class Usage(ResponseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: CompletionTokensDetails | None = Field(
        None, description="a chat request with a prediction's; absent otherwise")

    @model_serializer(mode="wrap")
    def _without_absent_details(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out = handler(self)
        if self.completion_tokens_details is None:
            out.pop("completion_tokens_details", None)
        return out


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gqa-serve"
    max_model_len: int


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# completions ---------------------------------------------------------------------------------------------
class CompletionLogprobs(ResponseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(ResponseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class CompletionResponse(ResponseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# chat ----------------------------------------------------------------------------------------------------
class TopLogprob(ResponseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ResponseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(ResponseModel):
    content: list[ChatTokenLogprob] | None = None


class FunctionCall(ResponseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(ResponseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ToolCallDelta(ToolCall):
    index: int


class _Reasoning(ResponseModel):
    """The thinking, with a reasoning_parser (server/reasoning_parsers.py), under both names clients read:
    `reasoning_content` (DeepSeek's, most SDKs') and `reasoning` (vLLM's current name, OpenRouter's)."""

    @computed_field
    @property
    def reasoning(self) -> str | None:
        return self.reasoning_content  # a field of each subclass, where it belongs in the JSON


class ChatMessageOut(_Reasoning):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(ResponseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionResponse(ResponseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ChatDelta(_Reasoning):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(ResponseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(ResponseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class OpenAIErrorBody(ResponseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class OpenAIError(ResponseModel):
    error: OpenAIErrorBody
