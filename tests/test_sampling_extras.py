"""vLLM's sampling extras: allowed_token_ids (a static mask), bad_words (token bans that follow the output) and
truncate_prompt_tokens, from the sampler's tensors through the engine (overlap scheduling, speculative drafts)
to the OpenAI routes.

The engine's outputs are checked against references that use no new code: allowed_token_ids against the same
request with a logit_bias of -100 on every other token (the same draws: a Gumbel sample never makes up a
gap of 100), bad words against a step-by-step greedy run that recomputes the banned ids from the output so
far and bans them with logit_bias.
"""
from __future__ import annotations

import random

import httpx
import pytest
import torch

from model.sampler import sample
from server.bad_words import bad_words_token_ids, banned_next, with_bad_words_token_ids
from server.outputs import AdmissionError
from server.sampling_batch import build_sampling_tensors, only_argmax
from server.sampling_params import SamplingParams
from server.sequence import Sequence
from tests.fake_engine import FakeTokenizer
from tests.live_server import engine_server, fake_server
from tests.test_overlap import make_llm
from tests.test_speculative import looping_prompts

V = 384  # the tiny model's vocabulary


# the rule, by brute force -----------------------------------------------------------------------------------
def banned_by_rule(output: list[int], bans) -> set[int]:
    """vLLM's rule as stated: a sequence's last token is banned when the output ends with the rest of it."""
    return {s[-1] for s in bans if len(s) - 1 <= len(output) and output[len(output) - len(s) + 1:] == list(s[:-1])}


def contains(output: list[int], seq) -> bool:
    return any(output[i:i + len(seq)] == list(seq) for i in range(len(output) - len(seq) + 1))


def test_banned_next_follows_the_rule_and_reads_the_output_only():
    rng = random.Random(0)
    for _ in range(500):
        prompt = [rng.randrange(4) for _ in range(rng.randrange(5))]
        output = [rng.randrange(4) for _ in range(rng.randrange(6))]
        bans = tuple(tuple(rng.randrange(4) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(1, 4)))
        assert set(banned_next(prompt + output, len(prompt), bans)) == banned_by_rule(output, bans)
    assert banned_next([5, 6], 2, ((6, 7),)) == []  # the prompt's last token does not start a word
    assert banned_next([5, 6], 1, ((6, 7),)) == [7]


def test_each_bad_word_is_tokenized_as_it_is_and_after_a_space():
    tok = FakeTokenizer()  # one token per byte, + 3
    assert bad_words_token_ids(tok, ["ab", "c", " c"]) == ((100, 101), (35, 100, 101), (102,), (35, 102),
                                                          (35, 35, 102))  # (" c" once, from "c")
    params = SamplingParams(bad_words=("ab",))
    filled = with_bad_words_token_ids(params, tok)
    assert filled.bad_words_token_ids == ((100, 101), (35, 100, 101)) and filled.bad_words == ("ab",)
    assert with_bad_words_token_ids(SamplingParams(), tok) == SamplingParams()


@pytest.mark.parametrize("fields, words", [
    ({"allowed_token_ids": []}, "allowed_token_ids: the list is empty"),
    ({"allowed_token_ids": [3, -1]}, "allowed_token_ids: token id -1 is negative"),
    ({"bad_words": ["a", ""]}, "bad_words: empty words"),
    ({"bad_words": ["a"] * 65}, "bad_words: 65 words, more than the limit of 64"),
    ({"bad_words": ["a" * 257]}, "bad_words: each word is at most 256 characters"),
    ({"bad_words_token_ids": [[1], []]}, "bad_words_token_ids: empty"),
])
def test_sampling_params_refuse_bad_values_naming_the_field(fields, words):
    with pytest.raises(ValueError, match=words):
        SamplingParams(**fields)


