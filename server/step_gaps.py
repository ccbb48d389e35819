"""The engine's side of inter-token latency: how long each step took to give the host its tokens, split by
whether the step carried prompt tokens (TGI's batch forward duration by method, vLLM's iteration time).

A step's gap runs from the later of its launch and the moment the host saw the step before it, to the
moment the host sees this step's tokens. With overlap scheduling a step is launched while the one before is
in flight, so its gap is what it added after that one; time with no step launched is not counted. A
streamed token cannot arrive sooner after the one before than its step's gap: when the clients' p99
inter-token latency is near the p99 gap of "prompt" steps, the tail is the steps that carry a new prompt;
when it is well above both kinds, the time goes to delivery (detokenizing, the event loop, the network).
Kept as plain bucket counts in the engine (its process may be a child) and exposed by server/metrics.py.
"""
from __future__ import annotations

import bisect

# seconds: fine around a decode step of a small model on a GPU (about 1-3 ms), coarse beyond
STEP_GAP_BUCKETS = (0.0005, 0.001, 0.00125, 0.0015, 0.00175, 0.002, 0.0025, 0.003, 0.004, 0.005, 0.0075, 0.01,
                    0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
KINDS = ("decode", "prompt")


class StepGaps:
    def __init__(self) -> None:
        self.counts = {kind: [0] * (len(STEP_GAP_BUCKETS) + 1) for kind in KINDS}  # the last one: above all
        self.sums = dict.fromkeys(KINDS, 0.0)
        self._last_seen = 0.0

    def observe(self, has_prompt: bool, launched_at: float, seen_at: float) -> None:
        """A step launched at `launched_at` whose tokens the host saw at `seen_at` (time.monotonic())."""
        gap = max(0.0, seen_at - max(launched_at, self._last_seen))
        self._last_seen = seen_at
        kind = KINDS[has_prompt]
        self.counts[kind][bisect.bisect_left(STEP_GAP_BUCKETS, gap)] += 1  # bucket i: gap <= bound i
        self.sums[kind] += gap

    def snapshot(self) -> tuple[tuple[str, tuple[int, ...], float], ...]:
        """((kind, counts per bucket, sum of gaps), ...): plain values that cross a process pipe."""
        return tuple((kind, tuple(self.counts[kind]), self.sums[kind]) for kind in KINDS)
