"""Online serving benchmark: Poisson arrivals of streamed /v1/completions against a running server.

    python benchmarks/serving.py --base-url http://127.0.0.1:8000 --request-rates 1,2,4,inf --num-prompts 64
    python benchmarks/serving.py --launch --serve-args "--model DIR --max-num-seqs 64"   # start the server too
    python benchmarks/serving.py --launch --dummy-checkpoint llama-3.2-1b                  # GPU, random weights

For each request rate (requests/s; inf = all at once) N requests are sent with exponential gaps (a Poisson
process, seeded), each `stream: true`, `ignore_eos: true`, `max_tokens` fixed, greedy. Prompts are random
token ids of lengths drawn from --input-len (one value: fixed; two: uniform in [lo, hi]), or word slices
of a text file (--dataset FILE; their token counts come back in the usage chunk). Metrics, per rate, in the
sense `vllm bench serve` gives them:
  TTFT  send -> first streamed chunk                 TPOT  (latency - TTFT) / (output tokens - 1)
  ITL   gaps between successive chunks of a stream  E2EL  send -> end of the stream
  request throughput = completed / duration, output tok/s = output tokens / duration (duration: first
  send -> last completion). Each at mean, p50, p90 and p99 (linear interpolation, numpy's default).
Beside them, the server's own side of ITL when its /metrics has it (gqa-serve's
gqaserve_engine_step_gap_seconds, server/step_gaps.py): p50 and p99 of each engine step's time to its tokens
over the rate's run, for steps that carried prompt tokens and for decode-only steps (interpolated within
the histogram's buckets, as Prometheus' histogram_quantile). A client ITL p99 near the prompt steps' p99 is
the device's mixed steps; one well above both kinds is delivery (detokenizing, event loop, network).
With --launch (on Linux) each rate also reports the server process's CPU per output token and its share of
a core: with the engine in a child process (`--engine-process`), the HTTP side's cost alone.
`--launch` starts `python -m server.cli serve` on a free loopback port with --serve-args, waits for
/health, runs, then stops it; `--dummy-checkpoint PRESET` first writes a random bf16 checkpoint of the
preset's shapes (benchmarks/throughput.py PRESETS) with a word-level tokenizer, and serves that.
Table on stdout; JSON to --json, else $OUT/serving.json when OUT is set.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import random
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from benchmarks.launch_server import LaunchedServer, write_dummy_checkpoint  # noqa: E402
from benchmarks.results import write_json  # noqa: E402

PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    ok: bool = False
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float = 0.0
    latency_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""


# ---- workload ---------------------------------------------------------------------------------------
def make_prompts(args, vocab_size: int, run: int = 0) -> list[str | list[int]]:
    """The prompts of one rate's run: each run draws its own, so none is served from the prefix cache of an
    earlier run."""
    rng = random.Random(args.seed + 7919 * run)
    lo, hi = (args.input_len[0], args.input_len[-1])
    lens = [rng.randint(lo, hi) for _ in range(args.num_prompts)]
    if not args.dataset:
        return [[rng.randrange(min(10, vocab_size - 1), vocab_size) for _ in range(n)] for n in lens]
    words = Path(args.dataset).read_text().split()
    out = []
    for n in lens:  # n words: roughly n tokens or more; the usage chunk says how many
        start = rng.randrange(0, max(1, len(words) - n))
        out.append(" ".join(words[start:start + n]))
    return out


def warm_up_prompt(prompt: str | list[int]) -> str | list[int]:
    """A prompt of the same size that shares no leading block with the timed one (reversed)."""
    return prompt[::-1] if isinstance(prompt, list) else " ".join(prompt.split()[::-1])


def arrival_gaps(n: int, rate: float, seed: int) -> list[float]:
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    return [rng.expovariate(rate) for _ in range(n)]


# ---- one request ------------------------------------------------------------------------------------
async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> RequestResult:
    res = RequestResult()
    chunks = 0
    t0 = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    res.error = str(event["error"])[:200]
                    return res
                if event.get("usage"):
                    res.prompt_tokens = event["usage"]["prompt_tokens"]
                    res.output_tokens = event["usage"]["completion_tokens"]
                if not event.get("choices"):
                    continue
                now = time.perf_counter()
                if chunks == 0:
                    res.ttft_s = now - t0
                else:
                    res.itl_s.append(now - last)
                last = now
                chunks += 1
        res.latency_s = time.perf_counter() - t0
        res.output_tokens = res.output_tokens or chunks
        res.ok = chunks > 0
        if not res.ok:
            res.error = "no chunks"
    except Exception as exc:  # noqa: BLE001 - a failed request is a result, not a crash
        res.error = f"{type(exc).__name__}: {exc}"[:200]
    return res


def request_body(prompt, model: str | None, max_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    return body | ({"model": model} if model else {})


async def send_on_schedule(url: str, bodies: list[dict], send_at: list[float], timeout: float
                           ) -> tuple[list[RequestResult], float, float]:
    """Send bodies[i] at monotonic time send_at[i]; (results, time the last one ended, CPU seconds used)."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    cpu0 = time.process_time()
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits) as client:
        tasks = []
        for body, at in zip(bodies, send_at):
            delay = at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one_request(client, url, body)))
        results = list(await asyncio.gather(*tasks))
    return results, time.monotonic(), time.process_time() - cpu0


