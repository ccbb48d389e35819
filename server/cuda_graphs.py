"""CUDA graphs for decode steps: one graph per padded batch size, captured at start-up, so a decode step
is a few input copies and one graph launch.

A decode-only step (every sequence feeds exactly one token) of n sequences is padded to the smallest
captured size >= n. Padding rows are inert by construction, not by masking after the fact:
  slot_mapping -1  -> the cache write skips the row (kernels/cache.py), the KV cache is untouched
  seq_len 0        -> the decode kernel returns zeros for the row (empty context, no NaN)
  input id 0, position 0, block-table row of 0s -> every index the row computes stays in bounds
Rows never mix inside the model (norms, MLP and attention are per-row), so the real rows' logits equal
the unpadded step's.

The captured grid may not depend on per-step values. The only one the decode path reads is max_seq_len
(the split-KV heuristic), so every graph is captured with max_seq_len = max_model_len: the split count is
fixed per batch size, and splits past a short sequence's end are empty (the kernel handles them).

Memory: all graphs (and the prefill graphs) share one private pool, captured largest first so the smaller
ones reuse its blocks (graphs replay one at a time on one stream). The logits of every size land in one
shared static buffer [max_size, vocab], so the pool holds only transient activations. The model runner
reserves a measured peak for the pool before it sizes the KV cache, and captures after allocating it.

Without CUDA the same static-buffer path runs with the eager model as its "replay" (use_eager).
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from dataclasses import replace
from typing import TYPE_CHECKING, Callable

import torch

from model.batch import StepBatch
from model.kv_cache import KVCache
from server.graph_capture import capture_graphs

if TYPE_CHECKING:
    from server.compiled_forward import CompiledForward

log = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int, max_num_batched_tokens: int, limit: int = 512) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8, up to the widest decode step the scheduler can form."""
    top = min(max_num_seqs, max_num_batched_tokens, limit)
    sizes = [s for s in (1, 2, 4) if s <= top] + list(range(8, top + 1, 8))
    if sizes[-1] != top:
        sizes.append(top)  # e.g. max_num_seqs=20: 16 alone would leave 17..20 eager
    return sizes


def is_graphable(batch: StepBatch) -> bool:
    """One new token for every sequence (a 1-token prefill chunk counts: it is the same computation)."""
    return batch.max_query_len == 1 and batch.num_tokens == batch.num_seqs > 0