# the sampler's tensors ----------------------------------------------------------------------------------------
def test_sequences_with_constraints_leave_the_argmax_path_and_only_words_of_several_tokens_read_the_output():
    def seq(**kw) -> Sequence:
        return Sequence("r", [1, 2, 3], SamplingParams(temperature=0.0, **kw))
    plain = seq()
    assert only_argmax([plain]) and not plain.reads_own_tokens
    for s in (seq(allowed_token_ids=(5,)), seq(bad_words_token_ids=((5,),)), seq(bad_words_token_ids=((4, 5),))):
        assert not only_argmax([s])
    assert not seq(allowed_token_ids=(5,)).reads_own_tokens  # static: no deferred sampling under overlap
    assert not seq(bad_words_token_ids=((5,), (6,))).reads_own_tokens
    assert seq(bad_words_token_ids=((5,), (4, 5))).reads_own_tokens


def test_the_sampler_masks_allowed_ids_and_bans_bad_words_per_row_with_raw_logprobs():
    torch.manual_seed(0)
    logits = torch.randn(4, V) * 3
    params = [SamplingParams(temperature=0.0, logprobs=3, allowed_token_ids=(7, 300, 33)),
              SamplingParams(temperature=0.0, logprobs=3),
              SamplingParams(temperature=0.0, logprobs=3, bad_words_token_ids=((int(logits[2].argmax()),),)),
              SamplingParams(temperature=0.7, seed=3, logprobs=3, allowed_token_ids=(7, 8),
                             bad_words_token_ids=((9, 8),))]
    seqs = [Sequence(f"r{i}", [1, 2], p) for i, p in enumerate(params)]
    seqs[3].token_ids.append(9)  # its output ends with 9: 8 is banned, 7 is all that is left
    out = sample(logits, build_sampling_tensors(seqs, V, (2,), torch.device("cpu")))
    ids = out.token_ids.tolist()
    assert ids[0] == max((7, 300, 33), key=lambda t: logits[0, t]) and ids[1] == int(logits[1].argmax())
    assert ids[2] == int(logits[2].topk(2).indices[1]) and ids[3] == 7
    raw = logits.log_softmax(-1)
    assert torch.allclose(out.top_logprobs, raw.topk(3).values)  # the model's, not the masked rows'
    assert torch.allclose(out.logprobs, raw.gather(1, out.token_ids[:, None]).squeeze(1))


# the engine ----------------------------------------------------------------------------------------------------
def prompts_and_outputs(llm, n: int = 4) -> tuple[list[list[int]], list[list[int]]]:
    prompts = looping_prompts(n, seed=2)
    plain = llm.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True))
    return prompts, [r.token_ids for r in plain]


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "overlap"])
def engine(tiny_llama_dir, request):
    return make_llm(tiny_llama_dir, overlap=request.param)


SAMPLINGS = [dict(temperature=0.0), dict(temperature=0.9, seed=5), dict(temperature=1.2, seed=8, top_k=6)]


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "seeded", "seeded-top-k"])
def test_allowed_token_ids_sample_as_a_minus_100_bias_on_every_other_token(engine, sampling):
    prompts, outputs = prompts_and_outputs(engine)
    allowed = [tuple(sorted(set(out[::3]) | {17, 250})) for out in outputs]  # some of each output's tokens
    # (greedy without logprobs: the case the plain-argmax fast path would take, were it not turned off)
    base = dict(max_new_tokens=20, ignore_eos=True, logprobs=2 if sampling["temperature"] else None, **sampling)
    deferred = engine.engine.counters.deferred_sampling_steps
    got = engine.generate(prompts, [SamplingParams(allowed_token_ids=a, **base) for a in allowed])
    assert engine.engine.counters.deferred_sampling_steps == deferred  # a static mask does not wait
    want = engine.generate(prompts, [SamplingParams(logit_bias={t: -100.0 for t in range(V) if t not in a}, **base)
                                     for a in allowed])
    for g, w, a, out in zip(got, want, allowed, outputs):
        assert set(g.token_ids) <= set(a) and g.token_ids == w.token_ids and g.token_ids != out
        assert [lp.logprob for lp in g.logprobs or ()] == pytest.approx([lp.logprob for lp in w.logprobs or ()],
                                                                        abs=1e-4)


