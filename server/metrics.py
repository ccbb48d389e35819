"""Prometheus collectors, one CollectorRegistry per app (never the process-global one).

Latencies are observed by the request handlers (server/generation.py); engine state (running, waiting, KV
usage, token and preemption counters) is read from engine.stats() at scrape time by EngineStatsCollector,
so /metrics is always current and the engine does no Prometheus work on its hot loop.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from server.step_gaps import KINDS, STEP_GAP_BUCKETS

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 300.0)


# (family, series, help, EngineStats field): read from the engine at each scrape
_ENGINE_SERIES = (
    (GaugeMetricFamily, "gqaserve_num_requests_running", "Sequences in the running batch", "num_running"),
    (GaugeMetricFamily, "gqaserve_num_requests_waiting", "Requests queued for admission", "num_waiting"),
    (GaugeMetricFamily, "gqaserve_kv_cache_usage_ratio", "Fraction of KV cache blocks in use (0..1)",
     "kv_cache_usage"),
    (GaugeMetricFamily, "gqaserve_kv_cache_free_blocks", "Free KV cache blocks", "num_free_blocks"),
    (CounterMetricFamily, "gqaserve_prompt_tokens", "Prompt tokens prefilled", "prompt_tokens_total"),
    (CounterMetricFamily, "gqaserve_generation_tokens", "Tokens generated", "generation_tokens_total"),
    (CounterMetricFamily, "gqaserve_num_preemptions", "Sequences preempted for lack of KV blocks",
     "num_preemptions_total"),
    (CounterMetricFamily, "gqaserve_admission_rejections", "Requests the engine refused at admission",
     "admission_rejections_total"),
    (CounterMetricFamily, "gqaserve_prefix_cache_queries", "Tokens of admitted requests (a preempted one's "
     "output too) looked up in the prefix cache", "prefix_cache_queries_total"),
    (CounterMetricFamily, "gqaserve_prefix_cache_hits", "Of those, tokens found in the prefix cache (not "
     "computed)", "prefix_cache_hits_total"),
    (CounterMetricFamily, "gqaserve_overlapped_steps", "Engine steps launched while the previous one was "
     "still in flight (overlap scheduling)", "overlapped_steps"),
    (CounterMetricFamily, "gqaserve_deferred_sampling_steps", "Of those, steps whose rows (penalties, "
     "grammars) sampled once the previous step's tokens were appended", "deferred_sampling_steps"),
    (CounterMetricFamily, "gqaserve_spec_decode_num_draft_tokens", "Speculative draft tokens verified",
     "draft_tokens"),
    (CounterMetricFamily, "gqaserve_spec_decode_num_accepted_tokens", "Of those, draft tokens accepted",
     "accepted_draft_tokens"),
    (CounterMetricFamily, "gqaserve_spec_decode_num_drafts", "Times a sequence fed drafts (mean tokens a "
     "verification: 1 + accepted / drafts)", "num_drafts"),
)


class EngineStatsCollector(Collector):
    """Gauges and counters straight from engine.stats(); zeros while the model loads."""

    def __init__(self, stats: Callable[[], Any]):
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        for family, name, help_text, stat in _ENGINE_SERIES:
            yield family(name, help_text, value=float(getattr(s, stat)) if s is not None else 0.0)
        steps = CounterMetricFamily("gqaserve_engine_steps", "Engine steps by how they ran: a replayed decode "
                                    "or prefill CUDA graph, or eager kernel launches", labels=["path"])
        decode = getattr(s, "decode_graph_steps", 0) if s is not None else 0
        prefill = getattr(s, "prefill_graph_steps", 0) if s is not None else 0
        total = getattr(s, "num_steps", 0) if s is not None else 0
        for path, value in (("decode_graph", decode), ("prefill_graph", prefill),
                            ("eager", max(total - decode - prefill, 0))):
            steps.add_metric([path], float(value))
        yield steps
        per_pos = CounterMetricFamily("gqaserve_spec_decode_num_accepted_tokens_per_pos", "Draft tokens accepted "
                                      "at each position of a sequence's drafts (0: the first)", labels=["position"])
        for j, value in enumerate(getattr(s, "accepted_by_position", ()) if s is not None else ()):
            per_pos.add_metric([str(j)], float(value))
        yield per_pos
        yield step_gap_histogram(getattr(s, "step_gaps", ()) if s is not None else ())


def step_gap_histogram(snapshot) -> HistogramMetricFamily:
    """StepGaps.snapshot() as one histogram labelled by kind (both kinds always present, zeros at first)."""
    family = HistogramMetricFamily("gqaserve_engine_step_gap_seconds", "Each engine step's time until the host "
                                   "has its tokens, after the step before (server/step_gaps.py): steps that carry "
                                   "prompt tokens or only decodes", labels=["kind"])
    found = {kind: (counts, total) for kind, counts, total in snapshot}
    for kind in KINDS:
        counts, total = found.get(kind, ((0,) * (len(STEP_GAP_BUCKETS) + 1), 0.0))
        cumulative, buckets = 0, []
        for bound, count in zip((*map(str, STEP_GAP_BUCKETS), "+Inf"), counts):
            cumulative += count
            buckets.append((bound, float(cumulative)))
        family.add_metric([kind], buckets, sum_value=total)
    return family


class ServerMetrics:
    def __init__(self, stats: Callable[[], Any]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.time_to_first_token = Histogram(
            "gqaserve_time_to_first_token_seconds", "Request arrival to first generated token",
            buckets=_TTFT_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            "gqaserve_inter_token_latency_seconds", "Time between consecutive generated tokens",
            buckets=_ITL_BUCKETS, registry=r)
        self.e2e_request_latency = Histogram(
            "gqaserve_e2e_request_latency_seconds", "Request arrival to last token", buckets=_E2E_BUCKETS,
            registry=r)
        self.request_queue_time = Histogram(
            "gqaserve_request_queue_time_seconds",
            "Request arrival to first scheduled (the engine's figure when it reports one, else arrival to "
            "first output)", buckets=_E2E_BUCKETS, registry=r)
        self.request_success = Counter(
            "gqaserve_request_success", "Requests finished, by finish reason", ["finished_reason"], registry=r)
        self.http_rejections = Counter(
            "gqaserve_http_rejections", "Requests refused by the HTTP layer, by kind", ["kind"], registry=r)
        self.http_responses = Counter(
            "gqaserve_http_responses", "HTTP responses by route (the path template; 'unmatched' for paths no "
            "route serves) and status code: 4xx and 5xx rates come from here", ["route", "status"], registry=r)
        r.register(EngineStatsCollector(stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)
