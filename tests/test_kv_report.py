"""`kv-report` on the tiny model (JSON rows, table, plot), the strided perplexity it is built on (checked
against transformers' loss), and the KV cache dtypes it measures."""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from model.kv_dtype import resolve_kv_cache_dtype
from model.llama import load_model
from model.perplexity import greedy_agreement, greedy_generate, perplexity, strided_windows
from server.kv_report import add_kv_report_arguments, format_table, run_kv_report
from tests.tiny_models import load_hf_model

FIELDS = {"method", "num_kv_heads", "native", "kv_cache_dtype", "kv_bytes_per_token", "capacity_tokens",
          "capacity_seqs", "perplexity", "greedy_agreement", "calibration_loss_ratio"}


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_kv_report_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory, shakespeare_text):
    path = tmp_path_factory.mktemp("text") / "shakespeare.txt"
    path.write_text(shakespeare_text[:12_000])
    return path


def test_kv_report_json_and_plot(tiny_llama_dir, text_file, tmp_path, capsys):
    png = tmp_path / "plot" / "kv.png"
    args = _parse(["--model", str(tiny_llama_dir), "--text", str(text_file), "--max-tokens", "160",
                   "--window", "64", "--stride", "32", "--calibration-tokens", "256", "--num-prompts", "2",
                   "--greedy-tokens", "4", "--kv-cache-memory", "1MiB", "--max-model-len", "256",
                   "--json", "--plot", str(png), "--no-progress"])
    assert run_kv_report(args) == 0
    rows = json.loads(capsys.readouterr().out)
    assert all(FIELDS <= set(r) for r in rows)
    # tiny model: 4 query heads, 2 kv heads -> valid counts 1, 2, 4
    mean = {r["num_kv_heads"]: r for r in rows if r["method"] == "mean" and r["kv_cache_dtype"] == "float32"}
    assert sorted(mean) == [1, 2, 4]
    assert [r["num_kv_heads"] for r in rows if r["method"] == "refit"] == [1]
    assert sorted(r["kv_cache_dtype"] for r in rows if r["num_kv_heads"] == 2) == [
        "bfloat16", "float16", "float32", "fp8_e4m3"]
    for r in rows:
        assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1
        assert 0.0 <= r["greedy_agreement"] <= 1.0
    native = mean[2]
    assert native["native"] and native["greedy_agreement"] == 1.0
    # 2 layers x K,V x heads x head_dim 16 x 4 bytes; capacity in whole 16-token blocks of 1 MiB
    assert [mean[n]["kv_bytes_per_token"] for n in (1, 2, 4)] == [256, 512, 1024]
    assert [mean[n]["capacity_tokens"] for n in (1, 2, 4)] == [4096, 2048, 1024]
    assert [mean[n]["capacity_seqs"] for n in (1, 2, 4)] == [16, 8, 4]
    assert mean[4]["perplexity"] == pytest.approx(native["perplexity"], rel=1e-5)  # replication is exact
    fp8 = next(r for r in rows if r["kv_cache_dtype"] == "fp8_e4m3")
    assert fp8["kv_bytes_per_token"] == 128 and fp8["capacity_tokens"] == 8192
    refit = next(r for r in rows if r["method"] == "refit")
    assert 0 < refit["calibration_loss_ratio"] <= 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_kv_report_table_and_bad_counts(tiny_llama_dir, text_file, capsys):
    base = ["--model", str(tiny_llama_dir), "--text", str(text_file), "--max-tokens", "64", "--window", "32",
            "--stride", "32", "--methods", "mean", "--kv-cache-dtypes", "", "--greedy-tokens", "2",
            "--no-progress"]
    assert run_kv_report(_parse(base + ["--num-kv-heads", "1"])) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| method | kv heads | KV dtype | KV bytes/token")
    assert len(out) == 4 and out[2].startswith("| mean | 1 | float32 |") and "| 2 (native) |" in out[3]
    with pytest.raises(ValueError, match=r"valid values: \[1, 2, 4\]"):
        run_kv_report(_parse(base + ["--num-kv-heads", "3"]))
    with pytest.raises(SystemExit):
        _parse(base + ["--methods", "median"])


