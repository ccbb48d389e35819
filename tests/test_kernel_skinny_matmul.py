"""The skinny matmul (kernels/skinny_matmul.py) against its reference compositions (kernels/reference.py).

On CPU the kernel runs in the Triton interpreter, in float32 and float16: 1 to 16 rows, N and K that are no
multiple of the tiles, rows of x with a stride wider than K (a view into a larger buffer), random weights,
norm weights and biases, outputs and the residual output poisoned with NaN before the run. On CUDA the
same in bfloat16 at the Llama-3.2-1B projections' shapes.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import reference as ref
from kernels.skinny_matmul import MAX_ROWS, rms_norm_linear, silu_mul_linear, skinny_linear
from tests.test_kernel_rotary_cache import CUDA, DEVICE, seed_of

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
CPU_DTYPES = [torch.float32, torch.float16]
# (rows, N, K): tiles of 16/32/64 columns and 256-wide K steps never fit these exactly
CPU_SHAPES = [(1, 40, 72), (3, 100, 300), (16, 33, 520)]
GPU_SHAPES = [(1, 3072, 2048), (8, 2048, 2048), (16, 16384, 2048), (1, 2048, 8192), (4, 128256, 2048)]


def rand(gen, *shape, dtype, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)


def strided_rows(gen, m, k, dtype):
    """[m, k] whose rows sit 7 elements apart beyond k: the kernel must use the row stride, not k."""
    return rand(gen, m, k + 7, dtype=dtype)[:, :k]


def poisoned(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def cases(dtypes, shapes):
    return [pytest.param(dtype, shape, id=f"{str(dtype)[6:]}-{'x'.join(map(str, shape))}")
            for dtype in dtypes for shape in shapes]


CPU_CASES = pytest.mark.skipif(CUDA, reason="interpreter cases; the GPU cases below run bf16")
GPU_CASES = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def check_linear(dtype, shape, with_bias, out_dtype=None, pdl=False):
    m, n, k = shape
    gen = torch.Generator().manual_seed(seed_of("linear", dtype, shape, with_bias))
    x, w = strided_rows(gen, m, k, dtype), rand(gen, n, k, dtype=dtype, scale=k ** -0.5)
    bias = rand(gen, n, dtype=dtype) if with_bias else None
    out = poisoned(m, n, dtype=out_dtype or dtype)
    got = skinny_linear(x, w, bias, out_dtype=out_dtype, out=out, pdl=pdl)
    assert got.data_ptr() == out.data_ptr()
    want = F.linear(x.float(), w.float(), None if bias is None else bias.float())
    torch.testing.assert_close(got.float(), want, **TOL[dtype])


def check_silu_mul(dtype, shape, pdl=False, fold=None):
    m, n, k = shape
    gen = torch.Generator().manual_seed(seed_of("silu", dtype, shape))
    gate_up, w = strided_rows(gen, m, 2 * k, dtype), rand(gen, n, k, dtype=dtype, scale=k ** -0.5)
    got = silu_mul_linear(gate_up, w, out=poisoned(m, n, dtype=dtype), pdl=pdl, fold=fold)
    torch.testing.assert_close(got, ref.silu_mul_linear(gate_up, w), **TOL[dtype])


def check_norm(dtype, shape, with_residual, pdl=False):
    m, n, k = shape
    gen = torch.Generator().manual_seed(seed_of("norm", dtype, shape, with_residual))
    x, w = strided_rows(gen, m, k, dtype), rand(gen, n, k, dtype=dtype, scale=k ** -0.5)
    residual = strided_rows(gen, m, k, dtype) if with_residual else None
    norm_w = (1.0 + 0.5 * rand(gen, k, dtype=torch.float32)).to(dtype)
    res_out = poisoned(m, k, dtype=dtype)
    got, got_res = rms_norm_linear(x, residual, norm_w, 1e-5, w, out=poisoned(m, n, dtype=dtype), res_out=res_out,
                                   pdl=pdl)
    want, want_res = ref.rms_norm_linear(x, residual, norm_w, 1e-5, w)
    torch.testing.assert_close(got, want, **TOL[dtype])
    if with_residual:
        assert got_res.data_ptr() == res_out.data_ptr()
        torch.testing.assert_close(got_res, want_res, atol=0, rtol=0)  # one rounded add, as the reference's
    else:
        assert got_res is x


@CPU_CASES
@pytest.mark.parametrize("dtype, shape", cases(CPU_DTYPES, CPU_SHAPES))
@pytest.mark.parametrize("with_bias", [False, True], ids=["", "bias"])
def test_skinny_linear(dtype, shape, with_bias):
    check_linear(dtype, shape, with_bias)


@CPU_CASES
def test_skinny_linear_writes_float32_logits_from_half_weights():
    check_linear(torch.float16, (2, 50, 64), False, out_dtype=torch.float32)


@CPU_CASES
@pytest.mark.parametrize("dtype, shape", cases(CPU_DTYPES, CPU_SHAPES))
@pytest.mark.parametrize("fold", [False, True], ids=["", "folded"])
def test_silu_mul_linear(dtype, shape, fold):
    """SiLU x mul by its own kernel, then the plain one above (the default), or folded into the kernel: at
    one row multiplied on the CUDA cores, at 3 rows the prologue's 4 rows repeated to the dot's 16."""
    check_silu_mul(dtype, shape, fold=fold)


@CPU_CASES
@pytest.mark.parametrize("dtype, shape", cases(CPU_DTYPES, CPU_SHAPES))
@pytest.mark.parametrize("with_residual", [False, True], ids=["", "residual"])
def test_rms_norm_linear(dtype, shape, with_residual):
    check_norm(dtype, shape, with_residual)


@CPU_CASES
def test_more_rows_than_a_tile_are_refused():
    x, w = torch.randn(MAX_ROWS + 1, 8), torch.randn(16, 8)
    with pytest.raises(ValueError, match="17 rows"):
        skinny_linear(x, w)


@CPU_CASES
def test_columns_of_x_or_the_weight_apart_in_memory_are_refused():
    """The kernel reads K contiguously: a transposed view would be read wrong, so the launcher says so."""
    x, w = torch.randn(2, 8), torch.randn(16, 8)
    for args in ((x.T.contiguous().T, w), (x, w.T.contiguous().T)):
        with pytest.raises(ValueError, match="unit stride along K"):
            skinny_linear(*args)


@GPU_CASES
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_skinny_kernels_bf16(shape):
    check_linear(torch.bfloat16, shape, False)
    check_linear(torch.bfloat16, shape, False, out_dtype=torch.float32)
    check_silu_mul(torch.bfloat16, shape)
    check_norm(torch.bfloat16, shape, True)


@GPU_CASES
@pytest.mark.skipif(CUDA and torch.cuda.get_device_capability() < (9, 0), reason="PDL needs sm_90+")
@pytest.mark.parametrize("shape", GPU_SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
def test_gpu_skinny_kernels_with_programmatic_dependent_launch(shape):
    """pdl=True (EngineConfig.skinny_matmul_pdl): the first weight tiles pulled into L2 before the wait, the
    same results (the kernel just before each launch is its output's NaN fill, which the wait must see finish)."""
    check_linear(torch.bfloat16, shape, True, pdl=True)
    check_silu_mul(torch.bfloat16, shape, pdl=True)
    check_norm(torch.bfloat16, shape, True, pdl=True)


# ---------------------------------------------------------------- the model and the engine
def count_calls(ops, monkeypatch) -> list[str]:
    """Record each skinny kernel the ops launch, by name (the module's functions, restored after the test)."""
    calls: list[str] = []
    for name in ("skinny_linear", "rms_norm_linear", "silu_mul_linear"):
        real = getattr(ops._skinny, name)
        monkeypatch.setattr(ops._skinny, name,
                            lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw))
    return calls


