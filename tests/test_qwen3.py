"""Qwen3 (LLaMA's layout plus an RMSNorm over each head's q and k before RoPE) against transformers: the model
through our Triton kernels, the whole engine's greedy tokens, and the KV-head knob (replication exact, mean
pooling served, refit refused by name). The torch path's prefill, decode and greedy checks are variants of
tests/test_model.py."""
from __future__ import annotations

import pytest
import torch

from model.llama import load_model
from tests.test_model import TOL, PagedRunner
from tests.tiny_models import load_hf_model, make_tiny_checkpoint


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    # head_dim 32 over hidden 64 with 4 heads (Qwen3 sets head_dim apart from hidden / heads); attention_bias
    # covers all four projections in Qwen3, o_proj included (Qwen2 has none there)
    # rms_norm_eps 0.05: large enough that the q/k norms reading another eps would show
    return make_tiny_checkpoint(tmp_path_factory.mktemp("qwen3"), architecture="Qwen3ForCausalLM", head_dim=32,
                                num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                                random_norms=True, rms_norm_eps=0.05)


def test_config_and_weights_load_the_norms(qwen3_dir):
    model = load_model(qwen3_dir)
    attn = model.model.layers[1].self_attn
    assert model.config.qk_norm and attn.o_proj.bias is not None
    assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (32,)
    assert not torch.equal(attn.q_norm.weight, attn.k_norm.weight)  # random, so a swap would show


@pytest.mark.parametrize("backend", ["torch", "triton", "triton-decode-fusion", "triton-skinny"])
def test_prefill_and_decode_match_transformers(qwen3_dir, backend, monkeypatch):
    """The torch ops norm q and k apart; the Triton ones inside the RoPE + cache-write kernel, also with
    decode_fusion on (whose one-launch decode kernel has no norm: such steps keep the two launches), and
    with skinny_matmul (the q/k/v and o biases added in the kernel)."""
    if backend != "torch":
        pytest.importorskip("kernels.dispatch")
    hf, model = load_hf_model(qwen3_dir), load_model(qwen3_dir, attention_backend=backend.split("-")[0])
    model.ops.decode_fusion = backend.endswith("fusion")
    model.ops.skinny_matmul = backend.endswith("skinny")
    if model.ops.skinny_matmul:
        from tests.test_kernel_skinny_matmul import count_calls
        calls = count_calls(model.ops, monkeypatch)
    if model.ops.decode_fusion:  # the one-launch decode kernel would skip the norm
        model.ops._decode_rotary = lambda *a, **k: pytest.fail("a q/k-norm model took the fused decode kernel")
    tokens = torch.randint(3, model.config.vocab_size, (1, 19), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = hf(tokens).logits[0]
    runner, table = PagedRunner(model, seed=5), []
    prefill = runner.step([(tokens[0, :11].tolist(), 0, table)], all_logits=True)
    assert (prefill - ref[:11]).abs().max() < TOL
    for pos in range(11, tokens.shape[1]):
        logits = runner.step([([int(tokens[0, pos])], pos, table)])
        assert (logits[0] - ref[pos]).abs().max() < TOL, f"decode position {pos}"
    if model.ops.skinny_matmul:  # every step (11 rows at most) projected with the kernel, biases included:
        # norm + qkv, o, norm + gate_up, SiLU's kernel then down (silu_mul_linear calls skinny_linear) a layer
        assert len(calls) == (1 + tokens.shape[1] - 11) * (5 * model.config.num_hidden_layers + 1)


def test_engine_greedy_tokens_equal_transformers(qwen3_dir):
    from server.llm import LLM
    from server.sampling_params import SamplingParams
    hf = load_hf_model(qwen3_dir)
    prompts = [[1, 17, 42, 99, 5, 250, 33], [1, 8, 9, 300, 12, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55]]
    llm = LLM(str(qwen3_dir), dtype="float32", device="cpu", kv_cache_memory="2MiB", max_num_batched_tokens=16)
    params = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)
    got = [r.token_ids for r in llm.generate(prompts, params)]
    for prompt, tokens in zip(prompts, got):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, min_new_tokens=20,
                              eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert tokens == ref


def test_kv_heads_replicate_exactly_pool_by_mean_and_refuse_refit(qwen3_dir):
    from model.kv_refit import load_refit_model
    prompt = [1, 17, 42, 99, 5, 250, 33, 8]
    native = PagedRunner(load_model(qwen3_dir)).step([(prompt, 0, [])], all_logits=True)
    wide = PagedRunner(load_model(qwen3_dir, num_kv_heads=4)).step([(prompt, 0, [])], all_logits=True)
    assert (wide - native).abs().max() < TOL  # replication: exact, the shared k_norm included
    pooled_model = load_model(qwen3_dir, num_kv_heads=1)
    assert pooled_model.config.num_kv_heads == 1
    pooled = PagedRunner(pooled_model).step([(prompt, 0, [])], all_logits=True)
    assert torch.isfinite(pooled).all() and (pooled - native).abs().max() > 100 * TOL  # served, approximately
    with pytest.raises(ValueError, match="refit' cannot pool Qwen3ForCausalLM.*use kv_head_method='mean'"):
        load_refit_model(qwen3_dir, 1, list(range(3, 200)))


def test_kv_report_measures_mean_pooling_only(qwen3_dir, caplog):
    from server.kv_measure import KVReportSpec, measure
    ids = [3 + (i * 37) % 380 for i in range(400)]
    spec = KVReportSpec(model_dir=qwen3_dir, max_tokens=96, window=32, stride=16, kv_cache_dtypes=(),
                        calibration_tokens=96, num_prompts=1, prompt_tokens=8, greedy_tokens=2, kv_cache_memory=2**20)
    rows = measure(spec, ids)
    assert {row.method for row in rows} == {"mean"} and 1 in {row.num_kv_heads for row in rows}  # pooled, by mean
    assert "refit cannot fit: measuring mean pooling only" in caplog.text
    with pytest.raises(ValueError, match="refit cannot pool Qwen3ForCausalLM.*--methods mean"):
        measure(KVReportSpec(**{**spec.__dict__, "methods": ("refit",)}), ids)


def test_head_dim_defaults_as_transformers_defaults_it():
    import transformers
    from model.config import ModelConfig
    raw = transformers.Qwen3Config(hidden_size=256, num_attention_heads=4, num_key_value_heads=2).to_dict()
    del raw["head_dim"]  # a config.json written without it
    raw["architectures"] = ["Qwen3ForCausalLM"]
    assert ModelConfig.from_dict(raw).head_dim == transformers.Qwen3Config.from_dict(raw).head_dim == 128


def test_attention_explorer_walks_through_the_normed_heads(qwen3_dir):
    """The explorer (model/explain.py, which projects q and k itself) on Qwen3: each head's z and the layer's
    output equal what the model's own paged forward computed, q/k norms included."""
    from model.explainer import AttentionExplainer
    from tests.test_explain import paged_forward_with_taps
    explainer = AttentionExplainer(qwen3_dir)
    prompt = "ab ba abc cab bca"
    ids = explainer.tokenize(prompt)
    taps = paged_forward_with_taps(load_model(qwen3_dir), ids)
    result = explainer.explain(prompt, layers=[0, 1], query_index=len(ids) - 1)
    for layer in result.layers:
        walk, tap = layer.walkthrough, taps[layer.layer]
        assert (walk.concat - tap["concat"][-1]).abs().max() < 1e-5
        assert (walk.output - tap["out"][-1]).abs().max() < 1e-5
