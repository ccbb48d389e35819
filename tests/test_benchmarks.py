"""Smoke tests of the benchmark scripts on CPU with the tiny model: they run, their tables and JSON have the
fields the GPU session reads, and their statistics are self-consistent. No timing is asserted."""
from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from benchmarks import latency, serving
from server.config import ServerConfig
from server.engine_config import EngineConfig
from tests.live_server import LiveServer

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "rope_theta": 10000.0,
               "max_position_embeddings": 512, "tie_word_embeddings": True}


def test_latency_prints_roofline_and_writes_json(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "lat.json"
    res = latency.main(["--model", str(tiny_llama_dir), "--device", "cpu", "--input-len", "16", "--output-len", "5",
                        "--num-iters", "2", "--num-iters-warmup", "1", "--copy-bytes", str(1 << 22),
                        "--json", str(out)])
    text = capsys.readouterr().out
    header = text.splitlines()[0]
    assert "TPOT ms" in header and "roofline tok/s" in header and "of roofline" in header
    saved = json.loads(out.read_text())
    assert saved["batch_size"] == 1 and len(saved["runs"]) == 2
    run = saved["runs"][0]
    assert run["decode_steps"] == 4 and run["decode_tokens"] == 4  # 5 tokens: 1 from prefill, 4 decode steps
    roof = saved["roofline"]
    assert roof["copy_GBps"] > 0 and roof["roofline_step_s"] > 0
    # untied tiny model: the embedding is looked up, not read whole, so it is left out of the bytes read
    assert roof["weight_bytes_read_per_step"] < roof["weight_bytes_total"]
    assert roof["mean_context"] == 16 + 5 / 2
    assert 0 < res["fraction_of_roofline"] == saved["fraction_of_roofline"]
    assert saved["max_model_len"] == 16 + 5  # the workload's longest request, unless --max-model-len says


def test_latency_dummy_batch_counts_tied_embedding_once(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY_CONFIG))
    res = latency.main(["--dummy", "--config", str(cfg), "--device", "cpu", "--batch-size", "3", "--input-len", "20",
                        "--output-len", "4", "--num-iters", "1", "--max-num-batched-tokens", "64",
                        "--copy-bytes", str(1 << 20), "--json", str(tmp_path / "b3.json"), "--compile-mode", "default",
                        "--max-model-len", "200"])
    assert "roofline" in capsys.readouterr().out
    assert res["compile_mode"] == "default" and res["compile_seconds"] == 0.0  # CPU: no decode graphs to compile
    assert res["median"]["decode_tokens"] == 3 * 3
    assert res["max_model_len"] == 200  # as a server configures it: the decode attention's splits follow it
    with pytest.raises(SystemExit, match="max-model-len 23"):
        latency.main(["--dummy", "--config", str(cfg), "--device", "cpu", "--input-len", "20", "--output-len", "4",
                      "--num-iters", "1", "--copy-bytes", str(1 << 20), "--max-model-len", "23"])
    h, v, i = TINY_CONFIG["hidden_size"], TINY_CONFIG["vocab_size"], TINY_CONFIG["intermediate_size"]
    per_layer = (4 * 8 * h) * 2 + (2 * 8 * h) * 2 + 3 * h * i + 2 * h
    params = 2 * per_layer + h + v * h  # embedding/lm_head once
    assert res["roofline"]["weight_bytes_read_per_step"] == params * 4  # float32 on CPU
    kv_per_token = 2 * 2 * 2 * 8 * 4  # K and V, layers, kv heads, head_dim, fp32
    assert res["roofline"]["kv_bytes_read_per_step_mean"] == 3 * (20 + 4 / 2) * kv_per_token


