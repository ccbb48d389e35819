"""The paged KV cache: per layer, K and V as [num_blocks, block_size, num_kv_heads, head_dim].

One contiguous allocation for all layers, so sizing is one number and layers are cheap views.
Block-major layout keeps a block's tokens contiguous: a decode kernel reads a whole block of one kv head
as block_size rows of head_dim, and the cache write is a scatter of T rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model.config import ModelConfig


@dataclass(frozen=True)
class KVCache:
    storage: torch.Tensor  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
    # per-layer (k, v) views, made once: tensor indexing costs microseconds of host time per call, and an
    # eager step asks for every layer's views
    _layers: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_layers", tuple((kv[0], kv[1]) for kv in self.storage.unbind(0)))

    @classmethod
    def allocate(cls, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str) -> "KVCache":
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        storage = torch.empty(config.num_hidden_layers, 2, num_blocks, block_size, config.num_kv_heads,
                              config.head_dim, dtype=dtype, device=device)
        if storage.device.type == "cpu":
            # commit every page now: the OS maps them on first write, and the allocator hands out every block
            # before it reuses one (oldest freed first, for the prefix cache), so the process grew by the whole
            # cache over minutes of traffic, and memory that is not there failed then, not at start-up
            storage.zero_()
        return cls(storage)

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        return block_size * config.kv_bytes_per_token(torch.empty((), dtype=dtype).element_size())

    @property
    def num_blocks(self) -> int:
        return self.storage.shape[2]

    @property
    def block_size(self) -> int:
        return self.storage.shape[3]

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache) of one layer, each [num_blocks, block_size, num_kv_heads, head_dim]."""
        return self._layers[index]
