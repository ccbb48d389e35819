"""Building blocks shared by the TGI and OpenAI request schemas."""
from __future__ import annotations

import functools
import math
import types
import typing
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Strict, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

# Logprobs of masked tokens are -inf; JSON has no infinities, so they are reported as this floor.
LOGPROB_FLOOR = -9999.0


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains a lone surrogate (not valid Unicode text)") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]
# a token id inside a list, where RequestModel's check of JSON types does not reach: "1" and true are refused
TokenId = Annotated[int, Strict()]


@functools.cache
def _scalar_kinds(model: type[BaseModel], name: str) -> frozenset[type]:
    annotation = model.model_fields[name].annotation
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    members = typing.get_args(annotation) if union else (annotation,)
    return frozenset(a for a in members if a in (int, float, bool, str))


class RequestModel(BaseModel):
    """Unknown fields and non-finite numbers are refused, naming the field; so are JSON values of another
    type than the field's where pydantic's lax mode would convert them (`"max_tokens": "2"` or `true` as a
    number, `"stream": "yes"` or `1` as a boolean), as OpenAI's API and TGI refuse them."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _json_types(cls, value: Any, info: ValidationInfo) -> Any:
        kinds = _scalar_kinds(cls, info.field_name)
        numeric = bool(kinds & {int, float})
        if isinstance(value, bool) and bool not in kinds and numeric:
            raise PydanticCustomError("number_type", "Input should be a number, not true or false")
        if isinstance(value, str) and str not in kinds and numeric:
            raise PydanticCustomError("number_type", "Input should be a number, not a string")
        if kinds == {bool} and value is not None and not isinstance(value, bool):
            raise PydanticCustomError("bool_type", "Input should be true or false")
        return value


class ResponseModel(BaseModel):
    model_config = ConfigDict(frozen=True)


def finite_logprob(value: float | None) -> float | None:
    if value is None:
        return None
    return value if math.isfinite(value) else LOGPROB_FLOOR
