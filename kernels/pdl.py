"""Programmatic dependent launch (PDL, sm_90+): what the kernels that use it share.

A kernel launched with PDL may start while the kernel before it in the stream is still running, once
every program of that one has called `gdc_launch_dependents` (or exited). Until its own `gdc_wait`, it may
only read what the kernel before did not write (weights, the step's inputs, cache entries of earlier
steps); `gdc_wait` returns once that kernel has completed and its writes are visible. Each of our kernels
signals its dependents only after its own wait, so every kernel before the one it waits on has completed
too. The interpreter has neither grid dependencies nor inline PTX: launchers turn PDL off there.
"""
from __future__ import annotations

import triton
import triton.language as tl

LINE_BYTES = 128  # an L2 prefetch pulls one 128-byte line


def interpreting() -> bool:
    """Whether Triton interprets kernels (TRITON_INTERPRET=1, the CPU tests)."""
    return bool(triton.knobs.runtime.interpret)


def launch_options(pdl: bool) -> dict:
    """The launch's extra keyword: Triton's PDL launch flag, only when asked (older launchers lack it)."""
    return {"launch_pdl": True} if pdl else {}


@triton.jit
def prefetch_l2(ptrs):
    """prefetch.global.L2 of each pointer's line (a hint: no registers held, no fault); a dummy result, kept
    by is_pure=False. PTX, so compiled only: the interpreter never runs a PDL launch."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)