def client_process(url: str, bodies: list[dict], send_at: list[float], timeout: float):
    """One client process's share of the requests (CLOCK_MONOTONIC is the same clock in every process)."""
    return asyncio.run(send_on_schedule(url, bodies, send_at, timeout))


def process_cpu_s(pid: int | None) -> float | None:
    """CPU seconds (user + system, all threads, not its children) a process has used so far; None when there
    is no pid or no /proc (a server not launched here, or not on Linux)."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except (OSError, TypeError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14 and 15


def run_rate(base_url: str, model: str | None, prompts, rate: float, args, server_pid: int | None = None) -> dict:
    """The requests go out on one Poisson schedule, dealt round-robin to --client-processes processes: a
    streaming client spends ~0.1-0.2 ms of CPU per event in Python, so one process saturates near 5-10k
    events/s and would then measure itself, not the server. Each process's CPU load is reported."""
    url = base_url.rstrip("/") + "/v1/completions"
    gaps = arrival_gaps(len(prompts), rate, args.seed)
    bodies = [request_body(p, model, args.max_tokens) for p in prompts]
    warm_body = request_body(warm_up_prompt(prompts[0]), model, 2)
    warm = asyncio.run(send_on_schedule(url, [warm_body], [0.0], args.request_timeout))[0][0]
    if not warm.ok:
        raise RuntimeError(f"warm-up request failed: {warm.error}")
    gaps_before = scrape_step_gaps(base_url)
    cpu_before = process_cpu_s(server_pid)
    k = max(1, min(args.client_processes, len(bodies)))
    if k == 1:
        start = time.monotonic()
        send_at = [start + t for t in itertools.accumulate(gaps)]
        parts = [client_process(url, bodies, send_at, args.request_timeout)]
    else:
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context
        with ProcessPoolExecutor(k, mp_context=get_context("spawn")) as pool:
            list(pool.map(abs, range(k)))  # start every process (spawn imports this module) before the clock
            start = time.monotonic() + 0.2
            send_at = [start + t for t in itertools.accumulate(gaps)]
            futures = [pool.submit(client_process, url, bodies[w::k], send_at[w::k], args.request_timeout)
                       for w in range(k)]
            parts = [f.result() for f in futures]
    results = [r for part, _, _ in parts for r in part]
    duration = max(end for _, end, _ in parts) - start
    row = summarize(results, rate, duration)
    row["client_processes"] = k
    row["client_cpu_busy"] = max(cpu for _, _, cpu in parts) / duration  # the busiest process: near 1 = saturated
    row["engine_step_gap_ms"] = step_gap_quantiles(gaps_before, scrape_step_gaps(base_url))
    cpu_after = process_cpu_s(server_pid)
    if cpu_before is not None and cpu_after is not None and row["output_tokens"]:
        # the launched server's own process: with the engine in a child process, the HTTP side alone
        row["server_cpu_us_per_token"] = (cpu_after - cpu_before) / row["output_tokens"] * 1e6
        row["server_cpu_busy"] = (cpu_after - cpu_before) / duration
    return row


# ---- the server's side: its engine steps' gaps (/metrics) ------------------------------------------------
STEP_GAP_SERIES = "gqaserve_engine_step_gap_seconds"