@pytest.mark.parametrize("caching", [True, False])
def test_throughput_chats_of_several_turns(tmp_path, capsys, caching):
    """--turns: each turn's prompt extends the last turn's prompt and answer; with the cache on, the earlier
    turns (answers included) come from it, and every turn's tokens are counted."""
    from benchmarks import throughput
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY_CONFIG))
    out = tmp_path / "t.json"
    throughput.main(["--dummy", "--config", str(cfg), "--device", "cpu", "--num-requests", "3", "--turns", "3",
                     "--input-len", "20", "20", "--output-len", "12", "12", "--kv-cache-memory", "1MiB",
                     "--json", str(out), "--enable-prefix-caching" if caching else "--no-enable-prefix-caching"])
    assert "3 requests x 3 turns" in capsys.readouterr().out
    ours = json.loads(out.read_text())["ours"]
    # turn k's prompt: k * (20 + 12) + 20 tokens; 3 conversations, 3 turns
    n_in, n_out = 3 * (20 + 52 + 84), 3 * 3 * 12
    assert round(ours["total_tok_s"] * ours["elapsed_s"]) == n_in + n_out
    assert round(ours["output_tok_s"] * ours["elapsed_s"]) == n_out
    # computed before turn 2: 20 + 11 = 31 tokens (1 block of 16); before turn 3: 63 (3 blocks)
    assert ours["prefix_cache_hit_tokens"] == (3 * (16 + 48) if caching else 0)


def test_percentiles_and_arrivals():
    s = serving.stats_ms([0.001 * k for k in range(1, 101)])
    assert s["p50"] <= s["p90"] <= s["p99"] and s["mean"] == pytest.approx(50.5)
    assert serving.arrival_gaps(5, math.inf, 0) == [0.0] * 5
    gaps = serving.arrival_gaps(4000, 4.0, 0)
    assert sum(gaps) / len(gaps) == pytest.approx(0.25, rel=0.1)
    assert serving.parse_rates("1,2.5,inf") == [1.0, 2.5, math.inf]


def check_rates(res: dict, n: int, max_tokens: int, rates: list[str]) -> None:
    assert [str(r["request_rate"]) for r in res["rates"]] == rates
    for r in res["rates"]:
        assert r["completed"] == n and r["failed"] == 0, r["errors"]
        assert r["output_tokens"] == n * max_tokens and r["input_tokens"] > 0
        assert r["request_throughput"] > 0 and r["output_tok_s"] > 0
        for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
            m = r[metric]
            assert 0 < m["p50"] <= m["p90"] <= m["p99"], (metric, m)
        assert r["ttft_ms"]["p99"] <= r["e2el_ms"]["p99"]


def test_histogram_quantile_interpolates_like_prometheus():
    inf = math.inf
    buckets = [(0.001, 0.0), (0.002, 10.0), (0.004, 20.0), (inf, 20.0)]
    assert serving.histogram_quantile(0.5, buckets) == pytest.approx(0.002)  # rank 10: the top of (1, 2] ms
    assert serving.histogram_quantile(0.25, buckets) == pytest.approx(0.0015)
    assert serving.histogram_quantile(0.75, buckets) == pytest.approx(0.003)
    assert serving.histogram_quantile(0.99, [(0.001, 1.0), (inf, 5.0)]) == 0.001  # in +Inf: the last bound
    assert math.isnan(serving.histogram_quantile(0.5, [(0.001, 0.0), (inf, 0.0)]))
    before = {"decode": [(0.001, 3.0), (0.002, 5.0), (inf, 5.0)]}
    after = {"decode": [(0.001, 3.0), (0.002, 9.0), (inf, 9.0)], "prompt": [(0.001, 0.0), (inf, 0.0)]}
    got = serving.step_gap_quantiles(before, after)  # this run's 4 decode steps all in (1, 2] ms
    assert got["decode"]["steps"] == 4 and got["decode"]["p50"] == pytest.approx(1.5)
    assert got["prompt"]["steps"] == 0 and math.isnan(got["prompt"]["p99"])


