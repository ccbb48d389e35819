"""ModelRunner: owns the device. Loads the model, sizes and allocates the KV cache, packs each step's
tensors from the scheduler's output, runs the forward under inference_mode, samples, and hands back host ids.

One device->host transfer per step (the sampled ids), plus one for logprobs when a row asks for them.
Decode-only steps replay a CUDA graph captured at start-up (server/cuda_graphs.py; `_replay_decode`
decides), steps with prompt tokens a graph per token bucket (server/prefill_graphs.py; `_replay_prefill`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from model.batch import StepBatch, build_step_batch, full_budget_batch
from model.config import ModelConfig
from model.kv_cache import KVCache
from model.kv_dtype import resolve_kv_cache_dtype
from model.rope import RotaryEmbedding
from model.sampler import sample
from server.compiled_forward import CompiledForward
from server.cuda_graphs import DecodeGraphRunner, capture_sizes, graph_memory_reserve
from server.engine_config import EngineConfig
from server.prefill_graphs import PrefillGraphRunner, prefill_graph_memory_reserve, token_buckets
from server.sampling_batch import build_sampling_tensors, only_argmax, profile_sampling_tensors
from server.scheduler_output import SchedulerOutput
from server.speculative import sampling_rows
from server.step_results import Forward, PendingStep

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVCapacity:
    num_blocks: int
    block_size: int
    bytes_per_token: int
    tokens: int
    max_concurrency: float  # tokens / max_model_len: how many full-length sequences fit at once


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():  # torch's own error is an assertion deep in a load
        raise ValueError("device: cuda was asked for, but torch sees no CUDA device (torch "
                         f"{torch.__version__}{'' if torch.version.cuda else ', a CPU-only build'})")
    return torch.device(name)


class ModelRunner:
    def __init__(self, config: EngineConfig, model_dir: str | None, eos_token_ids: tuple[int, ...] = (),
                 model: torch.nn.Module | None = None):
        """Loads model_dir, or adopts `model` (a CausalLM already on config's device, e.g. random weights)."""
        from model.kv_refit import load_with_kv_head_method
        from model.llama import resolve_dtype

        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        if model is None:
            model = load_with_kv_head_method(
                model_dir, dtype=self.dtype, device=str(self.device), num_kv_heads=config.num_kv_heads,
                kv_head_method=config.kv_head_method, calibration_text=config.kv_calibration_text,
                calibration_tokens=config.kv_calibration_tokens, attention_backend=config.attention_backend,
                progress=True)
        self.model = model
        self.ops_name = getattr(getattr(model, "ops", None), "name", None)  # "triton" | "torch"
        if self.ops_name == "triton":
            model.ops.decode_fusion, model.ops.skinny_matmul = config.decode_fusion, config.skinny_matmul
            model.ops.skinny_pdl = config.skinny_matmul_pdl  # (refused here on a GPU older than sm_90)
        self.kv_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, self.dtype, self.device, self.ops_name)
        self.model_config: ModelConfig = self.model.config
        self.eos_token_ids = eos_token_ids or self.model_config.eos_token_ids
        self.max_model_len = config.resolve_max_model_len(self.model_config)
        rotary = getattr(model, "rotary", None)  # a cos/sin row per position the model has: GiBs under YaRN x 32
        if rotary is not None and rotary.cos_sin_cache.shape[0] != self.max_model_len:
            model.rotary = RotaryEmbedding(self.model_config, self.device, max_positions=self.max_model_len)
        self.block_size = config.block_size
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.graph_sizes = self._graph_sizes()
        self.prefill_sizes = token_buckets(config.max_num_batched_tokens) \
            if self.graph_sizes and config.prefill_graphs else []
        self.compiled = self._compiled_forward()
        num_blocks = self._num_kv_blocks()  # leaves room for the graphs, captured after the KV allocation
        self.kv_cache = KVCache.allocate(self.model_config, num_blocks, self.block_size, self.kv_dtype,
                                        self.device)
        pool = torch.cuda.graph_pool_handle() if self.graph_sizes else None  # one pool for both kinds
        decode = self._decode_graphs() if self.graph_sizes else None
        self.prefill_graphs: PrefillGraphRunner | None = \
            self._prefill_graphs(decode.sampled).capture(pool) if self.prefill_sizes else None
        self.graphs: DecodeGraphRunner | None = decode.capture(pool) if decode else None
        self.kv_capacity = self._capacity(num_blocks)
        c = self.kv_capacity
        # a warning below one sequence: requests longer than the cache are refused (400) though under max_model_len
        log.log(logging.INFO if c.max_concurrency >= 1 else logging.WARNING,
                "KV cache: %d blocks x %d tokens = %d tokens of capacity, %d bytes/token (%.1f MiB); "
                "%.1f sequences of max_model_len=%d fit at once", c.num_blocks, c.block_size, c.tokens,
                c.bytes_per_token, c.tokens * c.bytes_per_token / 2**20, c.max_concurrency, self.max_model_len)

    # ---- CUDA graphs ------------------------------------------------------------------------------
    def _graph_sizes(self) -> list[int]:
        """The decode batch sizes to capture; none with enforce_eager, off CUDA, or with the torch ops
        (their decode attention reads seq_lens on the host, which a graph cannot)."""
        if self.config.enforce_eager or self.device.type != "cuda":
            return []
        if self.ops_name != "triton":
            log.info("CUDA graphs off: the %s ops are not capturable", self.ops_name)
            return []
        return capture_sizes(self.config.max_num_seqs, self.config.max_num_batched_tokens)

    def _compiled_forward(self) -> CompiledForward | None:
        mode = self.config.compile_mode
        if mode == "off":
            return None
        if not self.graph_sizes:
            log.warning("compile_mode=%s applies to decode CUDA graphs, and this run captures none (%s): "
                        "the model runs as written", mode, self.device)
        return CompiledForward(self.model, mode, self.config.compile_max_batch_size)

    def _decode_graphs(self) -> DecodeGraphRunner:
        return DecodeGraphRunner(self.model, self.kv_cache, self.graph_sizes or capture_sizes(
            self.config.max_num_seqs, self.config.max_num_batched_tokens), self.max_model_len, self.block_size,
            self.device, self.compiled)

    def _prefill_graphs(self, sampled: torch.Tensor) -> PrefillGraphRunner:
        return PrefillGraphRunner(self.model, self.kv_cache, self.prefill_sizes or token_buckets(
            self.config.max_num_batched_tokens), self.config.max_num_seqs, self.max_model_len, self.block_size,
            self.device, sampled)

    def use_graph_path_eagerly(self, prefill: bool = True) -> None:
        """Test hook (any device): decode steps (and with `prefill`, steps with prompt tokens) take the graph
        paths' padding and static buffers, with the eager model in place of the replay."""
        self.graphs = self._decode_graphs().use_eager()
        self.prefill_graphs = self._prefill_graphs(self.graphs.sampled).use_eager() if prefill else None

    # ---- sizing ------------------------------------------------------------------------------------
    def _capacity(self, num_blocks: int) -> KVCapacity:
        per_token = KVCache.bytes_per_block(self.model_config, 1, self.kv_dtype)
        tokens = num_blocks * self.block_size
        return KVCapacity(num_blocks, self.block_size, per_token, tokens, tokens / self.max_model_len)

    def _num_kv_blocks(self) -> int:
        per_block = KVCache.bytes_per_block(self.model_config, self.block_size, self.kv_dtype)
        if self.device.type != "cuda":
            budget = self.config.kv_cache_memory
        else:
            budget = self._cuda_kv_budget()
        num_blocks = budget // per_block
        if num_blocks < 1:
            raise ValueError(f"the KV cache budget of {budget} bytes holds no block of {per_block} bytes; "
                             "raise kv_cache_memory / gpu_memory_utilization")
        return num_blocks

    def _cuda_kv_budget(self) -> int:
        """gpu_memory_utilization * total - weights - activation peak of a full-budget dummy step - others."""
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        weights = torch.cuda.memory_allocated(self.device)
        others = total - free - torch.cuda.memory_reserved(self.device)  # CUDA context, other processes
        torch.cuda.reset_peak_memory_stats(self.device)
        self._profile_step()
        peak = torch.cuda.max_memory_allocated(self.device) - weights
        graphs = 0
        if self.graph_sizes:  # the graphs' pool and buffers live beside the eager steps' activations
            one_block = KVCache.allocate(self.model_config, 1, self.block_size, self.kv_dtype, self.device)
            graphs = graph_memory_reserve(self.model, one_block, max(self.graph_sizes), len(self.graph_sizes),
                                          self.max_model_len, self.block_size, self.device)
            if self.prefill_sizes:  # the pool is shared: this over-reserves by the decode graphs' smaller peak
                graphs += prefill_graph_memory_reserve(self.model, one_block, self.prefill_sizes,
                                                       self.config.max_num_seqs, self.max_model_len,
                                                       self.block_size, self.device)
            del one_block
        torch.cuda.empty_cache()
        budget = int(total * self.config.gpu_memory_utilization) - weights - peak - graphs - others
        log.info("GPU memory: total %.2f GiB, weights %.2f GiB, activation peak %.2f GiB, CUDA graphs %.2f GiB, "
                 "other %.2f GiB, KV budget %.2f GiB", total / 2**30, weights / 2**30, peak / 2**30,
                 graphs / 2**30, others / 2**30, budget / 2**30)
        return max(budget, 0)

    def _profile_step(self) -> None:
        """A dummy step at max_num_batched_tokens (sequences of at most max_model_len, the longest prefill)
        that samples max_sampled_rows at once (the widest logits, drafts' rows included): both peaks at once."""
        batch, num_blocks = full_budget_batch(self.config.max_num_batched_tokens, self.max_model_len,
                                              self.block_size, self.config.max_sampled_rows, self.device)
        cache = KVCache.allocate(self.model_config, num_blocks, self.block_size, self.kv_dtype, self.device)
        with torch.inference_mode():
            logits = self.model(batch, cache)
            sample(logits, profile_sampling_tensors(logits.shape[0], self.device), self.generator)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        del cache

    # ---- one step ----------------------------------------------------------------------------------
    def prepare(self, sched: SchedulerOutput) -> StepBatch:
        fed, logits_rows = sched.fed_tokens()
        for s, ids in zip(sched.scheduled, fed):
            if ids[-1] < 0:  # (a sequence with drafts has no placeholder: it never drafts then)
                raise RuntimeError(f"{s.seq.request_id}: an eager step got a token the host has not seen")
        return build_step_batch(fed, [s.seq.num_computed_tokens for s in sched.scheduled],
                                [s.seq.block_table for s in sched.scheduled], self.block_size, self.device,
                                logits_indices=logits_rows)

    def launch(self, sched: SchedulerOutput) -> "PendingStep":
        """Queue the step's device work (forward, sampling) and return without waiting for it."""
        return self.launch_sampling(self.launch_forward(sched))

    def launch_forward(self, sched: SchedulerOutput) -> Forward:
        """Queue the forward alone. A decode step may feed tokens the previous step sampled and the host has
        not seen yet (placeholders, -1 in seq.token_ids; see LLMEngine.step): the graph path reads them from
        the device. launch_sampling may wait until the host has them (penalties and grammars read them)."""
        sampling = sampling_rows(sched)  # (each draft's row after its sequence's)
        owed = sched.prompt_logprob_rows()
        prompt_lp = None
        with torch.inference_mode():
            logits = None if owed else self._replay_decode(sched)
            if logits is None and not owed:
                logits = self._replay_prefill(sched)
            # a replayed step publishes its ids for the next graph to read (unless it has too many rows)
            graphed = logits is not None and self.graphs is not None and len(sampling) <= self.graphs.max_size
            if owed:  # every token's hidden state is needed: eager, and the logits of extra rows
                batch = self.prepare(sched)
                hidden = self.model.hidden_states(batch, self.kv_cache)
                logits = self.model.logits(hidden, batch.logits_indices)
                rows, targets = (torch.tensor(x, dtype=torch.int64).to(self.device) for x in owed[:2])
                prompt_lp = (self.model.token_logprobs(hidden, rows, targets), owed[2])
            elif logits is None:
                logits = self.model(self.prepare(sched), self.kv_cache)        # [N, vocab] float32
        return Forward(logits, sampling, graphed, prompt_lp)

    def launch_sampling(self, fwd: Forward) -> "PendingStep":
        """Sample fwd's rows from the sequences' state now (a graphed forward's logits are valid until the
        next replay) and publish the ids for the next graph."""
        sampling, graphed = fwd.sampling, fwd.graphed
        if not sampling:
            return PendingStep(None, None, sampling, graphed, fwd.prompt_logprobs)
        out = None
        with torch.inference_mode():
            if only_argmax(sampling):  # greedy, no penalties or logprobs: skip the sampling tensors
                token_ids = fwd.logits.argmax(dim=-1)
            else:
                tensors = build_sampling_tensors(sampling, self.model_config.vocab_size, self.eos_token_ids,
                                                 self.device)
                out = sample(fwd.logits, tensors, self.generator)
                token_ids = out.token_ids
            if graphed:  # the next decode step's graph may read these before the host does
                for row, seq in enumerate(sampling):
                    seq.sampled_row = row
                ids = self.graphs.publish_sampled(token_ids, ahead=self.config.overlap_scheduling)
                return PendingStep(ids, out, sampling, True, fwd.prompt_logprobs)
        return PendingStep(token_ids, out, sampling, False, fwd.prompt_logprobs)

    def runs_ahead(self, sched: SchedulerOutput) -> bool:
        """Whether `sched` may be launched before the host has the in-flight step's ids (overlap scheduling):
        it replays a graph, which reads those ids from the device, and owes no prompt logprobs."""
        graphs, n = self.graphs, len(sched.scheduled)
        if graphs is None or n > graphs.max_size or sched.prompt_logprob_rows() is not None:
            return False  # (a 1-token chunk mid-prompt is decode-shaped and may owe prompt logprobs)
        if sched.decode_only:
            return True
        return self.prefill_graphs is not None and \
            self.prefill_graphs.bucket_for(sched.num_batched_tokens, n) is not None

    def _replay_prefill(self, sched: SchedulerOutput) -> torch.Tensor | None:
        """Any step that fits a token bucket (decode-only ones only if no decode graph took them): logits of
        the rows that sample, from one replay. None: the step runs eagerly. A row whose last token the host
        has not seen yet reads it from the decode graphs' sampled ids, at the sequence's row there."""
        if self.prefill_graphs is None:
            return None
        fed, logits_rows = sched.fed_tokens()
        rows = [(ids, s.seq.num_computed_tokens, s.seq.block_table_array(), s.seq.sampled_row if ids[-1] < 0 else -1)
                for s, ids in zip(sched.scheduled, fed)]
        return self.prefill_graphs.run(rows, logits_rows)

    def _replay_decode(self, sched: SchedulerOutput) -> torch.Tensor | None:
        """A decode-only step that fits a captured size: its rows go from the sequences straight into the
        graphs' pinned staging (no StepBatch), then one replay. None: the step runs eagerly."""
        graphs = self.graphs
        if graphs is None or not sched.decode_only:
            return None
        n = len(sched.scheduled)
        size = graphs.padded_size_for(n)
        if size is None:
            return None
        bs = self.block_size
        # One comprehension per column (this runs for every sequence every step; cheaper than one loop
        # with seven appends). A token < 0 was sampled by the step still in flight: the graph takes it
        # from graphs.sampled at the sequence's row there (src), not from input_ids.
        seqs = [s.seq for s in sched.scheduled]
        positions = [seq.num_computed_tokens for seq in seqs]
        tokens = [seq.token_ids[pos] for seq, pos in zip(seqs, positions)]
        slots = [seq.block_table[pos // bs] * bs + pos % bs for seq, pos in zip(seqs, positions)]
        tables = [seq.block_table_array() for seq in seqs]
        ids = [max(token, 0) for token in tokens]
        src = [seq.sampled_row if token < 0 else -1 for seq, token in zip(seqs, tokens)]
        seq_lens = [pos + 1 for pos in positions]
        rows = [i for i, s in enumerate(sched.scheduled) if s.samples]
        graphs.inputs.load_rows(ids, positions, slots, seq_lens, tables, size, src)
        picked = None if len(rows) == n else torch.tensor(rows, dtype=torch.int64).to(self.device)
        return graphs.replay(size, n, picked)
