"""The compute a layer calls besides matmuls: plain torch (CPU, oracle) or our Triton kernels (CUDA).

Chosen once at load time and handed to every layer explicitly; there is no global switch.
Both sets share the signatures of kernels/reference.py.
"""
from __future__ import annotations

import torch
from torch import nn

from kernels import reference
from model.batch import StepBatch


class TorchOps:
    name = "torch"
    # what torch.compile must not trace: the attention reads seq_lens and query_start_loc on the host, and
    # the cache write's padding check is data-dependent (see opaque_to_compiler)
    host_reading = ("rotary_and_write_kv", "attend", "write_kv_and_attend")
    rms_norm = staticmethod(reference.rms_norm)
    silu_and_mul = staticmethod(reference.silu_and_mul)
    apply_rotary = staticmethod(reference.apply_rotary)
    rotary_and_write_kv = staticmethod(reference.rotary_and_write_kv)

    @staticmethod
    def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: StepBatch,
               scale: float) -> torch.Tensor:
        return reference.paged_attention(q, k_cache, v_cache, batch.query_start_loc, batch.seq_lens,
                                         batch.block_tables, scale, max_query_len=batch.max_query_len)

    def write_kv_and_attend(self, q, k, v, batch: StepBatch, cos_sin_cache, k_cache, v_cache, scale: float,
                            qk_norm=None):
        """q [T, H, D], k / v [T, KVH, D] unrotated -> attention output [T, H, D]; rotated k and v land in
        their cache slots first. qk_norm: (q weight, k weight, eps) of a per-head RMSNorm before RoPE."""
        q = self.rotary_and_write_kv(q, k, v, batch.positions, cos_sin_cache, k_cache, v_cache, batch.slot_mapping,
                                     qk_norm=qk_norm)
        return self.attend(q, k_cache, v_cache, batch, scale)

    # the projections: nn.Linear (cuBLAS) here; TritonOps may take its small-batch kernel instead
    @staticmethod
    def linear(x: torch.Tensor, layer: nn.Linear, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        y = layer(x)
        return y if out_dtype is None else y.to(out_dtype)

    def rms_norm_linear(self, x: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module, layer: nn.Linear):
        """(layer(norm(x + residual)), x + residual)."""
        normed, residual = self.rms_norm(x, norm.weight, norm.eps, residual)
        return layer(normed), residual

    def silu_mul_linear(self, gate_up: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
        return layer(self.silu_and_mul(gate_up))


class TritonOps(TorchOps):
    """Our kernels for every op TorchOps has (the projections too, with skinny_matmul on)."""
    name = "triton"

    @property
    def host_reading(self) -> tuple[str, ...]:
        """Every op: our kernels are already fused, and their launchers pick grids from host ints; dynamo
        would only re-trace them (see opaque_to_compiler). The projections only where our kernel takes them:
        otherwise they are cuBLAS matmuls, which compile_mode=max-autotune exists to tune."""
        projections = ("linear", "rms_norm_linear", "silu_mul_linear") if self.skinny_matmul else ()
        return ("rms_norm", "silu_and_mul", "apply_rotary", "rotary_and_write_kv", "attend",
                "write_kv_and_attend") + projections

    def __init__(self, device: torch.device) -> None:
        # Imported here so that CPU-only installs never need triton.
        from kernels import activation, decode_rotary, dispatch, norm, rotary, rotary_cache, skinny_matmul
        # decode-only steps as one attention launch per layer (kernels/decode_rotary.py): RoPE + cache write
        # folded in, and the last split combines the partials, counting splits in `tickets` (left at 0 by
        # every launch, so one buffer serves every layer and every graph); the model runner sets the switch
        # from EngineConfig.decode_fusion
        self.decode_fusion = False
        # steps of at most skinny_matmul.MAX_ROWS tokens project with kernels/skinny_matmul.py instead of
        # cuBLAS, the norms and SiLU x mul folded in; set from EngineConfig.skinny_matmul
        self.skinny_matmul = False
        self.device = device
        self._skinny_pdl = False
        self.tickets = torch.zeros(1 << 16, dtype=torch.int32, device=device)  # >= batch x kv heads
        self._decode_rotary = decode_rotary.decode_rotary_attention
        self.rms_norm = norm.rms_norm
        self.silu_and_mul = activation.silu_and_mul
        self.apply_rotary = rotary.apply_rotary
        self.rotary_and_write_kv = rotary_cache.rotary_and_write_kv
        self._dispatch = dispatch
        self._skinny = skinny_matmul

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: StepBatch,
               scale: float) -> torch.Tensor:
        return self._dispatch.paged_attention(q, k_cache, v_cache, batch.query_start_loc, batch.seq_lens,
                                              batch.block_tables, scale, batch.max_query_len, batch.max_seq_len,
                                              tiles=batch.attention_tiles, tile_rows=batch.attention_tile_rows)

    def write_kv_and_attend(self, q, k, v, batch: StepBatch, cos_sin_cache, k_cache, v_cache, scale: float,
                            qk_norm=None):
        """TorchOps.write_kv_and_attend: one launch for a decode-only step when decode_fusion is on (the
        shape test is dispatch.py's, from host ints), else the fused rotary + cache write (+ q/k norm), then
        attend. A q/k-norm model (Qwen3) keeps the second way: the one-launch kernel has no norm, and norming
        ahead of it would copy q and k out of the projection's strided view and launch twice more a layer."""
        if (self.decode_fusion and qk_norm is None and batch.attention_tiles is None and batch.max_query_len == 1
                and q.shape[0] == batch.seq_lens.shape[0]):
            tickets = self.tickets if q.shape[0] * k.shape[1] <= self.tickets.numel() else None
            return self._decode_rotary(q, k, v, batch.positions, cos_sin_cache, k_cache, v_cache,
                                       batch.slot_mapping, batch.seq_lens, batch.block_tables, scale,
                                       batch.max_seq_len, tickets=tickets, pdl=self._skinny_pdl)
        q = self.rotary_and_write_kv(q, k, v, batch.positions, cos_sin_cache, k_cache, v_cache, batch.slot_mapping,
                                     qk_norm=qk_norm)
        return self.attend(q, k_cache, v_cache, batch, scale)

    def _takes_skinny(self, x: torch.Tensor, layer: nn.Linear) -> bool:
        """From shapes and dtypes only (host facts): the same choice at every replay of a captured step. A
        hooked projection runs as its module, so that its hooks see its input (the explorer's, refit's)."""
        return (self.skinny_matmul and x.dim() == 2 and x.shape[0] <= self._skinny.MAX_ROWS
                and x.dtype == layer.weight.dtype and x.stride(-1) == 1 and layer.weight.stride(-1) == 1
                and not layer._forward_pre_hooks and not layer._forward_hooks)

    @property
    def skinny_pdl(self) -> bool:
        """Launch the skinny kernels, and the one-launch decode attention between them, by programmatic
        dependent launch (EngineConfig.skinny_matmul_pdl): each pulls what the kernel before it does not write
        (its weights; the attention its first cached keys) into L2 while that kernel finishes."""
        return self._skinny_pdl

    @skinny_pdl.setter
    def skinny_pdl(self, on: bool) -> None:
        capability = torch.cuda.get_device_capability(self.device) if on and self.device.type == "cuda" else None
        if capability is not None and capability < (9, 0):
            raise ValueError(f"skinny_matmul_pdl: programmatic dependent launch needs a GPU of compute capability "
                             f"9.0 or newer (this one is {capability[0]}.{capability[1]}); leave it off")
        self._skinny_pdl = on

    def linear(self, x, layer, out_dtype=None):
        if self._takes_skinny(x, layer):
            return self._skinny.skinny_linear(x, layer.weight, layer.bias, out_dtype=out_dtype, pdl=self._skinny_pdl)
        return TorchOps.linear(x, layer, out_dtype)

    def rms_norm_linear(self, x, residual, norm, layer):
        if self._takes_skinny(x, layer) and (residual is None or residual.dtype == x.dtype):
            return self._skinny.rms_norm_linear(x, residual, norm.weight, norm.eps, layer.weight, layer.bias,
                                                pdl=self._skinny_pdl)
        return super().rms_norm_linear(x, residual, norm, layer)

    def silu_mul_linear(self, gate_up, layer):
        if self._takes_skinny(gate_up, layer):
            return self._skinny.silu_mul_linear(gate_up, layer.weight, layer.bias, pdl=self._skinny_pdl)
        return super().silu_mul_linear(gate_up, layer)


def opaque_to_compiler(ops: "TorchOps | TritonOps") -> None:
    """Make torch.compile call ops.host_reading as they are (a graph break each) instead of tracing them.
    Done on the model's own ops object, once, by server/compiled_forward.py when compilation is asked
    for: each wrapper costs about 0.5 us a call in eager steps, which the default path should not pay."""
    for name in ops.host_reading:
        fn = getattr(ops, name)
        if not getattr(fn, "_opaque_to_compiler", False):
            wrapped = torch.compiler.disable(fn)
            wrapped._opaque_to_compiler = True
            setattr(ops, name, wrapped)


def make_ops(name: str, device: torch.device) -> "TorchOps | TritonOps":
    """'auto' picks Triton on CUDA and torch elsewhere; 'triton' on CPU runs the interpreter (tests)."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        return TorchOps()
    if name == "triton":
        if device.type != "cuda" and not _triton_interprets():
            raise ValueError(f"attention_backend='triton' on {device.type}: Triton's kernels need a CUDA device "
                             "(or TRITON_INTERPRET=1, the interpreter the tests use); use 'auto' or 'torch'")
        return TritonOps(device)
    raise ValueError(f"attention_backend={name!r}: expected 'auto', 'torch' or 'triton'")


def _triton_interprets() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET=1, read by Triton itself)."""
    try:
        from triton import knobs
    except ImportError:  # no Triton, or one older than its knobs (3.4): let the launch say what is wrong
        return True
    return bool(knobs.runtime.interpret)