@pytest.mark.parametrize("flags, message", [
    (["--block-size", "0"], "--block-size must be positive, got 0"),
    (["--max-model-len", "-5"], "--max-model-len must be positive, got -5"),  # was a negative capacity
    (["--window", "600", "--stride", "32"], "--window 600 exceeds the model's context of 512 tokens"),
    (["--greedy-tokens", "500"], r"--greedy-tokens 500 after \d+-token prompts exceeds the model.s context of 512"),
])
def test_kv_report_refuses_arguments_the_model_cannot_run(tiny_llama_dir, text_file, flags, message):
    base = ["--model", str(tiny_llama_dir), "--text", str(text_file), "--max-tokens", "64", "--window", "32",
            "--stride", "32", "--methods", "mean,refit", "--kv-cache-dtypes", "", "--no-progress"]
    with pytest.raises(ValueError, match=message):
        run_kv_report(_parse(base + flags))


def test_format_table_marks_native_and_ratio():
    from server.kv_measure import KVReportRow
    rows = [KVReportRow("mean", 3, True, "float32", 46080, 23296, 2, 41.3, 1.0),
            KVReportRow("refit", 1, False, "float32", 15360, 69904, 8, 115.7, 0.25, 0.046)]
    table = format_table(rows)
    assert "| mean | 3 (native) | float32 | 46,080 | 23,296 | 2 | 41.300 | 100.0% |  |" in table
    assert "| refit | 1 | float32 | 15,360 | 69,904 | 8 | 115.700 | 25.0% | 0.046 |" in table


# --- the measurements underneath --------------------------------------------------------------------

@pytest.mark.parametrize("n, window, stride", [(100, 32, 16), (64, 64, 64), (65, 64, 32), (10, 4, 3), (2, 8, 8)])
def test_strided_windows_score_every_token_once(n, window, stride):
    windows = strided_windows(n, window, stride)
    scored = [t for w in windows for t in range(w.score_from, w.end)]
    assert scored == list(range(1, n))
    assert all(w.end - w.begin <= window and w.score_from > w.begin for w in windows)


def test_perplexity_matches_transformers_strided_recipe(tiny_llama_dir):
    """HF's recipe: labels of the already-scored prefix set to -100, loss averaged over the rest."""
    hf = load_hf_model(tiny_llama_dir)
    model = load_model(tiny_llama_dir)
    ids = torch.randint(3, 384, (90,), generator=torch.Generator().manual_seed(0)).tolist()
    nll_sum, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), 24):
        end = min(begin + 40, len(ids))
        inputs = torch.tensor([ids[begin:end]])
        labels = inputs.clone()
        labels[:, :-(end - prev_end)] = -100
        with torch.no_grad():
            loss = hf(inputs, labels=labels).loss
        scored = int((labels[:, 1:] != -100).sum())
        nll_sum += float(loss) * scored
        count += scored
        prev_end = end
        if end == len(ids):
            break
    result = perplexity(model, ids, window=40, stride=24)
    assert result.num_scored == count == len(ids) - 1
    assert result.perplexity == pytest.approx(math.exp(nll_sum / count), rel=1e-4)


@pytest.mark.parametrize("name", ["bfloat16", "float16", "fp8_e4m3"])
def test_narrow_kv_cache_dtypes_run_and_stay_close(tiny_llama_dir, name):
    model = load_model(tiny_llama_dir)
    ids = torch.randint(3, 384, (48,), generator=torch.Generator().manual_seed(1)).tolist()
    dtype = resolve_kv_cache_dtype(name, torch.float32)
    full = perplexity(model, ids, window=32, stride=16).perplexity
    narrow = perplexity(model, ids, window=32, stride=16, kv_cache_dtype=dtype).perplexity
    assert math.isfinite(narrow) and narrow == pytest.approx(full, rel=0.1)
    ref = greedy_generate(model, [ids[:8], ids[8:13]], 6)
    out = greedy_generate(model, [ids[:8], ids[8:13]], 6, kv_cache_dtype=dtype)
    assert len(out) == 2 and all(len(o) == 6 for o in out)
    assert 0.0 <= greedy_agreement(ref, out) <= 1.0
    assert resolve_kv_cache_dtype("auto", torch.bfloat16) == torch.bfloat16
    with pytest.raises(ValueError, match="fp8_e5m2"):
        resolve_kv_cache_dtype("fp8_e5m2", torch.float32)


def test_greedy_generate_matches_paged_runner(tiny_llama_dir):
    from tests.test_model import PagedRunner
    model = load_model(tiny_llama_dir)
    prompts = [[1, 17, 42, 99, 5], [1, 250, 33]]
    batched = greedy_generate(model, prompts, 7)
    assert batched == [PagedRunner(model).greedy(p, 7) for p in prompts]