def pad_decode_batch(batch: StepBatch, size: int, max_seq_len: int | None = None) -> StepBatch:
    """The decode step `batch` (n rows) padded to `size` rows with inert rows (see the module doc).

    max_seq_len replaces the host max (the captured value); logits are wanted for every row.
    The reference for what DecodeInputs.load writes into its static buffers.
    """
    n = batch.num_seqs
    pad = size - n
    assert is_graphable(batch) and pad >= 0, (batch.num_seqs, batch.max_query_len, size)

    def rows(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.cat([t, t.new_full((pad, *t.shape[1:]), value)])

    dev = batch.input_ids.device
    return StepBatch(
        input_ids=rows(batch.input_ids, 0), positions=rows(batch.positions, 0),
        slot_mapping=rows(batch.slot_mapping, -1), seq_lens=rows(batch.seq_lens, 0),
        block_tables=rows(batch.block_tables, 0),
        query_start_loc=torch.arange(size + 1, dtype=torch.int32, device=dev),
        logits_indices=torch.arange(size, dtype=torch.int64, device=dev),
        max_query_len=1, max_seq_len=batch.max_seq_len if max_seq_len is None else max_seq_len)


class DecodeInputs:
    """The static input buffers the graphs read, sized for the largest captured batch.

    All of them are views of two device buffers (int64: ids | positions | slots | src; int32: seq_lens |
    block tables) mirrored by two pinned host buffers, so loading a step is numpy writes on the host and two
    host->device copies. The host side may be rewritten once the step's copies have run; every step ends
    in a sync on its sampled ids, so the next load never races the previous copy.
    """

    def __init__(self, max_size: int, max_blocks_per_seq: int, max_seq_len: int, device: torch.device):
        S, MB = max_size, max_blocks_per_seq
        pin = device.type == "cuda"
        self.max_size, self.max_seq_len = S, max_seq_len
        # Two host copies, used in turn: with overlap scheduling a step's staging is written while the
        # previous step's copies may still be queued; the one before that has run (its step was waited for).
        self._host64 = [torch.zeros(4 * S, dtype=torch.int64, pin_memory=pin) for _ in range(2)]  # ids|pos|slots|src
        self._host32 = [torch.zeros(S + S * MB, dtype=torch.int32, pin_memory=pin) for _ in range(2)]  # lens|tables
        for h in self._host64:
            h[2 * S:] = -1  # created as all-padding: warm-up and capture write nothing into the cache
        self._np64 = [h.numpy() for h in self._host64]
        self._np32 = [h.numpy() for h in self._host32]
        self._turn = 0
        self._dev64 = self._host64[0].to(device)
        self._dev32 = self._host32[0].to(device)
        self.input_ids = self._dev64[:S]                                               # [S]
        self.positions = self._dev64[S:2 * S]                                          # [S]
        self.slot_mapping = self._dev64[2 * S:3 * S]                                   # [S]
        # src[r] >= 0: row r's input id is the previous step's sampled token of row src[r] (on the device,
        # not yet seen by the host); -1: input_ids[r] holds it
        self.src = self._dev64[3 * S:]                                                 # [S]
        self.seq_lens = self._dev32[:S]                                                # [S]
        self.block_tables = self._dev32[S:].view(S, MB)                                # [S, max_blocks]
        self.query_start_loc = torch.arange(S + 1, dtype=torch.int32, device=device)  # [S+1]
        self.logits_indices = torch.arange(S, dtype=torch.int64, device=device)       # [S]

    def device_bytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (self._dev64, self._dev32, self.query_start_loc, self.logits_indices))

    @property
    def max_blocks_per_seq(self) -> int:
        return self.block_tables.shape[1]

    def view(self, size: int) -> StepBatch:
        """The first `size` rows as a StepBatch: views, so a graph captured on it reads later copies."""
        return StepBatch(
            input_ids=self.input_ids[:size], positions=self.positions[:size],
            slot_mapping=self.slot_mapping[:size], query_start_loc=self.query_start_loc[:size + 1],
            seq_lens=self.seq_lens[:size], block_tables=self.block_tables[:size],
            logits_indices=self.logits_indices[:size], max_query_len=1, max_seq_len=self.max_seq_len)

    def load_rows(self, token_ids: list[int], positions: list[int], slots: list[int], seq_lens: list[int],
                  tables: list, size: int, src: list[int] | None = None) -> None:
        """Real rows [0, n) from host lists, padding rows [n, size) (see the module doc), two copies.

        Block-table columns past a row's own blocks keep stale (in-range) block ids: nothing reads them,
        because a row only reads the pages below its seq_len.
        """
        S, MB, n = self.max_size, self.max_blocks_per_seq, len(token_ids)
        k, self._turn = self._turn, self._turn ^ 1
        a, b = self._np64[k], self._np32[k]
        a[:n], a[n:size] = token_ids, 0
        a[S:S + n], a[S + n:S + size] = positions, 0
        a[2 * S:2 * S + n], a[2 * S + n:2 * S + size] = slots, -1
        a[3 * S:3 * S + n], a[3 * S + n:3 * S + size] = (-1 if src is None else src), -1
        b[:n], b[n:size] = seq_lens, 0
        for i, table in enumerate(tables):
            b[S + i * MB:S + i * MB + len(table)] = table
        b[S + n * MB:S + size * MB] = 0
        self._dev64.copy_(self._host64[k], non_blocking=True)
        end = S + size * MB
        self._dev32[:end].copy_(self._host32[k][:end], non_blocking=True)

    def load(self, batch: StepBatch, size: int) -> None:
        """load_rows from a device StepBatch (tests; syncs to read it)."""
        width = batch.block_tables.shape[1]
        self.load_rows(batch.input_ids.tolist(), batch.positions.tolist(), batch.slot_mapping.tolist(),
                       batch.seq_lens.tolist(), [row[:width] for row in batch.block_tables.tolist()], size)


