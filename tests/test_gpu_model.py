"""The default model on CUDA: the Triton kernels with CUDA graphs against the torch reference path.

Greedy decoding of SmolLM2-135M for 64 tokens must give the same tokens on both paths (issue 7): exactly in
float32; in bfloat16 up to exact logit ties (see the test). The torch
path is kernels/reference.py under the same model code, run eagerly; the Triton path is what `serve` runs.
Skipped without CUDA (CI has none); the CPU equivalents are in test_model.py and test_kernels.py.
"""
from __future__ import annotations

import gc

import pytest
import torch

from server.llm import LLM
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


def greedy_run(model_dir, backend: str, dtype: str, enforce_eager: bool, kv_cache_dtype: str = "auto",
               num_speculative_tokens: int = 0, decode_fusion: bool = False, skinny_matmul: bool = False,
               skinny_matmul_pdl: bool = False):
    gc.collect()
    torch.cuda.empty_cache()
    llm = LLM(str(model_dir), device="cuda", dtype=dtype, attention_backend=backend, enforce_eager=enforce_eager,
              gpu_memory_utilization=0.1, max_num_seqs=16, max_model_len=2048, kv_cache_dtype=kv_cache_dtype,
              num_speculative_tokens=num_speculative_tokens, decode_fusion=decode_fusion,
              skinny_matmul=skinny_matmul, skinny_matmul_pdl=skinny_matmul_pdl)
    params = SamplingParams(temperature=0.0, max_new_tokens=64, ignore_eos=True, logprobs=2)
    results = llm.generate(PROMPTS, params)
    runner = llm.engine.runner
    replays = sum(sum(g.replays.values()) for g in (runner.graphs, runner.prefill_graphs) if g is not None)
    prompt_steps = sum(runner.prefill_graphs.replays.values()) if runner.prefill_graphs is not None else 0
    accepted = llm.engine.counters.accepted_draft_tokens
    del llm, runner
    assert not num_speculative_tokens or accepted > 0, "no draft was ever kept"
    assert enforce_eager or prompt_steps > 0, "the prompt step never replayed a prefill graph"
    return results, replays


@gpu
@pytest.mark.parametrize("decode_fusion, skinny_matmul", [(False, False), (True, False), (True, True)],
                         ids=["", "decode-fusion", "decode-fusion-skinny-matmul"])
def test_gpu_greedy_default_model_triton_equals_torch_float32(smollm2_dir, decode_fusion, skinny_matmul):
    """float32: the two paths agree to ~1e-6, far below any logit gap greedy decoding meets here (also with
    a decode step's attention as one launch, EngineConfig.decode_fusion, and the projections of steps of
    up to 16 tokens on our kernel, EngineConfig.skinny_matmul)."""
    want, _ = greedy_run(smollm2_dir, "torch", "float32", enforce_eager=True)
    got, replays = greedy_run(smollm2_dir, "triton", "float32", enforce_eager=False,
                              decode_fusion=decode_fusion, skinny_matmul=skinny_matmul)
    assert replays > 0, "the Triton run never replayed a CUDA graph"
    for i, (g, w) in enumerate(zip(got, want)):
        assert len(g.token_ids) == 64
        assert g.token_ids == w.token_ids, f"prompt {i} ({PROMPTS[i]!r})"


@gpu
@pytest.mark.parametrize("skinny_matmul", [False, True], ids=["", "skinny-matmul"])
def test_gpu_greedy_default_model_triton_vs_torch_bfloat16(smollm2_dir, skinny_matmul):
    """bfloat16: logits are rounded to bf16 (a step of 0.125 between 16 and 32), so two tokens can tie exactly and
    either path may take either. Each prompt must agree up to its first divergence, and that divergence must
    be such a tie: the torch path's two best logprobs within 2 bf16 steps of a logit in [16, 32) (0.25), and
    the Triton path's token one of them. (A kernel bug shows up as a divergence at a wide gap.) Also with
    the projections of small steps on our kernel (EngineConfig.skinny_matmul)."""
    want, _ = greedy_run(smollm2_dir, "torch", "bfloat16", enforce_eager=True)
    got, replays = greedy_run(smollm2_dir, "triton", "bfloat16", enforce_eager=False, skinny_matmul=skinny_matmul)
    assert replays > 0, "the Triton run never replayed a CUDA graph"
    whole = assert_equal_up_to_ties(got, want, max_gap=0.25)
    # H100, 2026-11-23: 3 of 8 prompts equal throughout; the other 5 part at gaps of 0, 0.0625 and 0.125
    # (one bf16 step of a logit in [16, 32)), each to the torch path's second choice.
    print(f"bfloat16: {whole}/{len(PROMPTS)} prompts equal for all 64 tokens")


@gpu
@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (9, 0),
                    reason="programmatic dependent launch needs sm_90+")
