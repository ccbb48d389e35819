"""Build the Triton kernels for a GPU architecture on a machine that has none: what the launchers would
launch, compiled ahead of time by Triton's own compiler down to ptxas, and never run.

The interpreter (TRITON_INTERPRET=1, CI's kernel tests) checks a kernel's arithmetic, not that it compiles:
numpy accepts dtypes and layouts that the compiler refuses or cannot fit. Inside `compile_only(arch)` every
launch compiles for `sm_<arch>` instead of running (the launcher's own grid, constexprs, warps, stages and
argument specialisation, since the launcher itself is called), and the result records what ptxas reports:
registers, spills, shared memory. Those decide whether a launch fits on an SM at all and how many programs
share one. Needs a Triton wheel with its NVIDIA backend (PyPI's bundle ptxas) and TRITON_INTERPRET unset.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

# per-SM limits (CUDA occupancy calculator): registers, max warps, shared memory usable by one program
# and by the SM, the driver's reserve per program
SM_LIMITS = {
    80: dict(registers=65536, warps=64, smem_block=163 * 1024, smem_sm=164 * 1024, reserved=1024),
    86: dict(registers=65536, warps=48, smem_block=99 * 1024, smem_sm=100 * 1024, reserved=1024),
    89: dict(registers=65536, warps=48, smem_block=99 * 1024, smem_sm=100 * 1024, reserved=1024),
    90: dict(registers=65536, warps=64, smem_block=227 * 1024, smem_sm=228 * 1024, reserved=1024),
    100: dict(registers=65536, warps=64, smem_block=227 * 1024, smem_sm=228 * 1024, reserved=1024),
}
MAX_PROGRAMS_PER_SM = 32


@dataclass
class CompiledLaunch:
    kernel: str
    num_warps: int
    num_stages: int
    registers: int
    spill_stores: int  # bytes per thread written to local memory because registers ran out
    spill_loads: int
    shared: int  # bytes: Triton's dynamic shared memory (pipeline buffers, layout conversions)
    programs_per_sm: int  # resident programs per SM by registers, warps and shared memory (0: cannot launch)

    @property
    def fits(self) -> bool:
        return self.programs_per_sm > 0


def programs_per_sm(arch: int, registers: int, num_warps: int, shared: int) -> int:
    """How many programs of this kernel one SM holds at once: registers are granted per warp in units of
    256, shared memory per program plus the driver's reserve."""
    lim = SM_LIMITS[arch]
    if shared > lim["smem_block"]:
        return 0
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = lim["registers"] // (regs_per_warp * num_warps)
    by_warps = lim["warps"] // num_warps
    by_smem = lim["smem_sm"] // (shared + lim["reserved"])
    return min(by_regs, by_warps, by_smem, MAX_PROGRAMS_PER_SM)


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas_verbose(log: str) -> tuple[int, int, int]:
    """ptxas -v's report -> (registers, spill store bytes, spill load bytes)."""
    used, spills = _PTXAS_USED.search(log), _PTXAS_SPILLS.search(log)
    if used is None or spills is None:
        raise ValueError(f"no register report in ptxas output: {log[-300:]!r}")
    return int(used.group(1)), int(spills.group(1)), int(spills.group(2))


def _ptxas_report(ptx: str, arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as src:
        src.write(ptx)
        src.flush()
        done = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}",
                               src.name, "-o", "/dev/null"], capture_output=True, text=True, check=True)
    return done.stdout + done.stderr


def describe(compiled, arch: int) -> CompiledLaunch:
    """A Triton CompiledKernel -> its resources on `arch`."""
    registers, stores, loads = parse_ptxas_verbose(_ptxas_report(compiled.asm["ptx"], arch))
    meta = compiled.metadata
    return CompiledLaunch(kernel=compiled.name, num_warps=meta.num_warps, num_stages=meta.num_stages,
                          registers=registers, spill_stores=stores, spill_loads=loads, shared=meta.shared,
                          programs_per_sm=programs_per_sm(arch, registers, meta.num_warps, meta.shared))


class _CompileOnlyDriver:
    """Stands in for Triton's CUDA driver: names the target; device 0 and stream 0 are never touched."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


@contextmanager
def compile_only(arch: int) -> Iterator[list[CompiledLaunch]]:
    """Within the block, each Triton launch compiles for sm_<arch> and returns without running; the list
    yielded fills with one CompiledLaunch per launch, in order. Outputs the launchers allocate stay as
    allocated (on CPU: uninitialised), so nothing computed inside may be used. Kernels imported under
    TRITON_INTERPRET=1 are interpreted functions, which run instead and record nothing."""
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    if arch not in SM_LIMITS:
        raise ValueError(f"arch {arch}: expected one of {sorted(SM_LIMITS)}")
    launches: list[CompiledLaunch] = []
    touched: set = set()
    real_run, saved_active = JITFunction.run, driver._active

    def run(self, *args, grid, warmup, **kwargs):
        touched.add(self)
        compiled = real_run(self, *args, grid=grid, warmup=True, **kwargs)
        launches.append(describe(compiled, arch))
        return compiled

    driver.set_active(_CompileOnlyDriver(arch))
    JITFunction.run = run
    try:
        yield launches
    finally:
        JITFunction.run = real_run
        driver._active = saved_active
        for fn in touched:  # their binders were made for the fake target under device 0
            fn.device_caches.clear()
