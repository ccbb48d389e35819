"""Grammar-constrained generation: the sampler's mask against a plain reference, the engine against
transformers generating under the same llguidance mask on the same weights, overlap scheduling and
preemption against the synchronous engine, and TGI's `grammar` / OpenAI's `response_format` over HTTP."""
from __future__ import annotations

import json
import re

import httpx
import llguidance
import pytest
import torch

from model.sampler import SamplingTensors, sample
from server.admission import check_request
from server.grammar import JSON_LAYOUT, GrammarCompiler, allowed_bitmask
from server.outputs import AdmissionError
from server.sampling_params import Grammar, SamplingParams
from tests.test_cuda_graphs import engine_prompts
from tests.test_overlap import assert_same_results, make_llm
from tests.test_sampler import V, tensors

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "pick": {"enum": ["red", "green", "blue"]}},
          "required": ["ok", "pick"], "additionalProperties": False}
REGEX = r"(yes|no) [a-c]{2}[0-9]!"


def json_grammar(schema=SCHEMA) -> Grammar:
    return Grammar(type="json", value=json.dumps(schema))


def matches(text: str, grammar: Grammar) -> bool:
    if grammar.type == "regex":
        return re.fullmatch(grammar.value, text) is not None
    value = json.loads(text)  # compact layout, every required key, only listed keys, enum values
    schema = json.loads(grammar.value)
    return (json.dumps(value) == text and set(value) == set(schema["required"])
            and isinstance(value["ok"], bool) and value["pick"] in schema["properties"]["pick"]["enum"])


