"""CompiledForward: torch.compile of the model's forward for the small decode graphs (EngineConfig.compile_mode).

Off by default. What it can change on CUDA is the matrix products: our Triton ops are already fused, so they
stay opaque to dynamo (model/ops.opaque_to_compiler), and the compiled pieces between them are the four
projections of each layer plus glue. In "max-autotune" inductor times its own Triton GEMM templates
against cuBLAS for each shape and keeps the faster; at batch 1 cuBLAS reads the 2,048 x 3,072 and
2,048 x 2,048 weights at about 54% of the copy bandwidth (README, H100), which is what this is for.
On the CPU's torch ops, inductor also fuses the norms, SiLU and RoPE into C++ loops.

Only decode graphs of up to max_batch_size rows use it (as SGLang's --torch-compile-max-bs): every size
is compiled on its own (static shapes, so each gets its own GEMM choice), during the graphs' warm-up run
before capture, and a replay never runs Python. Larger sizes, prefill graphs and eager steps run the
model as it is.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable

import torch

from model.ops import opaque_to_compiler

log = logging.getLogger(__name__)

# EngineConfig.compile_mode -> torch.compile's mode. The graphs are ours, so inductor must not add its own.
MODES = {"default": "default", "max-autotune": "max-autotune-no-cudagraphs"}


class CompiledForward:
    def __init__(self, model: torch.nn.Module, mode: str, max_batch_size: int):
        if mode not in MODES:
            raise ValueError(f"compile_mode={mode!r}: expected one of {sorted(MODES)}")
        opaque_to_compiler(model.ops)
        self.mode = mode
        self.max_batch_size = max_batch_size
        self.eager = model.hidden_states
        # dynamic=False: one graph per batch size, each specialised (and autotuned) for its shape
        self.compiled = torch.compile(model.hidden_states, mode=MODES[mode], dynamic=False)
        self.compile_seconds = 0.0

    def for_size(self, size: int) -> Callable:
        """model.hidden_states, compiled for decode graphs of up to max_batch_size rows."""
        return self.compiled if size <= self.max_batch_size else self.eager

    @contextlib.contextmanager
    def compiling(self, sizes: list[int]):
        """Around the warm-up that compiles every size. Each size recompiles every frame dynamo resumes in
        after a graph break (twice for the norm: with and without a residual), and past dynamo's recompile
        limit (8 by default) a frame would quietly run eagerly: raise the limit, and fail instead."""
        count = sum(1 for s in sizes if s <= self.max_batch_size)
        start = time.perf_counter()
        with torch._dynamo.config.patch(recompile_limit=max(8, 4 * count), fail_on_recompile_limit_hit=True):
            yield
        self.compile_seconds = time.perf_counter() - start
        log.info("torch.compile (%s): %d decode sizes up to %d compiled and captured in %.1f s", self.mode,
                 count, self.max_batch_size, self.compile_seconds)
