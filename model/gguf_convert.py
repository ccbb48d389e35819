"""convert_gguf: a llama.cpp GGUF file -> a Hugging Face-style checkpoint dir.

Writes config.json (LlamaForCausalLM), model.safetensors (float32, HF tensor names), tokenizer.json,
tokenizer_config.json, chat_template.jinja and generation_config.json, so the rest of the server (and
transformers) loads the result like any HF checkpoint.

Two GGUF conventions to undo:
- shapes are listed fastest-dimension first (ne0, ne1): a torch `[out, in]` weight is `[in, out]` in
  the file's `tensor.shape`; the dequantized numpy array is already in torch order.
- llama.cpp permutes the rows of q_proj/k_proj per head from HF's "rotate half" RoPE layout into an
  interleaved-pairs layout; we apply the inverse, as transformers' GGUF loader does.
"""
from __future__ import annotations

import json
import logging
import re
import struct
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N.")
LAYER_TENSORS = MappingProxyType({
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
})
GLOBAL_TENSORS = MappingProxyType({
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
})
GGUF_TOKEN_TYPE_CONTROL = 3
GGUF_TOKEN_TYPE_USER_DEFINED = 4
# llama.cpp's `tokenizer.ggml.pre` names -> the split regex its BPE merges were learned with. Names not
# listed fall back to GPT-2's regex (ByteLevel's own).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = MappingProxyType(dict.fromkeys(("llama3", "llama-bpe", "llama-v3"), LLAMA3_SPLIT))
DIGIT_SPLITTING_PRE = ("smollm", "starcoder", "refact")  # digits one by one, then GPT-2's regex


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Raises ValueError naming the file for anything it cannot convert, a damaged file included."""
    try:
        _convert(Path(gguf_path), Path(out_dir))
    except (IndexError, KeyError, TypeError, ZeroDivisionError, AttributeError, struct.error) as exc:
        # a truncated header, counts of zero, ids past the vocabulary: gguf's reader does not check them
        raise ValueError(f"{gguf_path}: a damaged or malformed GGUF file ({type(exc).__name__}: {exc})") from exc


def _convert(gguf_path: Path, out_dir: Path) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    metadata = _read_metadata(reader)
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path}: architecture {arch!r} is not supported (only 'llama')")
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    config = llama_config(metadata, tie_word_embeddings=not has_output)
    out_dir.mkdir(parents=True, exist_ok=True)
    logger.info("converting %s (%s, %d tensors) to %s", gguf_path.name, metadata.get("general.name", "?"),
                len(reader.tensors), out_dir)
    _write_json(out_dir / "config.json", config)
    _write_weights(reader, config, out_dir / "model.safetensors")
    _write_tokenizer(metadata, config, out_dir)


def llama_config(metadata: dict[str, Any], *, tie_word_embeddings: bool) -> dict[str, Any]:
    """config.json for LlamaForCausalLM from `llama.*` metadata."""
    def need(key: str) -> Any:
        if f"llama.{key}" not in metadata:
            raise ValueError(f"GGUF metadata lacks llama.{key}")
        return metadata[f"llama.{key}"]

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    if heads < 1 or int(metadata.get("llama.attention.head_count_kv", heads)) < 1:
        raise ValueError(f"GGUF head counts must be positive, got {heads} query and "
                         f"{metadata.get('llama.attention.head_count_kv')} KV heads")
    vocab = metadata.get("llama.vocab_size") or len(metadata.get("tokenizer.ggml.tokens", []))
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(metadata.get("llama.attention.head_count_kv", heads)),
        "head_dim": int(metadata.get("llama.rope.dimension_count", hidden // heads)),
        "max_position_embeddings": int(need("context_length")),
        "rms_norm_eps": _float32_value(metadata.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _float32_value(metadata.get("llama.rope.freq_base", 10000.0)),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": "float32",
    }
    scaling = metadata.get("llama.rope.scaling.type")
    if scaling == "linear":
        config["rope_scaling"] = {"rope_type": "linear",
                                  "factor": _float32_value(metadata["llama.rope.scaling.factor"])}
    elif scaling not in (None, "none"):
        raise ValueError(f"GGUF rope scaling {scaling!r} is not supported")
    for name in ("bos", "eos", "padding"):
        key = f"tokenizer.ggml.{name}_token_id"
        if key in metadata:
            config[f"{'pad' if name == 'padding' else name}_token_id"] = int(metadata[key])
    return config


def unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k permutation. weight: [num_heads * head_dim, hidden]. Within each head
    llama.cpp stores the rows as (head_dim/2 pairs, 2); HF wants (2 halves, head_dim/2)."""
    rows = weight.shape[0]
    per_head = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
    return per_head.swapaxes(1, 2).reshape(weight.shape)


