"""model.sampler against straightforward per-row references (HF / OpenAI semantics)."""
import math

import pytest
import torch

from model.sampler import SamplingTensors, hashed_uniform, sample

V = 50


def tensors(B, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seeds=None, index=None, **kw):
    def col(v, dtype):
        return torch.tensor(v if isinstance(v, list) else [v] * B, dtype=dtype)
    temp = col(temperature, torch.float32)
    tk, tp, mp = col(top_k, torch.int64), col(top_p, torch.float32), col(min_p, torch.float32)
    seeds = seeds if seeds is not None else [None] * B
    greedy = (temp == 0).tolist()
    flags = dict(all_greedy=all(greedy), any_greedy=any(greedy),
                 any_top_k=bool((tk > 0).any()), any_top_p=bool((tp < 1).any()), any_min_p=bool((mp > 0).any()),
                 any_seeded=any(s is not None for s in seeds), any_unseeded=any(s is None for s in seeds))
    flags.update(kw)
    return SamplingTensors(temperature=temp, top_k=tk, top_p=tp, min_p=mp,
                           seeds=torch.tensor([s or 0 for s in seeds]),
                           has_seed=torch.tensor([s is not None for s in seeds]),
                           output_index=col(index if index is not None else 0, torch.int64), **flags)


def ref_filter(row: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """The set of allowed token ids for one row of (already tempered) logits, the plain way."""
    order = sorted(range(len(row)), key=lambda i: -row[i].item())
    keep = set(order)
    if top_k > 0:
        kth = row[order[top_k - 1]].item()
        keep = {i for i in keep if row[i].item() >= kth}
    if top_p < 1.0:
        masked = torch.tensor([row[i].item() if i in keep else -math.inf for i in range(len(row))])
        probs = masked.softmax(-1)
        mass, kept = 0.0, set()
        for i in sorted(keep, key=lambda i: -row[i].item()):
            if mass >= top_p and kept:
                break
            kept.add(i)
            mass += probs[i].item()
        keep = kept
    if min_p > 0:
        masked = torch.tensor([row[i].item() if i in keep else -math.inf for i in range(len(row))])
        probs = masked.softmax(-1)
        keep = {i for i in keep if probs[i] >= min_p * probs.max()}
    return keep


def test_greedy_is_argmax():
    logits = torch.randn(6, V)
    out = sample(logits, tensors(6, temperature=0.0))
    assert torch.equal(out.token_ids, logits.argmax(-1))


def test_filters_match_reference_support():
    torch.manual_seed(0)
    cases = [(5, 1.0, 0.0), (0, 0.7, 0.0), (0, 1.0, 0.2), (8, 0.9, 0.05), (1, 1.0, 0.0)]
    logits = torch.randn(len(cases), V) * 3
    t = tensors(len(cases), top_k=[c[0] for c in cases], top_p=[c[1] for c in cases],
                min_p=[c[2] for c in cases])
    allowed = [ref_filter(logits[i], *c) for i, c in enumerate(cases)]
    gen = torch.Generator().manual_seed(0)
    seen = [set() for _ in cases]
    for _ in range(300):
        ids = sample(logits, t, gen).token_ids.tolist()
        for i, tok in enumerate(ids):
            assert tok in allowed[i], (i, tok)
            seen[i].add(tok)
    for i in range(len(cases)):  # sampling reaches the bulk of the allowed set
        assert len(seen[i]) >= min(len(allowed[i]), 3)


@pytest.mark.parametrize("seed", range(4))
def test_what_is_sampled_from_equals_transformers_processors(seed):
    """Penalty, temperature, top-k, top-p and min-p against transformers' own logits processors, chained in
    the order generate() applies them: the logits the draw sees, values and -inf mask."""
    from transformers.generation import logits_process as hf

    from model.sampler import _apply_penalties, warped
    gen = torch.Generator().manual_seed(seed)
    cases = [(1.3, 0.7, 5, 1.0, 0.0), (1.0, 1.0, 0, 0.8, 0.0), (1.1, 1.5, 0, 1.0, 0.1), (2.0, 0.5, 9, 0.9, 0.05),
             (1.0, 1.0, 1, 1.0, 0.0), (1.0, 0.9, 0, 0.5, 0.2), (1.2, 1.0, 40, 0.95, 0.0)]
    B = len(cases)
    logits = torch.randn(B, V, generator=gen) * 3
    history = torch.randint(0, V, (B, 12), generator=gen)  # prompt then output, as HF's input_ids
    rep, temp, top_k, top_p, min_p = (list(c) for c in zip(*cases))
    t = tensors(B, temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p)
    t = SamplingTensors(**{**t.__dict__, "repetition_penalty": torch.tensor(rep),
                           "presence_penalty": torch.zeros(B), "frequency_penalty": torch.zeros(B),
                           "prompt_tokens": history[:, :5], "output_tokens": history[:, 5:], "max_logprobs": 0})
    ours = warped(_apply_penalties(logits, t), t)
    for b, (r, temperature, k, p, m) in enumerate(cases):
        chain = [hf.RepetitionPenaltyLogitsProcessor(r), hf.TemperatureLogitsWarper(temperature)]
        chain += [hf.TopKLogitsWarper(k)] if k else []
        chain += [hf.TopPLogitsWarper(p)] if p < 1 else []
        chain += [hf.MinPLogitsWarper(m)] if m else []
        want = hf.LogitsProcessorList(chain)(history[b:b + 1], logits[b:b + 1].clone())[0]
        assert torch.equal(ours[b].isinf(), want.isinf()), (b, cases[b])
        kept = ~want.isinf()
        torch.testing.assert_close(ours[b][kept], want[kept], msg=lambda m: f"{cases[b]}: {m}")


def test_sampling_frequencies_follow_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    out = sample(logits, tensors(4000, temperature=0.5), torch.Generator().manual_seed(1)).token_ids
    freq = torch.bincount(out, minlength=4).float() / 4000
    assert torch.allclose(freq, (logits[0] / 0.5).softmax(-1), atol=0.03)


def test_penalties_match_reference():
    torch.manual_seed(0)
    B = 3
    logits = torch.randn(B, V)
    prompt = [[1, 2, 3], [4], [5, 5]]
    output = [[3, 7, 7], [], [9, 9, 9, 1]]
    rep, pres, freq = [1.3, 1.0, 2.0], [0.5, 0.0, -0.3], [0.2, 1.0, 0.4]
    pad = lambda ls: torch.tensor([x + [V] * (max(map(len, ls)) - len(x)) for x in ls])  # noqa: E731
    t = tensors(B, temperature=0.0)
    t = SamplingTensors(**{**t.__dict__, "repetition_penalty": torch.tensor(rep),
                           "presence_penalty": torch.tensor(pres), "frequency_penalty": torch.tensor(freq),
                           "prompt_tokens": pad(prompt), "output_tokens": pad(output),
                           "max_logprobs": 0})
    from model.sampler import _apply_penalties
    got = _apply_penalties(logits, t)
    want = logits.clone()
    for b in range(B):
        for tok in set(prompt[b]) | set(output[b]):
            x = want[b, tok]
            want[b, tok] = x / rep[b] if x > 0 else x * rep[b]
        for tok in set(output[b]):
            want[b, tok] -= freq[b] * output[b].count(tok) + pres[b]
    assert torch.allclose(got, want)
    out = sample(logits, t)
    assert torch.equal(out.token_ids, want.argmax(-1))
    assert torch.allclose(out.logprobs, logits.log_softmax(-1).gather(1, out.token_ids[:, None])[:, 0])


def test_banned_tokens_masked():
    logits = torch.zeros(2, V)
    logits[:, 2] = 10.0
    t = tensors(2, temperature=0.0)
    t = SamplingTensors(**{**t.__dict__, "banned_tokens": torch.tensor([[2, V], [V, V]])})
    assert sample(logits, t).token_ids.tolist()[0] != 2 and sample(logits, t).token_ids.tolist()[1] == 2


def test_seeded_rows_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    row = torch.randn(1, V)
    alone = [sample(row, tensors(1, seeds=[7], index=i)).token_ids.item() for i in range(20)]
    busy = torch.randn(5, V)
    busy[3] = row[0]
    gen = torch.Generator().manual_seed(123)
    together = [sample(busy, tensors(5, seeds=[None, 1, None, 7, 2], index=i, top_k=[0, 0, 3, 0, 5]),
                       gen).token_ids[3].item() for i in range(20)]
    assert alone == together
    assert len(set(alone)) > 1  # it is sampling, not argmax
    other_seed = [sample(row, tensors(1, seeds=[8], index=i)).token_ids.item() for i in range(20)]
    assert other_seed != alone


def test_hashed_uniform_is_uniform_in_open_interval():
    u = hashed_uniform(torch.tensor([0, 1, 2**62]), torch.tensor([0, 5, 9]), 20000)
    assert (u > 0).all() and (u < 1).all()
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    # the extremes a hash can give (with 24 bits the top one was exactly 1.0: one token in 2**24 drew an
    # infinite Gumbel and was sampled whatever its logit, or NaN where masked; a grammar fuzzer caught it)
    from model.sampler import UNIFORM_BITS, open_unit_float
    ends = open_unit_float(torch.tensor([0, (1 << UNIFORM_BITS) - 1]))
    assert ends.dtype == torch.float32 and 0 < ends[0] and ends[1] < 1
    assert torch.isfinite(-torch.log(-torch.log(ends))).all()


def test_logprobs_are_raw_log_softmax_with_top_n():
    logits = torch.randn(4, V)
    t = tensors(4, temperature=[0.0, 1.0, 0.7, 0.0], top_k=[0, 3, 0, 0], max_logprobs=5)
    out = sample(logits, t, torch.Generator().manual_seed(0))
    ref = logits.log_softmax(-1)
    assert torch.allclose(out.logprobs, ref.gather(1, out.token_ids[:, None])[:, 0])
    top = ref.topk(5, -1)
    assert torch.equal(out.top_ids, top.indices) and torch.allclose(out.top_logprobs, top.values)


def test_penalties_on_a_subset_of_rows_leave_the_others_alone():
    """penalty_rows: only those rows are penalised (their tables hold R rows); the rest keep their logits."""
    from model.sampler import _apply_penalties
    torch.manual_seed(1)
    logits = torch.randn(5, V)
    rows, output = [3, 1], [[4, 4, 9], [2]]
    pad = lambda ls: torch.tensor([x + [V] * (max(map(len, ls)) - len(x)) for x in ls])  # noqa: E731
    t = tensors(5, temperature=0.0)
    t = SamplingTensors(**{**t.__dict__, "penalty_rows": torch.tensor(rows),
                           "repetition_penalty": torch.tensor([1.5, 1.2]), "prompt_tokens": pad([[0], [7, 8]]),
                           "presence_penalty": torch.tensor([0.3, 0.0]), "frequency_penalty": torch.tensor([0.5, 1.0]),
                           "output_tokens": pad(output)})
    got = _apply_penalties(logits, t)
    want = logits.clone()
    for r, prompt, out, rep, pres, freq in zip(rows, [[0], [7, 8]], output, [1.5, 1.2], [0.3, 0.0], [0.5, 1.0]):
        for tok in set(prompt) | set(out):
            x = want[r, tok]
            want[r, tok] = x / rep if x > 0 else x * rep
        for tok in set(out):
            want[r, tok] -= freq * out.count(tok) + pres
    assert torch.allclose(got, want) and not torch.equal(got[3], logits[3])
    assert torch.equal(got[[0, 2, 4]], logits[[0, 2, 4]])


def test_a_sequences_token_array_follows_its_tokens():
    from server.sampling_params import SamplingParams
    from server.sequence import Sequence
    seq = Sequence("s", list(range(10, 40)), SamplingParams())
    assert seq.token_array().tolist() == seq.token_ids
    for t in range(100):  # grows past its buffer, a token at a time
        seq.token_ids.append(t)
        assert seq.token_array().tolist() == seq.token_ids
    seq.token_ids.append(-1)                           # a placeholder of a step in flight ...
    assert seq.token_array().tolist() == seq.token_ids
    seq.token_ids[-1] = 77                             # ... filled when it completes
    seq.token_ids.append(-1)
    assert seq.token_array().tolist() == seq.token_ids
    del seq.token_ids[-1:]                             # dropped at a stop
    assert seq.token_array().tolist() == seq.token_ids
    seq.token_ids[-1] = 5                              # any change at the tail is seen
    assert seq.token_array().tolist() == seq.token_ids
    seq.token_ids += [-1, -1]                          # two steps' placeholders; the earlier one filled
    assert seq.token_array().tolist() == seq.token_ids
    seq.token_ids[-2] = 8
    assert seq.token_array().tolist() == seq.token_ids


def test_sampling_tables_hold_only_the_penalised_rows():
    """build_sampling_tensors: a batch of 6 with 2 penalised rows samples as the same rows alone would, and
    uploads their tables only."""
    from server.sampling_batch import build_sampling_tensors
    from server.sampling_params import SamplingParams
    from server.sequence import Sequence
    torch.manual_seed(2)
    seqs = []
    for i in range(6):
        p = SamplingParams(temperature=0.0, frequency_penalty=2.0 if i in (1, 4) else 0.0,
                           repetition_penalty=1.5 if i == 4 else 1.0)
        s = Sequence(str(i), [1 + i, 2 + i, 3], p)
        s.token_ids += [5 + i, 5 + i, 9]
        seqs.append(s)
    logits = torch.randn(6, V)
    for i in range(6):  # each row's repeated output token is its likely one, so penalties change the argmax
        logits[i, 5 + i] = 3.5
    t = build_sampling_tensors(seqs, V, (0,), torch.device("cpu"))
    assert t.penalty_rows.tolist() == [1, 4] and t.output_tokens.shape[0] == t.prompt_tokens.shape[0] == 2
    got = sample(logits, t).token_ids
    alone = [sample(logits[i:i + 1], build_sampling_tensors([s], V, (0,), torch.device("cpu"))).token_ids[0]
             for i, s in enumerate(seqs)]
    assert got.tolist() == [int(x) for x in alone]
    assert got[1] != logits[1].argmax() and got[0] == logits[0].argmax()


def test_seeded_rows_hashed_alone_draw_what_the_whole_batch_hash_draws():
    """seeded_rows: a batch mixing seeded and unseeded rows hashes only the seeded rows' uniforms; their tokens
    are the ones the all-rows hash gives, and unseeded rows still sample."""
    torch.manual_seed(3)
    logits = torch.randn(6, V)
    seeds = [None, 11, None, None, 4, None]
    for i in range(5):
        whole = sample(logits, tensors(6, seeds=seeds, index=i), torch.Generator().manual_seed(0)).token_ids
        t = tensors(6, seeds=seeds, index=i)
        t = SamplingTensors(**{**t.__dict__, "seeded_rows": torch.tensor([1, 4])})
        alone = sample(logits, t, torch.Generator().manual_seed(0)).token_ids
        assert alone[[1, 4]].tolist() == whole[[1, 4]].tolist()
        alone_row = sample(logits[1:2], tensors(1, seeds=[11], index=i)).token_ids
        assert alone[1] == alone_row[0]


def test_build_sampling_tensors_names_the_seeded_rows():
    from server.sampling_batch import build_sampling_tensors
    from server.sampling_params import SamplingParams
    from server.sequence import Sequence
    ps = [SamplingParams(temperature=0.7), SamplingParams(temperature=0.7, seed=3), SamplingParams(seed=5),
          SamplingParams(temperature=0.0, seed=9)]
    seqs = [Sequence(str(i), [1, 2], p) for i, p in enumerate(ps)]
    t = build_sampling_tensors(seqs, V, (0,), torch.device("cpu"))
    assert t.seeded_rows.tolist() == [1, 2] and t.any_seeded and t.any_unseeded  # greedy row 3: argmax
    t = build_sampling_tensors(seqs[1:3], V, (0,), torch.device("cpu"))
    assert t.seeded_rows is None and t.any_seeded and not t.any_unseeded         # all seeded: one hash


# ---- top-k / top-p cuts without a full sort (model.sampler._apply_top_k_top_p) -------------------------

def cut_cases(V=300, seed=0):
    """Rows mixing top-k (none, small, past the candidates, past V) and top-p (off, tight, loose), over
    logits rounded to bfloat16 (ties, as a bf16 model's logits have) and two grammar-like masked rows."""
    gen = torch.Generator().manual_seed(seed)
    ks = [0, 1, 5, 8, 20, 400, 0, 3, 0, 12, 0, 6]
    ps = [0.9, 1.0, 0.5, 0.99, 0.9, 0.7, 1.0, 0.95, 0.3, 1.0, 0.999, 0.8]
    logits = (torch.randn(len(ks), V, generator=gen) * 3).to(torch.bfloat16).float()
    allowed = torch.randperm(V, generator=gen)[:5]
    for row in (4, 8):
        logits[row] = logits[row].masked_fill(~torch.isin(torch.arange(V), allowed), float("-inf"))
    return logits, ks, ps


def masked_by_sort(logits, t):
    from model import sampler
    cut, _ = sampler._thresholds(logits, logits.sort(dim=-1, descending=True).values, t)
    return logits.masked_fill(logits < cut[:, None], float("-inf"))


def test_top_k_top_p_cut_from_candidates_equals_the_full_sort(monkeypatch):
    """The CPU path (best CPU_CANDIDATES tokens, a sort only for rows they cannot settle) and the top-k path
    (torch.topk of the largest k) mask exactly what the full sort masks, ties and -inf rows included."""
    from dataclasses import replace

    from model import sampler
    logits, ks, ps = cut_cases()
    t = tensors(len(ks), top_k=ks, top_p=ps)
    want = masked_by_sort(logits, t)
    monkeypatch.setattr(sampler, "CPU_CANDIDATES", 8)
    _, exact = sampler._thresholds(logits, logits.topk(8, dim=-1).values, t)
    assert 0 < int(exact.sum()) < len(ks), "some rows must need the fallback sort, others not"
    assert torch.equal(sampler._apply_top_k_top_p(logits, t), want)
    with_k = [i for i, k in enumerate(ks) if k > 0]  # the top-k path serves batches where every row has one
    sub = logits[with_k]
    tk = tensors(len(with_k), top_k=[ks[i] for i in with_k], top_p=[ps[i] for i in with_k])
    got = sampler._apply_top_k_top_p(sub, replace(tk, max_top_k=max(min(ks[i], 300) for i in with_k)))
    assert torch.equal(got, masked_by_sort(sub, tk))
    assert torch.equal(got, want[with_k])


def test_top_k_top_p_cut_keeps_the_reference_support():
    """Without ties, the cut keeps exactly the tokens of the plain per-row definition (HF's warpers). A token
    whose mass before it is within 1e-5 of top_p is on the threshold: float32 sums in another order (another
    CPU's vector width) may keep it or not (0.99900001 against 0.999 on one Xeon), so either way passes."""
    logits, ks, ps = cut_cases(seed=1)
    logits = logits + torch.rand(logits.shape, generator=torch.Generator().manual_seed(2)) * 1e-3  # no ties
    t = tensors(len(ks), top_k=ks, top_p=ps)
    from model import sampler
    got = sampler._apply_top_k_top_p(logits, t)
    for i, (k, p) in enumerate(zip(ks, ps)):
        finite = set(torch.isfinite(got[i]).nonzero().squeeze(1).tolist())
        want = {j for j in ref_filter(logits[i], min(k, logits.shape[1]), p, 0.0) if math.isfinite(logits[i, j])}
        row = logits[i].double()  # top-p's mass is over the tokens top-k kept
        row = row.masked_fill(row < row.topk(min(k, len(row))).values[-1], -math.inf) if k > 0 else row
        probs = row.softmax(-1)
        order = row.argsort(descending=True).tolist()
        before = dict(zip(order, (probs[order].cumsum(0) - probs[order]).tolist()))
        on_threshold = {j for j in finite ^ want if p < 1.0 and abs(before[j] - p) < 1e-5}
        assert finite ^ want == on_threshold, (i, sorted(finite ^ want))


def test_seeded_tokens_are_the_same_with_and_without_the_top_k_shortcut():
    from dataclasses import replace
    logits, _, _ = cut_cases(seed=3)
    B = logits.shape[0]
    ks = [7, 1, 30, 2, 5, 9, 11, 4, 3, 8, 20, 6]
    t = tensors(B, top_k=ks, top_p=0.9, seeds=list(range(B)), index=5)
    for step in range(4):
        t = replace(t, output_index=t.output_index + 1)
        assert torch.equal(sample(logits, t).token_ids, sample(logits, replace(t, max_top_k=30)).token_ids)


def test_sampling_batch_sets_max_top_k_only_when_every_sampled_row_has_one():
    """Greedy rows do not count (their token is the argmax whatever the filters); one sampled row without a
    top-k turns the topk cut off."""
    from server.sampling_batch import build_sampling_tensors
    from server.sampling_params import SamplingParams
    from server.sequence import Sequence

    def max_top_k(*params):
        seqs = [Sequence(f"r{i}", [1, 2, 3], p) for i, p in enumerate(params)]
        return build_sampling_tensors(seqs, 100, (2,), torch.device("cpu")).max_top_k
    greedy = SamplingParams(temperature=0.0)
    assert max_top_k(SamplingParams(top_k=5), SamplingParams(top_k=40), greedy) == 40
    assert max_top_k(SamplingParams(top_k=5), SamplingParams(top_p=0.9)) is None
    assert max_top_k(greedy) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (a host sync only exists there)")
@pytest.mark.parametrize("case", ["greedy", "temperature", "top_p", "top_k", "top_k_top_p_min_p", "seeded",
                                  "logprobs"])
def test_gpu_sampling_never_waits_for_the_device(case):
    """Overlap scheduling queues a step's sampling while the host works: no op in sample() may synchronise
    (torch's sync debug mode raises on one), in any setting the sampler branches on."""
    from dataclasses import fields, replace
    B, V = 16, 32000
    kw = {"greedy": dict(temperature=0.0), "temperature": dict(temperature=0.8),
          "top_p": dict(temperature=0.8, top_p=0.9), "top_k": dict(temperature=0.8, top_k=20),
          "top_k_top_p_min_p": dict(temperature=0.8, top_k=[20] * (B - 1) + [50], top_p=0.8, min_p=0.05),
          "seeded": dict(temperature=0.8, top_p=0.9, seeds=list(range(B // 2)) + [None] * (B // 2)),
          "logprobs": dict(temperature=0.8, max_logprobs=5)}[case]
    t = tensors(B, **kw)
    if case.startswith("top_k"):
        t = replace(t, max_top_k=int(t.top_k.max()))
    t = replace(t, **{f.name: getattr(t, f.name).cuda() for f in fields(t)
                      if isinstance(getattr(t, f.name), torch.Tensor)})
    assert sample_without_syncs(torch.randn(B, V, device="cuda"), t).token_ids.shape == (B,)


def sample_without_syncs(logits, t):
    """sample() once to warm up (first calls may allocate), then again with torch raising on any sync."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    sample(logits, t, gen)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return sample(logits, t, gen)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (a host sync only exists there)")
def test_gpu_sampling_with_penalties_bias_and_bans_never_waits_for_the_device():
    """The same for the stages the server's tensors switch on: penalties on some rows (their [R, V] slice),
    logit bias, min_new_tokens bans, seeds, top-k and logprobs, as build_sampling_tensors makes them."""
    from server.sampling_batch import build_sampling_tensors
    from server.sampling_params import SamplingParams
    from server.sequence import Sequence
    V, seqs = 32000, []
    for i in range(12):
        params = SamplingParams(temperature=0.8 if i % 3 else 0.0, top_k=20 if i % 2 else 0, top_p=0.9,
                                repetition_penalty=1.2 if i % 4 == 1 else 1.0,
                                frequency_penalty=0.5 if i % 4 == 2 else 0.0, logit_bias={5: 3.0} if i == 3 else {},
                                min_new_tokens=4 if i == 5 else 0, seed=i if i % 5 == 0 else None, logprobs=2)
        seq = Sequence(f"r{i}", list(range(1, 30 + i)), params)
        seq.token_ids += [7, 8, 9]
        seqs.append(seq)
    t = build_sampling_tensors(seqs, V, (2,), torch.device("cuda"))
    assert t.penalty_rows is not None and t.bias_index is not None and t.banned_tokens is not None
    out = sample_without_syncs(torch.randn(len(seqs), V, device="cuda"), t)
    assert out.token_ids.shape == (len(seqs),) and out.top_ids.shape == (len(seqs), 2)
