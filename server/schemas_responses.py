"""Request and response bodies of POST /v1/responses (OpenAI's Responses API), served statelessly. The
request becomes the chat route's own (`ResponsesRequest.chat_request`), so the chat template, tool calls
and the reasoning split work as on /v1/chat/completions. Input items map to chat messages as a chat client
sends the same conversation: `function_call` -> the assistant turn's tool_calls, `function_call_output` -> a
tool message, `reasoning` -> the next assistant turn's reasoning_content. A response's output items can be
sent back as they came (ids, statuses, annotations and logprobs are accepted and dropped).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag

from server.sampling_params import MAX_TOP_LOGPROBS
from server.schema_common import RequestModel, ResponseModel, Text
from server.schemas_openai import ChatCompletionRequest, FunctionDef
from server.schemas_openai_out import ChatTokenLogprob

ItemStatus = Literal["in_progress", "completed", "incomplete"]
LOGPROBS_INCLUDE = "message.output_text.logprobs"


# input items ---------------------------------------------------------------------------------------------
class InputTextPart(RequestModel):
    type: Literal["input_text", "output_text"]
    text: Text
    annotations: list[Any] | None = Field(None, description="an earlier output_text's: accepted, dropped")
    logprobs: list[Any] | None = Field(None, description="an earlier output_text's: accepted, dropped")


def _joined(content: str | list[InputTextPart]) -> str:
    return content if isinstance(content, str) else "".join(part.text for part in content)


class MessageItem(RequestModel):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Text | list[InputTextPart]
    id: Text | None = None
    status: ItemStatus | None = None


class FunctionCallItem(RequestModel):
    type: Literal["function_call"]
    call_id: Text
    name: Text
    arguments: Text
    id: Text | None = None
    status: ItemStatus | None = None


class FunctionCallOutputItem(RequestModel):
    type: Literal["function_call_output"]
    call_id: Text
    output: Text | list[InputTextPart]
    id: Text | None = None
    status: ItemStatus | None = None


class ReasoningTextPart(RequestModel):
    type: Literal["reasoning_text", "summary_text"]
    text: Text


class ReasoningInputItem(RequestModel):
    """An earlier response's thinking: the next assistant turn's reasoning_content (Qwen3's templates read it)."""
    type: Literal["reasoning"]
    summary: list[ReasoningTextPart] = []
    content: list[ReasoningTextPart] | None = None
    id: Text | None = None
    encrypted_content: Text | None = Field(None, description="accepted, dropped: this server encrypts nothing")
    status: ItemStatus | None = None

    def text(self) -> str:
        return "".join(part.text for part in (self.content or self.summary))


# Union members are picked by the value's own kind (a string or a list; an item's type, which a message may
# leave out), so an error is the chosen member's alone, not every member's. Tags are written as pydantic
# writes its own union tags ("list[...]"), which error paths leave out: "input.2.call_id: Field required".
def _item_type(value: Any) -> str:
    kind = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", "message")
    return f"item[{kind}]"


InputItem = Annotated[Annotated[MessageItem, Tag("item[message]")]
                      | Annotated[FunctionCallItem, Tag("item[function_call]")]
                      | Annotated[FunctionCallOutputItem, Tag("item[function_call_output]")]
                      | Annotated[ReasoningInputItem, Tag("item[reasoning]")], Discriminator(_item_type)]
Input = Annotated[Annotated[str, Field(min_length=1), *Text.__metadata__, Tag("str")]  # length checked first
                  | Annotated[list[InputItem], Field(min_length=1, max_length=4095), Tag("list[item]")],
                  Discriminator(lambda value: "str" if isinstance(value, str) else "list[item]")]


# tools, formats, options ---------------------------------------------------------------------------------
class FunctionTool(RequestModel):  # chat's FunctionDef at the top level; type first, so it is checked first
    type: Literal["function"]
    name: Text = FunctionDef.model_fields["name"]
    description: Text | None = None
    parameters: dict[str, Any] | None = FunctionDef.model_fields["parameters"]
    strict: bool | None = FunctionDef.model_fields["strict"]


class NamedFunctionChoice(RequestModel):
    type: Literal["function"]
    name: Text


class ResponsesTextFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"]
    name: Text | None = Field(None, max_length=64, description="with json_schema: required")
    description: Text | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="with json_schema: the schema")
    strict: bool | None = Field(None, description="accepted; the output always matches the schema")


class ResponsesTextConfig(RequestModel):
    format: ResponsesTextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = Field(None, description="accepted, ignored")


class ReasoningConfig(RequestModel):
    effort: Literal["none", "minimal", "low", "medium", "high"] | None = Field(
        None, description="to the chat template as reasoning_effort (gpt-oss's templates read it)")
    summary: Literal["auto", "concise", "detailed"] | None = Field(None, description="accepted; no summaries")


class ResponsesStreamOptions(RequestModel):
    include_obfuscation: bool | None = Field(None, description="accepted; events carry no obfuscation padding")