def test_allowed_token_ids_the_grammar_refuses_end_the_request_naming_the_field(engine):
    """A grammar and allowed_token_ids that share no next token left the row all -inf: token 0 was sampled
    and the request ended blaming the grammar ("refused token 0")."""
    from server.sampling_params import Grammar
    grammar = Grammar(type="regex", value="[a-z]+")
    letters = [t for t in range(3, V) if engine.tokenizer.decode([t]).isalpha()]
    digits = [t for t in range(3, V) if engine.tokenizer.decode([t]).strip().isdigit()] or [0]
    ok = engine.generate([[1, 40, 41]], SamplingParams(temperature=0.0, max_new_tokens=3, grammar=grammar,
                                                       allowed_token_ids=tuple(letters)))
    assert set(ok[0].token_ids) <= set(letters) | set(engine.tokenizer.eos_token_ids)
    engine.engine.add_request("clash", [1, 40, 41], SamplingParams(temperature=0.0, max_new_tokens=3,
                                                                    grammar=grammar, allowed_token_ids=tuple(digits)))
    outs = []
    while engine.engine.has_unfinished():
        outs += engine.engine.step()
    last = outs[-1]
    assert last.finish_reason == "error" and last.error_field == "allowed_token_ids"
    assert "none of these ids is one the grammar allows next" in last.error


def test_logprobs_under_allowed_token_ids_are_the_models_own(engine):
    prompts, outputs = prompts_and_outputs(engine)
    base = SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True, logprobs=5)
    free = engine.generate(prompts, base)
    # every token greedy decoding takes allowed: the same tokens, and the same (unrenormalised) logprobs
    wide = engine.generate(prompts, [base.model_copy(update={"allowed_token_ids": tuple(set(o) | {3})})
                                     for o in outputs])
    # its first token refused: the first position's logprobs (the same context) are still the model's
    narrow = engine.generate(prompts, [base.model_copy(update={"allowed_token_ids": (o[0] + 1, 3)}) for o in outputs])

    def same(a, b) -> None:
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
        assert [v for _, v in a.top] == pytest.approx([v for _, v in b.top], abs=1e-4)
    for f, w, n, out in zip(free, wide, narrow, outputs):
        assert w.token_ids == f.token_ids == out
        for a, b in zip(w.logprobs, f.logprobs):
            same(a, b)
        assert n.token_ids[0] != out[0]
        same(n.logprobs[0]._replace(logprob=f.logprobs[0].logprob), f.logprobs[0])  # the same top n: the model's
        assert n.logprobs[0].logprob < f.logprobs[0].logprob  # the chosen one's own, not renormalised to 0


def word_bans(out: list[int]) -> tuple[tuple[int, ...], ...]:
    """Bad words that bite: two and three of the plain output's tokens in a row, and a single one."""
    return (out[1], out[2]), (out[4], out[5], out[6]), (out[9],)


def stepwise_greedy(llm, prompt: list[int], n: int, bans) -> list[int]:
    """Greedy decoding one request per token, banning by the rule with a logit_bias of -100."""
    out: list[int] = []
    for _ in range(n):
        bias = {t: -100.0 for t in banned_by_rule(out, bans)}
        p = SamplingParams(temperature=0.0, max_new_tokens=1, ignore_eos=True, logit_bias=bias)
        out += llm.generate([prompt + out], p)[0].token_ids
    return out


def test_greedy_bad_words_equal_a_step_by_step_reference(engine):
    prompts, outputs = prompts_and_outputs(engine)
    bans = [word_bans(out) for out in outputs]
    deferred = engine.engine.counters.deferred_sampling_steps
    got = engine.generate(prompts, [SamplingParams(temperature=0.0, max_new_tokens=20, ignore_eos=True,
                                                   bad_words_token_ids=b) for b in bans])
    if engine.engine.config.overlap_scheduling:  # words of several tokens read the output: their sampling waits
        assert engine.engine.counters.deferred_sampling_steps > deferred and engine.engine.counters.overlapped_steps
    for g, prompt, b, out in zip(got, prompts, bans, outputs):
        assert not any(contains(g.token_ids, s) for s in b) and g.token_ids != out[:20]
        assert g.token_ids == stepwise_greedy(engine, prompt, 20, b)


