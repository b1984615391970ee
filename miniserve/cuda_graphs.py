"""CUDA graphs for uniform forward passes: every sequence brings the same number `n` of new tokens.

A decode step of a small model is bound by the host issuing hundreds of small kernels, not by the GPU.
Replaying a captured graph issues them all at once. Graphs are captured per (batch bucket, n) when the engine
starts: n = 1 for decode steps (target and draft), n = 2 for the draft's catch-up, n = k + 1 for speculative
verification. Batches are
padded up to the bucket; padded rows get slot -1, so they write no KV, and their outputs are dropped.
Everything a graph reads lives in static buffers that `run` fills before each replay; the attention metadata is
derived from them on the device, with `max_seq_len` fixed at the worker's maximum so kernel grids never change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from miniserve.worker import Worker

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    token_ids: torch.Tensor  # [bucket, n]
    start_pos: torch.Tensor  # [bucket]
    block_tables: torch.Tensor  # [bucket, max_blocks]
    valid: torch.Tensor  # [bucket] bool: real rows
    row_ids: torch.Tensor  # [bucket] 0..bucket-1, to set `valid` without allocating
    logits: torch.Tensor  # [bucket * n, V], written by every replay


class GraphRunner:
    def __init__(self, worker: Worker, max_batch: int):
        self.worker = worker
        self.max_batch = max(b for b in BATCH_BUCKETS if b <= max(max_batch, 1))
        self.max_blocks = -(-worker.max_positions // worker.block_size)
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.pool = None

    def capture_all(self, tokens_per_seq: list[int]) -> None:
        """Capture every batch bucket up front (as vLLM does), so no request pays for a capture mid-stream."""
        for n in tokens_per_seq:
            for bucket in BATCH_BUCKETS:
                if bucket <= self.max_batch and (bucket, n) not in self.graphs:
                    self._capture(bucket, n)

    def supports(self, batch: int) -> bool:
        return batch <= self.max_batch

    def run(self, token_ids: torch.Tensor, start_pos: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
        """Logits [B * n, V] of the uniform pass; a view into the graph's output, valid until its next replay."""
        batch, n = token_ids.shape
        bucket = next(b for b in BATCH_BUCKETS if b >= batch)
        g = self.graphs.get((bucket, n)) or self._capture(bucket, n)
        g.token_ids[:batch].copy_(token_ids)
        g.start_pos[:batch].copy_(start_pos)
        g.block_tables[:batch, : block_tables.shape[1]].copy_(block_tables)
        g.valid.copy_(g.row_ids < batch)
        g.graph.replay()
        return g.logits[: batch * n]

    def _capture(self, bucket: int, n: int) -> _Graph:
        dev = self.worker.device
        token_ids = torch.zeros(bucket, n, dtype=torch.int64, device=dev)
        start_pos = torch.zeros(bucket, dtype=torch.int64, device=dev)
        block_tables = torch.zeros(bucket, self.max_blocks, dtype=torch.int32, device=dev)
        valid = torch.zeros(bucket, dtype=torch.bool, device=dev)  # all padding: warm-up and capture write no KV
        args = (token_ids, start_pos, block_tables, self.worker.max_positions, valid)
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm up: compiles the Triton kernels outside the capture
            for _ in range(2):
                self.worker.run_uniform(*args)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.worker.run_uniform(*args)
        self.pool = graph.pool()
        g = _Graph(graph, token_ids, start_pos, block_tables, valid, torch.arange(bucket, device=dev), logits)
        self.graphs[(bucket, n)] = g
        return g