def test_serving_against_live_server(tiny_llama_dir, tmp_path, capsys):
    from server.app import create_app
    from server.async_engine import AsyncEngine
    engine = AsyncEngine(EngineConfig(model=str(tiny_llama_dir), device="cpu", dtype="float32", max_num_seqs=16,
                                      kv_cache_memory="16MiB"))
    out = tmp_path / "serving.json"
    with LiveServer(create_app(engine, ServerConfig(stats_log_interval_s=0))) as srv:
        res = serving.main(["--base-url", srv.url, "--request-rates", "20,inf", "--num-prompts", "6",
                            "--input-len", "8", "24", "--max-tokens", "5", "--json", str(out)])
    table = capsys.readouterr().out
    assert "TTFT p99" in table and "ITL p50" in table
    check_rates(res, 6, 5, ["20.0", "inf"])
    assert res["server_info"]["vocab_size"] == 384
    for row in res["rates"]:  # the server's step gaps over each rate's run (not the warm-up's)
        gaps = row["engine_step_gap_ms"]
        assert set(gaps) == {"decode", "prompt"} and gaps["prompt"]["steps"] >= 1 and gaps["decode"]["steps"] >= 4
        assert 0 < gaps["decode"]["p50"] <= gaps["decode"]["p99"]
    assert "engine step gaps (ms): decode p50" in table
    assert json.loads(out.read_text())["rates"][1]["completed"] == 6


def test_serving_deals_requests_to_client_processes():
    """--client-processes 3: every request is sent once (by one of three spawned processes), on the shared
    schedule, and the merged results count them all."""
    from tests.live_server import fake_server
    with fake_server(step_delay=0.001) as srv:
        res = serving.main(["--base-url", srv.url, "--request-rates", "50", "--num-prompts", "7", "--input-len", "4",
                            "--max-tokens", "6", "--vocab-size", "200", "--client-processes", "3"])
        generated = srv.engine.stats().generation_tokens_total
    row = res["rates"][0]
    assert row["client_processes"] == 3 and 0 < row["client_cpu_busy"]
    check_rates(res, 7, 6, ["50.0"])
    assert generated == 7 * 6 + 2  # each request served once, plus the 2-token warm-up


def test_serving_launches_a_dummy_checkpoint_server(tmp_path, shakespeare_text):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY_CONFIG))
    text = tmp_path / "text.txt"
    text.write_text(shakespeare_text[:20000])
    res = serving.main(["--launch", "--dummy-checkpoint", str(cfg), "--serve-args",
                        "--device cpu --max-num-seqs 8 --http-parser h11",
                        "--request-rates", "inf", "--num-prompts", "3", "--input-len", "12", "--max-tokens", "4",
                        "--dataset", str(text), "--launch-timeout", "120", "--json", str(tmp_path / "s.json")])
    check_rates(res, 3, 4, ["inf"])
    assert res["server_info"]["vocab_size"] == TINY_CONFIG["vocab_size"]
    assert "--port" in res["serve_cmd"]
    assert res["rates"][0]["server_cpu_us_per_token"] > 0  # the launched process's CPU, per output token


def test_process_cpu_counts_this_process_and_needs_a_pid():
    import os
    before = serving.process_cpu_s(os.getpid())
    sum(k * k for k in range(3_000_000))
    assert serving.process_cpu_s(os.getpid()) > before
    assert serving.process_cpu_s(None) is None


def test_run_gpu_script_parses():
    subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "run_gpu.sh")], check=True)


def test_profile_step_smoke(tmp_path):
    """CPU: the profiler path and the table; a 1-layer model at hidden size 2,048 spends its time in matmuls."""
    from benchmarks.profile_step import main
    rows = main(["--layers", "1", "--vocab", "500", "--steps", "2", "--context", "16", "--device", "cpu",
                 "--json", str(tmp_path / "p.json")])
    assert any("linear" in r["kernel"] or "mm" in r["kernel"] for r in rows[:10])
    assert json.loads((tmp_path / "p.json").read_text())["rows"][0]["kernel"] == rows[0]["kernel"]


