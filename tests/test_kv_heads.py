"""The num_kv_heads knob: replication is exact, pooling is the group mean (biases too), invalid counts are
refused with the valid list, the cache is sized from the converted count, and refit beats mean pooling on
its own calibration objective (and is exact where the heads differ only by what it can fold away)."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.config import ConfigError
from model.kv_heads import check_num_kv_heads, convert_kv_heads, valid_num_kv_heads
from model.kv_refit import (_assign, attention_weights, collect_grams, key_loss, load_refit_model, mean_pool,
                            refit_pool, value_loss)
from model.llama import load_model
from model.perplexity import perplexity
from tests.test_model import PagedRunner
from tests.tiny_models import make_tiny_checkpoint

TOL = 1e-4
PROMPT = [1, 17, 42, 99, 5, 250, 33, 8, 9, 120, 7]


def _logits_and_greedy(model, prompt=PROMPT, new_tokens=12):
    runner = PagedRunner(model, num_blocks=64, block_size=4)
    prefill = runner.step([(prompt, 0, [])], all_logits=True)
    return prefill, PagedRunner(model, num_blocks=64, block_size=4).greedy(prompt, new_tokens)


def _qkv_rows(model, layer: int):
    attn = model.model.layers[layer].self_attn
    q, k, v = attn.qkv_proj.weight.split(attn.split_sizes)
    biases = attn.qkv_proj.bias.split(attn.split_sizes) if attn.qkv_proj.bias is not None else None
    return (q, k, v), biases


# --- replication --------------------------------------------------------------------------------

def test_replication_is_lossless_on_tiny_model(tiny_llama_dir):
    native = load_model(tiny_llama_dir)
    wide = load_model(tiny_llama_dir, num_kv_heads=4)  # 4 query heads, 2 kv heads in the checkpoint
    assert wide.config.num_kv_heads == 4
    ref_logits, ref_tokens = _logits_and_greedy(native)
    logits, tokens = _logits_and_greedy(wide)
    assert (logits - ref_logits).abs().max() < TOL
    assert tokens == ref_tokens


def test_replication_is_lossless_on_smollm2(smollm2_dir):
    native = load_model(smollm2_dir)
    wide = load_model(smollm2_dir, num_kv_heads=9)
    assert (native.config.num_kv_heads, wide.config.num_kv_heads) == (3, 9)
    prompt = [504, 3458, 282, 260, 1345, 314, 253, 1690]
    ref_logits, ref_tokens = _logits_and_greedy(native, prompt, 8)
    logits, tokens = _logits_and_greedy(wide, prompt, 8)
    assert (logits - ref_logits).abs().max() < TOL
    assert tokens == ref_tokens


def test_replicated_rows_are_copies():
    w = torch.randn(2 * 3, 5)  # 2 heads of head_dim 3
    out = convert_kv_heads(w, 2, 6, 3)
    assert torch.equal(out.reshape(6, 3, 5), w.reshape(2, 3, 5).repeat_interleave(3, dim=0))


# --- pooling ------------------------------------------------------------------------------------

@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_pooled_weights_are_group_means(tmp_path, architecture):
    model_dir = make_tiny_checkpoint(tmp_path, architecture=architecture, num_attention_heads=8,
                                     num_key_value_heads=4, hidden_size=64, tokenizer=False, random_norms=True)
    tensors = load_file(model_dir / "model.safetensors")
    model = load_model(model_dir, num_kv_heads=2)
    head_dim = 8
    for layer in range(2):
        (q, k, v), biases = _qkv_rows(model, layer)
        prefix = f"model.layers.{layer}.self_attn"
        assert torch.equal(q, tensors[f"{prefix}.q_proj.weight"])
        for name, got in (("k_proj", k), ("v_proj", v)):
            heads = tensors[f"{prefix}.{name}.weight"].reshape(4, head_dim, 64)
            want = torch.stack([heads[0:2].mean(0), heads[2:4].mean(0)]).reshape(2 * head_dim, 64)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
        if architecture == "Qwen2ForCausalLM":
            for name, got in (("k_proj", biases[1]), ("v_proj", biases[2])):
                bias = tensors[f"{prefix}.{name}.bias"].reshape(4, head_dim)
                want = torch.stack([bias[0:2].mean(0), bias[2:4].mean(0)]).reshape(-1)
                torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
            torch.testing.assert_close(biases[0], tensors[f"{prefix}.q_proj.bias"], rtol=0, atol=0)
        else:
            assert biases is None


def test_one_kv_head_on_smollm2_costs_perplexity_and_saves_two_thirds(smollm2_dir, shakespeare_text):
    from model.kv_cache import KVCache
    from model.tokenizer import Tokenizer

    ids = Tokenizer.from_pretrained(smollm2_dir).encode(shakespeare_text[:4000], add_special_tokens=False)[:192]
    native, pooled = load_model(smollm2_dir), load_model(smollm2_dir, num_kv_heads=1)
    ppl_native = perplexity(native, ids, window=128, stride=64).perplexity
    ppl_pooled = perplexity(pooled, ids, window=128, stride=64).perplexity
    assert math.isfinite(ppl_pooled) and ppl_pooled > ppl_native
    per_token = native.config.kv_bytes_per_token(4)
    assert per_token == 2 * 30 * 3 * 64 * 4
    assert pooled.config.kv_bytes_per_token(4) * 3 == per_token
    memory = 7 * KVCache.bytes_per_block(native.config, 16, torch.float32)
    blocks = [memory // KVCache.bytes_per_block(m.config, 16, torch.float32) for m in (native, pooled)]
    assert blocks == [7, 21]
    cache = KVCache.allocate(pooled.config, blocks[1], 16, torch.float32, "cpu")
    assert cache.storage.numel() * 4 == memory


# --- invalid counts -----------------------------------------------------------------------------

@pytest.mark.parametrize("count", [0, 4, 18, -1, -3])
def test_invalid_counts_list_the_valid_ones(smollm2_dir, count):
    assert valid_num_kv_heads(9, 3) == [1, 3, 9]
    with pytest.raises(ConfigError, match=r"valid.*\[1, 3, 9\]"):
        check_num_kv_heads(9, 3, count)
    with pytest.raises(ConfigError, match=r"valid.*\[1, 3, 9\]"):
        load_model(smollm2_dir, num_kv_heads=count)


def test_valid_counts_need_whole_heads():
    # 12 query heads, 4 kv heads: 3 and 6 divide 12 but would split checkpoint heads.
    assert valid_num_kv_heads(12, 4) == [1, 2, 4, 12]
    with pytest.raises(ConfigError, match=r"valid values: \[1, 2, 4, 12\]"):
        check_num_kv_heads(12, 4, 6)


def test_refit_is_refused_tensor_by_tensor(tiny_llama_dir):
    with pytest.raises(ConfigError, match="load_refit_model"):
        load_model(tiny_llama_dir, num_kv_heads=1, kv_head_method="refit")
    with pytest.raises(ConfigError, match="kv_head_method='median'"):
        load_model(tiny_llama_dir, num_kv_heads=1, kv_head_method="median")


# --- refit --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def calibration_ids() -> list[int]:
    gen = torch.Generator().manual_seed(5)
    return torch.randint(3, 384, (600,), generator=gen).tolist()  # the tiny models' vocabulary


def test_refit_objective_is_not_worse_than_mean_at_one_head(tiny_llama_dir, calibration_ids):
    native = load_model(tiny_llama_dir)
    model, losses = load_refit_model(tiny_llama_dir, 1, calibration_ids, native_model=native)
    assert model.config.num_kv_heads == 1 and len(losses) == 2
    for loss in losses:
        assert loss.key_refit <= loss.key_mean * (1 + 1e-9)
        assert loss.value_refit <= loss.value_mean * (1 + 1e-9)
    assert sum(x.key_refit + x.value_refit for x in losses) < 0.95 * sum(x.key_mean + x.value_mean for x in losses)
    # the mean loss as refit_model reports it is the loss of the model mean pooling loads
    grams = collect_grams(native, calibration_ids)
    w = attention_weights(native.model.layers[0].self_attn)
    mean = mean_pool(w, 4, 16, 1)
    loaded = attention_weights(load_model(tiny_llama_dir, num_kv_heads=1).model.layers[0].self_attn)
    torch.testing.assert_close(mean.weights.k, loaded.k, rtol=0, atol=1e-6)
    assert key_loss(w, mean, grams[0], 4, 16) == pytest.approx(losses[0].key_mean)


def test_refit_calibrates_a_model_with_a_context_shorter_than_its_window(tmp_path, calibration_ids):
    """The calibration windows (512 tokens) stop at the model's context: a 64-position model ran past its
    rotary table (IndexError) and so could not be served with refit."""
    short = make_tiny_checkpoint(tmp_path / "short", max_position_embeddings=64)
    native = load_model(short)
    model, losses = load_refit_model(short, 1, calibration_ids, native_model=native)
    assert model.config.num_kv_heads == 1 and len(losses) == 2
    assert all(x.key_refit <= x.key_mean * (1 + 1e-9) for x in losses)
    windowed = collect_grams(native, calibration_ids[:128], window=64)
    torch.testing.assert_close(collect_grams(native, calibration_ids[:128]), windowed)


def test_refit_without_pooling_is_the_identity(tiny_llama_dir, calibration_ids):
    """Refitting 2 heads into 2 folds only exact rescalings into q and o: the model is unchanged."""
    native = load_model(tiny_llama_dir)
    grams = collect_grams(native, calibration_ids)
    same = copy.deepcopy(native)
    for layer_n, layer_s, gram in zip(native.model.layers, same.model.layers, grams):
        w = attention_weights(layer_n.self_attn)
        pooled = refit_pool(w, gram, 4, 16, 2)
        assert key_loss(w, pooled, gram, 4, 16) < 1e-10 and value_loss(w, pooled, gram, 4, 16) < 1e-10
        with torch.no_grad():
            _assign(layer_s.self_attn, pooled.weights)
    ref, _ = _logits_and_greedy(native)
    out, _ = _logits_and_greedy(same)
    assert (out - ref).abs().max() < TOL


def _gauge_copy_checkpoint(model_dir: Path, head_dim: int, seed: int = 0) -> None:
    """Make kv head 1 of every layer a RoPE-commuting transform of head 0: per rotary pair a complex
    scale for K, an invertible matrix for V. Heads 0 and 1 then carry the same information."""
    gen = torch.Generator().manual_seed(seed)
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    half = head_dim // 2
    for name in [n for n in tensors if n.endswith("k_proj.weight")]:
        k = tensors[name].double()
        re, im = k[0:half], k[half:head_dim]
        scale = torch.randn(half, 1, generator=gen, dtype=torch.float64) + 1j * torch.randn(
            half, 1, generator=gen, dtype=torch.float64)
        z = scale * torch.complex(re, im)
        k[head_dim:head_dim + half], k[head_dim + half:2 * head_dim] = z.real, z.imag
        tensors[name] = k.float()
        vname = name.replace("k_proj", "v_proj")
        v = tensors[vname].double()
        mix = torch.eye(head_dim, dtype=torch.float64) + 0.3 * torch.randn(head_dim, head_dim, generator=gen,
                                                                           dtype=torch.float64)
        v[head_dim:2 * head_dim] = mix @ v[0:head_dim]
        tensors[vname] = v.float()
    save_file(tensors, path, metadata={"format": "pt"})


def test_refit_is_exact_when_heads_differ_only_by_a_foldable_transform(tmp_path, calibration_ids):
    """Mean pooling mixes two heads that hold the same keys and values in different bases; refit
    recovers them exactly, which checks the RoPE pair algebra and the q / o_proj compensation."""
    model_dir = make_tiny_checkpoint(tmp_path, tokenizer=False)  # 4 query / 2 kv heads, head_dim 16
    _gauge_copy_checkpoint(model_dir, head_dim=16)
    native = load_model(model_dir)
    refit, losses = load_refit_model(model_dir, 1, calibration_ids, native_model=native)
    mean = load_model(model_dir, num_kv_heads=1)
    ref, ref_tokens = _logits_and_greedy(native)
    out, tokens = _logits_and_greedy(refit)
    assert (out - ref).abs().max() < 1e-3
    assert tokens == ref_tokens
    mean_out, _ = _logits_and_greedy(mean)
    assert (mean_out - ref).abs().max() > 100 * (out - ref).abs().max()
    assert all(x.key_refit < 1e-6 * x.key_mean and x.value_refit < 1e-6 * x.value_mean for x in losses)


def test_serving_entry_loads_refit_from_a_calibration_file(tiny_llama_dir, tmp_path, shakespeare_text):
    from model.kv_refit import load_with_kv_head_method
    text = tmp_path / "calibration.txt"
    text.write_text(shakespeare_text[600_000:604_000])
    refit = load_with_kv_head_method(tiny_llama_dir, num_kv_heads=1, kv_head_method="refit",
                                     calibration_text=text, calibration_tokens=300)
    mean = load_with_kv_head_method(tiny_llama_dir, num_kv_heads=1)
    assert refit.config.num_kv_heads == mean.config.num_kv_heads == 1
    assert not torch.equal(refit.model.layers[0].self_attn.qkv_proj.weight,
                           mean.model.layers[0].self_attn.qkv_proj.weight)
    # Without a file, refit calibrates on the text shipped in model/data, which lies far from the slice
    # kv-report scores (the start of tinyshakespeare).
    from model.kv_refit import DEFAULT_CALIBRATION_TEXT
    shipped = DEFAULT_CALIBRATION_TEXT.read_text()
    assert shakespeare_text.index(shipped[:500]) > 500_000
    default = load_with_kv_head_method(tiny_llama_dir, num_kv_heads=1, kv_head_method="refit",
                                       calibration_tokens=300)
    assert not torch.equal(default.model.layers[0].self_attn.qkv_proj.weight,
                           mean.model.layers[0].self_attn.qkv_proj.weight)
    wide = load_with_kv_head_method(tiny_llama_dir, num_kv_heads=4, kv_head_method="refit", calibration_text=text)
    assert wide.config.num_kv_heads == 4  # replication: nothing to fit