@CPU_CASES
def test_model_steps_with_skinny_projections_equal_the_torch_path(tiny_llama_dir, monkeypatch):
    """A 9-token prompt step, then an 18-token one (too many rows: cuBLAS, but for the head, which projects
    its one logits row), then a 1-token decode step: every projection of the short steps takes the kernel,
    and the logits are the torch path's."""
    from model.llama import load_model
    from tests.test_model import PagedRunner
    torch_model = load_model(tiny_llama_dir, attention_backend="torch")
    model = load_model(tiny_llama_dir, attention_backend="triton")
    model.ops.skinny_matmul = True
    calls = count_calls(model.ops, monkeypatch)
    prompt, other = [1, 17, 42, 99, 5, 250, 33, 8, 9], list(range(60, 78))
    outs, counts = [], []
    for m in (torch_model, model):
        runner, table, table2 = PagedRunner(m, seed=3), [], []
        steps = [runner.step([(prompt, 0, table)], all_logits=True)]
        counts.append(len(calls))
        steps.append(runner.step([(other, 0, table2)]))
        counts.append(len(calls))
        steps.append(runner.step([([7], len(prompt), table)]))
        counts.append(len(calls))
        outs.append(torch.cat(steps))
    layers = model.config.num_hidden_layers
    per_step = 4 * layers + 1  # norm + qkv, o, norm + gate_up, silu + down a layer; the head
    # down_proj takes SiLU x mul from its own kernel, then the plain skinny kernel (silu_mul_linear calls
    # skinny_linear)
    short_step = per_step + layers
    assert counts == [0, 0, 0, short_step, short_step + 1, 2 * short_step + 1]
    assert calls[:short_step].count("rms_norm_linear") == 2 * layers
    assert calls[:short_step].count("silu_mul_linear") == layers
    assert calls[:short_step].count("skinny_linear") == 2 * layers + 1  # o, down after SiLU, the head
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)