@pytest.mark.parametrize("sampling", SAMPLINGS[1:], ids=["seeded", "seeded-top-k"])
def test_sampled_bad_words_never_appear_and_overlap_changes_nothing(tiny_llama_dir, sampling):
    sync, overlap = make_llm(tiny_llama_dir, overlap=False), make_llm(tiny_llama_dir, overlap=True)
    prompts = looping_prompts(6, seed=4)
    outputs = [r.token_ids for r in sync.generate(prompts, SamplingParams(max_new_tokens=30, ignore_eos=True,
                                                                          **sampling))]
    params = [SamplingParams(max_new_tokens=30, ignore_eos=True, bad_words_token_ids=word_bans(o), **sampling)
              for o in outputs]
    got = sync.generate(prompts, params)
    assert [r.token_ids for r in overlap.generate(prompts, params)] == [r.token_ids for r in got]
    assert [r.token_ids for r in got] != outputs
    for r, p in zip(got, params):
        assert not any(contains(r.token_ids, s) for s in p.bad_words_token_ids)


# speculative decoding --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plain_and_spec(tiny_llama_dir):
    from tests.test_speculative import make_llm as make_spec_llm
    return make_spec_llm(tiny_llama_dir), make_spec_llm(tiny_llama_dir, num_speculative_tokens=4)


@pytest.mark.parametrize("trim", [True, False], ids=["drafts-cut", "drafts-verified-only"])
@pytest.mark.parametrize("sampling", SAMPLINGS[:2], ids=["greedy", "seeded"])
def test_drafts_never_bring_a_refused_token(plain_and_spec, sampling, trim, monkeypatch):
    """With drafts, the tokens are plain decoding's: a draft row is masked as plain decoding would be after
    the drafts before it. The drafts here are an oracle's, the unconstrained output's next tokens, so they
    keep proposing refused ones; without the proposer's cut (verified-only) those are only ever rejected."""
    from server import speculative
    plain, spec = plain_and_spec
    prompts = looping_prompts(8)
    scripts = [r.token_ids for r in plain.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=40))]

    def oracle(tokens, k: int, min_n: int, max_n: int) -> list[int]:
        tokens = tokens.tolist()
        prompt, script = next((p, s) for p, s in zip(prompts, scripts) if tokens[:len(p)] == p)
        return script[len(tokens) - len(prompt):][:k]
    cuts, unrefused = [], speculative.unrefused_drafts

    def cutting(seq, drafts):
        n = unrefused(seq, drafts)
        cuts.append(n < len(drafts))
        return n if trim else len(drafts)
    monkeypatch.setattr(speculative, "propose_ngram", oracle)
    monkeypatch.setattr(speculative, "unrefused_drafts", cutting)
    params = []
    for i, out in enumerate(scripts):
        extra = {"bad_words_token_ids": word_bans(out)} if i % 2 else {
            "allowed_token_ids": tuple(sorted(set(out) - {out[3], out[8]})) + (2,)}
        params.append(SamplingParams(max_new_tokens=40, **extra, **sampling))
    before = spec.engine.counters.accepted_draft_tokens
    got = spec.generate(prompts, params)
    assert spec.engine.counters.accepted_draft_tokens > before and any(cuts)  # (drafts held refused tokens)
    assert [r.token_ids for r in got] == [r.token_ids for r in plain.generate(prompts, params)]
    for r, p in zip(got, params):
        assert p.allowed_token_ids is None or set(r.token_ids) <= set(p.allowed_token_ids)
        assert not any(contains(r.token_ids, s) for s in p.bad_words_token_ids)


def test_the_proposer_cuts_drafts_at_the_first_refused_token():
    from server.speculative import unrefused_drafts
    seq = Sequence("r", [1, 5, 6], SamplingParams(allowed_token_ids=(5, 6, 7, 8), bad_words_token_ids=((6, 8),)))
    seq.token_ids.append(5)  # one output token
    assert unrefused_drafts(seq, [6, 7, 5, 9, 5]) == 3  # 9 is not allowed
    assert unrefused_drafts(seq, [6, 8, 5]) == 1        # 8 after 6 is a bad word
    assert unrefused_drafts(seq, [7, 6, 7]) == 3


