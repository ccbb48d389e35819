"""The model's generation_config.json sampling defaults fill what an OpenAI request leaves unset (as vLLM's
--generation-config auto); explicit fields win; TGI routes keep their own defaults; `none` turns it off."""
from __future__ import annotations

import json
import logging
import shutil

import httpx
import pytest

from model.generation_defaults import sampling_defaults
from server.config import ServerConfig


def test_only_the_keys_present_and_in_range_are_taken(tmp_path, caplog):
    assert sampling_defaults(tmp_path) == {} and sampling_defaults(None) == {}
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 50, "eos_token_id": [1, 2],
         "repetition_penalty": -1.0, "min_p": "x"}))
    with caplog.at_level(logging.WARNING):
        assert sampling_defaults(tmp_path) == {"temperature": 0.6, "top_p": 0.9, "top_k": 50}
    assert "repetition_penalty" in caplog.text and "min_p" in caplog.text
    (tmp_path / "generation_config.json").write_text("{not json")
    assert sampling_defaults(tmp_path) == {}


@pytest.fixture(scope="module")
def model_with_defaults(tiny_llama_dir, tmp_path_factory):
    model = tmp_path_factory.mktemp("gencfg") / "model"
    shutil.copytree(tiny_llama_dir, model)
    (model / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": 2, "temperature": 0.0, "repetition_penalty": 1.8}))
    return model


def complete(url: str, **fields) -> str:
    body = {"prompt": "hello there", "max_tokens": 12, **fields}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_openai_requests_take_the_models_defaults_for_unset_fields(model_with_defaults):
    from tests.live_server import engine_server
    with engine_server(model_with_defaults) as s:
        info = httpx.get(s.url + "/info").json()
        assert info["sampling_defaults"] == {"temperature": 0.0, "repetition_penalty": 1.8}
        unset = complete(s.url)
        assert unset == complete(s.url, temperature=0.0, repetition_penalty=1.8)  # the model's defaults
        assert unset != complete(s.url, temperature=0.0, repetition_penalty=1.0)  # an explicit field wins
        # TGI's /generate keeps its own defaults (greedy, no penalty)
        tgi = httpx.post(s.url + "/generate", json={"inputs": "hello there", "parameters": {"max_new_tokens": 12}},
                         timeout=60).json()["generated_text"]
        assert tgi == complete(s.url, temperature=0.0, repetition_penalty=1.0)


def test_generation_config_none_keeps_openais_defaults(model_with_defaults):
    from tests.live_server import engine_server
    config = ServerConfig(stats_log_interval_s=0, generation_config="none")
    with engine_server(model_with_defaults, server_config=config) as s:
        assert httpx.get(s.url + "/info").json()["sampling_defaults"] == {}
