"""SamplingParams: one request's decoding settings (and its scheduling priority), validated once at the door.

Pydantic so a bad value becomes an error that names its field; the HTTP schemas (TGI, OpenAI) map their
own fields onto this one model.

The engine works on token ids only: bad_words (strings) reach it as bad_words_token_ids, which the side that
holds the tokenizer fills at the door (server/bad_words.py), so the engine, its process and the sampler never
tokenize.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_STOP_SEQUENCES = 16
MAX_STOP_STRING_CHARS = 256
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024  # biased token ids per request
MAX_GRAMMAR_CHARS = 65536
MAX_ALLOWED_TOKEN_IDS = 1 << 18  # as many as the largest vocabularies hold
MAX_BAD_WORDS = 64
MAX_BAD_WORD_CHARS = 256
MAX_PREDICTION_TOKENS = 1 << 20  # static bound; the OpenAI route refuses more than max_model_len


class Grammar(BaseModel):
    """What the output must match (server/grammar.py): a JSON schema (as a JSON string), a regex, or a
    Lark grammar (llguidance's dialect)."""
    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["json", "regex", "lark"]
    value: str = Field(..., min_length=1, max_length=MAX_GRAMMAR_CHARS)


class SamplingParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    temperature: float = Field(1.0, ge=0.0, le=100.0, description="0 means greedy")
    top_k: int = Field(0, ge=-1, description="0 or -1: off")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    max_new_tokens: int = Field(16, ge=1)
    min_new_tokens: int = Field(0, ge=0)
    stop: tuple[str, ...] = Field((), max_length=MAX_STOP_SEQUENCES)
    stop_token_ids: tuple[int, ...] = Field((), max_length=MAX_STOP_SEQUENCES)
    include_stop_str_in_output: bool = Field(False, description="keep a matched stop string at the end of the "
                                             "output (TGI does; OpenAI and vLLM's default cut it)")
    ignore_eos: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                 description="None: none; 0: the chosen token's; n: plus the top n")
    logit_bias: dict[int, float] = Field(default_factory=dict, max_length=MAX_LOGIT_BIAS,
                                         description="token id -> a value in [-100, 100] added to its logit "
                                         "before sampling (OpenAI's logit_bias)")
    grammar: Grammar | None = Field(None, description="constrain the output to a JSON schema, regex or Lark "
                                    "grammar (TGI's grammar, OpenAI's response_format)")
    allowed_token_ids: tuple[int, ...] | None = Field(None, max_length=MAX_ALLOWED_TOKEN_IDS,
                                                      description="only these ids may be sampled (vLLM's); None: "
                                                      "any. A mask, not a bias: logprobs stay the model's")
    bad_words: tuple[str, ...] = Field((), description="words the output must not contain (vLLM's), as given; "
                                       "the engine applies bad_words_token_ids")
    bad_words_token_ids: tuple[tuple[int, ...], ...] = Field(
        (), max_length=2 * MAX_BAD_WORDS, description="the token sequences bad_words ban: each one's last token "
        "is banned where the output ends with the rest. Filled from bad_words by whoever holds the tokenizer "
        "(server/bad_words.with_bad_words_token_ids); admission refuses bad_words without them")
    prediction_token_ids: tuple[int, ...] = Field(
        (), max_length=MAX_PREDICTION_TOKENS, description="tokens the output is expected to mostly repeat (OpenAI's "
        "Predicted Outputs, tokenized): drafted for speculative decoding (server/prediction.py), so the output is "
        "what it would be without them; ids the model does not have are never drafted")
    skip_special_tokens: bool = True
    prompt_logprobs: bool = Field(False, description="the logprob of every prompt token after the first "
                                  "(TGI's decoder_input_details); sent with the first output")
    priority: int = Field(0, ge=-(2**31), le=2**31 - 1, description="with scheduling_policy \"priority\": "
                          "lower is served first (vLLM's); must be 0 under \"fcfs\"")

    @model_validator(mode="after")
    def _check(self) -> "SamplingParams":
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) must not exceed "
                             f"max_new_tokens ({self.max_new_tokens})")
        for s in self.stop:
            if not s:
                raise ValueError("stop: empty stop strings are not allowed")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise ValueError(f"stop: each stop string is at most {MAX_STOP_STRING_CHARS} characters")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids: token ids must be non-negative")
        for token, bias in self.logit_bias.items():
            if token < 0:
                raise ValueError(f"logit_bias: token id {token} is negative")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias: the bias of token {token} is {bias}; it must be in [-100, 100]")
        self._check_token_constraints()
        return self

    def _check_token_constraints(self) -> None:
        if self.allowed_token_ids is not None:
            if not self.allowed_token_ids:
                raise ValueError("allowed_token_ids: the list is empty, which would allow no token (null: any)")
            bad = next((t for t in self.allowed_token_ids if t < 0), None)
            if bad is not None:
                raise ValueError(f"allowed_token_ids: token id {bad} is negative")
        if len(self.bad_words) > MAX_BAD_WORDS:
            raise ValueError(f"bad_words: {len(self.bad_words)} words, more than the limit of {MAX_BAD_WORDS}")
        for word in self.bad_words:
            if not word:
                raise ValueError("bad_words: empty words are not allowed")
            if len(word) > MAX_BAD_WORD_CHARS:
                raise ValueError(f"bad_words: each word is at most {MAX_BAD_WORD_CHARS} characters")
        if min(self.prediction_token_ids, default=0) < 0:
            raise ValueError("prediction_token_ids: token ids must be non-negative")
        for ids in self.bad_words_token_ids:
            if not ids:
                raise ValueError("bad_words_token_ids: empty token sequences are not allowed")
            if any(t < 0 for t in ids):
                raise ValueError(f"bad_words_token_ids: {list(ids)} holds a negative token id")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
