"""RoPE scaling against transformers: the frequencies and YaRN's cos/sin scale bit for bit, the logits of a YaRN
model past its original context (torch path and Triton kernels), and the context YaRN stretches to."""
from __future__ import annotations

import json

import pytest
import torch

from model.config import ConfigError, ModelConfig
from model.llama import load_model
from model.rope import RotaryEmbedding, rope_inv_freq
from tests.test_model import TOL, PagedRunner
from tests.tiny_models import load_hf_model, make_tiny_checkpoint

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.5},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "yarn": YARN,
    # Qwen2.5's long-context recipe (its config's max_position_embeddings stays the original)
    "yarn_qwen25": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    "yarn_betas_untruncated": {**YARN, "beta_fast": 16, "beta_slow": 2, "truncate": False},
    "yarn_mscale": {**YARN, "factor": 40.0, "mscale": 0.707, "mscale_all_dim": 1.0},
    "yarn_mscale_one_set": {**YARN, "mscale": 0.707},  # needs both: the factor's own scale
    "yarn_attention_factor": {**YARN, "attention_factor": 0.8},
    "yarn_null_factor": {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 16},  # the ratio
    "yarn_zero_betas": {**YARN, "beta_fast": 0, "beta_slow": None},  # transformers' `or`: the defaults
    "yarn_factor_below_one": {**YARN, "factor": 0.5},  # attention factor 1 (no stretch to temper)
    "yarn_betas_equal": {**YARN, "beta_fast": 4, "beta_slow": 4, "truncate": False},
    # beta_fast below beta_slow (transformers only warns): at d 64 both ends truncate to dimension 8 (the
    # +0.001 guard against a zero-width ramp)
    "yarn_ramp_ends_equal": {**YARN, "beta_fast": 0.5, "beta_slow": 0.55},
}


def _hf_config(scaling: dict | None, head_dim: int = 64, theta: float = 10000.0, max_positions: int = 128):
    import transformers
    kwargs = {"rope_scaling": dict(scaling)} if scaling else {}
    return transformers.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, num_key_value_heads=2,
                                    head_dim=head_dim, rope_theta=theta, max_position_embeddings=max_positions,
                                    **kwargs)


@pytest.mark.parametrize("head_dim, theta", [(64, 10000.0), (128, 1e6), (80, 500000.0)])
@pytest.mark.parametrize("name", sorted(SCALINGS))
def test_frequencies_and_scale_are_transformers_bit_for_bit(name, head_dim, theta):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf_config = _hf_config(SCALINGS[name], head_dim, theta)
    rope_type = hf_config.rope_parameters["rope_type"]
    init = ROPE_INIT_FUNCTIONS[rope_type] if rope_type != "default" else None
    if init is None:
        ref_inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        ref_scale = 1.0
    else:
        ref_inv, ref_scale = init(hf_config, "cpu")
    ours = ModelConfig.from_dict(hf_config.to_dict())  # as save_pretrained writes it (rope_parameters)
    assert torch.equal(rope_inv_freq(ours), ref_inv)
    assert ours.rope_scaling.attention_factor == pytest.approx(ref_scale, rel=1e-12)
    if name.startswith("yarn") and name != "yarn_factor_below_one":
        assert ours.rope_scaling.attention_factor != 1.0  # the scale is exercised, not trivially 1
    legacy = ModelConfig.from_dict({**hf_config.to_dict(), "rope_parameters": None, "rope_theta": theta,
                                    "rope_scaling": SCALINGS[name]})  # as older configs write it
    assert torch.equal(rope_inv_freq(legacy), ref_inv)


def _transformers_reads(raw: dict):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf = transformers.LlamaConfig.from_dict(json.loads(json.dumps(raw)))
    return ROPE_INIT_FUNCTIONS[hf.rope_parameters["rope_type"]](hf, "cpu")


BASE = dict(_hf_config(None, head_dim=64).to_dict(), rope_parameters=None, max_position_embeddings=32768)


@pytest.mark.parametrize("raw", [
    # Phi-3 writes the pretraining context at the top level, and transformers takes it over the rope dict's
    {**BASE, "rope_theta": 1e6, "original_max_position_embeddings": 4096,
     "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},
    {**BASE, "original_max_position_embeddings": 4096, "rope_scaling": {"type": "yarn", "factor": None}},
    {**BASE, "original_max_position_embeddings": 8192, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}},
    # a legacy rope_scaling carrying its own rope_theta, none at the top
    {**BASE, "rope_theta": None, "rope_scaling": {"type": "yarn", "factor": 4.0, "rope_theta": 1e6}},
], ids=["top-level-original", "top-level-original-null-factor", "llama3-top-level-original", "theta-in-rope-scaling"])
def test_rope_fields_are_read_where_transformers_reads_them(raw):
    ref_inv, ref_scale = _transformers_reads(raw)
    ours = ModelConfig.from_dict(json.loads(json.dumps(raw)))
    assert torch.equal(rope_inv_freq(ours), ref_inv)
    assert ours.rope_scaling.attention_factor == pytest.approx(ref_scale, rel=1e-12)


