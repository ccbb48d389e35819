"""LLMEngine / LLM on the tiny random LLaMA (float32, CPU): invariances that continuous batching must keep."""
import random

import pytest
import torch

from server.llm import LLM
from server.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)


def make_llm(model_dir, **kw):
    cfg = dict(dtype="float32", device="cpu", kv_cache_memory="2MiB", max_num_batched_tokens=256)
    cfg.update(kw)
    return LLM(str(model_dir), **cfg)


def prompts(n, lo=3, hi=40, seed=0):
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 384) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return make_llm(tiny_llama_dir)


def test_matches_transformers_greedy(llm, tiny_llama_dir):
    from tests.tiny_models import load_hf_model
    ids = prompts(1, 10, 10)[0]
    hf = load_hf_model(tiny_llama_dir).generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                                min_new_tokens=12, pad_token_id=0)
    assert llm.generate([ids], GREEDY)[0].token_ids == hf[0, len(ids):].tolist()


def test_batch_invariance_greedy(llm):
    ps = prompts(32)
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    together = [r.token_ids for r in llm.generate(ps, params)]
    alone = [llm.generate([p], params)[0].token_ids for p in ps]
    assert together == alone
    assert llm.engine.allocator.num_free_blocks == llm.engine.allocator.num_blocks


def test_preemption_with_tiny_pool_gives_identical_outputs(llm, tiny_llama_dir):
    ps = prompts(8, 10, 30, seed=1)
    params = SamplingParams(temperature=0.0, max_new_tokens=26)
    want = [r.token_ids for r in llm.generate(ps, params)]
    small = make_llm(tiny_llama_dir, kv_cache_memory=10 * 16 * 512)  # 10 blocks of 16 tokens
    assert small.engine.allocator.num_blocks == 10
    got = [r.token_ids for r in small.generate(ps, params)]
    assert got == want
    assert small.engine.scheduler.num_preemptions_total > 0
    assert small.engine.allocator.num_free_blocks == 10


def test_priority_scheduling_with_a_tiny_pool_gives_identical_outputs(llm, tiny_llama_dir):
    """Random priorities reorder the queue and pick the preemption victims; the tokens stay the same."""
    ps = prompts(10, 10, 30, seed=3)
    rng = random.Random(3)
    params = [SamplingParams(temperature=0.0, max_new_tokens=26, priority=rng.randint(-3, 3)) for _ in ps]
    want = [r.token_ids for r in llm.generate(ps, [p.model_copy(update={"priority": 0}) for p in params])]
    small = make_llm(tiny_llama_dir, kv_cache_memory=10 * 16 * 512, scheduling_policy="priority", max_num_seqs=4)
    assert [r.token_ids for r in small.generate(ps, params)] == want
    assert small.engine.scheduler.num_preemptions_total > 0
    assert small.engine.allocator.num_free_blocks == 10


def test_chunked_prefill_equals_one_prefill(llm, tiny_llama_dir):
    ps = prompts(4, 90, 120, seed=2)
    chunked = make_llm(tiny_llama_dir, max_num_batched_tokens=16)
    assert [r.token_ids for r in chunked.generate(ps, GREEDY)] == [r.token_ids for r in llm.generate(ps, GREEDY)]


def test_seeded_request_same_alone_and_in_a_busy_batch(llm):
    p = prompts(1, 8, 8, seed=3)[0]
    seeded = SamplingParams(temperature=1.0, seed=1234, max_new_tokens=16)
    alone = llm.generate([p], seeded)[0].token_ids
    others = prompts(9, seed=4)
    mix = [SamplingParams(temperature=0.8, top_k=20, max_new_tokens=10),
           SamplingParams(temperature=1.0, seed=7, top_p=0.9, max_new_tokens=20), GREEDY]
    batch = others[:4] + [p] + others[4:]
    params = [mix[i % 3] for i in range(4)] + [seeded] + [mix[i % 3] for i in range(5)]
    assert llm.generate(batch, params)[4].token_ids == alone
    assert llm.generate([p], seeded.model_copy(update={"seed": 99}))[0].token_ids != alone


