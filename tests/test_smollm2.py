"""The real default model, SmolLM2-135M-Instruct (converted from the PyPI GGUF), against transformers."""
from __future__ import annotations

import torch

from model.llama import load_model
from tests.test_model import PagedRunner
from tests.tiny_models import load_hf_model

PROMPT = [{"role": "user", "content": "Write two sentences about the sea and the moon."}]


def test_greedy_64_tokens_equal_transformers(smollm2_dir):
    import transformers

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    prompt = hf_tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt)
    hf = load_hf_model(smollm2_dir)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=64, min_new_tokens=64, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    ours = PagedRunner(load_model(smollm2_dir), num_blocks=16, block_size=16).greedy(prompt, 64)
    assert ours == ref
    assert len(set(ours)) > 8, "a real model's 64 greedy tokens should not be one repeated token"


COPY_PROMPT = [{"role": "user", "content": "Repeat this text exactly: The quick brown fox jumps over the lazy dog "
                                           "while the old grey cat sleeps on the warm red mat by the door."}]


def test_speculative_greedy_equals_transformers(smollm2_dir):
    """The engine with n-gram drafts (verified several tokens a step) gives transformers' greedy tokens on a
    prompt the answer copies from, and keeps most of its drafts."""
    import transformers

    from server.llm import LLM
    from server.sampling_params import SamplingParams

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    prompt = hf_tokenizer.apply_chat_template(COPY_PROMPT, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt)
    with torch.no_grad():
        ref = load_hf_model(smollm2_dir).generate(
            torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False, eos_token_id=None,
            pad_token_id=0)[0, len(prompt):].tolist()
    llm = LLM(str(smollm2_dir), dtype="float32", device="cpu", kv_cache_memory="64MiB", num_speculative_tokens=4)
    ours = llm.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=32, ignore_eos=True))[0]
    assert ours.token_ids == ref
    counters = llm.engine.counters
    assert counters.accepted_draft_tokens >= 12 and counters.num_steps <= 20, counters


def test_speculative_json_extraction_drafts_forced_and_copied_tokens(smollm2_dir):
    """Extraction under a JSON schema with the real model: the sequence drafts what its grammar forces (keys,
    quotes) and, where nothing is forced, the prompt-lookup drafts its grammar takes (values copied from the
    text): the same tokens as the engine without drafts, the right JSON, under half the steps."""
    import json

    from benchmarks.speculative import EXTRACT_SCHEMA, extract_request
    from server.llm import LLM
    from server.sampling_params import Grammar, SamplingParams

    params = SamplingParams(temperature=0.0, max_new_tokens=80,
                            grammar=Grammar(type="json", value=json.dumps(EXTRACT_SCHEMA)))
    runs = []
    for k in (0, 4):
        llm = LLM(str(smollm2_dir), dtype="float32", device="cpu", kv_cache_memory="64MiB", num_speculative_tokens=k)
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": extract_request(0)}])
        runs.append((llm.generate([prompt], params)[0], llm.engine.counters))
    (plain, _), (spec, counters) = runs
    assert spec.token_ids == plain.token_ids and spec.finish_reason == plain.finish_reason == "eos_token"
    assert json.loads(spec.text)["city"] == "Saint Petersburg"
    assert counters.accepted_draft_tokens >= 20 and counters.num_steps < len(plain.token_ids) / 2, counters
