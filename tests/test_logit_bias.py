"""OpenAI's logit_bias: added to the raw logits of its row before sampling, checked against a plain reference,
against transformers' sequence_bias on the same weights, and through /v1/completions."""
import httpx
import pytest
import torch

from model.sampler import SamplingTensors, sample
from server.sampling_params import SamplingParams
from tests.test_sampler import V, tensors


def test_the_bias_is_added_to_its_own_row_and_logprobs_stay_raw():
    torch.manual_seed(0)
    logits = torch.randn(3, V)
    bias = {0: {4: 100.0}, 2: {int(logits[2].argmax()): -100.0, 7: 0.5}}  # row 1 has none
    index = [[r for r, b in bias.items() for _ in b], [t for b in bias.values() for t in b]]
    values = [v for b in bias.values() for v in b.values()]
    t = SamplingTensors(**{**tensors(3, temperature=0.0).__dict__, "bias_index": torch.tensor(index),
                           "bias_values": torch.tensor(values), "max_logprobs": 2})
    want = logits.clone()
    for row, b in bias.items():
        for token, v in b.items():
            want[row, token] += v
    out = sample(logits, t)
    assert out.token_ids.tolist() == want.argmax(-1).tolist()
    assert out.token_ids[0] == 4 and out.token_ids[1] == logits[1].argmax() and out.token_ids[2] != logits[2].argmax()
    assert torch.allclose(out.top_logprobs, logits.log_softmax(-1).topk(2).values)  # the model's, not the bias's


def test_a_biased_request_matches_transformers_sequence_bias(tiny_llama_dir):
    """Greedy decoding of the tiny model: the unbiased favourite is banned and another token pushed up, as
    transformers' `sequence_bias` does with single-token keys; a request beside it without a bias is
    unchanged (the bias is per row)."""
    from server.llm import LLM
    from tests.tiny_models import load_hf_model
    ids = [1] + list(range(40, 60))
    llm = LLM(str(tiny_llama_dir), dtype="float32", device="cpu", kv_cache_memory="2MiB")
    plain = SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True)
    unbiased = llm.generate([ids], plain)[0].token_ids
    bias = {unbiased[0]: -100.0, 17: 2.5}
    hf = load_hf_model(tiny_llama_dir).generate(
        torch.tensor([ids]), max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0,
        sequence_bias={(t,): v for t, v in bias.items()})
    want = hf[0, len(ids):].tolist()
    biased = plain.model_copy(update={"logit_bias": bias})
    got = llm.generate([ids, ids], [biased, plain])
    assert got[0].token_ids == want and unbiased[0] not in want and want != unbiased
    assert got[1].token_ids == unbiased


@pytest.fixture(scope="module")
def live(tiny_llama_dir):
    from tests.live_server import engine_server
    with engine_server(tiny_llama_dir) as s:
        yield s


def test_completions_take_logit_bias(live):
    body = {"prompt": [1, 40, 41, 42], "max_tokens": 5, "temperature": 0, "logprobs": 0}
    forced = httpx.post(live.url + "/v1/completions", json={**body, "logit_bias": {"17": 100}}).json()
    free = httpx.post(live.url + "/v1/completions", json=body).json()
    tokens = forced["choices"][0]["logprobs"]["tokens"]
    assert len(set(tokens)) == 1 and tokens != free["choices"][0]["logprobs"]["tokens"]


@pytest.mark.parametrize("bias, words", [
    ({"12x": 1.0}, "keys are token ids"),
    ({"\u00b2": 1.0}, "keys are token ids"),
    ({"-3": 1.0}, "negative"),
    ({"5": -100.5}, "[-100, 100]"),
    ({"100000": 1.0}, "outside the vocabulary"),
])
def test_bad_logit_bias_is_a_400_naming_it(live, bias, words):
    r = httpx.post(live.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2, "logit_bias": bias})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "logit_bias" and words in err["message"]
    assert err["message"].startswith("logit_bias")
