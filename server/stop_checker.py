"""StopChecker: when a sequence ends, and how much of its text may be released so far.

Per sequence, fed one token at a time. Token stops (stop_token_ids, eos) are decided before the token is
detokenized, so their text never enters the output. Stop strings are matched in the detokenized text across
token boundaries; the match and everything after it is cut (everything after it only, with
include_stop_str_in_output: TGI's way). Text that could be the start of a stop string
is held back until resolved, so a streaming client never receives text a later match would remove.
min_new_tokens suppresses every stop but "length" (as vLLM's min_tokens; the sampler also masks eos/stop ids).
"""
from __future__ import annotations

from typing import NamedTuple

from server.sampling_params import SamplingParams


class StopDecision(NamedTuple):  # one per token: a tuple is cheaper to make than a frozen dataclass
    text_delta: str                     # text releasable now
    finish_reason: str | None = None    # "length" | "stop" | "eos_token" | None (go on)
    stop_reason: str | int | None = None


_GO_ON = StopDecision("")


class StopChecker:
    def __init__(self, params: SamplingParams, eos_token_ids: tuple[int, ...]):
        self.params = params
        self.eos_token_ids = frozenset(() if params.ignore_eos else eos_token_ids)
        self.stop_token_ids = frozenset(params.stop_token_ids)
        self.stop = params.stop
        self.max_stop_len = max((len(s) for s in self.stop), default=0)
        self.text = ""       # output text so far (after a stop-string match: cut at the match); kept only
                             # with stop strings, which are matched in it
        self.released = 0    # characters of the output text already handed out

    def check_token(self, token_id: int, num_output_tokens: int) -> StopDecision | None:
        """A stop decided by the token id alone (num_output_tokens counts this token); None = go on."""
        if num_output_tokens <= self.params.min_new_tokens:
            return None
        if token_id in self.stop_token_ids:
            return self._finish("stop", token_id)
        if token_id in self.eos_token_ids:
            return self._finish("eos_token", token_id)
        return None

    def check_text(self, delta: str, num_output_tokens: int) -> StopDecision:
        """Add the token's detokenized text; match stop strings and apply max_new_tokens."""
        if not self.stop:  # the common case: nothing to match or hold back, every delta goes out as is
            self.released += len(delta)
            if num_output_tokens >= self.params.max_new_tokens:
                return StopDecision(delta, "length", None)
            return StopDecision(delta) if delta else _GO_ON
        start = len(self.text)
        self.text += delta
        if self.stop and num_output_tokens >= self.params.min_new_tokens:
            # A new match must end inside the new text: s may start up to len(s) - 1 chars earlier (so one
            # that lay whole in text written under min_new_tokens stays suppressed, whatever the other stops)
            best: tuple[int, str] | None = None
            for s in self.stop:
                i = self.text.find(s, max(0, start - len(s) + 1))
                if i >= 0 and (best is None or i < best[0]):
                    best = (i, s)
            if best is not None:
                self.text = self.text[:best[0] + (len(best[1]) if self.params.include_stop_str_in_output else 0)]
                return self._finish("stop", best[1])
        if num_output_tokens >= self.params.max_new_tokens:
            return self._finish("length", None)
        safe = len(self.text) - self._held_back()
        delta_out = self.text[self.released:safe] if safe > self.released else ""
        self.released = max(self.released, safe)
        return StopDecision(delta_out)

    def finish_now(self, reason: str) -> StopDecision:
        """End here for a reason of the caller's (a completed grammar): release whatever text is held."""
        return self._finish(reason, None)

    def _finish(self, reason: str, stop_reason: str | int | None) -> StopDecision:
        if not self.stop:  # check_text's fast path keeps no text: everything was released already
            return StopDecision("", reason, stop_reason)
        delta = self.text[self.released:]
        self.released = len(self.text)
        return StopDecision(delta, reason, stop_reason)

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of some stop string."""
        text = self.text
        for k in range(min(self.max_stop_len - 1, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0
