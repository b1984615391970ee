"""CUDA graphs: capture a pass once per batch bucket, replay it with one launch.

A decode step of a small model is bound by the host issuing hundreds of small kernels, not by the GPU. Replaying a
captured graph issues them all at once. Passes are captured when the engine starts (as vLLM does, so no request
pays for a capture mid-stream): each worker's uniform passes (decode steps; with a draft, the target's (k+1)-token
verification and the draft's two-token catch-up, see ModelRunner.capture_graphs), its one-sequence prompt passes of
up to 512 tokens (ModelRunner.capture_prefill_graphs) and the whole greedy speculative round
(the draft's two-token catch-up and k-1 proposal steps, the verification and the acceptance rule, see
spec_decode/greedy_round.py).

A captured function reads one static int64 buffer `[bucket, width]` (tokens, positions, a validity flag and the
block tables, packed by the caller) so that one host-to-device copy feeds a replay. Batches are padded up to the
bucket with rows whose validity flag is 0: they write no KV, and their outputs are dropped.

The buffer is stored column-major (`[width, bucket]` in memory, seen by the function as its transpose): `width`
holds a block table as long as the longest context (8,192 columns for a 128k-token Llama), but a batch's rows use
only their first few columns, and column-major those columns are one contiguous prefix. A replay copies just that
prefix: 256 rows of 1k-token sequences move 140 kB instead of 17 MB.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    static: torch.Tensor  # [width, bucket] int64 on the device: the transpose of what the graph reads
    outputs: tuple[torch.Tensor, ...]  # what every replay overwrites
    staging: tuple[torch.Tensor, torch.Tensor]  # pinned host twins of `static`, used in turn
    copied: list[torch.cuda.Event | None]  # recorded after each staging buffer's last copy to the device
    turn: int = 0
    peer_graphs: tuple[int, int] = (0, 0)  # (first, count) of the graphs other tensor-parallel ranks replay with it


def bucket_for(batch: int) -> int:
    return next(b for b in BATCH_BUCKETS if b >= batch)


def packed_buffer(width: int, bucket: int, padding: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """A `[width, bucket]` int64 buffer whose every row (column here) is the padding row: the column-major form of
    what a captured function reads (`buffer.t()`)."""
    buffer = torch.zeros(width, bucket, dtype=torch.int64)
    buffer[: len(padding)] = torch.tensor(padding, dtype=torch.int64)[:, None]
    return buffer.to(device)


PackedRow = tuple[list[int], list[int] | np.ndarray]  # a row's first columns (tokens, position, flag), its block table


def pack_rows(rows: list[PackedRow]) -> np.ndarray:
    """int64 [len(rows), W]: each row's first columns (as many in every row), then its block table, then zeros.
    A decode step packs every sequence's whole table, so tables come as Sequence.block_array's views, copied
    whole: unpacking lists into each row cost O(blocks) of Python work per sequence per step (~13 ms a step at
    batch 256 and 32k-token contexts, block size 16, on a 2-core CPU; ~1.3 ms this way, 0.3 ms at 2k)."""
    first = len(rows[0][0])
    packed = np.zeros((len(rows), first + max(len(table) for _, table in rows)), dtype=np.int64)
    packed[:, :first] = [head for head, _ in rows]
    for i, (_, table) in enumerate(rows):
        packed[i, first : first + len(table)] = table
    return packed


def block_tables(packed: torch.Tensor, first: int) -> torch.Tensor:
    """The int32 `[B, W]` block tables from column `first` of packed rows, contiguous as the kernels read them
    (captured packed rows are a column-major view)."""
    return packed[:, first:].to(torch.int32, memory_format=torch.contiguous_format)


class BucketedGraphs:
    """`fn(packed) -> tuple of tensors` captured for every batch bucket up to `max_batch`.

    Every output's first dimension must be a multiple of the bucket (rows per sequence); `run` returns views of
    the real rows, valid until the next replay of any graph sharing the memory pool.
    """

    def __init__(self, fn: Callable, width: int, padding: list[int], max_batch: int, device: torch.device, peer=None):
        """`peer`: a ParallelModelRunner whose passes `fn` runs (distributed/runner.py): its other ranks capture
        and replay their share of each graph with this one."""
        self.fn = fn
        self.peer = peer
        self.width = width
        self.padding = padding  # the row that fills a bucket: must be a harmless input (flag 0, valid positions)
        self._padding_column = np.array(padding, dtype=np.int64)[:, None]
        self.max_batch = max(b for b in BATCH_BUCKETS if b <= max(max_batch, 1))
        self.device = device
        self.pool = None  # the memory pool of the first graph captured, which the others share
        self.graphs: dict[int, _Graph] = {}

    def supports(self, batch: int) -> bool:
        return batch <= self.max_batch

    def capture_all(self) -> None:
        for bucket in BATCH_BUCKETS:
            if bucket <= self.max_batch and bucket not in self.graphs:
                self._capture(bucket)

    def run(self, rows: list[PackedRow], device_columns: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Replay on `rows` (`pack_rows`; each at most `width` ints) padded to their bucket. The rows go through a
        pinned staging buffer (one asynchronous copy, no host-GPU synchronisation). Columns past a row's end hold
        zeros or stale values: the layout must leave them unread (block-table entries past a sequence's last block).

        `device_columns` ([batch, c] int64 on the device) replace the rows' first c columns: inputs that a previous
        replay computed, so a pass can be launched before the host has read its predecessor's outputs.
        The outputs are overwritten by the next replay of the same bucket: copy what must outlive it first."""
        batch = len(rows)
        bucket = bucket_for(batch)
        if bucket not in self.graphs:
            self._capture(bucket)
        g = self.graphs[bucket]
        turn, g.turn = g.turn, 1 - g.turn
        copied = g.copied[turn]
        if copied is not None:  # two runs ago (or never): long done unless the host ran far ahead of the GPU
            copied.synchronize()
        staging = g.staging[turn]
        columns = staging.numpy()  # [width, bucket]: row i of the batch is column i
        packed = pack_rows(rows)
        columns[: packed.shape[1], :batch] = packed.T  # one transposing copy: column by column took 4x longer
        columns[: len(self.padding), batch:] = self._padding_column
        used = bucket * max(len(self.padding), packed.shape[1])  # the prefix the rows wrote
        g.static.view(-1)[:used].copy_(staging.view(-1)[:used], non_blocking=True)
        if copied is not None:
            copied.record()
        if device_columns is not None:
            g.static[: device_columns.shape[1], :batch].copy_(device_columns.t())
        if g.peer_graphs[1]:
            self.peer.replay_peer_graphs(*g.peer_graphs)
        g.graph.replay()
        return tuple(out[: batch * (out.shape[0] // bucket)] for out in g.outputs)

    def _capture(self, bucket: int) -> None:
        static = packed_buffer(self.width, bucket, self.padding, self.device)  # all rows padding
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm up: compiles the Triton kernels outside the capture
            for _ in range(2):
                self.fn(static.t())
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        mark = self.peer.peer_graph_mark() if self.peer is not None else 0
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = self.fn(static.t())
        peers = (mark, self.peer.peer_graph_mark() - mark) if self.peer is not None else (0, 0)
        if not peers[1]:  # its first launch (the upload) here, not in a request's step; a tensor-parallel graph
            graph.replay()  # needs the other ranks' in step, as run() does (not done: no two GPUs to test it on)
        self.pool = graph.pool()
        staging = tuple(packed_buffer(self.width, bucket, self.padding).pin_memory() for _ in range(2))
        events = [torch.cuda.Event(), torch.cuda.Event()]
        self.graphs[bucket] = _Graph(graph, static, tuple(outputs), staging, events, peer_graphs=peers)