def _write_weights(reader, config: dict[str, Any], path: Path) -> None:
    from gguf.quants import dequantize
    from safetensors.numpy import save_file
    from tqdm import tqdm

    tensors: dict[str, np.ndarray] = {}
    for tensor in tqdm(reader.tensors, desc="dequantizing GGUF", unit="tensor"):
        name = _hf_name(tensor.name)
        if tensor.name == "rope_freqs.weight":  # llama3 rope scaling, as llama.cpp writes it
            factors = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
            if not np.all(factors == 1.0):
                raise ValueError("GGUF rope_freqs.weight holds per-frequency RoPE factors (llama3 scaling); "
                                 "converting them to rope_scaling is not supported, and without them the "
                                 "logits would be wrong")
            continue
        if name is None:
            logger.warning("skipping GGUF tensor %s (no Hugging Face counterpart)", tensor.name)
            continue
        weight = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        torch_shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists ne0 (fastest) first
        weight = weight.reshape(torch_shape)
        if name.endswith("q_proj.weight"):
            weight = unpermute_rotary_rows(weight, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            weight = unpermute_rotary_rows(weight, config["num_key_value_heads"])
        tensors[name] = np.ascontiguousarray(weight)
    missing = {"model.embed_tokens.weight", "model.norm.weight"} - tensors.keys()
    if missing:
        raise ValueError(f"GGUF lacks tensors {sorted(missing)}")
    save_file(tensors, str(path), metadata={"format": "pt"})


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    match = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if match and match.group(2) in LAYER_TENSORS:
        return f"model.layers.{match.group(1)}.{LAYER_TENSORS[match.group(2)]}"
    return None


def _write_tokenizer(metadata: dict[str, Any], config: dict[str, Any], out_dir: Path) -> None:
    model_kind = metadata.get("tokenizer.ggml.model")
    if model_kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {model_kind!r} is not supported (only byte-level BPE 'gpt2')")
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    token_types: list[int] = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    backend = byte_level_bpe(tokens, metadata.get("tokenizer.ggml.merges", []), token_types,
                             metadata.get("tokenizer.ggml.pre", "default"))

    def token_at(key: str) -> str | None:
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        return tokens[int(token_id)] if token_id is not None else None

    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
    if add_bos or add_eos:
        # transformers reads BOS/EOS insertion from tokenizer.json's post-processor, not tokenizer_config.
        from tokenizers import processors
        bos, eos = token_at("bos_token_id"), token_at("eos_token_id")
        single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
        pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
        used = {t for t, flag in ((bos, add_bos), (eos, add_eos)) if flag}
        backend.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(t, backend.token_to_id(t)) for t in used])
    backend.save(str(out_dir / "tokenizer.json"))

    added = {str(i): {"content": tokens[i], "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": token_types[i] == GGUF_TOKEN_TYPE_CONTROL}
             for i in range(len(tokens)) if token_types[i] in (GGUF_TOKEN_TYPE_CONTROL, GGUF_TOKEN_TYPE_USER_DEFINED)}
    chat_template = metadata.get("tokenizer.chat_template")
    tokenizer_config = {
        # Not GPT2Tokenizer: transformers 5 rebuilds named classes' backends and would drop our pre-tokenizer.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token_at("bos_token_id"), "eos_token": token_at("eos_token_id"),
        "unk_token": token_at("unknown_token_id"), "pad_token": token_at("padding_token_id"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "added_tokens_decoder": added,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template
        (out_dir / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    _write_json(out_dir / "generation_config.json",
                {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config})


def byte_level_bpe(tokens: list[str], merges: list[str], token_types: list[int], pre: str):
    """A `tokenizers` byte-level BPE from GGUF vocabulary, merges ("a b") and token types."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=pairs))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in PRE_TOKENIZER_SPLITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRE_TOKENIZER_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in DIGIT_SPLITTING_PRE:
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        if pre not in ("default", "gpt2"):
            logger.warning("unknown GGUF pre-tokenizer %r; using GPT-2's split", pre)
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    control = [AddedToken(t, special=True, normalized=False)
               for t, kind in zip(tokens, token_types) if kind == GGUF_TOKEN_TYPE_CONTROL]
    user = [AddedToken(t, special=False, normalized=False)
            for t, kind in zip(tokens, token_types) if kind == GGUF_TOKEN_TYPE_USER_DEFINED]
    backend.add_special_tokens(control)
    backend.add_tokens(user)
    return backend


def _read_metadata(reader) -> dict[str, Any]:
    """Every key-value field as a Python value: str, int, float, bool or a list of those."""
    values: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        values[key] = field.contents()
    return values


def _float32_value(value: float) -> float:
    # GGUF stores float32: 1e-5 arrives as 9.999999747e-06; write the shortest decimal that is the same float32.
    return float(np.format_float_positional(np.float32(value), unique=True, trim="-"))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