class ResponsesRequest(RequestModel):
    model: Text | None = Field(None, description="must name the served model when given")
    input: Input = Field(..., description="a user message, or a list of items")
    instructions: Text | None = Field(None, description="a system message before the input")
    max_output_tokens: int | None = Field(None, ge=1, description="default: fill the context")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="default: the model's, else 1.0")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool | None = False
    stream_options: ResponsesStreamOptions | None = None
    tools: list[FunctionTool] | None = Field(None, max_length=128, description="functions the model may call")
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = Field(
        None, description="as on /v1/chat/completions (server/tool_calls.py)")
    parallel_tool_calls: bool | None = None
    text: ResponsesTextConfig | None = None
    reasoning: ReasoningConfig | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="with include's "
                                     f"{LOGPROBS_INCLUDE!r}: alternatives per token")
    include: list[Literal["message.output_text.logprobs", "reasoning.encrypted_content"]] | None = Field(
        None, description=f"{LOGPROBS_INCLUDE!r}: each output_text's logprobs; reasoning.encrypted_content is "
                          "accepted (there is none)")
    metadata: dict[str, Text] | None = Field(None, max_length=16, description="echoed back")
    user: Text | None = None
    store: bool | None = Field(None, description="accepted; nothing is stored")
    previous_response_id: Text | None = Field(None, description="must be null: nothing is stored")
    background: bool | None = Field(None, description="must not be true")
    truncation: Literal["disabled"] | None = Field(None, description="a prompt too long is refused")
    service_tier: Text | None = None
    prompt_cache_key: Text | None = Field(None, description="accepted; the prefix cache needs no key")
    safety_identifier: Text | None = None

    @property
    def wants_logprobs(self) -> bool:
        return LOGPROBS_INCLUDE in (self.include or ())

    def chat_messages(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = [{"role": "system", "content": self.instructions}] \
            if self.instructions is not None else []
        items = [MessageItem(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        thought = None  # a reasoning item's text, for the assistant turn that follows it
        for item in items:
            if isinstance(item, ReasoningInputItem):
                thought = item.text() or None
                continue
            if isinstance(item, FunctionCallItem):
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}
                if not messages or messages[-1]["role"] != "assistant":  # calls after text join its turn
                    messages.append({"role": "assistant", "content": None})
                messages[-1].setdefault("tool_calls", []).append(call)
            elif isinstance(item, FunctionCallOutputItem):
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": _joined(item.output)})
            else:
                messages.append({"role": item.role, "content": _joined(item.content)})
            if thought is not None and messages[-1]["role"] == "assistant":
                messages[-1]["reasoning_content"], thought = thought, None
        return messages

    def response_format(self) -> dict[str, Any] | None:
        fmt = self.text.format if self.text is not None else None
        if fmt is None or fmt.type != "json_schema":
            return None if fmt is None else {"type": fmt.type}
        spec = {"name": fmt.name, "description": fmt.description, "schema": fmt.schema_, "strict": fmt.strict}
        return {"type": "json_schema", "json_schema": {k: v for k, v in spec.items() if v is not None}}

    def chat_request(self) -> ChatCompletionRequest:
        """The same request as /v1/chat/completions takes it (validated again there: a ValidationError here
        is a field this route let through and chat does not take)."""
        choice = self.tool_choice
        return ChatCompletionRequest.model_validate({
            "model": self.model, "messages": self.chat_messages(), "max_tokens": self.max_output_tokens,
            "temperature": self.temperature, "top_p": self.top_p, "stream": self.stream, "user": self.user,
            "tools": [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                      for t in self.tools] if self.tools else None,
            "tool_choice": {"type": "function", "function": {"name": choice.name}}
            if isinstance(choice, NamedFunctionChoice) else choice,
            "parallel_tool_calls": self.parallel_tool_calls, "response_format": self.response_format(),
            "reasoning_effort": self.reasoning.effort if self.reasoning is not None else None,
            "logprobs": self.wants_logprobs, "top_logprobs": self.top_logprobs if self.wants_logprobs else None})


# output --------------------------------------------------------------------------------------------------
class OutputText(ResponseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = []
    logprobs: list[ChatTokenLogprob] = []


class OutputMessage(ResponseModel):
    type: Literal["message"] = "message"
    id: str
    status: ItemStatus
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class ReasoningText(ResponseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class OutputReasoning(ResponseModel):
    type: Literal["reasoning"] = "reasoning"
    id: str
    summary: list[Any] = []
    content: list[ReasoningText]
    status: ItemStatus


class OutputFunctionCall(ResponseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: ItemStatus


OutputItem = OutputReasoning | OutputMessage | OutputFunctionCall


class ResponsesUsage(ResponseModel):
    input_tokens: int
    input_tokens_details: dict[str, int] = {"cached_tokens": 0, "cache_write_tokens": 0}  # not counted
    output_tokens: int
    output_tokens_details: dict[str, int] = Field(..., description="reasoning_tokens")
    total_tokens: int


class IncompleteDetails(ResponseModel):
    reason: Literal["max_output_tokens"]


class ResponseError(ResponseModel):
    code: Literal["server_error", "invalid_prompt"]  # invalid_prompt: the request's own (an impossible schema)
    message: str
    param: str | None = None


class ResponseObject(ResponseModel):
    """OpenAI's Response, with the request's settings echoed back as OpenAI echoes them."""
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    model: str
    output: list[OutputItem] = []
    usage: ResponsesUsage | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float
    top_p: float
    top_logprobs: int | None = None
    tools: list[FunctionTool] = []
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice = "auto"
    parallel_tool_calls: bool = True
    text: ResponsesTextConfig
    reasoning: ReasoningConfig
    metadata: dict[str, str] = {}
    user: str | None = None
    store: bool = False
    previous_response_id: None = None
    background: bool = False
    truncation: Literal["disabled"] = "disabled"
    service_tier: str = "auto"
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
