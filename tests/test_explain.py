"""The attention explorer (issue 9): its numbers against an independent recomputation and against the
model's own paged forward, the HTTP contract (errors name the field; disabled means 404), and the PNG CLI.
"""
from __future__ import annotations

import argparse
import json
import struct

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from model.explainer import AttentionExplainer, ExplainError
from model.llama import load_model
from server.attention_map import add_attention_map_arguments, run_attention_map
from server.explain_api import create_explain_disabled_router, create_explain_router
from tests.test_model import PagedRunner

PROMPT = "To be, or not to be, that is the question: whether 'tis nobler in the mind"
TOL = 1e-5


@pytest.fixture(scope="module")
def explainer(tiny_llama_dir) -> AttentionExplainer:
    return AttentionExplainer(tiny_llama_dir)


def paged_forward_with_taps(model, token_ids: list[int]) -> list[dict[str, torch.Tensor]]:
    """Run the prompt through the paged cache (shuffled 4-token blocks); per layer, record what enters
    qkv_proj (the normed residual stream), what o_proj receives (the concatenated z) and what self_attn
    returns."""
    taps: list[dict[str, torch.Tensor]] = [{} for _ in model.model.layers]
    handles = []
    for i, layer in enumerate(model.model.layers):
        def qkv_hook(_m, args, tap=taps[i]):
            tap["hidden"] = args[0].clone()

        def attn_hook(_m, args, out, tap=taps[i]):
            tap["out"] = out.clone()

        def o_proj_hook(_m, args, tap=taps[i]):
            tap["concat"] = args[0].clone()
        handles += [layer.self_attn.qkv_proj.register_forward_pre_hook(qkv_hook),
                    layer.self_attn.register_forward_hook(attn_hook),
                    layer.self_attn.o_proj.register_forward_pre_hook(o_proj_hook)]
    try:
        PagedRunner(model, seed=5).step([(token_ids, 0, [])], all_logits=True)
    finally:
        for h in handles:
            h.remove()
    return taps