def test_profile_step_counts_each_kernel_once():
    """On CUDA the table's rows and total are the device's own events: an aten op that launched cuBLAS
    kernels carries their time as a "self" device time of its own in torch 2.11, and a runtime call
    (cuLaunchKernelEx) some too; counting them beside the kernels made 1.3 ms of kernels read 2.4 ms."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from benchmarks.profile_step import timed_events

    def event(key, device_type, device_us, cpu_us=1.0):
        return SimpleNamespace(key=key, device_type=device_type, device_time_total=device_us,
                               self_device_time_total=device_us, self_cpu_time_total=cpu_us)
    averages = [event("aten::mm", DeviceType.CPU, 1049.0, 30.0), event("cuLaunchKernelEx", DeviceType.CPU, 23.0, 9.0),
                event("nvjet_gate_up", DeviceType.CUDA, 406.0), event("nvjet_qkv_o", DeviceType.CUDA, 643.0),
                event("_decode_kernel", DeviceType.CUDA, 103.0), event("Memset (Device)", DeviceType.CUDA, 0.8),
                event("idle", DeviceType.CUDA, 0.0)]
    cuda = timed_events(averages, cuda=True)
    assert [(e.key, t) for e, t in cuda] == [("nvjet_qkv_o", 643.0), ("nvjet_gate_up", 406.0),
                                              ("_decode_kernel", 103.0), ("Memset (Device)", 0.8)]
    cpu = timed_events(averages, cuda=False)  # the CPU profile: each op's own CPU time
    assert [(e.key, t) for e, t in cpu][:2] == [("aten::mm", 30.0), ("cuLaunchKernelEx", 9.0)]


def test_profile_step_compiled_on_cpu(tmp_path):
    """--compile-mode profiles what inductor made of the forward: its fused C++ kernels show as such."""
    from benchmarks.profile_step import main
    rows = main(["--layers", "1", "--vocab", "500", "--steps", "2", "--context", "16", "--device", "cpu",
                 "--compile-mode", "default", "--json", str(tmp_path / "p.json")])
    assert any("Torch-Compiled Region" in r["kernel"] or "inductor" in r["kernel"].lower() for r in rows)


def test_step_overhead_host_only_on_cpu(tiny_llama_dir, tmp_path, capsys):
    """--host-only runs the engine's whole step without a model (any device): the stand-in's scripted ids
    come out as the sequences' tokens and are detokenized by the real tokenizer."""
    from benchmarks import step_overhead
    from model.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(tiny_llama_dir)
    script = step_overhead.token_script(tok, 300)
    assert len(set(script)) > 20 and max(script) < 300  # real text, inside the model's vocab
    rows = step_overhead.main(["--host-only", "--device", "cpu", "--batch-sizes", "1", "3", "5", "--steps", "6",
                               "--vocab", "300", "--tokenizer", str(tiny_llama_dir),
                               "--json", str(tmp_path / "s.json")])
    # captured sizes 1, 2, 4, 5: three rows replay the size-4 graph path
    assert [(r["batch"], r["padded"]) for r in rows] == [(1, 1), (3, 4), (5, 5)]
    assert all(r["step_us"] > 0 and r["device_us"] > 0 for r in rows)
    assert "host only (no model)" in capsys.readouterr().out
    assert json.loads((tmp_path / "s.json").read_text())["rows"][1]["padded"] == 4


def test_host_only_replay_emits_the_script(tiny_llama_dir):
    """The stand-in's logits make the engine sample the script's ids, row r offset by 97 * r."""
    import torch
    from benchmarks.step_overhead import install_host_only_replay

    class Stub:
        def __init__(self):
            self.sizes, self.logits = [1, 2], torch.zeros(2, 50)
    graphs = Stub()
    install_host_only_replay(graphs, list(range(10, 40)))
    graphs._replay[2]()
    assert graphs.logits.argmax(-1).tolist() == [11, 10 + (1 + 97) % 30]
    graphs._replay[1]()
    assert graphs.logits[:1].argmax(-1).tolist() == [12]