def scrape_step_gaps(base_url: str) -> dict[str, list[tuple[float, float]]]:
    """kind -> [(bucket upper bound, cumulative count)] from the server's /metrics; {} if it has none."""
    try:
        text = httpx.get(base_url.rstrip("/") + "/metrics", timeout=10).text
        families = list(text_string_to_metric_families(text))
    except (httpx.HTTPError, ValueError):
        return {}
    out: dict[str, list[tuple[float, float]]] = {}
    for family in families:
        if family.name == STEP_GAP_SERIES:
            for s in family.samples:
                if s.name.endswith("_bucket"):
                    out.setdefault(s.labels["kind"], []).append((float(s.labels["le"]), s.value))
    return {kind: sorted(buckets) for kind, buckets in out.items()}


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' estimate from cumulative buckets: linear within the bucket the rank falls in; the last
    finite bound when it falls in +Inf; NaN with no observations."""
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return float("nan")
    rank, lower, below = q * total, 0.0, 0.0
    for bound, cumulative in buckets:
        if cumulative >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / max(cumulative - below, 1e-12)
        lower, below = bound, cumulative
    return lower


def step_gap_quantiles(before: dict, after: dict) -> dict:
    """Per kind, the steps of this run (after - before): their count and p50 / p99 gap in ms."""
    out = {}
    for kind, buckets in after.items():
        old = dict(before.get(kind, ()))
        delta = [(bound, count - old.get(bound, 0.0)) for bound, count in buckets]
        out[kind] = {"steps": int(delta[-1][1]) if delta else 0,
                     **{f"p{q}": 1e3 * histogram_quantile(q / 100, delta) for q in (50, 99)}}
    return out


# ---- metrics ------------------------------------------------------------------------------------------
def stats_ms(values: list[float]) -> dict:
    if not values:
        return {"mean": float("nan"), **{f"p{q}": float("nan") for q in PERCENTILES}}
    arr = np.asarray(values) * 1e3
    return {"mean": float(arr.mean()), **{f"p{q}": float(np.percentile(arr, q)) for q in PERCENTILES}}


def summarize(results: list[RequestResult], rate: float, duration: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    tpot = [(r.latency_s - r.ttft_s) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "request_rate": "inf" if math.isinf(rate) else rate,
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration, "input_tokens": in_tokens, "output_tokens": out_tokens,
        "request_throughput": len(ok) / duration, "output_tok_s": out_tokens / duration,
        "total_tok_s": (in_tokens + out_tokens) / duration,
        "ttft_ms": stats_ms([r.ttft_s for r in ok]), "tpot_ms": stats_ms(tpot),
        "itl_ms": stats_ms([x for r in ok for x in r.itl_s]), "e2el_ms": stats_ms([r.latency_s for r in ok]),
    }


def print_table(rows: list[dict]) -> None:
    cols = ["rate", "ok", "fail", "req/s", "out tok/s"] + [f"{m} {s}" for m in ("TTFT", "TPOT", "ITL")
                                                           for s in ("mean", "p50", "p90", "p99")]
    table = []
    for r in rows:
        vals = [str(r["request_rate"]), str(r["completed"]), str(r["failed"]), f"{r['request_throughput']:.2f}",
                f"{r['output_tok_s']:.1f}"]
        for m in ("ttft_ms", "tpot_ms", "itl_ms"):
            vals += [f"{r[m][s]:.1f}" for s in ("mean", "p50", "p90", "p99")]
        table.append(vals)
    w = [max(len(c), *(len(v[i]) for v in table)) for i, c in enumerate(cols)]
    print(" | ".join(c.rjust(n) for c, n in zip(cols, w)) + "   (times in ms)")
    print("-+-".join("-" * n for n in w))
    for v in table:
        print(" | ".join(x.rjust(n) for x, n in zip(v, w)))


# ---- main -------------------------------------------------------------------------------------------
def server_info(base_url: str) -> dict:
    try:
        r = httpx.get(base_url.rstrip("/") + "/info", timeout=10)
        return r.json() if r.status_code == 200 else {}
    except (httpx.HTTPError, ValueError):
        return {}


def benchmark(base_url: str, args, server_pid: int | None = None) -> dict:
    info = server_info(base_url)
    vocab = args.vocab_size or info.get("vocab_size") or 256
    rows = []
    for i, rate in enumerate(args.request_rates):
        row = run_rate(base_url, args.model, make_prompts(args, vocab, i), rate, args, server_pid)
        rows.append(row)
        print(f"rate {row['request_rate']}: {row['completed']} ok, {row['failed']} failed, "
              f"{row['duration_s']:.1f} s; busiest of {row['client_processes']} client process(es) "
              f"{100 * row['client_cpu_busy']:.0f}% busy", flush=True)
        if "server_cpu_us_per_token" in row:
            print(f"  server process: {row['server_cpu_us_per_token']:.1f} us of CPU per output token, "
                  f"{100 * row['server_cpu_busy']:.0f}% of a core", flush=True)
        gaps = row["engine_step_gap_ms"]
        if gaps:
            print("  engine step gaps (ms): " + "; ".join(
                f"{kind} p50 {g['p50']:.2f} / p99 {g['p99']:.2f} ({g['steps']} steps)" for kind, g in gaps.items()),
                flush=True)
        if row["client_cpu_busy"] > 0.8:
            print("  warning: a client process was over 80% busy; its timings include its own queueing "
                  "(raise --client-processes)", flush=True)
    return {"base_url": base_url, "server_info": info, "rates": rows}


def parse_rates(text: str) -> list[float]:
    return [math.inf if x.strip().lower() in ("inf", "infinity") else float(x) for x in text.split(",")]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", help="model name to send (default: none, the server's own)")
    ap.add_argument("--request-rates", type=parse_rates, default=parse_rates("1,2,4,inf"),
                    help="comma-separated requests/s; inf = all at once")
    ap.add_argument("--num-prompts", type=int, default=64, help="requests per rate")
    ap.add_argument("--input-len", type=int, nargs="+", default=[128], help="LEN or LO HI (uniform)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--dataset", help="text file: prompts are word slices of it (default: random token ids)")
    ap.add_argument("--vocab-size", type=int, help="for random ids (default: /info's vocab_size)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--request-timeout", type=float, default=600.0)
    ap.add_argument("--client-processes", type=int, default=max(1, min(4, (os.cpu_count() or 1) // 4)),
                    help="client processes the requests are dealt to (default: a quarter of the cores, 1-4)")
    ap.add_argument("--launch", action="store_true", help="start `gqa-serve serve` for the run")
    ap.add_argument("--serve-args", default="", help="flags for the launched server (one string)")
    ap.add_argument("--dummy-checkpoint", metavar="PRESET", help="with --launch: serve random weights of a "
                    "throughput.py preset (or config.json path), written to a temporary directory")
    ap.add_argument("--launch-timeout", type=float, default=600.0)
    ap.add_argument("--json", help="write the results here (default: $OUT/serving.json when OUT is set)")
    args = ap.parse_args(argv)
    if len(args.input_len) not in (1, 2):
        ap.error("--input-len takes LEN or LO HI")

    if not args.launch:
        res = benchmark(args.base_url, args)
    else:
        with tempfile.TemporaryDirectory(prefix="gqa_serving_") as tmp:
            serve_args = shlex.split(args.serve_args)
            if args.dummy_checkpoint:
                t = time.perf_counter()
                write_dummy_checkpoint(args.dummy_checkpoint, Path(tmp) / "ckpt")
                print(f"wrote a random {args.dummy_checkpoint} checkpoint in {time.perf_counter() - t:.1f} s",
                      flush=True)
                serve_args = ["--model", str(Path(tmp) / "ckpt"), *serve_args]
            t = time.perf_counter()
            with LaunchedServer(serve_args, args.launch_timeout, Path(tmp) / "server.log") as srv:
                print(f"server healthy at {srv.url} after {time.perf_counter() - t:.1f} s", flush=True)
                res = benchmark(srv.url, args, srv.proc.pid)
            res["serve_cmd"] = srv.cmd
    res["args"] = {k: (v if not isinstance(v, list) else [str(x) for x in v]) for k, v in vars(args).items()}
    print_table(res["rates"])
    write_json(res, args.json, "serving.json")
    return res


if __name__ == "__main__":
    main()
