"""Random tiny HF checkpoints (saved by transformers itself) plus a small trained tokenizer.

Everything is built locally: no hub. The tokenizer is a byte-level BPE trained on a slice of
tinyshakespeare, so real text round-trips and multi-byte characters exercise the detokenizer.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from benchmarks.results import SHAKESPEARE  # ../shared, or the copy carried in .shared/ on the GPU machine

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def make_tiny_tokenizer(out_dir: Path, vocab_size: int = 384) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([SHAKESPEARE.read_text()[:200_000]], trainer=trainer)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 512,
    }))


def make_tiny_checkpoint(out_dir: Path, *, architecture: str = "LlamaForCausalLM", hidden_size: int = 64,
                         num_hidden_layers: int = 2, num_attention_heads: int = 4, num_key_value_heads: int = 2,
                         intermediate_size: int = 128, head_dim: int | None = None,
                         tie_word_embeddings: bool = False, rope_scaling: dict | None = None,
                         max_position_embeddings: int = 512, seed: int = 0, shard_size: str | None = None,
                         vocab_size: int = 384, tokenizer: bool = True, random_norms: bool = False, **extra) -> Path:
    """Save a random model with transformers' own save_pretrained (safetensors) and return its dir.

    random_norms: norm weights and biases random too (HF's init makes them ones and zeros, where reading one
    into the wrong place would not show); off by default, where other tests' tiny models are tuned to HF's."""
    import transformers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kwargs = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                  num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                  num_key_value_heads=num_key_value_heads, max_position_embeddings=max_position_embeddings,
                  tie_word_embeddings=tie_word_embeddings, rope_theta=10000.0,
                  bos_token_id=1, eos_token_id=2, **{"rms_norm_eps": 1e-5, **extra})
    if head_dim is not None:
        kwargs["head_dim"] = head_dim
    if rope_scaling is not None:
        kwargs["rope_scaling"] = rope_scaling
    config_cls = {"LlamaForCausalLM": transformers.LlamaConfig,
                  "MistralForCausalLM": transformers.MistralConfig,
                  "Qwen2ForCausalLM": transformers.Qwen2Config,
                  "Qwen3ForCausalLM": transformers.Qwen3Config}[architecture]
    config = config_cls(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config).eval()
    with torch.no_grad():  # HF's init is small (std 0.02); widen it so logits differ per token
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
            elif random_norms and name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif random_norms:  # biases
                p.normal_(0, 0.1)
    save_kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(out_dir, safe_serialization=True, **save_kwargs)
    if tokenizer:
        make_tiny_tokenizer(out_dir, vocab_size=vocab_size)
    return out_dir


def load_hf_model(model_dir: Path):
    """The transformers reference for a checkpoint, float32 on CPU, eager attention."""
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager").eval()


# three requests of different lengths batched together: what the engine-setting tests generate with
ENGINE_PROMPTS = [[1, 5, 9, 33, 7], [1] + list(range(40, 71)), [1, 300, 301]]


def tiny_triton_llm(model_dir: Path, **settings):
    """An offline engine on a tiny checkpoint with our Triton kernels (the interpreter on CPU)."""
    from server.llm import LLM
    return LLM(str(model_dir), dtype="float32", device="cpu", kv_cache_memory="2MiB", attention_backend="triton",
               **settings)


def greedy_token_ids(llm, max_new_tokens: int = 6) -> list[list[int]]:
    """ENGINE_PROMPTS' greedy tokens, eos ignored."""
    from server.sampling_params import SamplingParams
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, ignore_eos=True)
    return [r.token_ids for r in llm.generate(ENGINE_PROMPTS, params)]
