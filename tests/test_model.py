"""The model against transformers on the same weights, float32 on CPU.

Prefill logits, then token-by-token decode through the paged cache with shuffled block tables that cross
block boundaries, then greedy generation token for token.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from model.batch import build_step_batch
from model.config import ConfigError
from model.kv_cache import KVCache
from model.llama import load_model
from model.weights import CheckpointError
from tests.tiny_models import load_hf_model, make_tiny_checkpoint

TOL = 1e-4
VARIANTS = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=64),
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1),
    "head_dim_differs": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24),
    "llama3_rope_tied": dict(tie_word_embeddings=True, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
    "linear_rope": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    # Qwen2.5's long-context recipe; the 23-token checks run past the original 8 positions
    "qwen2_yarn_rope": dict(architecture="Qwen2ForCausalLM", max_position_embeddings=8,
                            rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}),
    "sharded": dict(shard_size="20KB"),
    "qwen2_bias": dict(architecture="Qwen2ForCausalLM"),
    "mistral": dict(architecture="MistralForCausalLM", sliding_window=None),
    "qwen3_qk_norm_tied": dict(architecture="Qwen3ForCausalLM", head_dim=32, tie_word_embeddings=True),
    "llama_attention_bias": dict(attention_bias=True),
}


class PagedRunner:
    """Drives the model through the paged cache the way the engine will, with a shuffled block pool."""

    def __init__(self, model, num_blocks: int = 64, block_size: int = 4, seed: int = 0):
        self.model = model
        self.block_size = block_size
        self.cache = KVCache.allocate(model.config, num_blocks, block_size, torch.float32, "cpu")
        self.cache.storage.fill_(float("nan"))  # poison: an unwritten slot that is read shows up
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)

    def table_for(self, length: int, table: list[int]) -> list[int]:
        while len(table) * self.block_size < length:
            table.append(self.free.pop())
        return table

    def step(self, seqs: list[tuple[list[int], int, list[int]]], all_logits: bool = False) -> torch.Tensor:
        """seqs: (new tokens, num cached, block table) per sequence."""
        for toks, cached, table in seqs:
            self.table_for(cached + len(toks), table)
        batch = build_step_batch([s[0] for s in seqs], [s[1] for s in seqs], [s[2] for s in seqs],
                                 self.block_size, all_logits=all_logits)
        with torch.inference_mode():
            return self.model(batch, self.cache)

    def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        table: list[int] = []
        logits = self.step([(prompt, 0, table)])
        out = [int(logits[-1].argmax())]
        while len(out) < max_new_tokens:
            logits = self.step([([out[-1]], len(prompt) + len(out) - 1, table)])
            out.append(int(logits[-1].argmax()))
        return out


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant_dir(request, tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), random_norms=True, **VARIANTS[request.param])


def test_prefill_then_paged_decode_match_transformers(variant_dir):
    hf = load_hf_model(variant_dir)
    model = load_model(variant_dir)
    runner = PagedRunner(model)
    torch.manual_seed(1)
    tokens = torch.randint(3, model.config.vocab_size, (1, 23))
    with torch.no_grad():
        ref = hf(tokens).logits[0]  # [23, V]
    prompt_len = 9  # prefill 9 (crosses two 4-token blocks), then decode one at a time
    table: list[int] = []
    prefill = runner.step([(tokens[0, :prompt_len].tolist(), 0, table)], all_logits=True)
    assert (prefill - ref[:prompt_len]).abs().max() < TOL
    for pos in range(prompt_len, tokens.shape[1]):
        logits = runner.step([([int(tokens[0, pos])], pos, table)])
        assert (logits[0] - ref[pos]).abs().max() < TOL, f"decode position {pos}"
    assert table != sorted(table), "the block table should be non-contiguous"


def test_mixed_batch_of_prefill_chunk_and_decodes_matches_transformers(variant_dir):
    """One flat step mixing a prefill chunk after cached tokens with decodes of other sequences."""
    hf = load_hf_model(variant_dir)
    model = load_model(variant_dir)
    runner = PagedRunner(model)
    torch.manual_seed(2)
    seqs = [torch.randint(3, model.config.vocab_size, (n,)).tolist() for n in (13, 6, 10)]
    with torch.no_grad():
        refs = [hf(torch.tensor([s])).logits[0] for s in seqs]
    tables: list[list[int]] = [[], [], []]
    # step 1: first 5 tokens of seq 0, all but the last token of seqs 1 and 2
    runner.step([(seqs[0][:5], 0, tables[0]), (seqs[1][:-1], 0, tables[1]), (seqs[2][:-1], 0, tables[2])])
    # step 2: the rest of seq 0 as a chunk after 5 cached tokens + one decode token each for seqs 1, 2
    logits = runner.step([(seqs[0][5:], 5, tables[0]), (seqs[1][-1:], 5, tables[1]),
                          (seqs[2][-1:], 9, tables[2])])
    for row, ref in zip(logits, refs):
        assert (row - ref[-1]).abs().max() < TOL


def test_greedy_generation_matches_transformers(variant_dir):
    hf = load_hf_model(variant_dir)
    model = load_model(variant_dir)
    prompt = [1, 17, 42, 99, 5, 250, 33]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, min_new_tokens=24,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert PagedRunner(model).greedy(prompt, 24) == ref


def test_triton_backend_matches_torch_backend(tiny_llama_dir):
    """The model with our Triton kernels (interpreter on CPU) gives the torch path's logits."""
    pytest.importorskip("kernels.dispatch")
    ref_model = load_model(tiny_llama_dir, attention_backend="torch")
    tri_model = load_model(tiny_llama_dir, attention_backend="triton")
    prompt = [1, 17, 42, 99, 5, 250, 33, 8, 9]
    outs = []
    for model in (ref_model, tri_model):
        runner = PagedRunner(model, seed=3)
        table: list[int] = []
        prefill = runner.step([(prompt, 0, table)], all_logits=True)
        decode = runner.step([([7], len(prompt), table)])
        outs.append(torch.cat([prefill, decode]))
    assert (outs[0] - outs[1]).abs().max() < TOL