# the offline API ---------------------------------------------------------------------------------------------------
def test_the_offline_api_takes_bad_words_and_the_engine_their_ids(plain_and_spec):
    llm = plain_and_spec[0]
    free = llm.generate([[1, 40, 41]], SamplingParams(temperature=0.0, max_new_tokens=6))[0].token_ids
    # a word that is one token of the free output, and encodes back to it alone
    token = next(t for t in free if llm.tokenizer.encode(llm.tokenizer.decode([t]), add_special_tokens=False) == [t])
    params = SamplingParams(temperature=0.0, max_new_tokens=6, bad_words=(llm.tokenizer.decode([token]),))
    got = llm.generate([[1, 40, 41]], params)[0].token_ids  # LLM.generate turns the words into ids itself
    assert token not in got and got[:free.index(token)] == free[:free.index(token)]
    with pytest.raises(AdmissionError, match="bad_words: not turned into token ids"):
        llm.engine.check_admission([1, 40, 41], params)  # the engine never tokenizes
    assert llm.engine.check_admission([1, 40, 41], with_bad_words_token_ids(params, llm.tokenizer)) is None
    with pytest.raises(AdmissionError, match="allowed_token_ids: token id 384 is outside the vocabulary"):
        llm.generate([[1, 40, 41]], SamplingParams(allowed_token_ids=(5, V)))
    with pytest.raises(AdmissionError, match="bad_words_token_ids: token id 999"):
        llm.generate([[1, 40, 41]], SamplingParams(bad_words_token_ids=((5, 999),)))


# the OpenAI routes ---------------------------------------------------------------------------------------------------
ROUTES = {"/v1/completions": {"prompt": "abcdefgh"},
          "/v1/chat/completions": {"messages": [{"role": "user", "content": "abcdefgh"}]}}


@pytest.fixture(scope="module")
def fake():
    with fake_server() as s, httpx.Client(base_url=s.url, timeout=30) as client:
        client.engine = s.engine
        yield client


@pytest.fixture()
def seen(fake, monkeypatch):
    """(prompt ids, SamplingParams) of each request the fake engine is given."""
    got, add = [], fake.engine.add_request

    def recording(request_id, prompt, params):
        got.append((prompt, params))
        return add(request_id, prompt, params)
    monkeypatch.setattr(fake.engine, "add_request", recording)
    return got


@pytest.mark.parametrize("route", ROUTES)
def test_the_routes_take_the_fields(fake, seen, route):
    r = fake.post(route, json={**ROUTES[route], "max_tokens": 3, "n": 2, "allowed_token_ids": [5, 70, 71],
                               "bad_words": ["ab", "q"]})
    assert r.status_code == 200, r.text
    assert [p.allowed_token_ids for _, p in seen] == [(5, 70, 71)] * 2
    assert [p.bad_words_token_ids for _, p in seen] == [((100, 101), (35, 100, 101), (116,), (35, 116))] * 2


@pytest.mark.parametrize("route", ROUTES)
def test_truncate_prompt_tokens_keeps_the_prompts_tail(fake, seen, route):
    full = fake.post(route, json={**ROUTES[route], "max_tokens": 2}).json()["usage"]["prompt_tokens"]
    r = fake.post(route, json={**ROUTES[route], "max_tokens": 2, "truncate_prompt_tokens": 5})
    assert r.status_code == 200, r.text
    assert full > 5 and r.json()["usage"]["prompt_tokens"] == 5
    assert seen[1][0] == seen[0][0][-5:]
    r = fake.post(route, json={**ROUTES[route], "max_tokens": 2, "truncate_prompt_tokens": -1})  # max_model_len
    assert r.json()["usage"]["prompt_tokens"] == full and seen[2][0] == seen[0][0]


