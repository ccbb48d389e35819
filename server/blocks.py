"""BlockAllocator: the paged KV cache's free list, per-block reference counts, and the prefix cache.

A sequence's block_table grows as its tokens do; free() returns it whole. With prefix caching on, every
full block whose K/V a sequence computes is registered under a hash of its tokens chained to the blocks
before it (so a block matches only after the same whole prefix): prompt blocks (and a recompute's) when
the scheduler hands them to a step, generated ones when the host has seen the step that filled them (a
decode step's token may still be a placeholder when it is scheduled). A sequence admitted after that, in
the same step or a later one, whose tokens start with registered blocks shares them (ref count + 1) and
computes only the rest: the shared system prompt, `n` samples of one prompt, a chat's earlier turns
(answers included), and a preempted sequence's own prompt and output. A block whose count drops to 0
stays registered but evictable: allocate() hands out never-registered blocks first, then the least
recently freed registered ones, dropping their entries.
"""
from __future__ import annotations

from collections import OrderedDict, deque

from server.sequence import Sequence


class BlockError(RuntimeError):
    """Allocator misuse (double free, foreign block id): a bug in the caller, never a user error."""


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free: deque[int] = deque(range(num_blocks))  # never registered (or dropped): handed out first
        self._evictable: OrderedDict[int, None] = OrderedDict()  # registered, count 0: least recent first
        self._ref_counts = [0] * num_blocks
        self._block_hash: list[int | None] = [None] * num_blocks  # the prefix hash a full block has
        self._cached: dict[int, int] = {}  # prefix hash -> the registered block holding it
        self._block_tokens: dict[int, tuple[int, ...]] = {}  # registered block -> its tokens (checked on a hit)

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocate() can hand out: free ones and evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1 (evictable cached blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def allocate(self, num_blocks: int) -> list[int]:
        if num_blocks > self.num_free_blocks:
            raise BlockError(f"asked for {num_blocks} blocks, {self.num_free_blocks} free")
        out = []
        for _ in range(num_blocks):
            if self._free:
                b = self._free.popleft()
            else:
                b, _ = self._evictable.popitem(last=False)
                self._forget(b)
            self._ref_counts[b] = 1
            out.append(b)
        return out

    def free_blocks(self, block_ids: list[int]) -> None:
        for b in block_ids:
            if not 0 <= b < self.num_blocks:
                raise BlockError(f"block {b} is not in this pool of {self.num_blocks}")
            if self._ref_counts[b] <= 0:
                raise BlockError(f"double free of block {b}")
            self._ref_counts[b] -= 1
            if self._ref_counts[b] == 0:
                if b in self._block_tokens:  # registered: kept for a later hit until it is needed
                    self._evictable[b] = None
                else:
                    self._block_hash[b] = None
                    self._free.append(b)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow seq.block_table to hold num_computed_tokens + num_new_tokens tokens.

        All or nothing: False (and no change) when the pool lacks the blocks.
        """
        needed = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if needed <= 0:
            return True
        if needed > self.num_free_blocks:
            return False
        seq.block_table.extend(self.allocate(needed))
        return True

    def free(self, seq: Sequence) -> None:
        """Return the sequence's blocks; its block_table is left empty (so freeing twice is harmless).

        Last block first: registered ones join the eviction order tail first, so the pool evicts a sequence's
        own tail (its output, its prompt's unshared end) before the prefix other requests may share, as
        vLLM's free does. (In the order of the table, a shared system prompt went first.)"""
        table, seq.block_table = seq.block_table, []
        self.free_blocks(table[::-1])

    # ---- prefix cache ------------------------------------------------------------------------------
    def take_cached_prefix(self, seq: Sequence) -> int:
        """Give a sequence that holds no blocks the registered blocks its tokens (prompt, and output after a
        preemption) start with; returns the tokens they hold (now seq.num_computed_tokens). At least one
        token is always left to compute: the step that samples must run the last one (it may be a
        placeholder, which no registered block holds). A sequence that owes prompt logprobs takes none
        (those come from computing every prompt position)."""
        if not self.enable_prefix_caching or seq.block_table or seq.prompt_logprobs is not None:
            return 0
        bs, tokens = self.block_size, seq.token_ids
        hits: list[int] = []
        parent = None
        for i in range((len(tokens) - 1) // bs):
            block_tokens = tuple(tokens[i * bs:(i + 1) * bs])
            parent = hash((parent, block_tokens))
            b = self._cached.get(parent)
            if b is None or self._block_tokens[b] != block_tokens:
                break
            hits.append(b)
        for b in hits:
            if self._ref_counts[b] == 0:
                del self._evictable[b]
            self._ref_counts[b] += 1
        seq.block_table.extend(hits)
        seq.num_computed_tokens = len(hits) * bs
        return seq.num_computed_tokens

    def register_scheduled_blocks(self, seq: Sequence, num_new_tokens: int) -> None:
        """seq is scheduled to compute num_new_tokens from seq.num_computed_tokens on (a prompt chunk or a
        recompute): register the full blocks that step fills. A sequence admitted later in the same step or
        after it may share them: in one step every layer writes the step's K/V before its attention reads
        the cache, and later steps run after it on the device. Whatever undoes the step before launch must
        drop_cached(seq). A placeholder (-1, overlap scheduling) can only be the last token."""
        tokens = seq.token_ids
        known = len(tokens) - (tokens[-1] < 0)
        self.register_full_blocks(seq, seq.num_computed_tokens, min(seq.num_computed_tokens + num_new_tokens, known))

    def register_full_blocks(self, seq: Sequence, start: int, end: int) -> None:
        """Register seq's full blocks within tokens [start, end): their K/V are written (or will be before
        any later step reads them) and their token ids are on the host. Also called by the engine for a
        generated block once it has seen the step that filled it."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        table, tokens = seq.block_table, seq.token_ids
        for i in range(start // bs, end // bs):
            parent = self._block_hash[table[i - 1]] if i else None
            if i and parent is None:  # the block before was dropped (drop_cached): no chain to extend
                return
            b = table[i]
            block_tokens = tuple(tokens[i * bs:(i + 1) * bs])
            h = hash((parent, block_tokens))
            self._block_hash[b] = h  # even for a duplicate, whose next block's hash chains from it
            if h not in self._cached:  # a duplicate (two sequences computed one prefix) stays private
                self._cached[h] = b
                self._block_tokens[b] = block_tokens

    def register_filled_block(self, seq: Sequence, index: int) -> None:
        """The engine has seen the step that sampled seq's token `index`: when that token starts a block, the
        block before it is full, its K/V written and its tokens known (generated blocks; the scheduler
        registers prompt and recompute blocks when it schedules them)."""
        bs = self.block_size
        if self.enable_prefix_caching and index % bs == 0 and seq.block_table:  # (not preempted meanwhile)
            self.register_full_blocks(seq, index - bs, index)

    def drop_cached(self, seq: Sequence) -> None:
        """Unregister seq's blocks (its step failed: their K/V may never have been written)."""
        for b in seq.block_table:
            if b in self._block_tokens:
                self._forget(b)

    def _forget(self, b: int) -> None:
        h = self._block_hash[b]
        if self._block_tokens.pop(b, None) is not None:
            del self._cached[h]
        self._block_hash[b] = None
        if b in self._evictable:  # count 0 and no longer registered: an ordinary free block
            del self._evictable[b]
            self._free.append(b)