def test_the_mask_keeps_only_allowed_tokens_and_logprobs_stay_raw():
    torch.manual_seed(0)
    B = 4
    logits = torch.randn(B, V)
    allowed = torch.rand(B, V) < 0.3
    allowed[:, 7] = True      # never an empty row
    allowed[2] = True         # a row without a grammar: every bit set
    words = torch.zeros(B, (V + 31) // 32 + 1, dtype=torch.int64)  # one spare word, as a wider tokenizer
    for b, v in allowed.nonzero().tolist():
        words[b, v // 32] |= 1 << (v % 32)
    words[2] = -1
    bits = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)  # as uint32 bit patterns
    greedy = sample(logits, SamplingTensors(**{**tensors(B, temperature=0.0).__dict__, "allowed_bits": bits,
                                               "max_logprobs": 1}))
    want = logits.masked_fill(~allowed, float("-inf")).argmax(-1)
    assert greedy.token_ids.tolist() == want.tolist() and want[2] == logits[2].argmax()
    assert torch.allclose(greedy.top_logprobs[:, 0], logits.log_softmax(-1).max(-1).values)  # the model's
    for seed in range(20):
        drawn = sample(logits, SamplingTensors(**{**tensors(B, temperature=1.5, seeds=[seed] * B).__dict__,
                                                  "allowed_bits": bits}))
        assert all(allowed[b, t] for b, t in enumerate(drawn.token_ids.tolist()))


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    from server.llm import LLM
    return LLM(str(tiny_llama_dir), dtype="float32", device="cpu", kv_cache_memory="2MiB")


def test_allowed_bitmask_is_what_the_matcher_allows(llm):
    compiler = llm.engine.grammars
    g = compiler.matcher(Grammar(type="regex", value=REGEX))
    mask = allowed_bitmask([None, g])
    assert mask.shape == (2, (compiler.mask_vocab_size + 31) // 32) and (mask[0] == -1).all()
    ids = [i for i in range(compiler.mask_vocab_size) if (int(mask[1, i // 32]) >> (i % 32)) & 1]
    decode = llm.engine.tokenizer.decode
    assert ids and all(re.fullmatch(r"y|ye|yes|n|no|yes |no ", decode([i])) for i in ids)
    # several rows are filled on the executor's threads: each row as if filled alone, free rows untouched
    grammars = [compiler.matcher(json_grammar()), None, compiler.matcher(Grammar(type="regex", value=REGEX)), None]
    grammars[0].advance(llm.engine.tokenizer.encode("{", add_special_tokens=False)[0])
    many = allowed_bitmask(grammars)
    assert torch.equal(many[0], allowed_bitmask([grammars[0]])[0]) and torch.equal(many[2], mask[1])
    assert (many[1] == -1).all() and (many[3] == -1).all() and not torch.equal(many[0], many[2])


def test_a_sentencepiece_tokenizer_is_read_with_its_spaces_and_byte_fallback(tmp_path, shakespeare_text):
    """tokenizer.model is rebuilt as a tokenizers BPE (model/tokenizer.py); llguidance must read "▁" as a
    space and <0xC3><0xA9> as the bytes of "é", so the prompt's own encoding walks the grammar to its end."""
    from model.tokenizer import Tokenizer
    from tests.test_tokenizer import make_sentencepiece_dir
    tok = Tokenizer.from_pretrained(make_sentencepiece_dir(tmp_path, shakespeare_text))
    ids = tok.encode("to be, café ☃", add_special_tokens=False)
    assert "<0xC3>" in [tok.id_to_piece(i) for i in ids]  # byte fallback is exercised
    grammar = GrammarCompiler(tok, tok.vocab_size, tok.eos_token_ids).matcher(
        Grammar(type="regex", value=" to be, café ☃"))  # the dummy prefix's space is part of the text
    assert grammar.matcher.try_consume_tokens(ids) == len(ids) and grammar.matcher.is_stopped()


def test_a_token_the_grammar_rejects_fails_the_request_not_completes_it(llm):
    """It used to end the sequence as if the grammar were complete (finish "eos_token", OpenAI "stop" or
    "tool_calls") with output that does not match it."""
    from server.grammar import GrammarFailed
    tok = llm.engine.tokenizer
    g = llm.engine.grammars.matcher(Grammar(type="regex", value=REGEX))
    assert not g.advance(tok.encode("yes", add_special_tokens=False)[0])  # "y" or "yes": more must follow
    seven = tok.encode("7", add_special_tokens=False)[0]
    with pytest.raises(GrammarFailed, match=f"refused token {seven}"):
        g.advance(seven)  # never allowed here
    class FailingMidway:  # as a grammar too complex for the parser fails: on some later token
        def __init__(self, inner):
            self.inner = inner

        def advance(self, token_id):
            raise GrammarFailed(f"the grammar refused token {token_id}")

        def __getattr__(self, name):
            return getattr(self.inner, name)

    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_new_tokens=8, grammar=Grammar(type="regex", value=REGEX))
    seq = engine.add_request("refused", engine_prompts(1, seed=2)[0], params)
    seq.grammar = FailingMidway(seq.grammar)
    finished = [o for _ in range(20) if engine.has_unfinished() for o in engine.step() if o.finished]
    assert [(o.finish_reason, "refused token" in o.error, o.error_field) for o in finished] == [
        ("error", True, "grammar")]  # the request's own fault: answered as a 4xx naming its grammar's field
    assert engine.allocator.num_free_blocks == engine.allocator.num_blocks


def test_a_grammar_that_fails_midway_is_a_4xx_naming_the_routes_field():
    """Through submit's field names (OpenAI: response_format or the tool's schema; TGI: parameters.grammar):
    it was a 500, as if the server had failed."""
    import asyncio
    import types

    from server.config import ServerConfig
    from server.generation import _tracked
    from server.http_errors import error_status, failure_error
    from server.metrics import ServerMetrics
    from server.outputs import RequestOutput

    state = types.SimpleNamespace(metrics=ServerMetrics(lambda: None), config=ServerConfig(),
                                  engine=types.SimpleNamespace(abort=lambda request_id: None))
    failed = RequestOutput("r", [], "", True, "error", error="GrammarFailed: the grammar refused token 7",
                           error_field="grammar")

    async def last(names):
        async def stream():
            yield failed
        return [out async for out in _tracked(state, "r", stream(), 0.0, names, prompt_tokens=1)][-1]

    out = asyncio.run(last({"grammar": "response_format"}))
    err = failure_error(out)
    assert (err.param, error_status(err, True), error_status(err, False)) == ("response_format", 400, 422)
    assert err.message.startswith("response_format: cannot be followed (GrammarFailed")
    engine_fault = failure_error(failed._replace(error_field=None, error="RuntimeError: boom"))
    assert error_status(engine_fault, True) == 500 and engine_fault.param is None


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_grammar_wins_over_min_new_tokens_when_it_allows_only_banned_tokens(llm, caplog, temperature):
    """Under min_new_tokens, stop ids (and eos) are banned; a grammar that allows nothing else here (regex
    "ab" after "a", with "b" a stop id) left the row all -inf, and argmax took token 0, which the grammar
    rejected. The grammar wins: "b" is sampled (a stop id below min_new_tokens does not stop) and the
    sequence ends with the grammar, its text matching."""
    b = llm.engine.tokenizer.encode("b", add_special_tokens=False)
    assert len(b) == 1
    grammar = Grammar(type="regex", value="ab")
    params = SamplingParams(temperature=temperature, seed=3, max_new_tokens=20, min_new_tokens=2,
                            stop_token_ids=b, grammar=grammar)
    with caplog.at_level("WARNING", logger="server.grammar"):
        out = llm.generate(engine_prompts(3, seed=5), params)
    assert [(o.text, o.finish_reason) for o in out] == [("ab", "eos_token")] * 3
    assert "grammar rejected" not in caplog.text


@pytest.mark.parametrize("grammar", [json_grammar(), Grammar(type="regex", value=REGEX)], ids=["json", "regex"])
def test_greedy_under_a_grammar_matches_transformers_under_the_same_mask(tiny_llama_dir, llm, grammar):
    """transformers generates greedily with a logits processor that feeds a fresh llguidance matcher the
    tokens so far and masks what it disallows; ours must give the same tokens, then end where the grammar
    does (transformers, forced, emits eos there). A row without a grammar beside it is unchanged."""
    from transformers import LogitsProcessor, LogitsProcessorList

    from tests.tiny_models import load_hf_model
    tok = llm.engine.tokenizer
    ll_tok = llguidance.LLTokenizer((tiny_llama_dir / "tokenizer.json").read_text(), n_vocab=384,
                                    eos_token=list(tok.eos_token_ids))
    source = (llguidance.LLMatcher.grammar_from_json_schema(json.loads(grammar.value), overrides=JSON_LAYOUT)
              if grammar.type == "json" else llguidance.LLMatcher.grammar_from_regex(grammar.value))

    class Masked(LogitsProcessor):
        def __init__(self, start):
            self.matcher, self.start = llguidance.LLMatcher(ll_tok, source), start

        def __call__(self, input_ids, scores):
            taken = input_ids[0, self.start:].tolist()
            for t in taken[len(taken) - 1:] if len(taken) else []:
                assert self.matcher.consume_token(t)
            mask = torch.tensor(list(self.matcher.compute_bitmask()), dtype=torch.uint8)  # 1 bit a token
            allowed = ((mask[:, None] >> torch.arange(8)) & 1).flatten()[:scores.shape[1]].bool()
            return scores.masked_fill(~allowed, float("-inf"))

    prompts = engine_prompts(3, seed=11)
    params = SamplingParams(temperature=0.0, max_new_tokens=40, grammar=grammar)
    free = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)
    got = llm.generate(prompts + prompts[:1], [params] * 3 + [free])
    hf = load_hf_model(tiny_llama_dir)
    for prompt, out in zip(prompts, got[:3]):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=41, do_sample=False, pad_token_id=0,
                          eos_token_id=list(tok.eos_token_ids),
                          logits_processor=LogitsProcessorList([Masked(len(prompt))]))[0, len(prompt):].tolist()
        assert out.token_ids == ref[:len(out.token_ids)] and ref[len(out.token_ids):] == [tok.eos_token_ids[0]]
        assert out.finish_reason == "eos_token" and matches(out.text, grammar)
    assert got[3].token_ids == llm.generate([prompts[0]], free)[0].token_ids


def test_text_held_for_a_stop_string_is_released_when_the_grammar_ends(llm):
    """The grammar's last "!" could start the stop string "!!", so the stop checker holds it back; the end
    of the grammar must release it."""
    grammar = Grammar(type="regex", value=REGEX)
    out = llm.generate(engine_prompts(2, seed=8), SamplingParams(temperature=0.0, max_new_tokens=40,
                                                                 grammar=grammar, stop=["!!"]))
    assert all(o.finish_reason == "eos_token" and matches(o.text, grammar) for o in out)


@pytest.mark.parametrize("kv_cache_memory", ["2MiB", "96KiB"])
def test_grammar_rows_under_overlap_and_preemption_match_the_synchronous_engine(tiny_llama_dir, kv_cache_memory):
    """Grammar rows sample from masks of the tokens before them: a step with them runs its forward ahead and
    samples once the in-flight tokens are appended; with a small cache they are preempted and recomputed.
    Either way the tokens are the synchronous engine's."""
    prompts = engine_prompts(8, seed=5)
    params = [SamplingParams(temperature=0.0, max_new_tokens=40, ignore_eos=True)] * 4
    params += [SamplingParams(temperature=0.9, seed=i, max_new_tokens=40, logprobs=1,
                              grammar=json_grammar() if i % 2 else Grammar(type="regex", value=REGEX))
               for i in range(4)]
    want = make_llm(tiny_llama_dir, overlap=False, kv_cache_memory=kv_cache_memory).generate(prompts, params)
    llm = make_llm(tiny_llama_dir, overlap=True, kv_cache_memory=kv_cache_memory)
    got = llm.generate(prompts, params)
    assert_same_results(got, want)
    assert all(r.finish_reason == "eos_token" and matches(r.text, p.grammar)
               for r, p in zip(got[4:], params[4:]))
    engine = llm.engine
    assert engine.counters.deferred_sampling_steps >= 10  # steps with grammar rows ran ahead
    if kv_cache_memory == "96KiB":
        assert engine.scheduler.num_preemptions_total > 0
    assert engine.allocator.num_free_blocks == engine.kv_capacity.num_blocks


@pytest.mark.parametrize("grammar, words", [
    (Grammar(type="regex", value="(ab"), "not a valid regex grammar"),
    (Grammar(type="json", value="{not json"), "does not parse"),
    (Grammar(type="json", value='{"type": "wrong"}'), "not a valid json grammar"),
    (Grammar(type="lark", value="start: nowhere"), "not a valid lark grammar"),
    (Grammar(type="json", value="[" * 5000), "nested too deeply"),  # (a RecursionError: a 500)
    (Grammar(type="json", value='{"const": NaN}'), "NaN is not JSON"),  # (Python's json took it)
    (Grammar(type="json", value='{"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}'), "cannot be run"),
])
def test_a_bad_grammar_is_refused_at_admission(llm, grammar, words):
    params = SamplingParams(max_new_tokens=4, grammar=grammar)
    with pytest.raises(AdmissionError, match=re.escape(words)) as err:
        llm.engine.add_request("bad", [1, 5, 6], params)
    assert err.value.field == "grammar" and not llm.engine.has_unfinished()
    assert llm.engine.grammars.check(json_grammar()) is llm.engine.grammars.check(json_grammar())  # validated once
    with pytest.raises(AdmissionError, match="without a grammar compiler"):  # e.g. a stand-in engine's check
        check_request([1, 5], params, 384, llm.engine.scheduler, None)
    assert isinstance(llm.engine.grammars, GrammarCompiler)


def test_the_server_engine_indexes_the_vocabulary_before_the_first_request(live):
    assert live.engine.engine.grammars.vocabulary_indexed


def test_a_tokenizer_llguidance_cannot_read_refuses_grammars_and_nothing_else(llm, caplog):
    class NoJson:
        vocab_size = 10

        def backend_json(self):
            raise ValueError("no tokenizer.json here")
    compiler = GrammarCompiler(NoJson(), 10, ())
    with caplog.at_level("WARNING", logger="server.grammar"):
        compiler.warm()  # start-up goes on
    assert "will be refused" in caplog.text and not compiler.vocabulary_indexed
    with pytest.raises(AdmissionError, match="cannot be used for grammars .*no tokenizer.json") as err:
        compiler.check(json_grammar())
    assert err.value.field == "grammar"


@pytest.fixture(scope="module")
def live(tiny_llama_dir):
    from tests.live_server import engine_server
    with engine_server(tiny_llama_dir) as s:
        yield s


def test_tgi_grammar_json_and_regex(live):
    for spec, grammar in (({"type": "json", "value": SCHEMA}, json_grammar()),
                          ({"type": "json", "value": json.dumps(SCHEMA)}, json_grammar()),
                          ({"type": "regex", "value": REGEX}, Grammar(type="regex", value=REGEX))):
        r = httpx.post(live.url + "/generate", json={"inputs": "To be", "parameters": {
            "max_new_tokens": 40, "grammar": spec, "details": True}})
        body = r.json()
        assert r.status_code == 200 and matches(body["generated_text"], grammar)
        assert body["details"]["finish_reason"] == "eos_token"


def test_openai_response_format(live, tiny_llama_dir):
    schema_fmt = {"type": "json_schema", "json_schema": {"name": "pick", "schema": SCHEMA, "strict": True}}
    r = httpx.post(live.url + "/v1/completions", json={"prompt": "To be", "max_tokens": 40,
                                                      "response_format": schema_fmt})
    choice = r.json()["choices"][0]
    assert r.status_code == 200 and matches(choice["text"], json_grammar()) and choice["finish_reason"] == "stop"
    # any object: a random model need not close one within max_tokens, so a logit_bias pushes "}" (which
    # the grammar allows only where an object may end)
    from tokenizers import Tokenizer
    close = Tokenizer.from_file(str(tiny_llama_dir / "tokenizer.json")).token_to_id("}")
    r = httpx.post(live.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 60, "seed": 3, "temperature": 1.0,
        "response_format": {"type": "json_object"}, "logit_bias": {str(close): 100}})
    choice = r.json()["choices"][0]
    assert r.status_code == 200 and json.loads(choice["message"]["content"]) == {}
    assert choice["finish_reason"] == "stop"


@pytest.mark.parametrize("route, body, status, field", [
    ("/v1/completions", {"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {
        "name": "n", "schema": {"type": "wrong"}}}}, 400, "response_format"),
    ("/v1/completions", {"prompt": "x", "response_format": {"type": "yaml"}}, 400, "response_format.type"),
    ("/generate", {"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "(ab"}}}, 422,
     "parameters.grammar"),
    ("/generate", {"inputs": "x", "parameters": {"grammar": {"type": "json", "value": "{nope"}}}, 422,
     "parameters.grammar"),
])
def test_a_bad_grammar_is_a_4xx_naming_the_field(live, route, body, status, field):
    r = httpx.post(live.url + route, json=body)
    assert r.status_code == status
    if route == "/generate":
        assert r.json()["error"].startswith(field)
    else:
        err = r.json()["error"]
        assert err["param"] == field and err["message"].startswith(field.split(".")[0])
    assert httpx.get(live.url + "/health").status_code == 200