class DecodeGraphRunner:
    """Replays a captured decode graph for decode-only steps of up to max(sizes) sequences."""

    def __init__(self, model: torch.nn.Module, kv_cache: KVCache, sizes: list[int], max_model_len: int,
                 block_size: int, device: torch.device, compiled: "CompiledForward | None" = None):
        self.model = model
        self.compiled = compiled  # torch.compile of the forward for the small sizes (compile_mode)
        self.kv_cache = kv_cache
        self.sizes = sorted(set(sizes))
        self.max_size = self.sizes[-1]
        self.device = device
        self._free_at_start = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
        self.inputs = DecodeInputs(self.max_size, -(-max_model_len // block_size), max_model_len, device)
        # One logits buffer for every size: per-size outputs would keep [size, vocab] float32 each alive.
        self.logits = torch.zeros(self.max_size, model.config.vocab_size, dtype=torch.float32,
                                  device=device)                                       # [S, vocab]
        # Each graphed step's sampled ids (written by the runner after sampling), read by the next graph,
        # and their host copies (two, in turn, as the staging) with an event per copy to wait on.
        self.sampled = torch.zeros(self.max_size, dtype=torch.int64, device=device)   # [S]
        pin = device.type == "cuda"
        self._sampled_host = [torch.zeros(self.max_size, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self._events = [torch.cuda.Event() for _ in range(2)] if pin else [None, None]
        self._sampled_turn = 0
        self._replay: dict[int, Callable[[], None]] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.replays: Counter[int] = Counter()  # padded size -> steps run at it
        self.memory_bytes = 0

    # ---- start-up ----------------------------------------------------------------------------------
    def _step(self, size: int) -> None:
        """The computation a graph holds: input ids (some from the previous step's sampled tokens), the model
        on the static view, logits into the shared buffer."""
        view = self.inputs.view(size)
        src = self.inputs.src[:size]
        ids = torch.where(src >= 0, self.sampled.index_select(0, src.clamp(min=0)), view.input_ids)
        forward = self.model.hidden_states if self.compiled is None else self.compiled.for_size(size)
        hidden = forward(replace(view, input_ids=ids), self.kv_cache)  # [size, hidden]
        # every row, so no gather; one kernel casts into the float32 buffer (logits() would cast, then copy)
        self.logits[:size].copy_(self.model.lm_head(hidden))

    def use_eager(self) -> "DecodeGraphRunner":
        """The static-buffer path with the eager model as replay (CPU tests; no torch.cuda.graph)."""
        self._replay = {s: (lambda s=s: self._step(s)) for s in self.sizes}
        return self

    def capture(self, pool=None) -> "DecodeGraphRunner":
        """Capture every size (server/graph_capture.py), into `pool` if given: the prefill graphs share it."""
        assert self.device.type == "cuda", "CUDA graphs need a CUDA device"
        start = time.perf_counter()
        with self.compiled.compiling(self.sizes) if self.compiled else contextlib.nullcontext():
            self.graphs = capture_graphs(self._step, self.sizes, self.device, pool)
        self._replay = {s: g.replay for s, g in self.graphs.items()}
        self.memory_bytes = self._free_at_start - torch.cuda.mem_get_info(self.device)[0]
        log.info("CUDA graphs: captured %d decode sizes (%s) in %.2f s, using %.1f MiB of GPU memory",
                 len(self.sizes), ",".join(map(str, self.sizes)), time.perf_counter() - start,
                 self.memory_bytes / 2**20)
        return self

    # ---- one step ----------------------------------------------------------------------------------
    def padded_size(self, batch: StepBatch) -> int | None:
        """The captured size this step replays at, or None when it must run eagerly."""
        if not is_graphable(batch) or batch.block_tables.shape[1] > self.inputs.max_blocks_per_seq:
            return None
        return self.padded_size_for(batch.num_seqs)

    def publish_sampled(self, token_ids: torch.Tensor, ahead: bool) -> "SampledIds | torch.Tensor":
        """A graphed step's ids into `sampled` (the next graph's input). With `ahead` (overlap scheduling) also
        into pinned host memory, unwaited: SampledIds.tolist() then waits for this step alone, where the
        device tensor's .tolist() (returned otherwise) would wait for every step queued after it too."""
        n = token_ids.shape[0]
        self.sampled[:n].copy_(token_ids)
        if not ahead:
            return token_ids
        k, self._sampled_turn = self._sampled_turn, self._sampled_turn ^ 1
        host = self._sampled_host[k][:n]
        host.copy_(token_ids, non_blocking=True)
        event = self._events[k]
        if event is not None:
            event.record()
        return SampledIds(host, event)

    def padded_size_for(self, num_seqs: int) -> int | None:
        """The captured size a decode step of num_seqs rows replays at (None: too wide, or no graphs)."""
        if not self._replay or num_seqs > self.max_size or num_seqs == 0:
            return None
        return next(s for s in self.sizes if s >= num_seqs)

    def run(self, batch: StepBatch, size: int) -> torch.Tensor:
        """Logits of batch.logits_indices, [N, vocab] float32: a view of the static buffer, valid until
        the next replay (the step samples from it before then)."""
        self.inputs.load(batch, size)
        return self.replay(size, batch.num_seqs, batch.logits_indices)

    def replay(self, size: int, num_seqs: int, logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        """Replay on what the inputs hold; logits of every real row, or of logits_indices."""
        self._replay[size]()
        self.replays[size] += 1
        if logits_indices is None or logits_indices.shape[0] == num_seqs:  # every row samples: arange(n)
            return self.logits[:num_seqs]
        return self.logits[logits_indices]


class SampledIds:
    """A step's sampled ids on their way to the host (see DecodeGraphRunner.publish_sampled)."""

    def __init__(self, host: torch.Tensor, event: "torch.cuda.Event | None"):
        self.host, self.event = host, event

    def tolist(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


def graph_memory_reserve(model: torch.nn.Module, kv_cache: KVCache, size: int, num_graphs: int,
                         max_model_len: int, block_size: int, device: torch.device) -> int:
    """Bytes the captured graphs will hold: the transient peak of a decode step of `size` rows (the
    shared pool's need), the static buffers, and a small allowance per graph.

    Padding rows make the same allocations as real ones (the split partials depend on max_model_len only)
    and touch no KV block, so a one-block cache serves.
    """
    inputs = DecodeInputs(size, -(-max_model_len // block_size), max_model_len, device)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        model(inputs.view(size), kv_cache)
    torch.cuda.synchronize(device)
    transient = torch.cuda.max_memory_allocated(device) - base
    static = inputs.device_bytes()
    static += size * model.config.vocab_size * 4  # the shared logits buffer, float32
    return transient + static + (2 << 20) * num_graphs  # + a guess at each graph's own device memory
