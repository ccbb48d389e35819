"""Building blocks shared by the TGI and OpenAI request schemas."""
from __future__ import annotations

import math
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict

# Logprobs of masked tokens are -inf; JSON has no infinities, so they are reported as this floor.
LOGPROB_FLOOR = -9999.0


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains a lone surrogate (not valid Unicode text)") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]


class RequestModel(BaseModel):
    """Unknown fields and non-finite numbers are refused, naming the field."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


class ResponseModel(BaseModel):
    model_config = ConfigDict(frozen=True)


def finite_logprob(value: float | None) -> float | None:
    if value is None:
        return None
    return value if math.isfinite(value) else LOGPROB_FLOOR