# --- bad checkpoints ---------------------------------------------------------------------------

def _edit_config(model_dir: Path, **changes) -> None:
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.fixture()
def broken_dir(tiny_llama_dir, tmp_path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, target)
    return target


def test_missing_tensor_is_named(broken_dir):
    from safetensors.torch import load_file, save_file
    tensors = load_file(broken_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, broken_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        load_model(broken_dir)


def test_unexpected_tensor_is_named(broken_dir):
    from safetensors.torch import load_file, save_file
    tensors = load_file(broken_dir / "model.safetensors")
    tensors["model.layers.0.self_attn.extra.weight"] = torch.ones(2, 2)
    save_file(tensors, broken_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.0\.self_attn\.extra\.weight"):
        load_model(broken_dir)


def test_wrong_shape_names_tensor_and_both_shapes(broken_dir):
    from safetensors.torch import load_file, save_file
    tensors = load_file(broken_dir / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.ones(100, 64)
    save_file(tensors, broken_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"up_proj\.weight: checkpoint shape \(100, 64\) but the model "
                                              r"expects \(128, 64\)"):
        load_model(broken_dir)


@pytest.mark.parametrize("num_kv_heads", [None, 1, 4])  # native 2, pooled, replicated
def test_a_short_kv_projection_is_named_whatever_num_kv_heads(broken_dir, num_kv_heads):
    """Pooling and replication reshape k/v rows by head: a short tensor failed there, naming nothing."""
    from safetensors.torch import load_file, save_file
    tensors = load_file(broken_dir / "model.safetensors")
    name = "model.layers.0.self_attn.v_proj.weight"
    tensors[name] = tensors[name][:-1].contiguous()
    save_file(tensors, broken_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"tensor {name}: checkpoint shape \(31, 64\)"):
        load_model(broken_dir, num_kv_heads=num_kv_heads)


def test_loaded_weights_do_not_follow_the_checkpoint_file(broken_dir):
    """float32 -> float32 on CPU would otherwise keep safetensors' private file mapping: a checkpoint written
    over in place while the server runs would change its weights (or, truncated, kill it with SIGBUS)."""
    model = load_model(broken_dir)
    before = {name: p.clone() for name, p in model.named_parameters()}
    path = broken_dir / "model.safetensors"
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    with open(path, "r+b") as f:  # same size, every tensor byte overwritten
        f.seek(header)
        f.write(b"\x7f" * (path.stat().st_size - header))
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_tied_config_with_a_written_head_of_another_shape_is_named(broken_dir):
    from safetensors.torch import load_file, save_file
    tensors = load_file(broken_dir / "model.safetensors")
    tensors["lm_head.weight"] = torch.randn(7, tensors["model.embed_tokens.weight"].shape[1])
    save_file(tensors, broken_dir / "model.safetensors", metadata={"format": "pt"})
    _edit_config(broken_dir, tie_word_embeddings=True)
    with pytest.raises(CheckpointError, match=r"lm_head\.weight \(7, 64\) does not match the tied embedding"):
        load_model(broken_dir)


@pytest.mark.parametrize("head", ["embedding", "different"])
def test_tied_config_with_a_written_head_loads_as_transformers_does(broken_dir, head):
    """tie_word_embeddings with an lm_head.weight in the file: the embedding if they are equal (tied, one
    tensor), else the written head (transformers then keeps it; tying gave logits off by several units)."""
    from safetensors.torch import load_file, save_file
    tensors = load_file(broken_dir / "model.safetensors")
    embedding = tensors["model.embed_tokens.weight"]
    tensors["lm_head.weight"] = embedding.clone() if head == "embedding" else torch.randn_like(embedding)
    save_file(tensors, broken_dir / "model.safetensors", metadata={"format": "pt"})
    _edit_config(broken_dir, tie_word_embeddings=True)
    model, hf = load_model(broken_dir), load_hf_model(broken_dir)
    tokens = torch.randint(3, model.config.vocab_size, (1, 7))
    with torch.no_grad():
        ref = hf(tokens).logits[0]
    logits = PagedRunner(model).step([(tokens[0].tolist(), 0, [])], all_logits=True)
    assert (logits - ref).abs().max() < TOL
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == (head == "embedding")


@pytest.mark.parametrize("value, dtype, cause", [
    (float("nan"), "float32", "in the checkpoint"), (float("-inf"), "float32", "in the checkpoint"),
    (1e6, "float16", "after conversion to torch.float16"),  # finite in the file, past float16's 65504
])
def test_weights_that_are_not_finite_are_refused_naming_the_tensor(broken_dir, value, dtype, cause):
    """Every logit would be NaN and argmax would serve token 0 to every request."""
    from safetensors.torch import load_file, save_file
    tensors = load_file(broken_dir / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = value
    save_file(tensors, broken_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"model\.layers\.1\.mlp\.up_proj\.weight: 1 of \d+ values are NaN "
                                              rf"or infinite {cause}"):
        load_model(broken_dir, dtype=dtype)


def test_pickle_only_checkpoint_is_refused_with_reason(broken_dir):
    (broken_dir / "model.safetensors").unlink()
    (broken_dir / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="arbitrary code") as err:
        load_model(broken_dir)
    assert "safetensors" in str(err.value)


@pytest.mark.parametrize("changes, pattern", [
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type='dynamic' is not supported"),
    ({"architectures": ["GPT2LMHeadModel"]}, "supported are LlamaForCausalLM"),
    ({"num_key_value_heads": 3}, "num_key_value_heads=3 must be positive and divide"),
    ({"architectures": ["MistralForCausalLM"], "sliding_window": -1}, "sliding_window must be a positive"),
    # what a config fuzzer found loading silently: served wrong (an activation the MLP does not compute) or
    # failing every request (a string eps, a zero factor)
    ({"hidden_act": "gelu_pytorch_tanh"}, "hidden_act='gelu_pytorch_tanh' is not supported"),
    ({"mlp_bias": True}, "mlp_bias=true is not supported"),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps must be a positive number"),
    ({"rms_norm_eps": None}, "rms_norm_eps must be a positive number"),
    ({"rope_theta": -1.0, "rope_parameters": None}, "rope_theta must be a positive number"),
    ({"rope_parameters": None, "rope_scaling": {"rope_type": "linear", "factor": 0}}, "factor must be a positive"),
    ({"rope_parameters": None, "rope_scaling": {"rope_type": "linear"}}, "needs a factor"),
    ({"rope_parameters": None, "rope_scaling": [1, 2]}, "rope_scaling must be an object"),
    ({"num_key_value_heads": "2"}, "num_key_value_heads must be a positive integer"),
    ({"head_dim": 16.0}, "head_dim must be a positive integer"),
    ({"max_position_embeddings": 0}, "max_position_embeddings must be a positive integer"),
    ({"rope_scaling": None, "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4}}},
     "rope parameters per layer type are not supported"),  # (transformers reads it as a KeyError)
    ({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True, "layer_types": ["full_attention"]},
     "layer_types must be a list of num_hidden_layers=2"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false"),
    ({"eos_token_id": "2"}, "eos_token_id must be a token id"),
])
def test_unsupported_configs_are_refused(broken_dir, changes, pattern):
    _edit_config(broken_dir, **changes)
    with pytest.raises(ConfigError, match=pattern):
        load_model(broken_dir)


@pytest.mark.parametrize("changes", [
    {"architectures": "LlamaForCausalLM"},  # a string, which transformers accepts too
    {"hidden_act": "swish"},  # silu's other name
    {"rope_theta": 500000.0},  # beside rope_parameters' own (10000), which transformers 5 reads
    {"rope_parameters": None, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0}},  # original context: the model's
], ids=["architectures-string", "swish", "rope-theta-twice", "llama3-no-original-context"])
def test_configs_transformers_reads_are_read_as_it_reads_them(broken_dir, changes):
    _edit_config(broken_dir, **changes)
    tokens = list(range(3, 40))
    ours = PagedRunner(load_model(broken_dir)).step([(tokens, 0, [])], all_logits=True)
    with torch.no_grad():
        ref = load_hf_model(broken_dir)(torch.tensor([tokens])).logits[0]
    assert (ours - ref).abs().max() < TOL


def test_unreadable_weight_files_are_named(broken_dir):
    path = broken_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])  # truncated
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        load_model(broken_dir)
    (broken_dir / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"index\.json: not a safetensors index"):
        load_model(broken_dir)
    outside = broken_dir.parent / "elsewhere.safetensors"
    shutil.copy(broken_dir / "model.safetensors", outside)
    (broken_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": f"../{outside.name}"}}))
    with pytest.raises(CheckpointError, match=r"shard names must be file names in the model directory"):
        load_model(broken_dir)


def test_model_safetensors_is_read_alone_beside_other_safetensors_files(broken_dir):
    """Without an index, model.safetensors is the checkpoint (as transformers reads it): an adapter's or a
    consolidated copy's file beside it is not loaded as more tensors."""
    (broken_dir / "adapter_model.safetensors").write_bytes((broken_dir / "model.safetensors").read_bytes())
    load_model(broken_dir)


def test_sliding_window_model_runs_within_its_window(tmp_path):
    """A sliding-window config (Mistral 7B v0.1) is served with contexts up to the window, where full attention
    is the model's attention: equal to transformers (which applies the window) on every position of a
    window-long sequence, and one token longer transformers' last position differs, so the cap is tight."""
    from server.engine_config import EngineConfig
    window = 16
    model_dir = make_tiny_checkpoint(tmp_path / "m", architecture="MistralForCausalLM", sliding_window=window)
    hf, model = load_hf_model(model_dir), load_model(model_dir)
    assert model.config.sliding_window == window and model.config.max_context == window
    tokens = torch.randint(3, model.config.vocab_size, (1, window + 1), generator=torch.Generator().manual_seed(4))
    table: list[int] = []
    with torch.no_grad():
        ref = hf(tokens[:, :window]).logits[0]
        longer = hf(tokens).logits[0, -1]
    ours = PagedRunner(model).step([(tokens[0, :window].tolist(), 0, table)], all_logits=True)
    assert (ours - ref).abs().max() < TOL
    full = PagedRunner(model).step([(tokens[0].tolist(), 0, [])])[-1]  # full attention past the window
    assert (full - longer).abs().max() > 100 * TOL
    assert EngineConfig().resolve_max_model_len(model.config) == window
    assert EngineConfig(max_model_len=8).resolve_max_model_len(model.config) == 8
    with pytest.raises(ValueError, match="max_model_len=17 exceeds the model's sliding_window=16"):
        EngineConfig(max_model_len=window + 1).resolve_max_model_len(model.config)
    from model.perplexity import perplexity
    with pytest.raises(ValueError, match="window=17 exceeds the model's context of 16 tokens"):
        perplexity(model, tokens[0].tolist() * 2, window=window + 1, stride=8)


@pytest.mark.parametrize("architecture, fields", [
    ("MistralForCausalLM", {}),  # no sliding_window key: transformers' default window
    ("MistralForCausalLM", {"sliding_window": None}),
    ("MistralForCausalLM", {"sliding_window": 64, "use_sliding_window": False}),  # not a Mistral field
    ("Qwen2ForCausalLM", {"use_sliding_window": True}),  # default window, on layers from 28: none of 2
    ("Qwen2ForCausalLM", {"use_sliding_window": True, "max_window_layers": 1}),
    ("Qwen3ForCausalLM", {"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 2}),
    ("Qwen3ForCausalLM", {"use_sliding_window": True, "sliding_window": 64,
                          "layer_types": ["full_attention", "sliding_attention"]}),
    ("Qwen3ForCausalLM", {"use_sliding_window": False, "sliding_window": 64,
                          "layer_types": ["full_attention", "sliding_attention"]}),
    ("Qwen2ForCausalLM", {"use_sliding_window": False, "sliding_window": 131072}),  # Qwen2.5's configs
    ("LlamaForCausalLM", {"use_sliding_window": True, "sliding_window": 64}),  # not a LLaMA field
])
def test_sliding_window_is_the_one_transformers_applies(architecture, fields):
    """Our context cap (the window, where full attention stops being the model's) against the window
    transformers' own config class gives any layer."""
    import transformers
    from model.config import ModelConfig
    cls = getattr(transformers, architecture.replace("ForCausalLM", "Config"))
    raw = {**cls(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2).to_dict(), "architectures": [architecture]}
    for name in ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types"):
        raw.pop(name, None)
    raw.update(fields)
    hf = cls.from_dict(json.loads(json.dumps(raw)))
    # Mistral's attention windows every layer; LLaMA's none, whatever fields its config carries
    fixed = {"MistralForCausalLM": ["sliding_attention"], "LlamaForCausalLM": []}
    layer_types = fixed[architecture] if architecture in fixed else hf.layer_types
    hf_window = hf.sliding_window if "sliding_attention" in layer_types else None
    assert ModelConfig.from_dict(raw).sliding_window == hf_window


def test_config_reads_eos_list_and_head_dim(broken_dir):
    from model.config import ModelConfig
    _edit_config(broken_dir, eos_token_id=[2, 7], head_dim=32)
    config = ModelConfig.from_pretrained(broken_dir)
    assert config.eos_token_ids == (2, 7)
    assert config.head_dim == 32
    assert config.kv_bytes_per_token(4) == 2 * 2 * 2 * 32 * 4


def test_a_cpu_kv_cache_is_resident_from_the_start():
    """The OS maps a fresh allocation's pages on first write, and BlockAllocator reuses the oldest freed
    block, so a lazily mapped cache grew the process by its whole size over minutes of traffic (a soak run:
    419 to 1,103 MiB in 4 minutes) and ran out of memory then rather than at start-up."""
    import ctypes
    import mmap

    from model.config import ModelConfig

    def resident_fraction(t: torch.Tensor) -> float:
        """The share of t's memory pages the OS has mapped (mincore(2)). The process's RSS growth measured it
        before, which read 0 in one CI run: an allocation that reuses pages already resident does not grow it."""
        page = mmap.PAGESIZE
        start = t.data_ptr() - t.data_ptr() % page
        length = t.data_ptr() + t.nbytes - start
        pages = (ctypes.c_ubyte * -(-length // page))()
        assert ctypes.CDLL(None).mincore(ctypes.c_void_p(start), ctypes.c_size_t(length), pages) == 0
        return sum(p & 1 for p in pages) / len(pages)
    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=512)
    cache = KVCache.allocate(config, 2048, 64, torch.float32, "cpu")  # 4 x 2 x 2,048 x 64 x 2 x 16 x 4 B = 128 MiB
    assert cache.storage.nbytes == 128 * 2**20
    resident = resident_fraction(cache.storage)
    assert resident >= 0.99, f"only {resident:.1%} of the cache's pages are resident"
    assert resident_fraction(torch.empty(256 * 2**20, dtype=torch.uint8)) < 0.5  # (a fresh mapping reads low)
