"""Ranks 1..N-1: hold a shard of the target model and run every call rank 0 sends, until told to stop.

A rank never decides anything: rank 0 schedules, samples and tells it which pass to run (channel.py); it runs the
same pass on its own shard, which meets rank 0's in the same collectives in the same order. Its copy of the logits
is dropped.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback

import torch
import torch.distributed as dist

from miniserve.config import EngineConfig
from miniserve.distributed.channel import Op, decode_inputs, unpack_uniform
from miniserve.distributed.launch import RankGroup, join_group, leave_group, rank_device
from miniserve.engine.model_runner import ModelRunner


def main(rank: int, size: int, port: int, config: EngineConfig, parent_pid: int, setup) -> None:
    """Entry point of a rank spawned by rank 0 (launch.SpawnedRanks)."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # a signal to the whole process group: rank 0 stops the others
        signal.signal(sig, signal.SIG_IGN)
    _exit_with_parent(parent_pid)
    store = dist.TCPStore("127.0.0.1", port, size, is_master=False)
    try:
        if setup is not None:
            setup()
        device = rank_device(config, rank)
        store.set(f"miniserve/joined/{rank}", "1")
        serve(config, join_group(rank, size, device, store))
    except BaseException:
        store.set(f"miniserve/error/{rank}", traceback.format_exc())  # rank 0 quotes it
        raise
    # stopped cleanly and left the group: skip the interpreter's teardown of torch (seconds), rank 0 waits for it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def serve(config: EngineConfig, group: RankGroup) -> None:
    """Load this rank's shard, then run rank 0's calls until it says stop (also the torchrun ranks' loop)."""
    runner = ModelRunner(config, config.model, "target", config.kv_cache_dtype, tp=group.tp, device=group.device)
    try:
        with torch.inference_mode():
            RankLoop(runner, group).run()
    finally:
        leave_group()


def _exit_with_parent(parent_pid: int) -> None:
    """A rank whose rank 0 is gone (killed, crashed) exits too: never an orphan waiting forever."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="miniserve-parent-watch", daemon=True).start()


class RankLoop:
    def __init__(self, runner: ModelRunner, group: RankGroup):
        self.runner = runner
        self.group = group
        self.graphs: list[tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = []  # see Op.CAPTURE_UNIFORM
        self.pool = None

    def run(self) -> None:
        recv = self.group.channel.recv
        while True:
            message = recv()
            op, args = message[0], message[1:]
            if op == Op.STOP:
                return
            if op == Op.FORWARD:
                self.runner.forward(decode_inputs(args))
            elif op == Op.FORWARD_DEVICE_TOKENS:
                inputs = decode_inputs(args)
                tokens = torch.empty(len(inputs), dtype=torch.int64, device=self.runner.device)
                self.runner.forward(inputs, self.group.tp.broadcast(tokens))
            elif op == Op.RUN_UNIFORM:
                self.run_uniform(args)
            elif op == Op.CAPTURE_UNIFORM:
                self.capture_uniform(args)
            elif op == Op.REPLAY:
                first, count = args
                for graph, _, _ in self.graphs[first : first + count]:
                    graph.replay()
            elif op == Op.ALLOCATE_KV:
                self.runner.allocate_kv_cache(args[0])
            elif op == Op.CAPTURE_GRAPHS:
                self.runner.use_graphs = bool(args[0])  # rank 0 decides: every rank must replay the same passes
                self.runner.capture_graphs(args[1:])
            elif op == Op.CAPTURE_PREFILL_GRAPHS:
                self.runner.use_graphs = bool(args[0])
                self.runner.capture_prefill_graphs()
            elif op == Op.DISABLE_GRAPHS:
                self.runner.disable_graphs()
            elif op == Op.GATHER_KV:
                self.group.tp.gather_bytes(self.runner.kv_pool)
            else:
                raise RuntimeError(f"unknown tensor-parallel operation {op}")

    def _receive_uniform(self, args: list[int]) -> tuple[torch.Tensor, tuple]:
        """A device buffer for rank 0's packed run_uniform inputs, and how to call run_uniform on it."""
        batch, n, width, max_seq_len, has_valid, as_float = args
        packed = torch.empty(batch, n + 2 + width, dtype=torch.int64, device=self.runner.device)
        return packed, (n, bool(has_valid), max_seq_len, bool(as_float))

    def _uniform_pass(self, packed: torch.Tensor, n: int, has_valid: bool, max_seq_len: int, as_float: bool):
        self.group.tp.broadcast(packed)
        token_ids, start_pos, tables, valid = unpack_uniform(packed, n, has_valid)
        return self.runner.run_uniform(token_ids, start_pos, tables, max_seq_len, valid, as_float)

    def run_uniform(self, args: list[int]) -> None:
        packed, call = self._receive_uniform(args)
        self._uniform_pass(packed, *call)

    def capture_uniform(self, args: list[int]) -> None:
        """Rank 0 is capturing a graph (a speculative round) that holds this pass: capture the same pass, whose
        broadcast receives what rank 0's sends, and replay it whenever rank 0 replays its own (Op.REPLAY). Both
        ranks ran the pass eagerly just before (the capture's warm-up), so nothing compiles here."""
        packed, call = self._receive_uniform(args)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._uniform_pass(packed, *call)
        self.pool = graph.pool()
        self.graphs.append((graph, packed, logits))  # the logits stay allocated: graphs share the pool
