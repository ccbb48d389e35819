"""compile_mode: torch.compile of the decode graphs' forward (server/compiled_forward.py).

On CPU the decode graphs' static-buffer path runs with the model as its replay (use_graph_path_eagerly), so
the compiled forward (inductor's C++ on the torch ops) is what those steps run; the GPU section compiles and
captures real graphs (skipped without CUDA).
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo.utils as dynamo_utils
from pydantic import ValidationError

from model.ops import TorchOps, opaque_to_compiler
from server.compiled_forward import CompiledForward
from server.config import load_config
from tests.test_server_config import parse
from server.engine_config import EngineConfig
from server.llm import LLM
from server.sampling_params import SamplingParams
from tests.test_cuda_graphs import engine_prompts, free_gpu_memory

CPU_ENGINE = dict(dtype="float32", device="cpu", kv_cache_memory="2MiB", max_num_batched_tokens=256,
                  max_num_seqs=8)


def test_config_takes_the_modes_and_refuses_others():
    assert EngineConfig().compile_mode == "off"
    assert EngineConfig(compile_mode="max-autotune", compile_max_batch_size=8).compile_max_batch_size == 8
    with pytest.raises(ValidationError, match="compile_mode"):
        EngineConfig(compile_mode="reduce-overhead")  # inductor's own graphs would fight ours
    with pytest.raises(ValidationError, match="compile_max_batch_size"):
        EngineConfig(compile_max_batch_size=0)
    args = vars(parse(["--compile-mode", "max-autotune", "--compile-max-batch-size", "4"]))
    cfg = load_config({k: v for k, v in args.items() if k != "config"}, environ={})
    assert (cfg.engine.compile_mode, cfg.engine.compile_max_batch_size) == ("max-autotune", 4)


def test_opaque_to_compiler_wraps_the_host_reading_ops_once():
    ops = TorchOps()
    plain = {name: getattr(ops, name) for name in ("rms_norm", "silu_and_mul", "attend")}
    opaque_to_compiler(ops)
    assert ops.attend is not plain["attend"] and ops.attend._opaque_to_compiler
    assert ops.rotary_and_write_kv._opaque_to_compiler
    assert ops.rms_norm is plain["rms_norm"] and ops.silu_and_mul is plain["silu_and_mul"]  # traced, fused
    wrapped = ops.attend
    opaque_to_compiler(ops)
    assert ops.attend is wrapped  # not wrapped twice
    assert not hasattr(TorchOps.attend, "_opaque_to_compiler")  # the class is untouched: other models' ops


def test_compiling_raises_the_recompile_limit_and_fails_past_it(tiny_llama_dir):
    from model.llama import load_model
    model = load_model(tiny_llama_dir)
    forward = CompiledForward(model, "default", max_batch_size=4)
    assert forward.for_size(4) is forward.compiled and forward.for_size(5) is forward.eager
    limit = torch._dynamo.config.recompile_limit
    with forward.compiling([1, 2, 4, 8, 16, 24, 32]):  # 3 of them compiled
        assert torch._dynamo.config.recompile_limit >= 12
        assert torch._dynamo.config.fail_on_recompile_limit_hit
    assert torch._dynamo.config.recompile_limit == limit and forward.compile_seconds >= 0
    # past the raised limit a frame fails instead of quietly running eagerly
    double = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)
    with pytest.raises(Exception, match="(?i)recompile"), forward.compiling([1]):  # limit 8
        for n in range(1, 12):
            double(torch.ones(n))
    with pytest.raises(ValueError, match="compile_mode"):
        CompiledForward(model, "off", 4)


def test_engine_with_compiled_decode_graphs_equals_the_eager_engine(tiny_llama_dir, caplog):
    """Sizes 1 and 2 run compiled, 4 and 8 the model as written; the tokens equal the plain engine's."""
    ps = engine_prompts(5, seed=3)
    params = [SamplingParams(temperature=0.0, max_new_tokens=5 + 3 * i) for i in range(5)]
    want = [r.token_ids for r in LLM(str(tiny_llama_dir), **CPU_ENGINE).generate(ps, params)]
    with caplog.at_level("WARNING", logger="server.model_runner"):
        llm = LLM(str(tiny_llama_dir), compile_mode="default", compile_max_batch_size=2, **CPU_ENGINE)
    runner = llm.engine.runner
    assert runner.compiled is not None and runner.graphs is None  # CPU: no capture, so a warning
    assert "compile_mode=default applies to decode CUDA graphs" in caplog.text
    runner.use_graph_path_eagerly(prefill=False)
    graphs_before = dynamo_utils.counters["stats"]["unique_graphs"]
    got = [r.token_ids for r in llm.generate(ps, params)]
    assert got == want
    replays = runner.graphs.replays
    assert replays[1] > 0 and replays[2] > 0 and replays[8] > 0  # compiled sizes and eager ones both ran
    assert dynamo_utils.counters["stats"]["unique_graphs"] > graphs_before  # dynamo did compile graphs


# ---------------------------------------------------------------- GPU: compiled, then captured

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["default", "max-autotune"])
def test_gpu_engine_with_compiled_graphs_equals_enforce_eager(tiny_llama_dir, mode):
    cfg = dict(dtype="float32", device="cuda", gpu_memory_utilization=0.05, max_num_seqs=8,
               max_num_batched_tokens=256)
    ps = engine_prompts(5, seed=1)
    params = [SamplingParams(temperature=0.0, max_new_tokens=6 + 3 * i) for i in range(5)]
    free_gpu_memory()
    want = [r.token_ids for r in LLM(str(tiny_llama_dir), enforce_eager=True, **cfg).generate(ps, params)]
    free_gpu_memory()
    llm = LLM(str(tiny_llama_dir), compile_mode=mode, compile_max_batch_size=2, **cfg)
    runner = llm.engine.runner
    assert runner.compiled.compile_seconds > 0 and sorted(runner.graphs.graphs) == [1, 2, 4, 8]
    got = [r.token_ids for r in llm.generate(ps, params)]
    assert got == want
    assert runner.graphs.replays[1] > 0 and runner.graphs.replays[2] > 0
