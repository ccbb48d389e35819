"""capture_graphs: the start-up capture both kinds of CUDA graph share (server/cuda_graphs.py for decode
steps, server/prefill_graphs.py for steps with prompt tokens)."""
from __future__ import annotations

from typing import Callable

import torch


def capture_graphs(body: Callable[[int], None], sizes: list[int], device: torch.device,
                   pool=None) -> dict[int, torch.cuda.CUDAGraph]:
    """One graph of body(size) per size. Every size runs once on a side stream first, so each kernel variant
    is compiled (and cuBLAS has its workspace) before any capture; then the captures go largest first into
    `pool` (a new one if None), so the smaller graphs reuse the largest one's blocks. Graphs sharing a pool
    must never run concurrently: here they replay one at a time on one stream."""
    graphs: dict[int, torch.cuda.CUDAGraph] = {}
    with torch.inference_mode():
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for size in sorted(sizes, reverse=True):
                body(size)
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        for size in sorted(sizes, reverse=True):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                body(size)
            graphs[size] = graph
    torch.cuda.synchronize(device)
    return graphs
