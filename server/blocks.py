"""BlockAllocator: the paged KV cache's free list and per-block reference counts.

Ref counts exist from the start so prefix caching can later share a block between sequences; today every
allocated block has count 1. A sequence's block_table grows as its tokens do; free() returns it whole.
"""
from __future__ import annotations

from collections import deque

from server.sequence import Sequence


class BlockError(RuntimeError):
    """Allocator misuse (double free, foreign block id): a bug in the caller, never a user error."""


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        if num_blocks > len(self._free):
            raise BlockError(f"asked for {num_blocks} blocks, {len(self._free)} free")
        out = [self._free.popleft() for _ in range(num_blocks)]
        for b in out:
            self._ref_counts[b] = 1
        return out

    def free_blocks(self, block_ids: list[int]) -> None:
        for b in block_ids:
            if not 0 <= b < self.num_blocks:
                raise BlockError(f"block {b} is not in this pool of {self.num_blocks}")
            if self._ref_counts[b] <= 0:
                raise BlockError(f"double free of block {b}")
            self._ref_counts[b] -= 1
            if self._ref_counts[b] == 0:
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
        if needed > len(self._free):
            return False
        seq.block_table.extend(self.allocate(needed))
        return True

    def free(self, seq: Sequence) -> None:
        """Return the sequence's blocks; its block_table is left empty (so freeing twice is harmless)."""
        table, seq.block_table = seq.block_table, []
        self.free_blocks(table)
