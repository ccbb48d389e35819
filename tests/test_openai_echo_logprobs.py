"""/v1/completions with echo and logprobs: the logprobs object covers the prompt's tokens, then the generated
ones (as vLLM and OpenAI's legacy API send it). Prompt logprobs are checked against transformers on the same
random checkpoint, text_offset against the echoed text, and the stream against the whole response."""
from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

from tests.live_server import engine_server
from tests.test_prompt_logprobs import transformers_prompt_logprobs

PROMPT = "ROMEO: What light through yonder window"
MAX_TOKENS = 4


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with engine_server(tiny_llama_dir, kv_cache_memory="4MiB") as s:
        s.tokenizer = s.engine.tokenizer
        yield s


def complete(server, **body) -> dict:
    body = {"max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, **body}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def assert_prompt_part(lp: dict, prompt_ids: list[int], model_dir) -> None:
    """The first len(prompt_ids) entries: null first, then transformers' logprob of each prompt token, each
    top_logprobs entry holding the prompt token alone."""
    n = len(prompt_ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    got = lp["token_logprobs"][1:n]
    assert None not in got
    want = transformers_prompt_logprobs(model_dir, prompt_ids)
    assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-4), (got, want)
    for i in range(1, n):
        assert lp["top_logprobs"][i] == {lp["tokens"][i]: lp["token_logprobs"][i]}


def test_echo_logprobs_cover_the_prompt_then_the_generated_tokens(server, tiny_llama_dir):
    ids = server.tokenizer.encode(PROMPT)
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as oai:
        echoed = oai.completions.create(model=oai.models.list().data[0].id, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                        temperature=0, logprobs=2, echo=True, extra_body={"ignore_eos": True})
    plain = complete(server, prompt=PROMPT, logprobs=2)["choices"][0]
    choice, lp = echoed.choices[0], echoed.choices[0].logprobs.model_dump()
    assert echoed.usage.prompt_tokens == len(ids) and echoed.usage.completion_tokens == MAX_TOKENS
    total = len(ids) + MAX_TOKENS
    assert [len(lp[k]) for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")] == [total] * 4
    assert lp["tokens"][:len(ids)] == [server.tokenizer.decode([t], skip_special_tokens=False) for t in ids]
    assert_prompt_part(lp, ids, tiny_llama_dir)
    # the generated part is what the same request without echo returns, its offsets after the prompt's text
    assert choice.text == PROMPT + plain["text"]
    tail = {k: v[len(ids):] for k, v in lp.items()}
    assert tail["tokens"] == plain["logprobs"]["tokens"]
    # (the later request prefilled only the prompt's last partial block, the prefix cache holding the rest:
    # other matmul shapes, so logprobs equal to float32 rounding, not bit for bit)
    for got, want in zip(tail["top_logprobs"], plain["logprobs"]["top_logprobs"], strict=True):
        assert got.keys() == want.keys() and all(abs(got[k] - want[k]) < 1e-5 for k in got)
    assert torch.allclose(torch.tensor(tail["token_logprobs"]), torch.tensor(plain["logprobs"]["token_logprobs"]))
    assert tail["text_offset"] == [len(PROMPT) + o for o in plain["logprobs"]["text_offset"]]
    # the BOS the tokenizer added is not in the echoed string: it and the first word both start at 0
    assert lp["tokens"][0] == "<s>" and lp["text_offset"][:2] == [0, 0]
    for token, offset in zip(lp["tokens"][1:len(ids)], lp["text_offset"][1:len(ids)]):
        assert choice.text[offset:offset + len(token)] == token


def test_echo_offsets_follow_the_text_through_split_characters_and_special_tokens(server, tiny_llama_dir):
    decode = server.tokenizer.decode
    text = "Ça va? ☃ é"  # characters of several bytes, split over byte tokens by the tiny BPE
    ids = server.tokenizer.encode(text)
    lp = complete(server, prompt=text, logprobs=0, echo=True)["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(ids) + MAX_TOKENS and lp["top_logprobs"][0] is None
    checked = 0
    for i in range(len(ids)):  # where the prefix decodes to whole characters, its length is the offset
        prefix = decode(ids[:i], skip_special_tokens=True)
        if not prefix.endswith("\ufffd"):
            assert lp["text_offset"][i] == len(prefix), (i, lp["text_offset"])
            checked += 1
    assert checked >= 6 and sum(map(len, lp["tokens"][:len(ids)])) > len(text)  # naive sums would drift
    assert lp["text_offset"] == sorted(lp["text_offset"])
    # token ids are echoed decoded with their special tokens, so there the BOS takes up its 3 characters
    token_prompt = [1] + server.tokenizer.encode(PROMPT, add_special_tokens=False)
    choice = complete(server, prompt=token_prompt, logprobs=1, echo=True)["choices"][0]
    assert choice["text"].startswith("<s>" + PROMPT)
    assert choice["logprobs"]["text_offset"][:3] == [0, 3, 3 + len(choice["logprobs"]["tokens"][1])]
    assert_prompt_part(choice["logprobs"], token_prompt, tiny_llama_dir)


def test_stream_sends_the_prompt_logprobs_with_the_echoed_text(server):
    ids = server.tokenizer.encode(PROMPT)
    body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "logprobs": 1,
            "echo": True, "n": 2}
    whole = complete(server, **body)["choices"]
    r = httpx.post(server.url + "/v1/completions", json={**body, "stream": True}, timeout=60)
    events = [json.loads(b[6:]) for b in r.text.split("\n\n") if b and b != "data: [DONE]"]
    for index in (0, 1):
        chunks = [c["choices"][0] for c in events if c["choices"][0]["index"] == index]
        first = chunks[0]
        assert first["text"].startswith(PROMPT) and len(first["logprobs"]["tokens"]) == len(ids) + 1
        assert first["logprobs"]["token_logprobs"][0] is None and first["logprobs"]["top_logprobs"][0] is None
        assert all(len(c["logprobs"]["tokens"]) == 1 for c in chunks[1:])
        joined = {k: sum((c["logprobs"][k] for c in chunks), []) for k in first["logprobs"]}
        want = whole[index]["logprobs"]
        assert "".join(c["text"] for c in chunks) == whole[index]["text"]
        assert joined["tokens"] == want["tokens"] and joined["text_offset"] == want["text_offset"]
        assert [None if d is None else list(d) for d in joined["top_logprobs"]] == \
               [None if d is None else list(d) for d in want["top_logprobs"]]
        assert joined["token_logprobs"][0] is None
        assert torch.allclose(torch.tensor(joined["token_logprobs"][1:]), torch.tensor(want["token_logprobs"][1:]),
                              atol=1e-5)


def test_echo_alone_has_no_logprobs_and_logprobs_alone_no_prompt(server):
    echo_only = complete(server, prompt=PROMPT, echo=True)["choices"][0]
    assert echo_only["text"].startswith(PROMPT) and echo_only["logprobs"] is None
    lp = complete(server, prompt=PROMPT, logprobs=1)["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == MAX_TOKENS and None not in lp["token_logprobs"]
    r = httpx.post(server.url + "/v1/completions", json={"prompt": PROMPT, "echo": True, "logprobs": 1,
                                                         "max_tokens": 0}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"  # echo-only scoring: refused


def test_byte_tokens_report_their_own_bytes_and_are_spelled_as_openai_does(server):
    """A character split over byte tokens: each token's `bytes` are its own (joined, the text), and its
    token string is spelled "\\xe2\\x98" (chat: OpenAI's and DeepSeek's) or "bytes:\\xe2\\x98" (completions).
    Both used to be U+FFFD's, so `bytes` could not rebuild the content and top_logprobs merged different
    byte tokens into one "\ufffd" key."""
    from types import SimpleNamespace

    from server.api_openai import chat_logprobs
    from server.outputs import TokenLogprob
    tok = server.tokenizer
    text = "Ça va? ☃ é"
    ids = tok.encode(text, add_special_tokens=False)
    split = [i for i in ids if "\ufffd" in tok.decode([i])]
    assert len(split) >= 2
    lps = [TokenLogprob(t, -1.0, tuple((s, -2.0 - k) for k, s in enumerate(split))) for t in ids]
    content = chat_logprobs(SimpleNamespace(engine=SimpleNamespace(tokenizer=tok)), ids, lps).content
    assert b"".join(bytes(e.bytes) for e in content).decode() == text
    assert all(e.token.startswith("\\x") for e, t in zip(content, ids) if t in split)
    want = ["".join(f"\\x{b:02x}" for b in tok.token_bytes(s)) for s in split]
    assert [t.token for t in content[0].top_logprobs] == want
    # completions: echo shows the prompt's byte tokens so, and their top_logprobs keys stay apart
    choice = complete(server, prompt=text, logprobs=5, echo=True)["choices"][0]
    prompt_tokens = choice["logprobs"]["tokens"][1:len(tok.encode(text))]
    assert [t.startswith("bytes:") for t in prompt_tokens] == [i in split for i in ids]
    assert all(len(top) == 5 for top in choice["logprobs"]["top_logprobs"][-MAX_TOKENS:])
