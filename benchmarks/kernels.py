"""Kernel micro-benchmarks: ours vs the torch peers vs a roofline limit measured in the same run.

    python benchmarks/kernels.py             # CUDA only: decode, prefill, rms_norm, silu_and_mul,
                                             #   rotary+kv_write (+ Qwen3's q/k norm),
                                             #   decode+rotary+kv_write (bf16)
    python benchmarks/kernels.py --dry-run   # CPU smoke: tiny inputs, reference functions, no timing claims

Timings are medians over CUDA-event runs after warm-up (triton.testing.do_bench, return_mode="median"),
each size on fresh random inputs. Limits: decode, the small ops and rotary+kv_write are memory bound (bytes /
measured device-to-device copy bandwidth); prefill is compute bound (FLOPs / measured bf16 matmul throughput).
Results go to a table on stdout and, with $OUT set (or --json PATH), to JSON.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from benchmarks.results import write_json  # noqa: E402

from kernels import reference as ref  # noqa: E402


@dataclass(frozen=True)
class Row:
    kernel: str
    shape: str
    ours_us: float
    peer: str
    peer_us: float
    limit_us: float

    @property
    def ours_over_peer(self) -> float:
        return self.ours_us / self.peer_us if self.peer_us > 0 else math.nan

    @property
    def fraction_of_limit(self) -> float:
        return self.limit_us / self.ours_us if self.ours_us > 0 else math.nan


@dataclass(frozen=True)
class Bench:
    """How this run times and what it runs: the GPU kernels, or (dry run) the CPU reference."""
    device: str
    dtype: torch.dtype
    dry_run: bool

    def time_us(self, fn: Callable[[], object]) -> float:
        if self.dry_run:
            fn()
            runs = []
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                runs.append(time.perf_counter() - t0)
            return statistics.median(runs) * 1e6
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3

    def graph_time_us(self, fn: Callable[[], object], reps: int = 20) -> float:
        """Per call, from replays of a CUDA graph of `reps` calls: the device time a captured decode step
        pays, gaps between kernels included and Python's launch cost excluded (which would decide a
        comparison of one launch against two at these microsecond sizes)."""
        if self.dry_run:
            return self.time_us(fn)
        fn()  # compile outside the capture
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                fn()
        return self.time_us(graph.replay) / reps

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=self.device, dtype=self.dtype)

    @staticmethod
    def for_run(dry_run: bool, script: str) -> "Bench":
        """The GPU in bf16, or (dry run) the CPU references in float32; without a GPU and no dry run, exit
        saying so."""
        if dry_run:
            return Bench("cpu", torch.float32, True)
        if not torch.cuda.is_available():
            sys.exit(f"benchmarks/{script} needs a CUDA GPU; use --dry-run for the CPU smoke path")
        return Bench("cuda", torch.bfloat16, False)


def copy_bandwidth(bench: Bench) -> float:
    """Device-to-device copy, bytes read + written per second."""
    numel = (1 << 29) if not bench.dry_run else (1 << 20)
    src = torch.empty(numel, dtype=torch.uint8, device=bench.device).random_(0, 255)
    dst = torch.empty_like(src)
    return 2 * numel / (bench.time_us(lambda: dst.copy_(src)) * 1e-6)


def matmul_flops(bench: Bench) -> float:
    n = 8192 if not bench.dry_run else 256
    a, b = bench.randn(n, n), bench.randn(n, n)
    return 2 * n ** 3 / (bench.time_us(lambda: a @ b) * 1e-6)


def sdpa_peers(bench: Bench) -> dict[str, Callable]:
    """SDPA pinned to one backend each (flash, cuDNN when this torch/GPU has it); math on the dry run.

    Each peer maps (q, k, v, causal) to a zero-argument call to time. A backend without native GQA gets
    K/V expanded to every query head once, outside the timing (its name says so).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backends = {"sdpa-math": SDPBackend.MATH} if bench.dry_run else {"sdpa-flash": SDPBackend.FLASH_ATTENTION}
    if not bench.dry_run and hasattr(SDPBackend, "CUDNN_ATTENTION"):
        backends["sdpa-cudnn"] = SDPBackend.CUDNN_ATTENTION

    def pinned(backend):
        def prepare(q, k, v, causal):
            def call(kk, vv, gqa):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, kk, vv, is_causal=causal, enable_gqa=gqa)
            try:
                call(k, v, True)
                return "", lambda: call(k, v, True)
            except RuntimeError:
                rep = q.shape[1] // k.shape[1]
                k_rep, v_rep = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
                call(k_rep, v_rep, False)  # raises if the backend cannot run this shape at all
                return "(expanded kv)", lambda: call(k_rep, v_rep, False)
        return prepare
    return {name: pinned(b) for name, b in backends.items()}


