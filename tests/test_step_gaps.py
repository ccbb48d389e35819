"""Each engine step's time to its tokens, by kind (server/step_gaps.py), and its /metrics histogram."""
from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.async_engine import engine_stats
from server.metrics import ServerMetrics, step_gap_histogram
from server.step_gaps import STEP_GAP_BUCKETS, StepGaps


def histogram_samples(families) -> dict[tuple[str, str, str], float]:
    """(sample name, kind, le) -> value of gqaserve_engine_step_gap_seconds among metric families."""
    out = {}
    for family in families:
        if family.name == "gqaserve_engine_step_gap_seconds":
            for s in family.samples:
                out[(s.name, s.labels["kind"], s.labels.get("le", ""))] = s.value
    return out


def test_a_gap_starts_at_the_later_of_the_launch_and_the_step_before():
    gaps = StepGaps()
    gaps.observe(False, launched_at=0.0, seen_at=0.002)    # alone: 2 ms, on a bucket bound (le is inclusive)
    gaps.observe(True, launched_at=0.001, seen_at=0.005)   # launched while that one was in flight: 3 ms
    gaps.observe(False, launched_at=10.0, seen_at=10.0004)  # after 10 s idle: 0.4 ms, the idle time not counted
    (kind_d, counts_d, sum_d), (kind_p, counts_p, sum_p) = gaps.snapshot()
    assert (kind_d, kind_p) == ("decode", "prompt")
    assert counts_d[STEP_GAP_BUCKETS.index(0.002)] == 1 and counts_d[0] == 1 and sum(counts_d) == 2
    assert counts_p[STEP_GAP_BUCKETS.index(0.003)] == 1 and sum(counts_p) == 1
    assert sum_d == pytest.approx(0.0024) and sum_p == pytest.approx(0.003)
    gaps.observe(True, launched_at=30.0, seen_at=35.0)  # beyond the last bound: the +Inf bucket only
    assert gaps.snapshot()[1][1][-1] == 1


def test_histogram_is_cumulative_with_both_kinds_always_present():
    gaps = StepGaps()
    for seen in (0.0009, 0.0018, 0.0027, 0.0036):  # back to back, 0.9 ms apart
        gaps.observe(False, 0.0, seen)
    text = ServerMetrics(lambda: None).render().decode()  # no engine yet: zeros
    samples = histogram_samples(text_string_to_metric_families(text))
    assert samples[("gqaserve_engine_step_gap_seconds_count", "prompt", "")] == 0.0
    samples = histogram_samples([step_gap_histogram(gaps.snapshot())])
    bucket = "gqaserve_engine_step_gap_seconds_bucket"
    assert samples[(bucket, "decode", "0.0005")] == 0.0
    assert samples[(bucket, "decode", "0.001")] == 4.0  # each gap is 0.9 ms
    assert samples[(bucket, "decode", "+Inf")] == 4.0
    assert samples[("gqaserve_engine_step_gap_seconds_sum", "decode", "")] == pytest.approx(0.0036)
    assert samples[(bucket, "prompt", "+Inf")] == 0.0


def test_the_engine_times_every_step_by_kind(tiny_llama_dir):
    """A batch of prompts on CPU: their prompt step(s), then decode steps; every step counted once, each
    gap positive and within the run's wall time, and /metrics says the same."""
    import time

    from server.llm import LLM
    from server.sampling_params import SamplingParams
    llm = LLM(str(tiny_llama_dir), dtype="float32", device="cpu", kv_cache_memory="2MiB")
    t0 = time.monotonic()
    llm.generate(["To be, or not", "Once upon a time", "1, 2, 3"],
                 SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True))
    wall = time.monotonic() - t0
    engine = llm.engine
    (_, decode, decode_sum), (_, prompt, prompt_sum) = engine.counters.step_gaps.snapshot()
    assert sum(prompt) >= 1 and sum(decode) >= 5
    assert sum(prompt) + sum(decode) == engine.counters.num_steps
    assert 0 < prompt_sum and 0 < decode_sum and prompt_sum + decode_sum <= wall
    samples = histogram_samples(text_string_to_metric_families(
        ServerMetrics(lambda: engine_stats(engine)).render().decode()))
    assert samples[("gqaserve_engine_step_gap_seconds_count", "prompt", "")] == sum(prompt)
    assert samples[("gqaserve_engine_step_gap_seconds_count", "decode", "")] == sum(decode)
