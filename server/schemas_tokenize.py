"""Bodies of POST /tokenize and /detokenize, in vLLM's shapes (the habit of OpenAI-style servers' clients).

/tokenize takes a text (`prompt`, or TGI's `inputs`) or a chat (`messages`, through the model's chat template,
as /v1/chat/completions renders it) and answers the token ids, their count and the context limit; /detokenize
turns ids back into text.
"""
from __future__ import annotations

from typing import Any

from pydantic import Field

from server.schema_common import RequestModel, ResponseModel, Text, TokenId
from server.schemas_openai import ChatMessage, ToolDef


class TokenizeRequest(RequestModel):
    model: Text | None = Field(None, description="must name the served model when given")
    prompt: Text | None = Field(None, description="the text to tokenize; or inputs, or messages")
    inputs: Text | None = Field(None, description="the text, under TGI's name")
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=4096,
                                               description="a chat, rendered by the model's chat template")
    add_special_tokens: bool | None = Field(None, description="default: true for a text, false for messages "
                                                              "(their template writes them)")
    add_generation_prompt: bool | None = Field(True, description="with messages: end with the assistant's turn")
    continue_final_message: bool | None = Field(False, description="with messages: leave the final message open "
                                                "(needs add_generation_prompt false), as the chat route does")
    tools: list[ToolDef] | None = Field(None, max_length=128, description="with messages: to the chat template")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="with messages: template variables")
    return_token_strs: bool | None = Field(False, description="also answer each token's vocabulary piece")


class TokenizeResponse(ResponseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(RequestModel):
    model: Text | None = Field(None, description="must name the served model when given")
    tokens: list[TokenId] = Field(..., max_length=1 << 17)
    skip_special_tokens: bool | None = Field(False, description="drop special tokens' text (vLLM keeps it)")


class DetokenizeResponse(ResponseModel):
    prompt: str
