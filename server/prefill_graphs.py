"""CUDA graphs for steps that carry prompt tokens: one graph per token-count bucket, captured at start-up.

A decode-only step replays a decode graph (server/cuda_graphs.py). A step with prompt tokens (a new prompt,
a prefill chunk, either joining running decodes) used to run eagerly: about 160 kernel launches from
Python, 7-8 ms of host time on the H100 host for under 3 ms of device work on the 1B shape, and every
running request waited that long for its next token (serving's inter-token p99). Here such a step is
padded to the smallest captured token count >= its own and replays that bucket's graph.

What the graph holds: embeddings, every layer, the final norm, written into one static hidden buffer
[max_tokens, hidden]. The lm_head over the rows that sample, and the sampling itself, stay eager: which rows
and how many change every step, and they are three launches.

The grid problem: the prefill attention kernel sizes its grid from the step's longest query, which a graph
cannot change. Each step instead writes the kernel's work list (kernels/prefill_tiles.py) into a static
buffer sized for the bucket's worst case; entries past the step's own do nothing.

Padding is inert by construction: padding tokens have slot -1 (the cache write skips them), position 0 and
input id 0, and belong to no sequence (query_start_loc stops at the real token count), so no attention
program reads or writes them; their rows carry junk through row-wise ops and are never read. Padding
sequences have no tokens and no work-list entries.

Without CUDA the same static-buffer path runs with the eager model as its "replay" (use_eager), so the CPU
tests drive exactly the packing the graphs replay.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import replace

import numpy as np
import torch

from kernels.prefill_tiles import NO_ROWS, max_tiles, prefill_block_m, tile_map
from model.batch import StepBatch
from model.kv_cache import KVCache
from server.graph_capture import capture_graphs

log = logging.getLogger(__name__)


def token_buckets(max_num_batched_tokens: int, limit: int = 4096) -> list[int]:
    """16, 24, 32, 48, ... 384, 512 (powers of 2 and the midpoints between), then every 256: small steps are
    bound by reading the weights, so their padding is nearly free; from about 512 tokens the matmuls are
    bound by compute and a padded step costs its padding, so there at most a fifth of a step is padding.
    The last bucket is the step's token budget (or `limit`, above which steps run eagerly)."""
    top = min(max_num_batched_tokens, limit)
    sizes, p = [], 16
    while p < 512:
        sizes += [p, p + p // 2]
        p *= 2
    sizes += range(512, top, 256)
    return [s for s in sizes if s < top] + [top]


class PrefillInputs:
    """The static buffers a prefill graph reads, sized for the largest bucket: views of one int64 device
    buffer (ids | positions | slots | src | logits rows) and one int32 (query_start_loc | seq_lens | block
    tables | work list), each loaded from a pinned host mirror by one copy. src[t] >= 0: token t is the
    in-flight step's sampled id at that row (overlap scheduling; see DecodeInputs), not input_ids[t]."""

    def __init__(self, sizes: list[int], max_seqs: int, max_blocks_per_seq: int, group: int, head_dim: int,
                 device: torch.device, float32: bool = False):
        """float32: the queries are float32, whose attention tiles are smaller (kernels/prefill_tiles.py)."""
        self.sizes = sorted(sizes)
        T, MB = self.sizes[-1], max_blocks_per_seq
        S = self.max_seqs = min(max_seqs, T)
        self.max_tokens, self.group = T, group
        self.block_m = {n: prefill_block_m(n * group, head_dim, float32) for n in self.sizes}
        self.entries = {n: max_tiles(n, min(S, n), group, self.block_m[n]) for n in self.sizes}
        E = max(self.entries.values())
        self._o32 = (0, S + 1, 2 * S + 1, 2 * S + 1 + S * MB, 2 * S + 1 + S * MB + 2 * E)  # field offsets
        pin = device.type == "cuda"
        # Two host mirrors used in turn, each with an event after its copies: a step that samples nothing
        # ends in no sync, so the mirror may be rewritten only once its last copy has run.
        # (logits rows: up to one per token, for speculative steps' draft rows)
        self._host64 = [torch.zeros(5 * T, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self._host32 = [torch.zeros(self._o32[-1], dtype=torch.int32, pin_memory=pin) for _ in range(2)]
        self._events = [torch.cuda.Event() for _ in range(2)] if pin else [None, None]
        self._turn = 0
        for h64, h32 in zip(self._host64, self._host32):  # all padding: warm-up and capture touch no cache
            h64[2 * T:4 * T] = -1
            h32[self._o32[3]:].view(E, 2)[:, 1] = NO_ROWS
        self._dev64 = self._host64[0].to(device, copy=True)
        self._dev32 = self._host32[0].to(device, copy=True)
        o = self._o32
        self.query_start_loc = self._dev32[o[0]:o[1]]                       # [S+1]
        self.seq_lens = self._dev32[o[1]:o[2]]                              # [S]
        self.block_tables = self._dev32[o[2]:o[3]].view(S, MB)              # [S, MB]
        self.tiles = self._dev32[o[3]:o[4]]                                 # [2E]
        self.src = self._dev64[3 * T:4 * T]                                 # [T]

    def device_bytes(self) -> int:
        return self._dev64.numel() * 8 + self._dev32.numel() * 4

    def bucket_for(self, num_tokens: int, num_seqs: int) -> int | None:
        if num_tokens > self.max_tokens or num_seqs > self.max_seqs:
            return None
        return next(n for n in self.sizes if n >= num_tokens)

    def view(self, size: int) -> StepBatch:
        """The bucket's StepBatch: views of the static buffers, so a graph captured on it reads later loads."""
        T, S = self.max_tokens, min(self.max_seqs, size)
        return StepBatch(
            input_ids=self._dev64[:size], positions=self._dev64[T:T + size],
            slot_mapping=self._dev64[2 * T:2 * T + size], query_start_loc=self.query_start_loc[:S + 1],
            seq_lens=self.seq_lens[:S], block_tables=self.block_tables[:S],
            logits_indices=self._dev64[4 * T:4 * T], max_query_len=size, max_seq_len=0,
            attention_tiles=self.tiles[:2 * self.entries[size]], attention_tile_rows=self.block_m[size])

    def logits_rows(self, count: int) -> torch.Tensor:
        T = self.max_tokens
        return self._dev64[4 * T:4 * T + count]

    def load(self, rows: list[tuple[list[int], int, np.ndarray, int]], block_size: int, logits_rows: list[int],
             size: int) -> bool:
        """rows: (new token ids, tokens already cached, block table: int32 array or list, src) per sequence,
        padding up to `size`. src >= 0: the row's last token is a placeholder (< 0) for the in-flight step's
        sampled id at row src. Returns whether any row reads one."""
        T, S, MB = self.max_tokens, self.max_seqs, self.block_tables.shape[1]
        k, self._turn = self._turn, self._turn ^ 1
        if self._events[k] is not None:
            self._events[k].synchronize()
        a, b = self._host64[k].numpy(), self._host32[k].numpy()
        o = self._o32
        end, starts, lens, q_lens, ones = 0, [0], [], [], ([], [], [], [])  # ones: decode rows, gathered
        ahead = []  # (token index, src row) of the placeholders
        for i, (ids, cached, table, src) in enumerate(rows):
            n = len(ids)
            if src >= 0:
                ahead.append((end + n - 1, src))
            if n == 1:  # a decode row: written with the others below, in one assignment per column
                ones[0].append(end)
                ones[1].append(max(ids[0], 0))
                ones[2].append(cached)
                ones[3].append(int(table[cached // block_size]) * block_size + cached % block_size)
            else:
                pos = np.arange(cached, cached + n)
                a[end:end + n] = ids
                a[end + n - 1] = max(ids[-1], 0)
                a[T + end:T + end + n] = pos
                a[2 * T + end:2 * T + end + n] = np.asarray(table)[pos // block_size].astype(np.int64) * block_size \
                    + pos % block_size
            b[o[2] + i * MB:o[2] + i * MB + len(table)] = table
            end += n
            starts.append(end)
            lens.append(cached + n)
            q_lens.append(n)
        if ones[0]:
            at = np.array(ones[0])
            a[at], a[T + at], a[2 * T + at] = ones[1], ones[2], ones[3]
        B, view_s = len(rows), min(S, size)
        a[end:size], a[T + end:T + size], a[2 * T + end:2 * T + size] = 0, 0, -1
        a[3 * T:3 * T + size] = -1
        for t, src in ahead:
            a[3 * T + t] = src
        a[4 * T:4 * T + len(logits_rows)] = logits_rows
        b[:B + 1] = starts
        b[B + 1:view_s + 1] = end            # padding sequences: no queries
        b[o[1]:o[1] + B] = lens
        b[o[1] + B:o[1] + view_s] = 0
        b[o[3]:o[3] + 2 * self.entries[size]] = tile_map(q_lens, self.group, self.block_m[size], self.entries[size])
        self._dev64.copy_(self._host64[k], non_blocking=True)
        self._dev32.copy_(self._host32[k], non_blocking=True)
        if self._events[k] is not None:
            self._events[k].record()
        return bool(ahead)


class PrefillGraphRunner:
    """Replays a captured prefill-step graph for steps of up to max(sizes) tokens; see the module doc."""

    def __init__(self, model: torch.nn.Module, kv_cache: KVCache, sizes: list[int], max_seqs: int,
                 max_model_len: int, block_size: int, device: torch.device, sampled: torch.Tensor | None = None):
        """sampled: the decode graphs' buffer of the last graphed step's sampled ids (src rows read it)."""
        cfg = model.config
        self.model, self.kv_cache, self.device = model, kv_cache, device
        self.block_size = block_size
        self.sizes = sorted(set(sizes))
        self.inputs = PrefillInputs(self.sizes, max_seqs, -(-max_model_len // block_size),
                                    cfg.num_attention_heads // cfg.num_kv_heads, cfg.head_dim, device,
                                    float32=model.lm_head.weight.dtype == torch.float32)
        self.hidden = torch.zeros(self.sizes[-1], cfg.hidden_size, dtype=model.lm_head.weight.dtype,
                                  device=device)                                   # [T, hidden]
        self._replay: dict[int, object] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.sampled = sampled if sampled is not None else torch.zeros(1, dtype=torch.int64, device=device)
        self.replays: Counter[int] = Counter()  # bucket -> steps run at it
        self.ahead = 0  # steps that read tokens of the step still in flight
        self.memory_bytes = 0

    def _body(self, size: int) -> None:
        view, src = self.inputs.view(size), self.inputs.src[:size]
        ids = torch.where(src >= 0, self.sampled.index_select(0, src.clamp(min=0)), view.input_ids)
        hidden = self.model.hidden_states(replace(view, input_ids=ids), self.kv_cache)  # [size, hidden]
        self.hidden[:size].copy_(hidden)

    def use_eager(self) -> "PrefillGraphRunner":
        """The static-buffer path with the eager model as replay (CPU tests; no torch.cuda.graph)."""
        self._replay = {n: (lambda n=n: self._body(n)) for n in self.sizes}
        return self

    def capture(self, pool=None) -> "PrefillGraphRunner":
        """Capture every bucket (server/graph_capture.py), into `pool` if given: the decode graphs share it."""
        assert self.device.type == "cuda", "CUDA graphs need a CUDA device"
        start, free = time.perf_counter(), torch.cuda.mem_get_info(self.device)[0]
        self.graphs = capture_graphs(self._body, self.sizes, self.device, pool)
        self._replay = {n: g.replay for n, g in self.graphs.items()}
        self.memory_bytes = free - torch.cuda.mem_get_info(self.device)[0]
        log.info("CUDA graphs: captured %d prefill-step token buckets (%s) in %.2f s, using %.1f MiB",
                 len(self.sizes), ",".join(map(str, self.sizes)), time.perf_counter() - start,
                 self.memory_bytes / 2**20)
        return self

    def bucket_for(self, num_tokens: int, num_seqs: int) -> int | None:
        """The bucket a step of this many tokens and sequences replays at; None: it runs eagerly."""
        return self.inputs.bucket_for(num_tokens, num_seqs) if self._replay else None

    def run(self, rows: list[tuple[list[int], int, np.ndarray, int]], logits_rows: list[int]) -> torch.Tensor | None:
        """Logits [len(logits_rows), vocab] float32 of the step `rows` (see PrefillInputs.load); None when
        it fits no bucket (it then runs eagerly)."""
        size = self.bucket_for(sum(len(r[0]) for r in rows), len(rows))
        if size is None:
            return None
        self.ahead += self.inputs.load(rows, self.block_size, logits_rows, size)
        self._replay[size]()
        self.replays[size] += 1
        return self.model.logits(self.hidden[:size], self.inputs.logits_rows(len(logits_rows)))


def prefill_graph_memory_reserve(model: torch.nn.Module, kv_cache: KVCache, sizes: list[int], max_seqs: int,
                                 max_model_len: int, block_size: int, device: torch.device) -> int:
    """Bytes the prefill graphs will hold: the transient peak of the largest bucket's body (padding only, so
    a one-block cache serves), the static buffers, and a small allowance per graph."""
    runner = PrefillGraphRunner(model, kv_cache, sizes, max_seqs, max_model_len, block_size, device)
    static = runner.inputs.device_bytes() + runner.hidden.numel() * runner.hidden.element_size()
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        runner._body(runner.sizes[-1])
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base + static + (2 << 20) * len(runner.sizes)
