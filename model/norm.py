"""RMSNorm, the one normalisation of the LLaMA family: the layers' (fused with the residual add) and Qwen3's
per-head q/k norm, both through the ops chosen at load (torch or our Triton kernel)."""
from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, ops):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Returns (norm(x + residual), x + residual): the add is fused into the norm."""
        return self.ops.rms_norm(x, self.weight, self.eps, residual)
