"""ServeConfig: the server's own settings plus the EngineConfig, from defaults, a TOML file, env and flags.

This is the only module that reads the environment. Precedence, highest first:
    command-line flags  >  environment (GQA_<FIELD>)  >  TOML file (--config / GQA_CONFIG)  >  defaults

Every field of ServerConfig and of EngineConfig is settable all three ways under one name:
    field ``max_num_seqs``  ->  flag ``--max-num-seqs``  ->  env ``GQA_MAX_NUM_SEQS``
Booleans take ``--enforce-eager`` / ``--no-enforce-eager`` and env values true/false/1/0/yes/no/on/off;
optional fields take ``none`` (or an empty env value) for None; list fields take comma-separated values.

TOML shape (configs/NAME.toml): two tables, each holding fields of its model; unknown tables or keys are
errors that name them::

    [server]
    host = "0.0.0.0"
    port = 8000
    cors_origins = ["https://example.org"]

    [engine]
    model = "/models/smollm2-135m"
    num_kv_heads = 1
    kv_cache_memory = "2GiB"

``--config`` takes a path; a bare name (``--config gpu``) is looked up as ``configs/<name>.toml`` in the
working directory and then next to this package.
"""
from __future__ import annotations

import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from server.engine_config import EngineConfig, Settings, union_members

ENV_PREFIX = "GQA_"
CONFIG_ENV = "GQA_CONFIG"
SECTIONS = ("server", "engine")
_NONE_WORDS = ("", "none", "null")


class ConfigError(ValueError):
    """A bad configuration; str() is one line that names the field and where the value came from."""


class ServerConfig(Settings):
    """HTTP-side settings; the engine's are in EngineConfig."""
    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field("127.0.0.1", min_length=1,  # uvicorn would read "" as every interface
                      description="interface to listen on")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port)")
    api_key: SecretStr | None = Field(None, description="require 'Authorization: Bearer KEY' on all routes "
                                                        "but /health and /metrics")
    cors_origins: tuple[str, ...] = Field((), description="allowed CORS origins (comma-separated); none: CORS off")
    served_model_name: str | None = Field(None, description="model id reported by the APIs "
                                                            "(default: the model directory's name)")
    max_payload_bytes: int = Field(1 << 20, ge=1024, description="largest request body accepted (413 beyond)")
    max_prompt_chars: int | None = Field(None, ge=1, description="prompt length limit in characters, checked "
                                                                 "before tokenizing (default: 16 x max_model_len)")
    max_choices: int = Field(16, ge=1, le=128, description="largest n (OpenAI) / batch size (TGI list inputs)")
    stats_log_interval_s: float = Field(10.0, ge=0.0, description="seconds between stats log lines; 0: off")
    log_requests: bool = Field(True, description="one log line per request as it ends: its id, finish reason, "
                                                 "tokens, queue time, TTFT, end-to-end time, time per token")
    drain_timeout_s: float = Field(30.0, ge=0.0, description="on SIGTERM, how long running requests may finish")
    engine_stall_timeout_s: float = Field(
        120.0, ge=0.0, description="with requests in flight and no engine step finished for this long, /health "
                                   "and new requests answer 503 (a hung GPU or engine process); 0: never")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    engine_process: bool | None = Field(
        None, description="run the engine loop in a child process, so HTTP work and engine steps do not share one "
                          "GIL (server/engine_process.py); unset: on when the engine runs on CUDA (1.7x the "
                          "streamed tokens/s of a saturated H100 server), off on CPU")
    gc_freeze: bool = Field(True, description="after the model loads, exempt every object alive then from "
                                              "Python's cyclic GC (gc.freeze), so full collections stay short")
    generation_config: Literal["auto", "none"] = Field(
        "auto", description="auto: the model's generation_config.json sampling defaults (temperature, top_p, "
                            "top_k, min_p, repetition_penalty) fill the fields an OpenAI request leaves unset; "
                            "none: OpenAI's own defaults")
    tool_call_parser: Literal["auto", "hermes", "llama3_json", "mistral", "none"] = Field(
        "auto", description="how tool_choice 'auto' finds calls in the reply's text (server/tool_parsers.py): "
                            "auto = the syntax the chat template shows; none = 'auto' is refused")
    reasoning_parser: Literal["none", "deepseek_r1"] = Field(
        "none", description="split a reasoning model's thinking (<think>...</think>) into reasoning_content on "
                            "/v1/chat/completions (server/reasoning_parsers.py); none = the reply is all content")
    http_parser: Literal["auto", "httptools", "h11"] = Field(
        "auto", description="uvicorn's HTTP implementation: auto = httptools (C) when installed, else h11 (Python)")
    ssl_certfile: str | None = Field(None, description="serve HTTPS with this PEM certificate (or chain); needs "
                                                     "ssl_keyfile (default: plain HTTP)")
    ssl_keyfile: str | None = Field(None, description="the PEM private key of ssl_certfile")
    ssl_keyfile_password: SecretStr | None = Field(None, description="the password of an encrypted ssl_keyfile")
    ssl_ca_certs: str | None = Field(None, description="with HTTPS: clients must present a certificate signed by one "
                                                     "of these PEM CAs (mutual TLS)")
    enable_explain: bool = Field(False, description="serve the attention explorer at /explain (torch reference "
                                                    "path on CPU copies of the model, never the hot path)")

    @model_validator(mode="after")
    def _tls_files_come_together(self) -> "ServerConfig":
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            given, missing = ("ssl_certfile", "ssl_keyfile") if self.ssl_keyfile is None \
                else ("ssl_keyfile", "ssl_certfile")
            raise ValueError(f"{missing}: needed with {given} (HTTPS takes both)")
        if self.ssl_ca_certs is not None and self.ssl_certfile is None:
            raise ValueError("ssl_ca_certs: needs ssl_certfile and ssl_keyfile (client certificates need HTTPS)")
        return self

    def prompt_char_limit(self, max_model_len: int) -> int:
        """BPE tokens average well under 16 characters, so this never refuses a prompt that would fit."""
        return self.max_prompt_chars if self.max_prompt_chars is not None else 16 * max_model_len


class ServeConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    server: ServerConfig = Field(default_factory=ServerConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)


@dataclass(frozen=True)
class FieldSpec:
    """One settable field: where it lives and the names it goes by."""
    section: str
    name: str
    annotation: Any
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env_var(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def is_bool(self) -> bool:  # bool, or bool | None (unset: the setting decides by itself)
        return self.annotation is bool or set(self.members) == {bool, type(None)}

    @property
    def members(self) -> tuple[Any, ...]:
        return union_members(self.annotation)

    @property
    def is_sequence(self) -> bool:
        return any(typing.get_origin(a) in (tuple, list) for a in self.members)

    @property
    def is_optional(self) -> bool:
        return type(None) in self.members


def _section_models() -> dict[str, type[BaseModel]]:
    return {"server": ServerConfig, "engine": EngineConfig}


def field_specs() -> list[FieldSpec]:
    """All settable fields, server first; names are unique across sections (checked in the tests)."""
    specs = []
    for section, model in _section_models().items():
        for name, info in model.model_fields.items():
            default = info.get_default(call_default_factory=True)
            shown = default.get_secret_value() and "***" if isinstance(default, SecretStr) else default
            text = info.description or name.replace("_", " ")
            if "(default: " not in text:  # a description may say what an unset (None) default means
                text += f" (default: {shown!r})"
            specs.append(FieldSpec(section, name, info.annotation, text))
    return specs


def _text_value(spec: FieldSpec, raw: str) -> Any:
    """A string from a flag or env var, shaped for pydantic (which does the type conversion itself)."""
    if spec.is_optional and raw.strip().lower() in _NONE_WORDS:
        return None
    if spec.is_sequence:
        return [part.strip() for part in raw.split(",") if part.strip()]
    return raw


def resolve_config_path(value: str) -> Path:
    path = Path(value)
    if path.is_file():
        return path
    preset = path.parent == Path(".") and path.suffix != ".toml"  # a preset name ("llama-3.2-1b" has a suffix)
    if preset:
        for root in (Path.cwd(), Path(__file__).resolve().parent.parent):
            candidate = root / "configs" / f"{value}.toml"
            if candidate.is_file():
                return candidate
    raise ConfigError(f"config: no such file {value!r}" + (f" (nor configs/{value}.toml)" if preset else ""))


def _read_toml(path: Path) -> dict[str, dict[str, Any]]:
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config {path}: {exc}") from None
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"config {path}: unknown table or key {unknown[0]!r} (expected [server] and [engine])")
    tables = {}
    for section in SECTIONS:
        table = raw.get(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"config {path}: {section} must be a table ([{section}])")
        tables[section] = table
    return tables


def load_config(flags: Mapping[str, Any] | None = None, config_file: str | None = None,
                environ: Mapping[str, str] | None = None) -> ServeConfig:
    """Merge the layers and validate; raises ConfigError with a one-line reason.

    `flags` maps field names to the strings (or bools) given on the command line, only those given.
    """
    flags = dict(flags or {})
    environ = os.environ if environ is None else environ
    specs = {spec.name: spec for spec in field_specs()}
    unknown = sorted(set(flags) - set(specs))
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]!r}")

    values: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    sources: dict[tuple[str, str], str] = {}
    config_file = config_file or environ.get(CONFIG_ENV) or None
    if config_file:
        path = resolve_config_path(config_file)
        for section, table in _read_toml(path).items():
            for key, value in table.items():
                values[section][key] = value
                sources[(section, key)] = f"{path} [{section}]"
    for spec in specs.values():
        if spec.env_var in environ:
            values[spec.section][spec.name] = _text_value(spec, environ[spec.env_var])
            sources[(spec.section, spec.name)] = f"env {spec.env_var}"
    for name, value in flags.items():
        spec = specs[name]
        values[spec.section][name] = _text_value(spec, value) if isinstance(value, str) else value
        sources[(spec.section, name)] = f"flag {spec.flag}"

    built = {}
    for section, model in _section_models().items():
        try:
            built[section] = model(**values[section])
        except ValidationError as exc:
            raise ConfigError(_one_line(section, exc, sources)) from None
    return ServeConfig(**built)


def _one_line(section: str, exc: ValidationError, sources: Mapping[tuple[str, str], str]) -> str:
    err = exc.errors(include_url=False)[0]
    field = ".".join(str(p) for p in err["loc"])
    name = str(err["loc"][0]) if err["loc"] else ""
    where = sources.get((section, name))
    label = f"{section}.{field}" if field else section  # a check across fields has no location
    if err["type"] == "extra_forbidden":
        return f"{label}: unknown setting" + (f" (from {where})" if where else "")
    message = err["msg"].removeprefix("Value error, ")
    shown = repr(err.get("input"))
    got = f", got {shown}" if "input" in err and err["loc"] and not isinstance(err["input"], dict) \
        and shown not in message else ""
    return f"{label}: {message}{got}" + (f" (from {where})" if where else "")