def test_step_overhead_through_the_async_engine(tmp_path):
    """--async-engine serves the same steps through AsyncEngine and asyncio streams."""
    from benchmarks import step_overhead
    rows = step_overhead.main(["--host-only", "--async-engine", "--device", "cpu", "--batch-sizes", "2", "--steps",
                               "20", "--vocab", "300", "--json", str(tmp_path / "a.json")])
    assert rows[0]["batch"] == 2 and rows[0]["padded"] == 2 and rows[0]["step_us"] > 0 and rows[0]["device_us"] > 0
    assert json.loads((tmp_path / "a.json").read_text())["args"]["async_engine"] is True


def test_prefill_step_times_both_cases_on_cpu(tmp_path, capsys):
    """The prompt-step benchmark runs its prompt steps to their first token, with and without running
    decodes, through the graphs' static path and eagerly, and leaves no request behind."""
    from benchmarks import prefill_step
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY_CONFIG))
    res = prefill_step.main(["--config", str(cfg), "--device", "cpu", "--prompt-len", "24", "--decodes", "3",
                             "--reps", "4", "--profile", "--json", str(tmp_path / "p.json")])
    assert list(res["cases"]) == ["prefill alone, static", "prefill + 3 decodes, static",
                                  "prefill alone, eager", "prefill + 3 decodes, eager"]
    assert sum(res["prefill_graph_replays"].values()) >= 2 * 4  # the static cases' timed steps at least
    for case in res["cases"].values():
        assert len(case["all_ms"]) == 4 and all(t > 0 for t in case["all_ms"])
        assert case["device_ms"] is None  # CPU: not measured
    assert json.loads((tmp_path / "p.json").read_text())["cases"].keys() == res["cases"].keys()
    assert "cumtime" in capsys.readouterr().out  # the cProfile table


def test_host_pack_times_both_table_sources_and_prefill_loads(tmp_path):
    from benchmarks import host_pack
    res = host_pack.main(["--repeats", "1", "--loads", "2", "--json", str(tmp_path / "h.json")])
    assert [r["blocks_per_seq"] for r in res["decode"]] == [8, 40, 125]
    assert all(r["list_us"] > 0 and r["mirror_us"] > 0 for r in res["decode"])
    assert [r["bucket"] for r in res["prefill"]] == [128, 192, 384, 2048, 1280]
    assert json.loads((tmp_path / "h.json").read_text())["prefill"][0]["load_us"] > 0
    assert [r["batch"] for r in res["sampling"]] == [64, 256]
    assert all(0 < r["penalised"] < r["batch"] and r["build_us"] > 0 for r in res["sampling"])


def test_gc_pause_measures_before_and_after_the_freeze(tmp_path):
    import gc
    from benchmarks import gc_pause
    res = gc_pause.main(["--repeats", "1", "--json", str(tmp_path / "g.json")])
    loaded, frozen = res["rows"]
    assert loaded["tracked_objects"] > 10_000 > frozen["tracked_objects"]
    assert loaded["gen2_ms"] > 0 and gc.get_freeze_count() == 0  # the process is left unfrozen


def test_gemm_shapes_on_cpu(tmp_path, capsys):
    """CPU smoke test of the per-projection GEMM table: every projection of the config at each M, the
    limit from the measured copy bandwidth, and a step's total = layers x the four per-layer ones + lm_head."""
    from benchmarks import gemm_shapes
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY_CONFIG))
    rows = gemm_shapes.main(["--config", str(cfg), "--device", "cpu", "--batch-sizes", "1", "4", "--reps", "3",
                             "--repeats", "2", "--copy-bytes", str(1 << 20), "--json", str(tmp_path / "g.json")])
    h, i, v = TINY_CONFIG["hidden_size"], TINY_CONFIG["intermediate_size"], TINY_CONFIG["vocab_size"]
    shapes = {r["projection"]: (r["k"], r["n"]) for r in rows}
    assert shapes == {"qkv": (h, (4 + 2 * 2) * 8), "o": (4 * 8, h), "gate_up": (h, 2 * i), "down": (i, h),
                      "lm_head": (h, v)}
    assert len(rows) == 10 and all(r["us"]["torch"] > 0 and r["limit_us"] > 0 for r in rows)
    saved = json.loads((tmp_path / "g.json").read_text())
    step = next(t for t in saved["steps"] if t["m"] == 4)
    per = {r["projection"]: r for r in rows if r["m"] == 4}
    want = 2 * sum(per[p]["limit_us"] for p in ("qkv", "o", "gate_up", "down")) + per["lm_head"]["limit_us"]
    assert abs(step["limit_us"] - want) < 1e-9 * want and step["best_us"] == step["us"]["torch"]
    assert "one decode step's matmuls at M=1" in capsys.readouterr().out