def test_stop_string_id_and_eos(llm):
    p = prompts(1, 12, 12, seed=5)[0]
    full = llm.generate([p], SamplingParams(temperature=0.0, max_new_tokens=30))[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 30
    stop = full.text[8:11]
    r = llm.generate([p], SamplingParams(temperature=0.0, max_new_tokens=30, stop=(stop,)))[0]
    assert r.finish_reason == "stop" and r.stop_reason == stop
    assert r.text == full.text[:full.text.find(stop)]

    tok = full.token_ids[5]
    first = full.token_ids.index(tok)
    r = llm.generate([p], SamplingParams(temperature=0.0, max_new_tokens=30, stop_token_ids=(tok,)))[0]
    assert (r.finish_reason, r.stop_reason, r.token_ids) == ("stop", tok, full.token_ids[:first + 1])
    assert r.text == llm.tokenizer.decode(full.token_ids[:first])  # the stop token's text is not included

    engine = llm.engine
    saved = engine.eos_token_ids, engine.runner.eos_token_ids
    engine.eos_token_ids = engine.runner.eos_token_ids = (tok,)
    try:
        r = llm.generate([p], SamplingParams(temperature=0.0, max_new_tokens=30))[0]
        assert (r.finish_reason, r.token_ids) == ("eos_token", full.token_ids[:first + 1])
        r = llm.generate([p], SamplingParams(temperature=0.0, max_new_tokens=30, ignore_eos=True))[0]
        assert r.finish_reason == "length" and r.token_ids == full.token_ids
        r = llm.generate([p], SamplingParams(temperature=0.0, max_new_tokens=30, min_new_tokens=first + 2))[0]
        assert tok not in r.token_ids[:first + 2]  # eos is masked until min_new_tokens
    finally:
        engine.eos_token_ids, engine.runner.eos_token_ids = saved


def test_logprobs(llm):
    p = prompts(1, seed=6)[0]
    r = llm.generate([p], SamplingParams(temperature=0.0, max_new_tokens=5, logprobs=3))[0]
    assert len(r.logprobs) == 5
    for tok, lp in zip(r.token_ids, r.logprobs):
        assert lp.token_id == tok and len(lp.top) == 3 and lp.top[0] == (tok, pytest.approx(lp.logprob))
    r = llm.generate([p], SamplingParams(temperature=0.0, max_new_tokens=5, logprobs=0))[0]
    assert all(lp.top == () for lp in r.logprobs)


def test_abort_frees_blocks_at_once(llm):
    engine = llm.engine
    for i, p in enumerate(prompts(4, seed=7)):
        engine.add_request(f"a{i}", p, SamplingParams(max_new_tokens=50))
    for _ in range(3):
        engine.step()
    assert engine.allocator.num_free_blocks < engine.allocator.num_blocks
    outs = [engine.abort(f"a{i}") for i in range(4)]
    assert all(o.finished and o.finish_reason == "abort" for o in outs)
    assert engine.abort("a0") is None
    assert engine.allocator.num_free_blocks == engine.allocator.num_blocks and not engine.has_unfinished()


def test_a_request_whose_own_host_work_fails_ends_alone(llm):
    """An exception in one sequence's detokenizer (as tokenizers' DecodeStream once raised for byte-fallback
    output) ends that request with an error; the requests beside it finish as they would alone, its blocks
    are freed, and the engine goes on (it used to propagate out of step() and stop the engine loop)."""
    class Broken:
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def add(self, token_id):
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("Invalid prefix encountered while decoding stream")
            return self.inner.add(token_id)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    engine, ps = llm.engine, prompts(3, seed=9)
    params = SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True)
    want = [r.token_ids for r in llm.generate(ps, params)]
    seqs = [engine.add_request(f"h{i}", p, params) for i, p in enumerate(ps)]
    seqs[1].detokenizer = Broken(seqs[1].detokenizer)
    finished = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert finished["h1"].finish_reason == "error" and "Invalid prefix" in finished["h1"].error
    assert [finished[f"h{i}"].finish_reason for i in (0, 2)] == ["length", "length"]
    assert [seqs[i].output_token_ids for i in (0, 2)] == [want[0], want[2]]
    assert engine.counters.failed_steps_in_a_row == 0
    assert engine.allocator.num_free_blocks == engine.allocator.num_blocks
    assert llm.generate([ps[1]], params)[0].token_ids == want[1]


def test_start_up_refuses_what_would_fail_every_request(tiny_llama_dir, tmp_path, monkeypatch):
    """A bos token the tokenizer adds past the model's vocabulary (every prompt refused) and the Triton
    backend on a CPU without the interpreter (every step failed): refused at start-up, naming why."""
    import json
    import shutil

    from model.config import ConfigError
    from model.ops import make_ops
    model_dir = tmp_path / "bos"
    shutil.copytree(tiny_llama_dir, model_dir)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config["bos_token"] = "<|not_in_the_vocabulary|>"  # the tokenizer adds it as id 384 = vocab_size
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="bos token id 384 is outside the model's vocabulary"):
        make_llm(model_dir)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="Triton's kernels need a CUDA device"):
        make_ops("triton", torch.device("cpu"))


def test_eos_ids_past_the_vocabulary_are_dropped_with_a_warning(caplog):
    """They can never be sampled; kept, they stopped llguidance from reading the tokenizer (no grammars)."""
    from server.admission import token_ids_within

    class Tok:
        bos_token_id = 1
    with caplog.at_level("WARNING", logger="server.admission"):
        assert token_ids_within(Tok(), (2, 400, 383), 384) == (2, 383)
    assert "[400]" in caplog.text and "outside the vocabulary" in caplog.text
    assert token_ids_within(Tok(), (2,), 384) == (2,)