LONG = "abcd" * 5000  # 20,000 characters: over the fake engine's max_prompt_chars (16 x its 1,024 tokens)
LONG_BODIES = {"/v1/completions": {"prompt": LONG}, "/v1/chat/completions": {"messages": [{"role": "user",
                                                                                        "content": LONG}]}}


@pytest.mark.parametrize("route", ROUTES)
def test_truncation_takes_a_prompt_over_the_character_limit(fake, route):
    """The character limit refused a long prompt before truncate_prompt_tokens could cut it, the one case
    truncation is for (the body limit still bounds what gets tokenized)."""
    body = {**LONG_BODIES[route], "max_tokens": 2}
    r = fake.post(route, json={**body, "truncate_prompt_tokens": 10})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 10, r.text
    refused = fake.post(route, json=body)
    assert refused.status_code == 400 and "max_prompt_chars" in refused.json()["error"]["message"]
    if route == "/v1/completions":  # TGI's truncate, which shares the check
        r = fake.post("/generate", json={"inputs": LONG, "parameters": {"max_new_tokens": 2, "truncate": 10}})
        assert r.status_code == 200 and r.headers["x-prompt-tokens"] == "10", r.text


@pytest.mark.parametrize("prompt, echoed", [("abcdefgh", "fgh"), ([1, 100, 101, 102, 103], "bcd")])
def test_a_truncated_completion_prompt_echoes_what_is_left(fake, prompt, echoed):
    r = fake.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2, "echo": True,
                                           "truncate_prompt_tokens": 3}).json()
    assert r["usage"]["prompt_tokens"] == 3 and r["choices"][0]["text"].startswith(echoed)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("fields, param, why", [
    ({"allowed_token_ids": []}, "allowed_token_ids", "empty"),
    ({"allowed_token_ids": [-2]}, "allowed_token_ids", "negative"),
    ({"allowed_token_ids": ["5"]}, "allowed_token_ids.0", "integer"),
    ({"bad_words": [""]}, "bad_words", "empty words"),
    ({"bad_words": ["w"] * 65}, "bad_words", "more than the limit of 64"),
    ({"bad_words": ["w" * 257]}, "bad_words", "at most 256 characters"),
    ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens", "keeps no token"),
    ({"truncate_prompt_tokens": -2}, "truncate_prompt_tokens", "keeps no token"),
    ({"truncate_prompt_tokens": 5000}, "truncate_prompt_tokens", "more than max_model_len"),
])
def test_bad_values_are_400s_naming_the_field(fake, route, fields, param, why):
    r = fake.post(route, json={**ROUTES[route], "max_tokens": 2, **fields})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == param and why in err["message"], r.text
    assert err["message"].startswith(param)


@pytest.fixture(scope="module")
def live(tiny_llama_dir):
    with engine_server(tiny_llama_dir) as s, httpx.Client(base_url=s.url, timeout=60) as client:
        yield client


@pytest.mark.parametrize("route", ROUTES)
def test_ids_outside_the_vocabulary_are_400s_naming_the_field(live, route):
    r = live.post(route, json={**ROUTES[route], "max_tokens": 2, "allowed_token_ids": [5, V]})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "allowed_token_ids" and "outside the vocabulary" in err["message"]


def test_the_real_engine_keeps_to_allowed_token_ids_and_away_from_bad_words(live):
    body = {"prompt": [1, 40, 41, 42], "max_tokens": 8, "temperature": 0, "logprobs": 0, "ignore_eos": True}
    free = live.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]["tokens"]
    vocab = {live.post("/detokenize", json={"tokens": [t]}).json()["prompt"]: t for t in (17, 250)}
    allowed = live.post("/v1/completions", json={**body, "allowed_token_ids": [17, 250]}).json()
    assert set(allowed["choices"][0]["logprobs"]["tokens"]) <= set(vocab) and free[0] not in vocab
    banned = live.post("/v1/completions", json={**body, "bad_words": [free[0].strip()]}).json()
    tokens = banned["choices"][0]["logprobs"]["tokens"]
    assert free[0] not in tokens and tokens != free