def independent_attention(attn, hidden: torch.Tensor, rope_theta: float):
    """softmax(QK^T / sqrt(d_k)) with a causal mask, from qkv_proj's weights and a RoPE written here."""
    heads, kv_heads, dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
    num_tokens = hidden.shape[0]
    qkv = hidden @ attn.qkv_proj.weight.T
    if attn.qkv_proj.bias is not None:
        qkv = qkv + attn.qkv_proj.bias
    q = qkv[:, :heads * dim].reshape(num_tokens, heads, dim)
    k = qkv[:, heads * dim:(heads + kv_heads) * dim].reshape(num_tokens, kv_heads, dim)
    inv_freq = 1.0 / rope_theta ** (torch.arange(0, dim, 2).float() / dim)
    angles = torch.arange(num_tokens).float()[:, None] * inv_freq[None, :]
    cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]

    def rope(x):
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    q, k = rope(q), rope(k)
    k = k.repeat_interleave(heads // kv_heads, dim=1)  # query head h reads kv head h // group
    scores = torch.einsum("ihd,jhd->hij", q, k) / dim ** 0.5
    mask = torch.triu(torch.ones(num_tokens, num_tokens, dtype=torch.bool), diagonal=1)
    return scores.masked_fill(mask, float("-inf")).softmax(-1), scores


@pytest.mark.parametrize("num_kv_heads", [None, 1, 4])  # native 2, pooled to 1, replicated to 4
def test_weights_and_walkthrough_match_the_model(explainer, tiny_llama_dir, num_kv_heads):
    ids = explainer.tokenize(PROMPT)
    model = load_model(tiny_llama_dir, num_kv_heads=num_kv_heads)  # a separate copy, run by the test
    taps = paged_forward_with_taps(model, ids)
    for query_index in (len(ids) - 1, 7):
        result = explainer.explain(PROMPT, layers=[0, 1], num_kv_heads=num_kv_heads, query_index=query_index)
        assert result.num_kv_heads == model.config.num_kv_heads
        for layer in result.layers:
            attn, tap = model.model.layers[layer.layer].self_attn, taps[layer.layer]
            expected, scores = independent_attention(attn, tap["hidden"], model.config.rope_theta)
            assert layer.heads == tuple(range(4))
            assert (layer.weights - expected).abs().max() < TOL
            assert torch.allclose(layer.weights.sum(-1), torch.ones(4, len(ids)), atol=TOL)
            assert (layer.weights.triu(1) == 0).all()
            walk = layer.walkthrough
            concat = tap["concat"][query_index]  # what o_proj received in the paged forward
            for step in walk.heads:
                assert step.kv_head == step.head // (4 // result.num_kv_heads)
                assert (step.scores - scores[step.head, query_index, :query_index + 1]).abs().max() < 1e-4
                assert (step.weights - expected[step.head, query_index, :query_index + 1]).abs().max() < TOL
                assert (step.z - concat.view(4, -1)[step.head]).abs().max() < TOL
            assert (walk.concat - concat).abs().max() < TOL
            assert (walk.output - tap["out"][query_index]).abs().max() < TOL


def test_models_are_cached_per_kv_head_count(explainer):
    assert explainer.model_for(1) is explainer.model_for(1)
    assert explainer.model_for(None) is explainer.model_for(2)
    assert explainer.model_for(1) is not explainer.model_for(2)
    assert [g.query_heads for g in explainer.explain("hi", layers=[0], num_kv_heads=1).groups] == [(0, 1, 2, 3)]


def test_following_another_token_reuses_the_forward(tiny_llama_dir, monkeypatch):
    import model.explainer as explainer_module
    calls = []
    real = explainer_module.capture_layer_inputs
    monkeypatch.setattr(explainer_module, "capture_layer_inputs", lambda *a: calls.append(a[2]) or real(*a))
    fresh = AttentionExplainer(tiny_llama_dir)
    first = fresh.explain(PROMPT, layers=[0], query_index=3)
    again = fresh.explain(PROMPT, layers=[0], query_index=3)
    fresh.explain(PROMPT, layers=[0], query_index=9)
    fresh.explain(PROMPT, layers=[1], query_index=9)  # deeper: one more forward
    assert calls == [1, 2]
    assert torch.equal(first.layers[0].weights, again.layers[0].weights)


# --- HTTP -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(explainer) -> TestClient:
    app = FastAPI()
    app.include_router(create_explain_router(lambda: explainer))
    return TestClient(app)


def test_attention_endpoint_returns_maps_walkthrough_and_groups(client, explainer):
    resp = client.post("/explain/attention", json={"prompt": PROMPT, "layers": [1], "heads": [1, 3],
                                                   "query_index": 5})
    assert resp.status_code == 200, resp.text
    data = resp.json()
    ids = explainer.tokenize(PROMPT)
    assert [t["id"] for t in data["tokens"]] == ids and data["query_index"] == 5
    assert data["num_kv_heads"] == data["native_num_kv_heads"] == 2
    assert data["kv_groups"] == [{"kv_head": 0, "query_heads": [0, 1]}, {"kv_head": 1, "query_heads": [2, 3]}]
    reference = explainer.explain(PROMPT, layers=[1], heads=[1, 3], query_index=5).layers[0]
    (layer,) = data["layers"]
    assert [(h["head"], h["kv_head"]) for h in layer["heads"]] == [(1, 0), (3, 1)]
    weights = torch.tensor([h["weights"] for h in layer["heads"]])
    assert weights.shape == (2, len(ids), len(ids))
    assert (weights - reference.weights).abs().max() < 1e-5
    assert torch.allclose(weights.sum(-1), torch.ones(2, len(ids)), atol=1e-4)
    walk = layer["walkthrough"]
    assert walk["query_index"] == 5 and len(walk["heads"]) == 4  # every head: concat needs them all
    assert all(len(s["scores"]) == len(s["weights"]) == 6 and len(s["q"]) == len(s["z"]) == 16
               for s in walk["heads"])
    assert len(walk["concat"]) == 64 and len(walk["output"]) == 64
    assert abs(torch.tensor(walk["output"]) - reference.walkthrough.output).max() < 1e-5


def test_walkthrough_only_request_leaves_out_the_maps(client):
    full = client.post("/explain/attention", json={"prompt": PROMPT, "query_index": 3}).json()
    walk = client.post("/explain/attention", json={"prompt": PROMPT, "query_index": 3,
                                                   "include_weights": False}).json()
    assert "heads" not in walk["layers"][0]
    assert walk["layers"][0]["walkthrough"] == full["layers"][0]["walkthrough"]


def test_pooled_request_reports_its_grouping(client):
    data = client.post("/explain/attention", json={"prompt": "hello", "num_kv_heads": 1}).json()
    assert data["num_kv_heads"] == 1 and data["kv_groups"] == [{"kv_head": 0, "query_heads": [0, 1, 2, 3]}]


@pytest.mark.parametrize("body, field", [
    ({"prompt": PROMPT, "layers": [2]}, "layers"),
    ({"prompt": PROMPT, "layers": [-1]}, "layers"),
    ({"prompt": PROMPT, "layers": []}, "layers"),
    ({"prompt": PROMPT, "layers": [0, 1, 0, 1, 0]}, "layers"),
    ({"prompt": PROMPT, "layers": "zero"}, "layers"),
    ({"prompt": PROMPT, "heads": [4]}, "heads"),
    ({"prompt": PROMPT, "heads": []}, "heads"),
    ({"prompt": "word " * 300}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"layers": [0]}, "prompt"),
    ({"prompt": PROMPT, "num_kv_heads": 3}, "num_kv_heads"),
    ({"prompt": PROMPT, "num_kv_heads": 0}, "num_kv_heads"),
    ({"prompt": PROMPT, "query_index": 500}, "query_index"),
    ({"prompt": PROMPT, "layer": 0}, "layer"),
    ([1, 2], "body"),
    ({"prompt": "lone \ud800 surrogate"}, "prompt"),  # was a 500 from the tokenizer
    ({"prompt": PROMPT, "num_kv_heads": True}, "num_kv_heads"),  # pydantic's lax mode read it as 1 KV head
    ({"prompt": PROMPT, "layers": [True]}, "layers.0"),
])
def test_bad_requests_get_422_naming_the_field(client, body, field):
    resp = client.post("/explain/attention", content=json.dumps(body),  # ASCII: a lone surrogate as \\ud800
                       headers={"content-type": "application/json"})
    assert resp.status_code == 422, resp.text
    data = resp.json()
    assert data["error_type"] == "validation"
    assert data["error"].startswith(f"{field}:"), data["error"]