def test_a_hand_added_rope_scaling_keeps_the_theta_of_rope_parameters():
    """The README's YaRN recipe on a config saved by transformers 5 (theta only inside rope_parameters):
    transformers reads the added rope_scaling alone and falls back to theta 10,000, another model; we keep
    rope_parameters' theta."""
    raw = {**BASE, "rope_theta": None, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
           "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}
    ours = ModelConfig.from_dict(raw)
    assert ours.rope_theta == 1e6 and ours.rope_scaling.rope_type == "yarn"


def test_the_table_scales_cos_and_sin_by_the_attention_factor():
    config = ModelConfig.from_dict(_hf_config(YARN).to_dict())
    plain = ModelConfig.from_dict(_hf_config(None).to_dict())
    table = RotaryEmbedding(config, torch.device("cpu")).cos_sin_cache
    cos, sin = table.chunk(2, dim=-1)
    norm = (cos ** 2 + sin ** 2).sqrt()  # the factor, at every position and frequency
    assert torch.allclose(norm, torch.full_like(norm, config.rope_scaling.attention_factor), rtol=1e-6)
    assert table.shape == (128, 64) and RotaryEmbedding(plain, torch.device("cpu")).cos_sin_cache.shape == (128, 64)


@pytest.fixture(scope="module")
def yarn_qwen2_dir(tmp_path_factory):
    """The Qwen2.5 recipe in small: max_position_embeddings 16 = the original context, factor 4 -> 64."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("yarn"), architecture="Qwen2ForCausalLM",
                                max_position_embeddings=16, random_norms=True,
                                rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_yarn_model_matches_transformers_past_its_original_context(yarn_qwen2_dir, backend):
    if backend == "triton":
        pytest.importorskip("kernels.dispatch")
    hf = load_hf_model(yarn_qwen2_dir)
    model = load_model(yarn_qwen2_dir, attention_backend=backend)
    tokens = torch.randint(3, model.config.vocab_size, (1, 60), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = hf(tokens).logits[0]  # [60, V]
    runner = PagedRunner(model)
    table: list[int] = []
    prompt_len = 40  # prefill well past the original 16 positions, then paged decode up to 60
    prefill = runner.step([(tokens[0, :prompt_len].tolist(), 0, table)], all_logits=True)
    assert (prefill - ref[:prompt_len]).abs().max() < TOL
    for pos in range(prompt_len, tokens.shape[1]):
        logits = runner.step([([int(tokens[0, pos])], pos, table)])
        assert (logits[0] - ref[pos]).abs().max() < TOL, f"decode position {pos}"


def test_yarn_stretches_the_served_context(yarn_qwen2_dir, tmp_path):
    from server.engine_config import EngineConfig
    config = ModelConfig.from_pretrained(yarn_qwen2_dir)
    assert config.max_position_embeddings == 16 and config.max_positions == config.max_context == 64
    assert load_model(yarn_qwen2_dir).rotary.cos_sin_cache.shape[0] == 64  # a table for every position
    assert EngineConfig().resolve_max_model_len(config) == 64
    assert EngineConfig(max_model_len=64).resolve_max_model_len(config) == 64
    with pytest.raises(ValueError, match=r"max_model_len=65 exceeds the model.s context of 64 positions \(YaRN"):
        EngineConfig(max_model_len=65).resolve_max_model_len(config)
    # a config that already states more positions than original x factor keeps them (DeepSeek's do)
    raw = json.loads((yarn_qwen2_dir / "config.json").read_text())
    more = ModelConfig.from_dict({**raw, "max_position_embeddings": 100})
    assert more.max_positions == 100


def test_a_runner_sizes_the_table_of_a_model_it_adopts(yarn_qwen2_dir):
    """The table follows each runner's max_model_len, shorter or longer than the one the model came with."""
    from server.engine_config import EngineConfig
    from server.model_runner import ModelRunner
    model = load_model(yarn_qwen2_dir)
    for max_model_len in (24, 48, 64):
        ModelRunner(EngineConfig(max_model_len=max_model_len, kv_cache_memory="1MiB"), None, model=model)
        assert model.rotary.cos_sin_cache.shape[0] == max_model_len


def test_the_served_table_stops_at_max_model_len(yarn_qwen2_dir):
    """The model's table covers its 64 stretched positions; an engine serving 24 keeps 24 rows, same tokens."""
    from server.llm import LLM
    from server.sampling_params import SamplingParams
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    cfg = dict(dtype="float32", device="cpu", kv_cache_memory="1MiB")
    whole, short = LLM(str(yarn_qwen2_dir), **cfg), LLM(str(yarn_qwen2_dir), max_model_len=24, **cfg)
    assert whole.engine.runner.model.rotary.cos_sin_cache.shape[0] == 64
    assert short.engine.runner.model.rotary.cos_sin_cache.shape[0] == 24
    prompt = [[1, 5, 9, 22, 7, 100, 31, 8, 3, 44]]
    assert whole.generate(prompt, params)[0].token_ids == short.generate(prompt, params)[0].token_ids


def _served_info(model_dir, **engine) -> dict:
    import httpx

    from server.app import create_app
    from server.async_engine import AsyncEngine
    from server.config import ServerConfig
    from server.engine_config import EngineConfig
    from tests.live_server import LiveServer
    engine = AsyncEngine(EngineConfig(model=str(model_dir), device="cpu", dtype="float32", **engine))
    with LiveServer(create_app(engine, ServerConfig(stats_log_interval_s=0))) as server:
        return httpx.get(server.url + "/info").json()


def test_info_reports_the_cache_as_the_longest_request(yarn_qwen2_dir):
    """TGI's max_input_tokens / max_total_tokens are what one request can use: the cache's 32 tokens when it
    holds less than max_model_len (64, still reported as such)."""
    info = _served_info(yarn_qwen2_dir, kv_cache_memory="16KiB", block_size=16)
    assert (info["max_total_tokens"], info["max_input_tokens"], info["max_model_len"]) == (32, 31, 64)


def test_info_shows_what_sets_the_context(yarn_qwen2_dir):
    """A served YaRN model: /info names its scaling and the stretched context, and a prompt past the original
    16 positions is answered."""
    import httpx

    from server.app import create_app
    from server.async_engine import AsyncEngine
    from server.config import ServerConfig
    from server.engine_config import EngineConfig
    from tests.live_server import LiveServer
    engine = AsyncEngine(EngineConfig(model=str(yarn_qwen2_dir), device="cpu", dtype="float32",
                                      kv_cache_memory="1MiB"))
    with LiveServer(create_app(engine, ServerConfig(stats_log_interval_s=0))) as server:
        info = httpx.get(server.url + "/info").json()
        long = httpx.post(server.url + "/generate", json={"inputs": "ab " * 20, "parameters": {
            "max_new_tokens": 4, "details": True}}, timeout=60)
    assert info["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    assert info["max_model_len"] == info["max_total_tokens"] == 64 and info["sliding_window"] is None
    assert long.status_code == 200 and long.json()["details"]["generated_tokens"] == 4
    assert int(long.headers["x-prompt-tokens"]) > 16


@pytest.mark.parametrize("scaling, pattern", [
    ({**YARN, "truncate": "no"}, "rope_scaling.truncate must be true or false"),
    ({**YARN, "attention_factor": 0}, "rope_scaling.attention_factor must be a positive number"),
    ({**YARN, "factor": -2}, "rope_scaling.factor must be a positive number"),
    ({**YARN, "beta_fast": "32"}, "rope_scaling.beta_fast must be a positive number"),
    ({**YARN, "original_max_position_embeddings": 0}, "original_max_position_embeddings must be a positive"),
    ({"rope_type": "longrope", "factor": 2.0}, "rope_type='longrope' is not supported"),
])
def test_bad_yarn_fields_are_named(scaling, pattern):
    raw = {**_hf_config(None).to_dict(), "rope_parameters": None, "rope_scaling": scaling}
    with pytest.raises(ConfigError, match=pattern):
        ModelConfig.from_dict(raw)


def test_a_context_longer_than_the_kv_cache_is_a_warning_at_start(yarn_qwen2_dir, caplog):
    """YaRN makes long default contexts common: when the cache holds less than one max_model_len sequence
    (here 32 of 64 tokens), start-up says so at WARNING, and a request past the cache is refused by name."""
    import logging

    from server.llm import LLM
    from server.outputs import AdmissionError
    from server.sampling_params import SamplingParams
    caplog.set_level(logging.INFO, logger="server.model_runner")
    llm = LLM(str(yarn_qwen2_dir), dtype="float32", device="cpu", kv_cache_memory="16KiB", block_size=16)
    line = next(r for r in caplog.records if r.getMessage().startswith("KV cache:"))
    assert line.levelno == logging.WARNING and "0.5 sequences of max_model_len=64" in line.getMessage()
    with pytest.raises(AdmissionError, match="inputs: the prompt has 40 tokens; the whole KV cache holds 32"):
        llm.generate([list(range(3, 43))], SamplingParams(max_new_tokens=1, temperature=0))
    with pytest.raises(AdmissionError, match="max_new_tokens: 20 prompt tokens .* need 4 KV blocks; the whole cache"):
        llm.generate([list(range(3, 23))], SamplingParams(max_new_tokens=30, temperature=0))
    caplog.clear()
    LLM(str(yarn_qwen2_dir), dtype="float32", device="cpu", kv_cache_memory="1MiB")
    line = next(r for r in caplog.records if r.getMessage().startswith("KV cache:"))
    assert line.levelno == logging.INFO  # room for a whole sequence: no warning
