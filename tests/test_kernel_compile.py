"""Every Triton kernel, launched the way the model launches it, compiles for Hopper (sm_90) and Ampere
(sm_80) with Triton's own compiler and ptxas, on this machine without a GPU (kernels/aot.py).

The interpreter tests check the kernels' arithmetic; this checks what only a real build shows: the kernels
with an fp8 KV cache did not compile at all (tl.dot refuses an fp8 operand) while the interpreter had no
test of them, and float32 prefill tiles spilled kilobytes of registers per thread.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("triton.backends.nvidia.compiler", reason="needs a Triton wheel with its NVIDIA backend")


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> dict:
    """benchmarks/kernel_resources.py for sm_90 and sm_80, run as CI would run it (interpreter off)."""
    out = tmp_path_factory.mktemp("aot") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), "--arch", "90",
                           "--arch", "80", "--jobs", str(min(4, os.cpu_count() or 1)), "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    print(done.stdout[-4000:], done.stderr[-4000:])
    data = json.loads(out.read_text())
    data["returncode"] = done.returncode
    return data


def launched_kernels() -> set[str]:
    """The names of the launchable kernels in kernels/ (device helpers are not `*_kernel`)."""
    from triton.runtime.jit import JITFunction

    names = set()
    for path in (ROOT / "kernels").glob("*.py"):
        module = importlib.import_module(f"kernels.{path.stem}")
        names |= {name for name, obj in vars(module).items()
                  if name.endswith("_kernel") and (isinstance(obj, JITFunction) or hasattr(obj, "fn"))}
    return names


def test_every_kernel_compiles_and_fits_on_hopper_and_ampere(table):
    rows = table["rows"]
    failed = [(r["arch"], r["config"], r["case"], r["status"]) for r in rows if r["status"].startswith("failed")]
    assert not failed
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["kernel"] for r in ok} == launched_kernels(), "a kernel is missing from the compile table"
    for r in ok:
        where = f"sm_{r['arch']} {r['config']} {r['case']} {r['kernel']}"
        assert 0 < r["registers"] <= 255, where
        assert r["programs_per_sm"] >= 1, f"{where} does not fit on an SM ({r['shared']} B shared memory)"
        # a few dozen spilled bytes happen at the largest bf16 tiles; kilobytes (what float32 tiles of
        # 64 rows did: 2.8 KB on sm_90, 26 KB on sm_80) mean a tile choice that must change
        assert r["spill_stores"] <= 256, f"{where} spills {r['spill_stores']} bytes per thread"
    assert table["returncode"] == 0


def test_fp8_kv_cache_compiles_on_hopper_and_is_refused_below_ada(table):
    fp8 = [r for r in table["rows"] if "kv fp8" in r["config"]]
    on_hopper = [r for r in fp8 if r["arch"] == 90]
    assert on_hopper and all(r["status"] == "ok" for r in on_hopper)
    assert {r["kernel"] for r in on_hopper} >= {"_decode_kernel", "_prefill_kernel", "_rotary_cache_kernel"}
    on_ampere = [r for r in fp8 if r["arch"] == 80]
    assert on_ampere and all(r["status"].startswith("skipped: fp8 KV needs sm_89") for r in on_ampere)


def test_float32_prefill_takes_the_small_tiles(table):
    """The exact (float32) prefill compiles to 32-row tiles with 8 warps for long queries, 16 rows below."""
    fp32 = [r for r in table["rows"] if r["config"].startswith("smollm2-135m fp32") and r["case"].startswith(
        "prefill, 2 x 256") and r["kernel"] == "_prefill_kernel"]
    assert fp32 and all(r["num_warps"] == 8 for r in fp32)


def test_programs_per_sm_counts_registers_warps_and_shared_memory():
    from kernels.aot import programs_per_sm

    # 255 registers x 32 threads round up to 8,192 a warp: 65,536 / (8,192 x 4 warps) = 2 programs
    assert programs_per_sm(90, 255, 4, 65792) == 2
    # few registers: shared memory decides, 228 KiB / (40 KiB + 1 KiB reserved) = 5
    assert programs_per_sm(90, 32, 4, 40 * 1024) == 5
    # warps decide: 64 warps / 8
    assert programs_per_sm(90, 32, 8, 0) == 8
    # more shared memory than one program may have on an A100
    assert programs_per_sm(80, 32, 4, 200 * 1024) == 0


def test_ptxas_report_parsing():
    from kernels.aot import parse_ptxas_verbose

    log = ("ptxas info    : Compiling entry function '_k' for 'sm_90a'\n"
           "ptxas info    : Function properties for _k\n"
           "    48 bytes stack frame, 44 bytes spill stores, 40 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 48 bytes cumulative stack size\n")
    assert parse_ptxas_verbose(log) == (255, 44, 40)
    with pytest.raises(ValueError, match="no register report"):
        parse_ptxas_verbose("ptxas fatal: something else")