def test_malformed_json_is_422(client):
    resp = client.post("/explain/attention", content=b"{nope", headers={"content-type": "application/json"})
    assert resp.status_code == 422 and resp.json()["error"].startswith("body:")


def test_page_static_files_and_model_info(client):
    page = client.get("/explain")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/explain/static/explain.js" in page.text
    assert client.get("/explain/static/explain.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/explain/static/explain.css").status_code == 200
    assert client.get("/explain/static/secret.py").status_code == 404
    info = client.get("/explain/model").json()
    assert info["num_layers"] == 2 and info["num_heads"] == 4 and info["native_num_kv_heads"] == 2
    assert info["valid_num_kv_heads"] == [1, 2, 4] and info["max_prompt_tokens"] == 256


@pytest.mark.parametrize("method, path", [("GET", "/explain"), ("POST", "/explain/attention"),
                                          ("GET", "/explain/model"), ("GET", "/explain/static/explain.js")])
def test_disabled_explorer_answers_404_with_the_flag(method, path):
    app = FastAPI()
    app.include_router(create_explain_disabled_router())
    resp = TestClient(app).request(method, path, json={"prompt": "x"} if method == "POST" else None)
    assert resp.status_code == 404
    assert resp.json() == {"error": "the attention explorer is disabled; start the server with --enable-explain",
                           "error_type": "not_found"}


# --- CLI --------------------------------------------------------------------------------------------

def _cli_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_attention_map_arguments(parser)
    return parser.parse_args(list(argv))


def test_attention_map_writes_a_png_grid(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "maps" / "layer1.png"
    assert run_attention_map(_cli_args("--model", str(tiny_llama_dir), "--prompt", PROMPT, "--layer", "1",
                                       "--num-kv-heads", "1", "--out", str(out))) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert 400 <= width <= 4000 and 300 <= height <= 4000
    assert 10_000 < len(data) < 3_000_000
    assert str(out) in capsys.readouterr().out


def test_attention_map_names_the_bad_flag(tiny_llama_dir, tmp_path):
    for argv, flag in ((("--layer", "9"), "--layer"), (("--layer", "0", "--heads", "0", "7"), "--heads"),
                       (("--layer", "0", "--num-kv-heads", "3"), "--num-kv-heads")):
        with pytest.raises(ValueError, match=f"^{flag}: "):
            run_attention_map(_cli_args("--model", str(tiny_llama_dir), "--prompt", "hi", *argv,
                                        "--out", str(tmp_path / "x.png")))
    assert not (tmp_path / "x.png").exists()


def test_prompts_stop_at_the_model_context(tmp_path):
    """A 64-position model: its context caps the prompt below the explorer's 256 (it ran past the rotary
    table, a 500)."""
    from tests.tiny_models import make_tiny_checkpoint
    short = AttentionExplainer(make_tiny_checkpoint(tmp_path / "short", max_position_embeddings=64))
    assert short.info().max_prompt_tokens == 64
    with pytest.raises(ExplainError, match="at most 64") as err:
        short.explain("word " * 100, layers=[0])
    assert err.value.field == "prompt"


def test_pooled_heads_are_made_as_the_server_makes_them(tiny_llama_dir):
    """With kv_head_method refit the explorer shows the refit heads the server runs (it showed mean
    pooling: by the README's table a different model, 17,385 against 121.8 perplexity for SmolLM2 at 1 head)."""
    from model.kv_refit import load_with_kv_head_method
    refit = AttentionExplainer(tiny_llama_dir, kv_head_method="refit", calibration_tokens=256)
    served = load_with_kv_head_method(tiny_llama_dir, num_kv_heads=1, kv_head_method="refit", calibration_tokens=256)
    shown, mean = refit.model_for(1).model.layers[0].self_attn, load_model(tiny_llama_dir, num_kv_heads=1)
    for name, param in served.model.layers[0].self_attn.named_parameters():
        assert torch.equal(dict(shown.named_parameters())[name], param), name
    assert not torch.equal(shown.qkv_proj.weight, mean.model.layers[0].self_attn.qkv_proj.weight)


def test_explain_error_names_field(explainer):
    with pytest.raises(ExplainError) as err:
        explainer.explain("hello", layers=[0], heads=[0, 12])
    assert err.value.field == "heads" and "0..3" in str(err.value)
