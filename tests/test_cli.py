"""`gqa-serve generate` / `fetch-model` as a user runs them: JSON lines, greedy tokens, one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from server.cli import main
from tests.tiny_models import load_hf_model


def test_generate_json_lines_are_greedy_transformers_tokens(tiny_llama_dir, capsys):
    prompts = ["First Citizen:", "ROMEO: what"]
    assert main(["generate", "--model", str(tiny_llama_dir), "--prompt", prompts[0], "--prompt", prompts[1],
                 "--max-new-tokens", "10", "--ignore-eos", "--json", "--device", "cpu"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2
    hf = load_hf_model(tiny_llama_dir)
    for line in lines:
        assert set(line) == {"text", "prompt_token_ids", "token_ids", "finish_reason"}
        assert line["finish_reason"] == "length" and len(line["token_ids"]) == 10
        with torch.no_grad():
            ref = hf.generate(torch.tensor([line["prompt_token_ids"]]), max_new_tokens=10, min_new_tokens=10,
                              do_sample=False, eos_token_id=None, pad_token_id=0)
        assert line["token_ids"] == ref[0, len(line["prompt_token_ids"]):].tolist()


def test_generate_reports_effective_num_kv_heads(tiny_llama_dir, capsys, caplog):
    caplog.set_level("INFO")
    assert main(["generate", "--model", str(tiny_llama_dir), "--prompt", "a", "--max-new-tokens", "2",
                 "--num-kv-heads", "1", "--device", "cpu"]) == 0
    assert "num_kv_heads=1 (checkpoint 2)" in caplog.text


@pytest.mark.parametrize("args, reason", [
    (["--max-new-tokens", "0"], "max_new_tokens: Input should be greater than or equal to 1"),
    (["--num-kv-heads", "3"], "num_kv_heads=3"),
    (["--dtype", "float64"], "invalid choice: 'float64'"),
    (["--temperature", "-1"], "temperature"),
])
def test_bad_arguments_exit_nonzero_with_one_line(tiny_llama_dir, args, reason):
    proc = subprocess.run([sys.executable, "-m", "server.cli", "generate", "--model", str(tiny_llama_dir),
                           "--prompt", "hi", "--device", "cpu", *args], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and reason in errors[0], proc.stderr


def test_missing_model_dir_is_named(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_unusable_device_and_unreadable_files_are_one_line(tiny_llama_dir, tmp_path, capsys):
    """They were tracebacks: torch's CUDA assertion deep in a load, and an IsADirectoryError."""
    import torch
    if not torch.cuda.is_available():
        assert main(["generate", "--model", str(tiny_llama_dir), "--prompt", "hi", "--device", "cuda"]) == 2
        assert "device: cuda was asked for, but torch sees no CUDA device" in capsys.readouterr().err
    assert main(["kv-report", "--model", str(tiny_llama_dir), "--text", str(tmp_path), "--device", "cpu"]) == 2
    assert "Is a directory" in capsys.readouterr().err


def test_fetch_model_prints_the_cached_directory(smollm2_dir, capsys):
    assert main(["fetch-model", "smollm2-135m", "--cache-dir", str(smollm2_dir.parent)]) == 0
    assert capsys.readouterr().out.strip() == str(smollm2_dir)
    assert main(["fetch-model", "no-such-model", "--cache-dir", str(smollm2_dir.parent)]) == 2
