"""Prompt logprobs (TGI's decoder_input_details): each prompt token's logprob under the model, against
transformers on the same weights, through chunked prefill, a batch mixing requests that ask and that do not,
a preemption's recompute, and the TGI route on a real server."""
from __future__ import annotations

import httpx
import pytest
import torch

from server.llm import LLM
from server.sampling_params import SamplingParams
from tests.live_server import engine_server
from tests.test_cuda_graphs import engine_prompts


def transformers_prompt_logprobs(model_dir, prompt: list[int]) -> list[float]:
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0].float()
    return logits.log_softmax(-1)[:-1].gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1).tolist()


def run_engine(model_dir, prompts, params, graphs: bool = False, **config):
    """Each request's prompt_logprobs, from its first output. With `graphs`, on the graphs' static path
    (use_graph_path_eagerly), where overlap scheduling runs steps ahead of the host."""
    engine = LLM(str(model_dir), dtype="float32", device="cpu", **config).engine
    if graphs:
        engine.runner.use_graph_path_eagerly()
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), p, sp)
    first = {}
    while engine.has_unfinished():
        for out in engine.step():
            first.setdefault(out.request_id, out)
    assert engine.allocator.num_free_blocks == engine.kv_capacity.num_blocks
    return [first[str(i)].prompt_logprobs for i in range(len(prompts))], engine


@pytest.mark.parametrize("kv_cache_memory, graphs", [("2MiB", False), ("64KiB", False), ("2MiB", True)])
def test_prompt_logprobs_match_transformers(tiny_llama_dir, kv_cache_memory, graphs):
    prompts = engine_prompts(6, seed=11)
    params = [SamplingParams(temperature=0.0, max_new_tokens=30, ignore_eos=True, prompt_logprobs=i % 3 != 1)
              for i in range(len(prompts))]
    # 16-token steps: prompts of up to 31 tokens are split into chunks shared with other requests' tokens
    got, engine = run_engine(tiny_llama_dir, prompts, params, graphs, max_num_batched_tokens=16, max_num_seqs=6,
                             kv_cache_memory=kv_cache_memory)
    if graphs:  # overlap ran steps ahead, prompt-logprob steps among them never (they run eagerly)
        assert engine.counters.overlapped_steps > 0
    if kv_cache_memory == "64KiB":
        assert engine.scheduler.num_preemptions_total > 0  # recomputed prompts must not add entries twice
    for prompt, sp, lps in zip(prompts, params, got):
        if not sp.prompt_logprobs:
            assert lps is None
            continue
        assert len(lps) == len(prompt) and lps[0] is None
        want = transformers_prompt_logprobs(tiny_llama_dir, prompt)
        assert torch.allclose(torch.tensor(lps[1:]), torch.tensor(want), atol=1e-4), (lps, want)


def test_prompt_logprobs_in_slices_equal_one_pass(tiny_llama_dir):
    """token_logprobs makes the logits a slice of rows at a time: any slice size gives the same values
    (up to float rounding)."""
    from model.batch import build_step_batch
    from model.kv_cache import KVCache
    from model.llama import load_model
    model = load_model(tiny_llama_dir)
    prompt = engine_prompts(1, seed=2)[0]
    cache = KVCache.allocate(model.config, 4, 16, torch.float32, "cpu")
    with torch.inference_mode():
        hidden = model.hidden_states(build_step_batch([prompt], [0], [[0, 1, 2, 3]], 16), cache)
        rows, targets = torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])
        whole = model.token_logprobs(hidden, rows, targets, chunk=1024)
        sliced = model.token_logprobs(hidden, rows, targets, chunk=5)
    assert whole.shape == (len(prompt) - 1,) and torch.allclose(whole, sliced, atol=1e-5)  # matmuls of other M


def test_tgi_decoder_input_details(tiny_llama_dir):
    with engine_server(tiny_llama_dir, kv_cache_memory="4MiB") as s:
        body = {"inputs": "ROMEO: What light through yonder window", "parameters": {
            "max_new_tokens": 3, "temperature": 0, "details": True, "decoder_input_details": True}}
        d = httpx.post(s.url + "/generate", json=body, timeout=60).json()["details"]
        plain = httpx.post(s.url + "/generate", json={**body, "parameters": {
            **body["parameters"], "decoder_input_details": False}}, timeout=60).json()["details"]
    ids = [t["id"] for t in d["prefill"]]
    want = transformers_prompt_logprobs(tiny_llama_dir, ids)
    assert d["prefill"][0]["logprob"] is None
    assert torch.allclose(torch.tensor([t["logprob"] for t in d["prefill"][1:]]), torch.tensor(want), atol=1e-4)
    assert plain["prefill"] == []
    # the second request prefilled only the prompt's last partial block (prefix cache): other matmul shapes,
    # so the same tokens with logprobs equal to float32 rounding
    key = lambda t: (t["id"], t["text"], t["special"])  # noqa: E731
    assert [key(t) for t in plain["tokens"]] == [key(t) for t in d["tokens"]]
    assert torch.allclose(torch.tensor([t["logprob"] for t in plain["tokens"]]),
                          torch.tensor([t["logprob"] for t in d["tokens"]]), atol=1e-5)


def test_rows_owed_after_a_recompute_skip_what_is_done():
    """A sequence preempted mid-prompt recomputes from position 0; only the logprobs it still owes get rows."""
    from server.scheduler_output import ScheduledSeq, SchedulerOutput
    from server.sequence import Sequence
    prompt = list(range(100, 120))
    seq = Sequence("r", prompt, SamplingParams(prompt_logprobs=True, max_new_tokens=4))
    seq.prompt_logprobs += [-1.0] * 10  # tokens 1..10 done before the preemption
    other = Sequence("o", [5, 6, 7], SamplingParams(max_new_tokens=4))
    sched = SchedulerOutput((ScheduledSeq(other, 3, True, True), ScheduledSeq(seq, 16, True, False)), 19)
    rows, targets, owners = sched.prompt_logprob_rows()
    assert rows == list(range(3 + 10, 3 + 16))    # positions 10..15, after the other sequence's 3 rows
    assert targets == prompt[11:17] and owners == [(seq, 6)]
    seq.num_computed_tokens = 16                  # the rest of the prompt: positions 16..18 predict 17..19
    rows, targets, owners = SchedulerOutput((ScheduledSeq(seq, 4, True, True),), 4).prompt_logprob_rows()
    assert rows == [0, 1, 2] and targets == prompt[17:20] and owners == [(seq, 3)]