def test_skinny_matmul_benchmark_dry_run(tmp_path, capsys):
    """CPU smoke test of benchmarks/skinny_matmul.py's table: each projection at each row count, the peer
    and the limit (weight bytes over the measured copy bandwidth) beside ours, written to the JSON."""
    from benchmarks import skinny_matmul
    result = skinny_matmul.main(["--dry-run", "--rows", "1", "3", "--json", str(tmp_path / "s.json")])
    rows = result["rows"]
    assert [(r["kernel"], r["shape"].split()[1]) for r in rows] == [
        (k, m) for k in ("skinny qkv", "skinny gate_up (+rms_norm)", "skinny down (+silu_mul)") for m in ("M=1", "M=3")
    ] + [("skinny layer chain", "M=1"), ("decoder layer (attention)", "M=1,")]  # no PDL twins off sm_90
    chain, layer = rows[-2], rows[-1]
    assert chain["limit_us"] == pytest.approx(sum(r["limit_us"] for r in rows[:-2:2]))  # the M=1 rows' weights
    kv_bytes = 2 * skinny_matmul.CONTEXT * 1 * 16 * 4  # K and V of the tiny layer's one kv head of 16, float32
    o_bytes = 64 * 64 * 4  # the o projection TINY leaves out: hidden 64 x 4 heads of 16
    assert layer["limit_us"] == pytest.approx(chain["limit_us"] + (kv_bytes + o_bytes)
                                              / (result["copy_bandwidth_gbps"] * 1e9) * 1e6)
    n, k = 96, 64  # the tiny qkv's weight, float32
    assert rows[0]["limit_us"] == pytest.approx(n * k * 4 / (result["copy_bandwidth_gbps"] * 1e9) * 1e6)
    assert all(r["ours_us"] > 0 and r["peer_us"] > 0 for r in rows)
    assert json.loads((tmp_path / "s.json").read_text())["rows"] == rows
    assert "cuBLAS after ours" in capsys.readouterr().out


def test_skinny_matmul_benchmark_layer_computes_the_decoder_layer():
    """The whole-layer rows' GPU path (benchmarks/skinny_matmul.py's decoder_layer: our skinny kernels and the
    one-launch attention, run here by the interpreter; with PDL asked and a smaller prefetch too) computes what
    the reference layer computes from the same inputs: a layer whose outputs were wired wrong times nothing."""
    import torch
    from benchmarks import skinny_matmul
    from benchmarks.kernels import Bench
    from kernels.pdl import interpreting
    assert interpreting()
    from kernels.skinny_matmul import EarlyLaunch
    outputs = []
    reference, kernels = Bench("cpu", torch.float32, True), Bench("cpu", torch.float32, False)
    for bench, kw in ((reference, {"pdl": False}), (kernels, {"pdl": False}), (kernels, {"pdl": False, "cublas": True}),
                      (kernels, {"pdl": EarlyLaunch(4096)}), (kernels, {"pdl": EarlyLaunch(4096, early_trigger=True)})):
        torch.manual_seed(3)  # the same weights, inputs and cache in each
        outputs.append(skinny_matmul.decoder_layer(bench, "tiny", skinny_matmul.TINY["tiny"], **kw)())
    assert outputs[0].shape == (1, 64) and outputs[0].abs().sum() > 0
    for got in outputs[1:]:
        torch.testing.assert_close(got, outputs[0], atol=1e-4, rtol=1e-4)


