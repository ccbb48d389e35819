"""What the engine hands back per request per step, the errors it raises at admission, and its counters."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from server.step_gaps import StepGaps

if TYPE_CHECKING:  # (annotations only: the HTTP side imports this module, not the engine's state)
    from server.sequence import Sequence

FINISH_REASONS = ("length", "stop", "eos_token", "abort", "error")


# NamedTuples, not frozen dataclasses: the engine makes one of each per sequence per step, and a frozen
# dataclass's __init__ (object.__setattr__ per field) costs ~6x as much; both are immutable.
class TokenLogprob(NamedTuple):
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token_id, logprob), best first; empty unless top-n asked


class RequestOutput(NamedTuple):
    """A delta: the tokens and text produced for one request since its previous output."""
    request_id: str
    new_token_ids: list[int]
    new_text: str                      # text delta; a matched stop string is never included
    finished: bool = False
    finish_reason: str | None = None   # one of FINISH_REASONS once finished
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    new_logprobs: list[TokenLogprob] | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0         # total so far
    error: str | None = None           # set with finish_reason "error"
    error_field: str | None = None     # the request field at fault when the failure is the request's (its grammar)
    queue_time: float | None = None    # seconds from arrival to first scheduling; on the first output only
    prompt_logprobs: list[float | None] | None = None
    step_time: float | None = None     # time.monotonic() of the engine step that made it: one step may keep
                                       # several draft tokens, each its own output; metrics group them by this
    accepted_prediction_tokens: int = 0  # of its prediction's drafts so far, those kept / refused (totals;
    rejected_prediction_tokens: int = 0  # server/prediction.py): OpenAI's usage.completion_tokens_details


def finished_output(seq: Sequence, reason: str, error: str | None = None) -> RequestOutput:
    """The output that ends a request without a token (abort, error)."""
    return RequestOutput(request_id=seq.request_id, new_token_ids=[], new_text="", finished=True,
                         finish_reason=reason, error=error, num_prompt_tokens=seq.num_prompt_tokens,
                         num_output_tokens=seq.num_output_tokens, **prediction_totals(seq))


def prediction_totals(seq: Sequence) -> dict[str, int]:
    """A RequestOutput's prediction counts from its sequence (none: 0 and 0)."""
    state = seq.prediction
    return {"accepted_prediction_tokens": state.accepted if state is not None else 0,
            "rejected_prediction_tokens": state.rejected if state is not None else 0}


class AdmissionError(ValueError):
    """The request can never be served with this configuration (too long for max_model_len or the pool).

    `field` names the request field at fault so the HTTP layer can say so in a 4xx.
    """

    def __init__(self, message: str, field: str = "inputs"):
        super().__init__(message)
        self.field = field


class OverloadedError(RuntimeError):
    """The waiting queue is full (max_waiting_requests) or the engine is draining: refuse now (429/503)."""


class EngineDeadError(RuntimeError):
    """The engine loop has died; /health reports 503 and requests fail fast."""


@dataclass
class EngineCounters:
    num_steps: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    admission_rejections_total: int = 0
    failed_steps_in_a_row: int = 0
    overlapped_steps: int = 0  # steps launched while the previous one was still in flight
    deferred_sampling_steps: int = 0  # of those, steps sampled after the previous one's tokens were appended
    draft_tokens: int = 0  # speculative tokens proposed and verified (server/speculative.py)
    accepted_draft_tokens: int = 0  # of those, tokens kept
    num_drafts: int = 0  # times a sequence fed drafts; accepted_by_position[j]: times its draft j + 1 was kept
    accepted_by_position: list[int] = field(default_factory=lambda: [0] * 16)  # (the first 16 positions)
    step_gaps: StepGaps = field(default_factory=StepGaps)  # each step's time to its tokens, decode / prompt