def test_gpu_skinny_matmul_pdl_changes_no_token_or_logprob_bfloat16(smollm2_dir):
    """EngineConfig.skinny_matmul_pdl launches the same kernels early inside the CUDA graphs, each waiting on
    the one before it for its input: the arithmetic is unchanged, so every token and every top logprob equals
    the run without it, bit for bit (a missing wait would read a half-written x or residual)."""
    want, _ = greedy_run(smollm2_dir, "triton", "bfloat16", enforce_eager=False, skinny_matmul=True)
    got, replays = greedy_run(smollm2_dir, "triton", "bfloat16", enforce_eager=False, skinny_matmul=True,
                              skinny_matmul_pdl=True)
    assert replays > 0, "the Triton run never replayed a CUDA graph"
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.token_ids == w.token_ids, f"prompt {i} ({PROMPTS[i]!r})"
        assert [lp.top for lp in g.logprobs] == [lp.top for lp in w.logprobs], f"prompt {i} ({PROMPTS[i]!r})"


@gpu
def test_gpu_greedy_default_model_fp8_kv_cache_triton_vs_torch(smollm2_dir):
    """kv_cache_dtype fp8_e4m3 (float32 model): both paths round K/V to fp8 the same way (nearest even) and
    the kernels widen them exactly, but the float32 K/V they round differ in the last bit (fused RoPE vs torch's
    three ops, cuBLAS's kernel per batch shape), and a value that sits on a rounding midpoint then lands a
    whole fp8 step (1/16 of it) apart. Each prompt must agree up to a divergence at a gap under 0.1 in
    logprob (H100, 2026-11-24: one prompt parted at 0.016); a kernel that misreads the cache parts at once
    and wide."""
    want, _ = greedy_run(smollm2_dir, "torch", "float32", enforce_eager=True, kv_cache_dtype="fp8_e4m3")
    got, replays = greedy_run(smollm2_dir, "triton", "float32", enforce_eager=False, kv_cache_dtype="fp8_e4m3")
    assert replays > 0, "the Triton run never replayed a CUDA graph"
    whole = assert_equal_up_to_ties(got, want, max_gap=0.1)
    print(f"fp8 KV cache: {whole}/{len(PROMPTS)} prompts equal for all 64 tokens")


@gpu
def test_gpu_greedy_default_model_with_drafts_equals_torch_float32(smollm2_dir):
    """n-gram drafts (server/speculative.py) verified through the prefill graphs (a logits row per draft):
    float32, so the tokens equal the torch path's plain greedy ones exactly."""
    want, _ = greedy_run(smollm2_dir, "torch", "float32", enforce_eager=True)
    got, replays = greedy_run(smollm2_dir, "triton", "float32", enforce_eager=False, num_speculative_tokens=4)
    assert replays > 0
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.token_ids == w.token_ids, f"prompt {i} ({PROMPTS[i]!r})"


def assert_equal_up_to_ties(got, want, max_gap: float) -> int:
    """Each prompt agrees up to its first divergence, where the torch path's two best logprobs are within
    max_gap and the Triton path took one of them; returns how many prompts agree throughout."""
    whole, wide = 0, []
    for i, (g, w) in enumerate(zip(got, want)):  # every prompt's divergence printed before any assertion
        assert len(g.token_ids) == 64
        first = next((j for j, (a, b) in enumerate(zip(g.token_ids, w.token_ids)) if a != b), None)
        if first is None:
            whole += 1
            continue
        (top1, lp1), (top2, lp2) = w.logprobs[first].top[:2]
        print(f"prompt {i}: diverges at token {first}: torch top-2 {top1} {lp1:.4f}, {top2} {lp2:.4f}; "
              f"triton took {g.token_ids[first]}")
        if lp1 - lp2 > max_gap or g.token_ids[first] not in (top1, top2):
            wide.append(f"prompt {i} ({PROMPTS[i]!r}) at token {first}, gap {lp1 - lp2:.4f}")
    assert not wide, f"divergences without a near-tie (> {max_gap}): {wide}"
    return whole


@gpu
@pytest.mark.parametrize("decode_fusion", [False, True], ids=["", "decode-fusion"])
def test_gpu_greedy_tiny_qwen3_triton_equals_torch_float32(tmp_path_factory, decode_fusion):
    """Qwen3's q/k norm inside the RoPE + cache-write kernel (decode_fusion on or off: its decode steps keep
    that kernel) on CUDA, with graphs, against the torch path: the same 64 greedy tokens in float32 (a random
    tiny model; no real Qwen3 checkpoint can be fetched here)."""
    from tests.tiny_models import make_tiny_checkpoint
    model_dir = make_tiny_checkpoint(tmp_path_factory.mktemp("qwen3_gpu"), architecture="Qwen3ForCausalLM",
                                     head_dim=64, hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
                                     max_position_embeddings=4096, random_norms=True)
    want, _ = greedy_run(model_dir, "torch", "float32", enforce_eager=True)
    got, replays = greedy_run(model_dir, "triton", "float32", enforce_eager=False, decode_fusion=decode_fusion)
    assert replays > 0
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