def test_host_speed_measures_each_case(tmp_path):
    """The host calibration (benchmarks/host_speed.py): every case measured, positive, min <= median <= max."""
    from benchmarks import host_speed
    rows = host_speed.main(["--repeats", "2", "--json", str(tmp_path / "h.json")])
    assert [r["case"] for r in rows] == ["python_loop", "thread_wake", "process_pipe"]
    assert all(0 < r["min"] <= r["median"] <= r["max"] for r in rows)
    assert json.loads((tmp_path / "h.json").read_text())["rows"] == rows


def test_run_gpu_steps_match_the_documented_names():
    """The header's list of step names (what SKIP takes), the steps the script runs, and every name a SKIP in
    benchmarks/README.md's call plan uses are the same set: a renamed step cannot silently stop being skipped."""
    import re
    script = (REPO / "benchmarks" / "run_gpu.sh").read_text()
    listed = set(re.search(r"# step names: ([a-z0-9_ ]+)\)", script).group(1).split())
    run = set(re.findall(r"(?:^|\|\| |STEP_RESERVE=0 )\s*step ([a-z0-9_]+) ", script, flags=re.M))
    assert run == listed
    plan = (REPO / "benchmarks" / "README.md").read_text()
    skipped = {name for skip in re.findall(r'SKIP="([^"]+)"', plan) for name in skip.split()}
    assert skipped and skipped <= listed, skipped - listed


def test_throughput_with_a_share_of_penalized_requests(tmp_path, capsys):
    """--penalized-fraction: that share of the requests (seeded draw) samples with a frequency penalty; with
    --temperature / --top-p every request samples; each still generates exactly its drawn length."""
    from benchmarks import throughput
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY_CONFIG))
    out = tmp_path / "p.json"
    throughput.main(["--dummy", "--config", str(cfg), "--device", "cpu", "--num-requests", "12",
                     "--input-len", "8", "20", "--output-len", "4", "12", "--kv-cache-memory", "1MiB",
                     "--penalized-fraction", "0.5", "--temperature", "0.8", "--top-p", "0.9", "--json", str(out)])
    assert "requests with a penalty" in capsys.readouterr().out
    ours = json.loads(out.read_text())["ours"]
    assert 0 < ours["penalized_requests"] < 12
    assert ours["overlapped_steps"] == ours["deferred_sampling_steps"] == 0  # CPU: no graphs, nothing overlaps


def test_sampler_cost_times_the_sort_and_the_cut(tiny_llama_dir, tmp_path):
    from benchmarks import sampler_cost
    rows = sampler_cost.main(["--model", str(tiny_llama_dir), "--batch-sizes", "3", "--context", "8",
                              "--repeats", "1", "--json", str(tmp_path / "s.json")])
    assert [r["setting"] for r in rows] == list(sampler_cost.SETTINGS)
    assert all(r["sort_ms"] > 0 and r["now_ms"] > 0 and r["sort_rows"] == 0 for r in rows)
    assert json.loads((tmp_path / "s.json").read_text())["vocab"] > 0


def test_stream_parse_cost_times_parsed_and_plain_replies(tmp_path):
    from benchmarks import stream_parse_cost
    rows = stream_parse_cost.main(["--deltas", "40", "--json", str(tmp_path / "p.json")])
    assert [r["deltas"] for r in rows] == [40] and all(v > 0 for v in rows[0].values())
    assert json.loads((tmp_path / "p.json").read_text())["rows"] == rows
    text = "".join(stream_parse_cost.deltas(6))
    assert text == "the cat sat </think>\nthe cat sat "  # reasoning, the end marker, the answer


