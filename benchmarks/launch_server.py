"""Start `python -m server.cli serve` for a benchmark: a free loopback port, /health polling, a clean stop;
and a random-weight checkpoint of a preset's shapes to serve (benchmarks/serving.py --launch)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_dummy_checkpoint(preset: str, out_dir: Path, dtype: str = "bfloat16") -> Path:
    """Random weights under Hugging Face names, config.json, and a word-level tokenizer (token i = "t<i>")."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    from benchmarks.throughput import PRESETS
    cfg = dict(PRESETS.get(preset) or json.loads(Path(preset).read_text()))
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh, kvh = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // nh
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = getattr(torch, dtype)
    g = torch.Generator(device=dev).manual_seed(0)

    def rand(*shape):
        return torch.empty(*shape, dtype=dt, device=dev).normal_(0, 0.02, generator=g).cpu()

    tensors = {"model.embed_tokens.weight": rand(v, h), "model.norm.weight": torch.ones(h, dtype=dt)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        tensors |= {p + "self_attn.q_proj.weight": rand(nh * d, h), p + "self_attn.k_proj.weight": rand(kvh * d, h),
                    p + "self_attn.v_proj.weight": rand(kvh * d, h), p + "self_attn.o_proj.weight": rand(h, nh * d),
                    p + "mlp.gate_proj.weight": rand(i, h), p + "mlp.up_proj.weight": rand(i, h),
                    p + "mlp.down_proj.weight": rand(h, i), p + "input_layernorm.weight": torch.ones(h, dtype=dt),
                    p + "post_attention_layernorm.weight": torch.ones(h, dtype=dt)}
        if cfg.get("architectures") == ["Qwen3ForCausalLM"]:
            tensors |= {p + "self_attn.q_norm.weight": torch.ones(d, dtype=dt),
                        p + "self_attn.k_norm.weight": torch.ones(d, dtype=dt)}
    if not cfg.get("tie_word_embeddings"):
        tensors["lm_head.weight"] = rand(v, h)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"))
    del tensors
    if dev == "cuda":  # the launched server sizes its KV cache from the free GPU memory
        torch.cuda.empty_cache()
    (out_dir / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": dtype, "rms_norm_eps": 1e-5,
        "hidden_act": "silu", **cfg}))
    tok = Tokenizer(models.WordLevel({f"t{k}": k for k in range(v)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "add_eos_token": False}))
    return out_dir


class LaunchedServer:
    """`python -m server.cli serve` in a subprocess on a free loopback port; stopped on exit."""

    def __init__(self, serve_args: list[str], timeout: float, log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                    "--stats-log-interval-s", "0", *serve_args]
        self.timeout, self.log_path = timeout, log_path

    def __enter__(self) -> "LaunchedServer":
        self.log = open(self.log_path, "wb")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"server not healthy after {self.timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 3000) -> str:
        self.log.flush()
        return self.log_path.read_bytes()[-n:].decode(errors="replace")

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
