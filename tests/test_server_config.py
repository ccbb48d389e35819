"""ServeConfig layering (flags > env > TOML > defaults), naming, and the serve entry point's errors."""
from __future__ import annotations

import argparse

import pytest

from server.config import ConfigError, ServerConfig, field_specs, load_config
from server.engine_config import EngineConfig
from server.serve import add_serve_arguments, run_serve


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(argv)


def test_every_field_has_one_flag_and_env_name():
    specs = field_specs()
    names = [s.name for s in specs]
    assert len(names) == len(set(names)), "server and engine fields must not share a name"
    assert set(names) == set(ServerConfig.model_fields) | set(EngineConfig.model_fields)
    spec = next(s for s in specs if s.name == "max_num_seqs")
    assert (spec.flag, spec.env_var) == ("--max-num-seqs", "GQA_MAX_NUM_SEQS")


def test_defaults_serve_default_model_on_loopback():
    cfg = load_config({}, environ={})
    assert (cfg.server.host, cfg.server.port, cfg.engine.model) == ("127.0.0.1", 8000, None)


def test_precedence_flags_over_env_over_toml(tmp_path):
    toml = tmp_path / "preset.toml"
    toml.write_text('[server]\nport = 7000\nhost = "0.0.0.0"\n[engine]\nnum_kv_heads = 1\nmax_num_seqs = 4\n'
                    'kv_cache_memory = "64MiB"\n')
    env = {"GQA_PORT": "7100", "GQA_MAX_NUM_SEQS": "8", "GQA_CORS_ORIGINS": "https://a.org, https://b.org"}
    args = parse(["--config", str(toml), "--port", "7200", "--enforce-eager"])
    flags = {k: v for k, v in vars(args).items() if k != "config"}
    cfg = load_config(flags, args.config, environ=env)
    assert cfg.server.port == 7200                       # flag beats env and TOML
    assert cfg.engine.max_num_seqs == 8                  # env beats TOML
    assert cfg.server.host == "0.0.0.0" and cfg.engine.num_kv_heads == 1  # TOML beats defaults
    assert cfg.engine.kv_cache_memory == 64 * 2**20 and cfg.engine.enforce_eager is True
    assert cfg.server.cors_origins == ("https://a.org", "https://b.org")


def test_config_from_env_var_and_none_words(tmp_path):
    toml = tmp_path / "x.toml"
    toml.write_text("[engine]\nmax_model_len = 128\n")
    cfg = load_config({}, environ={"GQA_CONFIG": str(toml), "GQA_API_KEY": "k", "GQA_MAX_PROMPT_CHARS": "none"})
    assert cfg.engine.max_model_len == 128 and cfg.server.api_key.get_secret_value() == "k"
    assert cfg.server.max_prompt_chars is None


@pytest.mark.parametrize("flags, env, toml, needle", [
    ({"port": "eighty"}, {}, None, "server.port"),
    ({}, {"GQA_NUM_KV_HEADS": "0"}, None, "env GQA_NUM_KV_HEADS"),
    ({"block_size": "12"}, {}, None, "engine.block_size"),
    ({}, {"GQA_DTYPE": "fp8"}, None, "engine.dtype"),
    ({}, {}, "[engine]\nbogus = 1\n", "engine.bogus: unknown setting"),
    ({}, {}, "[serve]\nport = 1\n", "unknown table or key 'serve'"),
    ({}, {}, "[server\n", "config"),
    ({}, {}, "[engine]\nnum_kv_heads = true\n", "engine.num_kv_heads: not a boolean setting"),  # lax: 1 KV head
    ({}, {}, "[engine]\ngpu_memory_utilization = true\n", "engine.gpu_memory_utilization: not a boolean"),
    ({}, {}, "[engine]\ndtype = false\n", "engine.dtype: not a boolean"),
    ({"seed": str(2**64)}, {}, None, "engine.seed"),  # past torch's manual_seed range
    # a check across fields: "engine: ...", not "engine.engine: ..."
    ({"prompt_lookup_min": "5", "prompt_lookup_max": "3"}, {}, None, "engine: prompt_lookup_min=5"),
])
def test_bad_config_is_one_line_naming_the_field(tmp_path, flags, env, toml, needle):
    path = None
    if toml is not None:
        path = tmp_path / "bad.toml"
        path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(flags, str(path) if path else None, environ=env)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_run_serve_rejects_bad_config_with_exit_code(capsys):
    assert run_serve(parse(["--max-num-seqs", "0"])) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "max_num_seqs" in err