def test_speculative_benchmark_compares_drafts_with_transformers(tiny_llama_dir, tmp_path):
    """Ours with and without drafts and transformers with and without prompt lookup, on one workload; greedy
    tokens must be the same in every setting, whatever the speed."""
    from benchmarks import speculative
    rows = speculative.main(["--model", str(tiny_llama_dir), "--workloads", "copy", "--num-prompts", "1",
                             "--max-new-tokens", "6", "--num-speculative-tokens", "2",
                             "--json", str(tmp_path / "s.json")])
    runs = [(r["engine"], r["k"]) for r in rows]
    assert runs == [("ours", 0), ("ours", 2), ("transformers", 0), ("transformers", 2), ("ours vs transformers", 0)]
    assert all(r["same_tokens"] for r in rows)
    assert all(r["tok_s"] > 0 and r["speedup"] > 0 for r in rows[:4])
    assert rows[1]["drafted"] >= rows[1]["accepted"] >= 0 and rows[1]["tokens_per_step"] >= 1
    assert json.loads((tmp_path / "s.json").read_text())["rows"][0]["workload"] == "copy"


def test_speculative_benchmark_json_workload_drafts_forced_tokens(tiny_llama_dir, tmp_path):
    """The JSON-schema workload: ours only (transformers has no grammars), the same tokens with drafts, and
    forced tokens kept (the tiny model's byte-level vocabulary makes most of an object's tokens forced)."""
    from benchmarks import speculative
    rows = speculative.main(["--model", str(tiny_llama_dir), "--workloads", "json", "--num-prompts", "1",
                             "--max-new-tokens", "24", "--num-speculative-tokens", "4",
                             "--json", str(tmp_path / "s.json")])
    assert [(r["engine"], r["k"]) for r in rows] == [("ours", 0), ("ours", 4)]
    assert rows[1]["same_tokens"] and rows[1]["accepted"] > 0 and rows[1]["tokens_per_step"] > 1
    assert len(rows[1]["kept_by_position"]) == 4 and sum(rows[1]["kept_by_position"]) == rows[1]["accepted"]


def test_throughput_cpu_preset_compares_with_transformers(tiny_llama_dir, tmp_path, capsys):
    """--preset cpu (here on the tiny model, --quick): the workload against transformers' generate and its
    continuous batching, and batch 1 as the median of three fresh prompts with the engines taking turns."""
    from benchmarks import throughput
    throughput.main(["--preset", "cpu", "--model", str(tiny_llama_dir), "--quick", "--json", str(tmp_path / "t.json")])
    cmp = json.loads((tmp_path / "t.json").read_text())["compare"]
    assert cmp["hf_generate"]["output_tok_s"] > 0 and cmp["ours_batch1_tok_s"] > 0 and cmp["hf_batch1_tok_s"] > 0
    assert len(cmp["batch1_prompt_lens"]) == 3
    assert "batch-1 decode tok/s (median of 3)" in capsys.readouterr().out


def test_priority_benchmark_lets_interactive_requests_jump_the_queue(tiny_llama_dir, tmp_path):
    """Counted in engine steps, not timed: under fcfs the interactive requests wait behind the batch queue;
    under priority each takes a slot at once. Greedy tokens must not depend on the policy."""
    from benchmarks import priority
    rows = priority.main(["--model", str(tiny_llama_dir), "--max-num-seqs", "2", "--batch", "4",
                          "--batch-prompt", "12", "--batch-output", "12", "--interactive", "2",
                          "--interactive-prompt", "6", "--interactive-output", "3", "--first-arrival", "2",
                          "--every", "3", "--kv-cache-memory", "2MiB", "--json", str(tmp_path / "p.json")])
    fcfs, prio = rows
    assert (fcfs["policy"], prio["policy"]) == ("fcfs", "priority") and fcfs["same_tokens"]
    assert fcfs["preemptions"] == 0 and prio["preemptions"] >= 1
    assert prio["ttft_max_steps"] <= 2 < fcfs["ttft_p50_steps"]
    assert json.loads((tmp_path / "p.json").read_text())["rows"][1]["policy"] == "priority"
