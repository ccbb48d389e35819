"""The default model on CUDA: the Triton kernels with CUDA graphs against the torch reference path.

Greedy decoding of SmolLM2-135M for 64 tokens must give the same tokens on both paths (issue 7). The torch
path is kernels/reference.py under the same model code, run eagerly; the Triton path is what `serve` runs.
Skipped without CUDA (CI has none); the CPU equivalents are in test_model.py and test_kernels.py.
"""
from __future__ import annotations

import gc

import pytest
import torch

from server.engine import LLM
from server.sampling_params import SamplingParams

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "Explain grouped-query attention in one paragraph.",
    "1, 2, 3, 4,",
    "Once upon a time",
    "The three laws of thermodynamics are",
]


def greedy_tokens(model_dir, backend: str, dtype: str, enforce_eager: bool) -> tuple[list[list[int]], int]:
    gc.collect()
    torch.cuda.empty_cache()
    llm = LLM(str(model_dir), device="cuda", dtype=dtype, attention_backend=backend, enforce_eager=enforce_eager,
              gpu_memory_utilization=0.1, max_num_seqs=16, max_model_len=2048)
    params = SamplingParams(temperature=0.0, max_new_tokens=64, ignore_eos=True)
    tokens = [r.token_ids for r in llm.generate(PROMPTS, params)]
    graphs = llm.engine.runner.graphs
    replays = sum(graphs.replays.values()) if graphs is not None else 0
    del llm
    return tokens, replays


@gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gpu_greedy_default_model_triton_equals_torch(smollm2_dir, dtype):
    want, _ = greedy_tokens(smollm2_dir, "torch", dtype, enforce_eager=True)
    got, replays = greedy_tokens(smollm2_dir, "triton", dtype, enforce_eager=False)
    assert replays > 0, "the Triton run never replayed a CUDA graph"
    assert all(len(t) == 64 for t in got)
    for i, (g, w) in enumerate(zip(got, want)):
        first = next((j for j, (a, b) in enumerate(zip(g, w)) if a != b), None)
        assert first is None, f"prompt {i} ({PROMPTS[i]!r}) diverges at token {first}: {g[first:first + 5]} vs " \
                              f"{w[first:first + 5]}"