def test_admission_errors(llm):
    from server.outputs import AdmissionError
    with pytest.raises(AdmissionError) as e:
        llm.generate([[1] * 500], SamplingParams(max_new_tokens=100))
    assert e.value.field == "max_new_tokens"
    with pytest.raises(AdmissionError) as e:
        llm.generate([[1, 999]], GREEDY)
    assert e.value.field == "inputs"


def test_text_prompts(llm):
    r = llm.generate(["To be, or not to be"], GREEDY)[0]
    assert r.prompt_token_ids == llm.tokenizer.encode("To be, or not to be") and len(r.token_ids) == 12
    assert r.text == llm.tokenizer.decode(r.token_ids)


def test_narrow_kv_cache_dtype_runs_and_halves_bytes_per_token(llm, tiny_llama_dir):
    half = make_llm(tiny_llama_dir, kv_cache_dtype="bfloat16")
    assert half.engine.kv_capacity.bytes_per_token * 2 == llm.engine.kv_capacity.bytes_per_token
    r = half.generate(prompts(2, seed=8), GREEDY)
    assert all(len(x.token_ids) == 12 and x.finish_reason == "length" for x in r)


def test_fp8_kv_cache_through_the_triton_attention(tiny_llama_dir):
    """kv_cache_dtype fp8_e4m3 with the Triton attention kernels (the interpreter here) gives the torch ops'
    tokens: the kernels read the fp8 cache widened in registers. The cache is written by the torch reference
    in both runs, because the interpreter's own float32 -> fp8 conversion is wrong (it rounds 0.487 to 0.25
    where a GPU's cvt and torch give 0.5); the GPU test in test_gpu_model.py runs the Triton writer too. For
    the same reason decode steps keep the separate writer (decode_fusion off: the fused kernel writes the
    cache itself)."""
    from kernels import reference
    torch_run = make_llm(tiny_llama_dir, kv_cache_dtype="fp8_e4m3", attention_backend="torch")
    triton_run = make_llm(tiny_llama_dir, kv_cache_dtype="fp8_e4m3", attention_backend="triton",
                          decode_fusion=False)
    ops = triton_run.engine.runner.model.ops
    assert ops.name == "triton"
    ops.rotary_and_write_kv = reference.rotary_and_write_kv
    want, got = (llm.generate(prompts(2, seed=9), GREEDY) for llm in (torch_run, triton_run))
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert all(len(r.token_ids) == 12 for r in got)


def test_fp8_kv_cache_needs_ada_or_newer_for_the_triton_kernels(monkeypatch):
    """Triton has no float8_e4m3fn code below compute capability 8.9: refused at start-up, naming the field,
    instead of failing at the first step; the torch ops and newer GPUs pass."""
    from model.kv_dtype import resolve_kv_cache_dtype
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match=r"kv_cache_dtype='fp8_e4m3'.*8\.9.*this one is 8\.0"):
        resolve_kv_cache_dtype("fp8_e4m3", torch.bfloat16, cuda, "triton")
    assert resolve_kv_cache_dtype("fp8_e4m3", torch.bfloat16, cuda, "torch") == torch.float8_e4m3fn
    assert resolve_kv_cache_dtype("bfloat16", torch.bfloat16, cuda, "triton") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert resolve_kv_cache_dtype("fp8_e4m3", torch.bfloat16, cuda, "triton") == torch.float8_e4m3fn


def test_memory_profiling_step_runs(llm):
    runner = llm.engine.runner  # the CUDA sizing pass; on CPU it only has to run
    runner._profile_step()


def test_block_table_array_mirrors_the_list_through_growth_and_free():
    """The int32 mirror the graphs copy from: append-only growth copies new entries, a freed (new) list or a
    shrunk one starts over, and growth past the mirror's capacity keeps what was there."""
    from server.sequence import Sequence
    seq = Sequence("r", [1, 2, 3], SamplingParams())
    assert seq.block_table_array().tolist() == []
    seq.block_table.extend([7, 3])
    assert seq.block_table_array().tolist() == [7, 3]
    seq.block_table.extend(range(100, 140))  # past the first capacity (16)
    assert seq.block_table_array().tolist() == [7, 3] + list(range(100, 140))
    seq.block_table = []  # what BlockAllocator.free does
    seq.block_table.append(5)
    assert seq.block_table_array().tolist() == [5]
    del seq.block_table[:]
    seq.block_table.extend([9, 8])  # the same list object, rewritten through a shrink
    assert seq.block_table_array().tolist() == [9, 8]
    assert seq.block_table_array().dtype.name == "int32"