def test_an_address_serve_cannot_listen_on_is_refused_before_the_model_loads(capsys, monkeypatch):
    """uvicorn binds after the lifespan has begun the load: a busy port loaded the whole model (and waited up
    to 60 s for it) before exiting 3; a bad host did the same without naming the setting."""
    import socket

    import server.async_engine
    monkeypatch.setattr(server.async_engine.AsyncEngine, "__init__", lambda *a: pytest.fail("engine created"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        assert run_serve(parse(["--host", "127.0.0.1", "--port", port])) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"server.port: cannot listen on 127.0.0.1:{port}" in err
    assert run_serve(parse(["--host", "x" * 64])) == 2  # a DNS label too long: refused without a lookup
    assert f"server.host: cannot resolve '{'x' * 64}'" in capsys.readouterr().err


def test_an_empty_host_is_refused_not_every_interface():
    with pytest.raises(ConfigError, match="server.host"):
        load_config({}, environ={"GQA_HOST": ""})


@pytest.mark.parametrize("preset", ["llama-3.2-1b", "llama-3.1-8b", "smollm2-135m-kv1"])
def test_presets_are_found_by_name_dots_and_all(preset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # found beside the package, not only from the repository root
    assert load_config({}, preset, environ={}) is not None


def test_a_value_is_shown_once():
    with pytest.raises(ConfigError) as info:
        load_config({"kv_cache_memory": "-5"}, environ={})
    assert str(info.value).count("'-5'") == 1, str(info.value)


def test_missing_config_file_is_named():
    with pytest.raises(ConfigError, match=r"no such file 'does-not-exist' \(nor configs/does-not-exist.toml\)"):
        load_config({}, "does-not-exist", environ={})
    with pytest.raises(ConfigError) as info:  # a path is not a preset name: no configs/ guess to add
        load_config({}, "/tmp/nowhere/x.toml", environ={})
    assert str(info.value) == "config: no such file '/tmp/nowhere/x.toml'"


def test_help_shows_each_default_once():
    from server.config import field_specs
    for spec in field_specs():
        assert spec.help.count("(default: ") == 1, spec.help


def test_a_boolean_is_refused_for_a_setting_that_is_not_one_from_python_too():
    from pydantic import ValidationError
    with pytest.raises(ValidationError, match="not a boolean setting"):
        EngineConfig(num_kv_heads=True)
    with pytest.raises(ValidationError, match="not a boolean setting"):
        ServerConfig(port=False)
    assert EngineConfig(enforce_eager=True).enforce_eager and EngineConfig(num_kv_heads=2).num_kv_heads == 2


def test_toml_booleans_set_boolean_settings(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("[engine]\nenforce_eager = true\nenable_prefix_caching = false\n[server]\nengine_process = true\n")
    cfg = load_config({}, str(toml), environ={})
    assert cfg.engine.enforce_eager and not cfg.engine.enable_prefix_caching and cfg.server.engine_process


@pytest.mark.parametrize("argv, env, setting, device, cuda, want", [
    ([], {}, None, "auto", False, False),                         # unset: the engine's device decides (CPU: off)
    ([], {}, None, "auto", True, True),                           # unset, CUDA seen: a child process
    ([], {}, None, "cuda", False, True),
    ([], {}, None, "cpu", True, False),
    (["--engine-process"], {}, True, "cpu", False, True),         # set: as set, whatever the device
    (["--no-engine-process"], {}, False, "cuda", True, False),
    ([], {"GQA_ENGINE_PROCESS": "off"}, False, "cuda", True, False),
    ([], {"GQA_ENGINE_PROCESS": "none"}, None, "cuda", True, True),
])
def test_engine_process_unset_follows_the_device(argv, env, setting, device, cuda, want, monkeypatch):
    """server.engine_process: a flag pair and env values like any boolean; left unset, on exactly when the
    engine runs on CUDA (server/serve.py's uses_engine_process)."""
    import torch
    from server.serve import uses_engine_process
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    flags = {k: v for k, v in vars(parse(argv + ["--device", device])).items() if k != "config"}
    cfg = load_config(flags, None, environ=env)
    assert cfg.server.engine_process is setting
    assert uses_engine_process(cfg) is want