def paged_inputs(bench: Bench, lens: list[int], heads: int, kv_heads: int, head_dim: int, block_size: int):
    """A paged cache holding every sequence's K/V in shuffled blocks, and the same K/V gathered contiguous."""
    blocks = [-(-n // block_size) for n in lens]
    perm = torch.randperm(sum(blocks), device=bench.device).to(torch.int32)
    tables = torch.zeros(len(lens), max(blocks), dtype=torch.int32, device=bench.device)
    used = 0
    for b, n in enumerate(blocks):
        tables[b, :n] = perm[used:used + n]
        used += n
    k_cache = bench.randn(sum(blocks), block_size, kv_heads, head_dim)
    v_cache = bench.randn(sum(blocks), block_size, kv_heads, head_dim)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=bench.device)
    # equal lengths in every benchmark shape, so the peers take one dense [B, KVH, S, D] batch
    k = k_cache[tables.long()].flatten(1, 2)[:, :lens[0]].transpose(1, 2).contiguous()
    v = v_cache[tables.long()].flatten(1, 2)[:, :lens[0]].transpose(1, 2).contiguous()
    return k_cache, v_cache, seq_lens, tables, k, v


def bench_decode(bench: Bench, bandwidth: float, batch: int, context: int, heads: int, kv_heads: int,
                 head_dim: int, block_size: int, cache_dtype: torch.dtype | None = None) -> list[Row]:
    """cache_dtype (e.g. float8_e4m3fn, kv_cache_dtype="fp8_e4m3"): ours reads a cache of that dtype, so the
    limit counts its bytes; the peers, which take no fp8 K/V, read the same values in the model's dtype."""
    k_cache, v_cache, seq_lens, tables, k, v = paged_inputs(bench, [context] * batch, heads, kv_heads,
                                                            head_dim, block_size)
    if cache_dtype is not None:
        k_cache, v_cache = k_cache.to(cache_dtype), v_cache.to(cache_dtype)
        k, v = k.to(cache_dtype).to(k.dtype), v.to(cache_dtype).to(v.dtype)
    q = bench.randn(batch, heads, head_dim)  # [B, H, D]
    scale = head_dim ** -0.5
    out = torch.empty_like(q)
    starts = torch.arange(batch + 1, dtype=torch.int32, device=bench.device)
    if bench.dry_run:
        ours = lambda: ref.paged_attention(q, k_cache, v_cache, starts, seq_lens, tables, scale, 1)  # noqa: E731
    else:
        from kernels.attention_decode import paged_decode_attention
        ours = lambda: paged_decode_attention(q, k_cache, v_cache, seq_lens, tables, scale, context, out=out)  # noqa: E731,E501
    ours_us = bench.time_us(ours)
    kv_bytes = 2 * k.numel() * k_cache.element_size()
    limit_us = kv_bytes / bandwidth * 1e6
    shape = f"B={batch} ctx={context} H={heads}/{kv_heads} D={head_dim} bs={block_size}"
    kernel = "decode" if cache_dtype is None else f"decode, {str(cache_dtype).split('.')[-1]} KV"
    return peer_rows(bench, kernel, shape, ours_us, limit_us, q[:, :, None, :], k, v, causal=False)  # q [B, H, 1, D]


def bench_prefill(bench: Bench, tflops: float, batch: int, seq: int, heads: int, kv_heads: int,
                  head_dim: int, block_size: int) -> list[Row]:
    k_cache, v_cache, seq_lens, tables, k, v = paged_inputs(bench, [seq] * batch, heads, kv_heads,
                                                            head_dim, block_size)
    q = bench.randn(batch * seq, heads, head_dim)  # [T, H, D]
    starts = torch.arange(0, batch * seq + 1, seq, dtype=torch.int32, device=bench.device)
    scale = head_dim ** -0.5
    out = torch.empty_like(q)
    if bench.dry_run:
        ours = lambda: ref.paged_attention(q, k_cache, v_cache, starts, seq_lens, tables, scale, seq)  # noqa: E731
    else:
        from kernels.attention_prefill import paged_prefill_attention
        ours = lambda: paged_prefill_attention(q, k_cache, v_cache, starts, seq_lens, tables, scale, seq,  # noqa: E731
                                               out=out)
    ours_us = bench.time_us(ours)
    flops = 4 * heads * head_dim * batch * seq * (seq + 1) / 2  # QK^T and PV over the causal half
    limit_us = flops / tflops * 1e6
    shape = f"{batch}x{seq} H={heads}/{kv_heads} D={head_dim}"
    q4 = q.view(batch, seq, heads, head_dim).transpose(1, 2)  # [B, H, S, D]
    return peer_rows(bench, "prefill", shape, ours_us, limit_us, q4, k, v, causal=True)


def peer_rows(bench: Bench, kernel: str, shape: str, ours_us: float, limit_us: float, q4: torch.Tensor,
              k: torch.Tensor, v: torch.Tensor, causal: bool) -> list[Row]:
    """One table row per SDPA peer that can run this shape (q4 [B, H, S, D], k/v [B, KVH, S, D])."""
    rows = []
    for name, peer in sdpa_peers(bench).items():
        try:
            note, run = peer(q4, k, v, causal)
        except RuntimeError as exc:
            print(f"  {name} unavailable for {kernel}: {exc}".splitlines()[0], file=sys.stderr)
            continue
        rows.append(Row(kernel, shape, ours_us, name + note, bench.time_us(run), limit_us))
    return rows


def bench_small_ops(bench: Bench, bandwidth: float, tokens: int, hidden: int, inter: int) -> list[Row]:
    x, res, w = bench.randn(tokens, hidden), bench.randn(tokens, hidden), bench.randn(hidden)
    gate_up = bench.randn(tokens, 2 * inter)
    if bench.dry_run:
        norm, act = ref.rms_norm, ref.silu_and_mul
    else:
        from kernels.activation import silu_and_mul as act
        from kernels.norm import rms_norm as norm
    el = x.element_size()
    norm_bytes = (4 * tokens * hidden + hidden) * el  # read x, res, w; write out, res_out
    act_bytes = 3 * tokens * inter * el  # read gate|up, write out
    return [
        Row("rms_norm+res", f"T={tokens} N={hidden}", bench.time_us(lambda: norm(x, w, 1e-6, res)),
            "torch-eager", bench.time_us(lambda: ref.rms_norm(x, w, 1e-6, res)), norm_bytes / bandwidth * 1e6),
        Row("silu_and_mul", f"T={tokens} I={inter}", bench.time_us(lambda: act(gate_up)),
            "torch-eager", bench.time_us(lambda: ref.silu_and_mul(gate_up)), act_bytes / bandwidth * 1e6),
    ]


def bench_rotary_cache(bench: Bench, bandwidth: float, tokens: int, heads: int, kv_heads: int, head_dim: int,
                       block_size: int, max_pos: int = 8192, qk_norm: bool = False) -> Row:
    """Rotary fused with the KV-cache write vs our two unfused kernels (apply_rotary, then write_kv_cache).
    qk_norm (Qwen3): the per-head q/k RMSNorm folded in too, against our RMSNorm kernel on q and on k (each
    copying its strided view first) and then the fused rotary + write: what the model ran before the fold.

    q, k, v are column slices of one [T, (H + 2 KVH) D] tensor, as the model's fused qkv matmul leaves
    them; tokens land on shuffled slots of a cache with room for them all.
    """
    qkv = bench.randn(tokens, (heads + 2 * kv_heads) * head_dim)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = (x.view(tokens, n, head_dim) for x, n in ((q, heads), (k, kv_heads), (v, kv_heads)))
    positions = torch.randint(0, max_pos, (tokens,), device=bench.device)
    freqs = torch.rand(max_pos, head_dim // 2, device=bench.device) * 6.3
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)  # [max_pos, D] float32, as the model's
    num_blocks = -(-tokens // block_size)
    k_cache = bench.randn(num_blocks, block_size, kv_heads, head_dim)
    v_cache = bench.randn(num_blocks, block_size, kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, device=bench.device)[:tokens]
    if bench.dry_run:
        fused, rotate, write, norm = ref.rotary_and_write_kv, ref.apply_rotary, ref.write_kv_cache, ref.rms_norm
    else:
        from kernels.cache import write_kv_cache as write
        from kernels.norm import rms_norm as norm
        from kernels.rotary import apply_rotary as rotate
        from kernels.rotary_cache import rotary_and_write_kv as fused
    weights = (bench.randn(head_dim) + 1, bench.randn(head_dim) + 1, 1e-6) if qk_norm else None
    # both allocate their outputs per call, as the attention layer runs them
    ours = lambda: fused(q, k, v, positions, cos_sin, k_cache, v_cache, slots, qk_norm=weights)  # noqa: E731

    def unfused():
        q_rot, k_rot = rotate(q, k, positions, cos_sin)
        write(k_rot, v, k_cache, v_cache, slots)

    def norms_then_fused():
        q_normed, k_normed = norm(q, weights[0], weights[2])[0], norm(k, weights[1], weights[2])[0]
        fused(q_normed, k_normed, v, positions, cos_sin, k_cache, v_cache, slots)

    el = qkv.element_size()
    # read q, k, v and each token's cos/sin row (+ its position and slot); write q_out and the k, v cache rows
    moved = tokens * ((2 * heads + 4 * kv_heads) * head_dim * el + head_dim * cos_sin.element_size() + 16)
    shape = f"T={tokens} H={heads}/{kv_heads} D={head_dim} bs={block_size}"
    if qk_norm:
        return Row("rotary+kv_write+qk_norm", shape, bench.time_us(ours), "ours-unfused (2 norms + 1)",
                   bench.time_us(norms_then_fused), moved / bandwidth * 1e6)
    return Row("rotary+kv_write", shape, bench.time_us(ours), "ours-unfused (2 kernels)", bench.time_us(unfused),
               moved / bandwidth * 1e6)


def bench_decode_rotary(bench: Bench, bandwidth: float, batch: int, context: int, heads: int, kv_heads: int,
                        head_dim: int, block_size: int, max_seq_len: int) -> Row:
    """A decode step's attention as one launch (kernels/decode_rotary.py: rotary + cache write folded in,
    the last split reducing) against the kernels it replaces (rotary_and_write_kv, then paged decode and, with
    splits, its reduce), both replayed from CUDA graphs as a captured step runs them; max_seq_len is what a
    captured graph passes (the split count follows it)."""
    k_cache, v_cache, seq_lens, tables, k_dense, _ = paged_inputs(bench, [context] * batch, heads, kv_heads,
                                                                  head_dim, block_size)
    qkv = bench.randn(batch, (heads + 2 * kv_heads) * head_dim)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = (x.view(batch, n, head_dim) for x, n in ((q, heads), (k, kv_heads), (v, kv_heads)))
    freqs = torch.rand(max_seq_len, head_dim // 2, device=bench.device) * 6.3
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    positions = (seq_lens - 1).long()
    slots = tables.long().gather(1, (positions // block_size)[:, None])[:, 0] * block_size + positions % block_size
    scale, out = head_dim ** -0.5, torch.empty_like(q)
    if bench.dry_run:
        def fused():
            return ref.decode_rotary_attention(q, k, v, positions, cos_sin, k_cache, v_cache, slots, seq_lens, tables,
                                               scale)
        unfused = fused
    else:
        from kernels.attention_decode import paged_decode_attention
        from kernels.decode_rotary import decode_rotary_attention
        from kernels.rotary_cache import rotary_and_write_kv
        q_rot = torch.empty_like(q)

        tickets = torch.zeros(batch * kv_heads, dtype=torch.int32, device=bench.device)

        def fused():
            return decode_rotary_attention(q, k, v, positions, cos_sin, k_cache, v_cache, slots, seq_lens, tables,
                                           scale, max_seq_len, out=out, tickets=tickets)

        def unfused():
            rotary_and_write_kv(q, k, v, positions, cos_sin, k_cache, v_cache, slots, q_out=q_rot)
            return paged_decode_attention(q_rot, k_cache, v_cache, seq_lens, tables, scale, max_seq_len, out=out)
    kv_bytes = 2 * k_dense.numel() * k_cache.element_size()
    return Row("decode+rotary+kv_write", f"B={batch} ctx={context} H={heads}/{kv_heads} D={head_dim} "
               f"bs={block_size} max_seq_len={max_seq_len}", bench.graph_time_us(fused),
               "ours-unfused (2-3 kernels)", bench.graph_time_us(unfused), kv_bytes / bandwidth * 1e6)


def format_table(rows: list[Row]) -> str:
    head = ("kernel", "shape", "ours (us)", "peer", "peer (us)", "limit (us)", "ours/peer", "frac of limit")
    body = [(r.kernel, r.shape, f"{r.ours_us:.1f}", r.peer, f"{r.peer_us:.1f}", f"{r.limit_us:.1f}",
             f"{r.ours_over_peer:.2f}", f"{r.fraction_of_limit:.2f}") for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in [head, *body]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU smoke run of the table path at tiny sizes")
    parser.add_argument("--json", type=Path, default=None, help="results file (default: $OUT/kernels.json)")
    args = parser.parse_args(argv)
    bench = Bench.for_run(args.dry_run, "kernels.py")
    torch.manual_seed(0)
    bandwidth, tflops = copy_bandwidth(bench), matmul_flops(bench)
    heads, kv_heads = (32, 8) if not args.dry_run else (4, 2)
    rows: list[Row] = []
    if args.dry_run:
        rows += bench_decode(bench, bandwidth, 3, 40, heads, kv_heads, 16, 8)
        rows += bench_decode(bench, bandwidth, 3, 40, heads, kv_heads, 16, 8, torch.float8_e4m3fn)
        rows += bench_prefill(bench, tflops, 2, 24, heads, kv_heads, 16, 8)
        rows += bench_small_ops(bench, bandwidth, 5, 64, 96)
        rows.append(bench_rotary_cache(bench, bandwidth, 7, heads, kv_heads, 16, 4))
        rows.append(bench_rotary_cache(bench, bandwidth, 7, heads, kv_heads, 16, 4, qk_norm=True))
        rows.append(bench_decode_rotary(bench, bandwidth, 3, 40, heads, kv_heads, 16, 8, 64))
    else:
        rows += bench_decode(bench, bandwidth, 64, 4096, heads, kv_heads, 128, 16)
        rows += bench_decode(bench, bandwidth, 64, 4096, heads, kv_heads, 128, 16, torch.float8_e4m3fn)
        for head_dim in (128, 64):
            for batch, seq in ((8, 2048), (2, 8192)):
                rows += bench_prefill(bench, tflops, batch, seq, heads, kv_heads, head_dim, 16)
        rows += bench_small_ops(bench, bandwidth, 4096, 4096, 14336)
        for tokens in (4096, 64):  # prefill-like, decode-like (one captured step's launch)
            rows.append(bench_rotary_cache(bench, bandwidth, tokens, heads, kv_heads, 128, 16))
        for tokens in (4096, 64, 1):  # Qwen3-8B's heads (32/8, D 128); 1: a batch-1 decode step
            rows.append(bench_rotary_cache(bench, bandwidth, tokens, heads, kv_heads, 128, 16, qk_norm=True))
        # a decode step's attention, as the 1B shape's graphs run it at batch 1 and 64 (max_model_len 2,048
        # sets their split count), and the decode target's shape
        for batch, context, head_dim, max_seq_len in ((1, 512, 64, 2048), (64, 512, 64, 2048),
                                                      (64, 4096, 128, 4096)):
            rows.append(bench_decode_rotary(bench, bandwidth, batch, context, heads, kv_heads, head_dim, 16,
                                            max_seq_len))
    device = "cpu (dry run: reference functions, timings mean nothing)" if args.dry_run \
        else torch.cuda.get_device_name()
    print(f"device: {device}\ncopy bandwidth: {bandwidth / 1e9:.1f} GB/s, matmul: {tflops / 1e12:.1f} TFLOP/s")
    print(format_table(rows))
    write_json({
        "device": device, "dry_run": args.dry_run, "copy_bandwidth_gbps": bandwidth / 1e9,
        "matmul_tflops": tflops / 1e12,
        "rows": [asdict(r) | {"ours_over_peer": r.ours_over_peer, "fraction_of_limit": r.fraction_of_limit}
                 for r in rows],
    }, args.json, "kernels.json")
    return rows


if __name__ == "__main__":
    main()