@CPU_CASES
def test_a_hooked_projection_runs_as_its_module(tiny_llama_dir, monkeypatch):
    """The explorer and refit read each layer's normed input through a pre-hook on qkv_proj: with
    skinny_matmul on, a hooked projection takes the norm kernel and the module (its hooks fire and see the
    torch path's normed input), the others keep the fused kernel."""
    from model.explain import capture_layer_inputs
    from model.llama import load_model
    torch_inputs = capture_layer_inputs(load_model(tiny_llama_dir, attention_backend="torch"), [1, 5, 9, 33, 7])
    model = load_model(tiny_llama_dir, attention_backend="triton")
    model.ops.skinny_matmul = True
    calls = count_calls(model.ops, monkeypatch)
    inputs = capture_layer_inputs(model, [1, 5, 9, 33, 7])
    layers = model.config.num_hidden_layers
    assert len(inputs) == layers and calls.count("rms_norm_linear") == layers  # gate_up's; qkv_proj is hooked
    for got, want in zip(inputs, torch_inputs):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@CPU_CASES
def test_engine_settings_reach_the_ops_and_keep_the_tokens(tiny_llama_dir, monkeypatch):
    """EngineConfig.skinny_matmul (and skinny_matmul_pdl): greedy tokens of a batch of requests equal the
    default engine's, and every skinny launch of the PDL engine asks for the early launch, as does every
    one-launch decode attention between them (and no launch of the other engines)."""
    from kernels import decode_rotary, skinny_matmul
    from tests.tiny_models import greedy_token_ids, tiny_triton_llm
    launches: list[bool] = []
    attention: list[bool] = []
    real = skinny_matmul._launch
    monkeypatch.setattr(skinny_matmul, "_launch", lambda *a, **kw: launches.append(kw["pdl"]) or real(*a, **kw))
    real_attention = decode_rotary.decode_rotary_attention  # the ops take it from the module when made
    monkeypatch.setattr(decode_rotary, "decode_rotary_attention",
                        lambda *a, **kw: attention.append(kw["pdl"]) or real_attention(*a, **kw))
    runs = []
    for skinny, pdl in ((False, False), (True, False), (True, True)):
        llm = tiny_triton_llm(tiny_llama_dir, skinny_matmul=skinny, skinny_matmul_pdl=pdl)
        ops = llm.engine.runner.model.ops
        assert (ops.skinny_matmul, ops.skinny_pdl) == (skinny, pdl)
        assert ("linear" in ops.host_reading) is skinny
        launches.clear()
        attention.clear()
        runs.append(greedy_token_ids(llm))
        assert launches == [] if not skinny else launches and set(launches) == {pdl}
        assert attention and set(attention) == {pdl}
    assert runs[0] == runs[1] == runs[2] and all(len(t) == 6 for t in runs[0])


def test_pdl_needs_the_skinny_kernels_and_a_hopper_gpu(monkeypatch):
    """skinny_matmul_pdl alone is refused by the config; on a GPU older than sm_90 by the ops, naming it."""
    from pydantic import ValidationError
    from model.ops import TritonOps
    from server.engine_config import EngineConfig
    with pytest.raises(ValidationError, match="skinny_matmul_pdl = true .* needs skinny_matmul = true"):
        EngineConfig(skinny_matmul_pdl=True)
    ops = TritonOps(torch.device("cpu"))
    ops.skinny_pdl = True  # (the interpreter: no GPU to ask)
    ops.device = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match=r"skinny_matmul_pdl: .* compute capability 9.0 or newer \(this one is 8.0\)"):
        ops.skinny_pdl = True
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    ops.skinny_pdl = True
    assert ops.skinny_pdl
