"""Rank 0's target: a ModelRunner over rank 0's shard that has every other rank run each call alongside it.

Each call first sends one control message (channel.py) so the other ranks enter the same pass, then runs its own:
their collectives meet in the same order. What the engine and the speculative decoder see is a ModelRunner whose
logits are the whole model's.

CUDA graphs: the collectives are ordinary ops of the passes, so they are captured with them (torch's NCCL
process group records them into the capturing stream). The target's own graphs (decode steps, prompt passes,
verification) are captured and replayed on every rank by the same calls. A graph of another caller that contains
a target pass (the speculative decoder's whole greedy round, draft included, which exists only on rank 0) is
mirrored: while rank 0 captures it, each other rank captures the target pass it contains, whose first op receives
the pass's inputs by a broadcast from rank 0's device; when rank 0 replays it (BucketedGraphs with `graph_peer`),
the other ranks replay theirs.

Inputs that exist only on rank 0's device go by one device broadcast inside the call: the samples an overlapped
decode step starts from (`forward(..., device_tokens)`), and the drafts a greedy speculative round verifies
(`run_uniform`). Speculative decoding: the draft model runs whole on rank 0 (TP=1), as in vLLM's and SGLang's
usual setups: it is small, so splitting it would add two all-reduces per draft layer for little work saved.

Run on 2 H200s once (benchmarks/results/tp_shutdown_h200x2.md: the engine started on NCCL with its graphs, and
its greedy tokens equalled TP=1's); benchmarks/tp_check.py is the full 2-GPU check, not yet run. The captured NCCL
collectives rely on torch's ProcessGroupNCCL support for graph capture; if replays misbehave, `enforce_eager=True`
runs the same passes without graphs.
"""

from __future__ import annotations

import multiprocessing.connection
import os
import sys
import weakref
from collections.abc import Callable
from contextlib import contextmanager

import torch

from miniserve.config import EngineConfig
from miniserve.distributed import worker
from miniserve.distributed.channel import Op, encode_inputs, pack_uniform, uniform_header
from miniserve.distributed.launch import (
    RankGroup,
    SpawnedRanks,
    TensorParallelError,
    join_group,
    leave_group,
    rank_device,
    torchrun_env,
)
from miniserve.engine.model_runner import ForwardInput, ModelRunner
from miniserve.models.config import ModelConfig
from miniserve.models.parallel import check_divisible


class _Group:
    """What stopping the group needs, kept apart from the runner so a finalizer can stop it."""

    def __init__(self, group: RankGroup, spawned: SpawnedRanks | None):
        self.group = group
        self.spawned = spawned
        self.busy = False  # a call is between its control message and its end (for good if it failed)
        self.broken: str | None = None  # why a call failed on rank 0 alone
        self.closed = False

    @property
    def failure(self) -> str | None:
        dead = self.spawned.failure if self.spawned is not None else None
        return dead or self.broken

    def stop(self) -> None:
        if self.closed:
            return
        self.closed = True
        listening = not self.busy and self.failure is None  # else the ranks are inside a pass: no stop message
        send = (lambda: self.group.channel.send([Op.STOP])) if listening else None
        if self.spawned is not None:
            self.spawned.stop(send)
        elif send is not None:
            send()
        if not self.busy or self.group.backend == "gloo":  # (NCCL: a pass may still be queued on the GPU)
            leave_group(self.group)


def serve_as_other_rank(config: EngineConfig) -> bool:
    """Under torchrun, on a rank other than 0: serve rank 0 until it stops, then return True (the caller exits).
    False everywhere else. For commands that must not start their own work on those ranks (`miniserve serve`
    binds a port)."""
    if config.tensor_parallel_size == 1 or not torchrun_env() or int(os.environ["RANK"]) == 0:
        return False
    worker.serve(config, _join_torchrun(config))
    return True


def _join_torchrun(config: EngineConfig) -> RankGroup:
    size = config.tensor_parallel_size
    check_divisible(ModelConfig.from_dir(config.model), size)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != size:
        raise ValueError(f"tensor_parallel_size={size}, but torchrun started WORLD_SIZE={world} ranks")
    return join_group(rank, size, rank_device(config, int(os.environ.get("LOCAL_RANK", rank))))


class ParallelModelRunner(ModelRunner):
    @classmethod
    def launch(cls, config: EngineConfig) -> ParallelModelRunner:
        """Start (or, under torchrun, join) the group; under torchrun, ranks other than 0 serve rank 0 here and
        exit when it stops."""
        if torchrun_env():
            group = _join_torchrun(config)
            if group.tp.rank != 0:
                worker.serve(config, group)
                sys.exit(0)
            spawned = None
        else:
            size = config.tensor_parallel_size
            check_divisible(ModelConfig.from_dir(config.model), size)  # before any process starts
            device = rank_device(config, 0)
            spawned = SpawnedRanks(config, worker.main)
            spawned.fatal_exit = device.type == "cuda"
            try:
                group = join_group(0, size, device, spawned.store)
            except BaseException:
                spawned.stop(None)
                raise
        state = _Group(group, spawned)
        try:
            return cls(config, state)
        except BaseException as e:
            state.busy = True  # the other ranks may be anywhere: stop them without a message
            state.stop()
            leave_group()
            if state.failure is not None:
                raise TensorParallelError(state.failure) from e
            raise

    def __init__(self, config: EngineConfig, state: _Group):
        self.state = state
        self.channel = state.group.channel
        self.num_peer_graphs = 0  # graphs the other ranks captured for callers' graphs (Op.CAPTURE_UNIFORM)
        self._stop = weakref.finalize(self, state.stop)  # at exit, or when the engine is dropped
        group = state.group
        self.tp = group.tp
        super().__init__(config, config.model, "target", config.kv_cache_dtype, tp=group.tp, device=group.device)

    # ---- every call: a control message, then rank 0's own pass

    @contextmanager
    def _call(self, message: list[int]):
        """Send `message` and run the body. A call that does not complete (another rank died, an error, Ctrl-C)
        leaves the ranks inside different passes: it is the group's last, and every later call raises."""
        state = self.state
        if state.closed or state.failure is not None:
            raise TensorParallelError(state.failure or "the tensor-parallel engine was shut down")
        state.busy = True
        try:
            self.channel.send(message)
            yield
        except BaseException as e:
            if state.spawned is not None and state.spawned.failure is None:
                state.spawned.failure = _dead_rank(state.spawned)
            if state.spawned is not None and state.spawned.failure is not None:
                raise TensorParallelError(state.spawned.failure) from e
            state.broken = f"a call failed on rank 0 ({type(e).__name__}: {e}): the ranks are out of step"
            raise
        state.busy = False

    def allocate_kv_cache(self, num_blocks: int) -> None:
        with self._call([Op.ALLOCATE_KV, num_blocks]):
            super().allocate_kv_cache(num_blocks)

    def forward(
        self, inputs: list[ForwardInput], device_tokens: torch.Tensor | None = None, float_logits: bool = True
    ) -> torch.Tensor:
        """The step's packed inputs go by the control message; a decode step launched from the previous step's
        samples (`device_tokens`, still on rank 0's device) sends them by one device broadcast."""
        if device_tokens is None:
            with self._call(encode_inputs(Op.FORWARD, inputs)):
                return super().forward(inputs, None, float_logits)
        with self._call(encode_inputs(Op.FORWARD_DEVICE_TOKENS, inputs)):
            self.tp.broadcast(device_tokens)
            return super().forward(inputs, device_tokens, float_logits)

    def run_uniform(self, token_ids, start_pos, block_tables, max_seq_len, valid, float_logits=True) -> torch.Tensor:
        """A pass whose inputs are on rank 0's device (the speculative verification of drafts): the header goes
        by the control message, the inputs by one device broadcast (captured with the pass in a graph)."""
        capturing = token_ids.is_cuda and torch.cuda.is_current_stream_capturing()
        header = uniform_header(token_ids, block_tables, max_seq_len, valid, float_logits)
        with self._call([Op.CAPTURE_UNIFORM if capturing else Op.RUN_UNIFORM, *header]):
            self.num_peer_graphs += capturing
            self.tp.broadcast(pack_uniform(token_ids, start_pos, block_tables, valid))
            return super().run_uniform(token_ids, start_pos, block_tables, max_seq_len, valid, float_logits)

    def capture_graphs(self, tokens_per_seq: list[int]) -> None:
        with self._call([Op.CAPTURE_GRAPHS, int(self.use_graphs), *tokens_per_seq]):
            super().capture_graphs(tokens_per_seq)

    def capture_prefill_graphs(self) -> None:
        with self._call([Op.CAPTURE_PREFILL_GRAPHS, int(self.use_graphs)]):
            super().capture_prefill_graphs()

    def disable_graphs(self) -> None:
        with self._call([Op.DISABLE_GRAPHS]):
            super().disable_graphs()

    def gather_kv_pools(self) -> list[torch.Tensor]:
        """Every rank's KV pool (rank order), copied to rank 0: [layers, 2, blocks, block_size, its KV heads, head
        dim] each. For checks (each rank's bytes against the matching heads of a single-GPU pool)."""
        with self._call([Op.GATHER_KV]):
            pools = self.tp.gather_bytes(self.kv_pool)
        return [p.view(self.kv_pool.dtype).view(self.kv_pool.shape) for p in pools]

    # ---- graphs of other callers that hold a pass of this runner (see the module docstring)

    @property
    def graph_peer(self) -> ParallelModelRunner:
        return self

    def peer_graph_mark(self) -> int:
        """How many graphs the other ranks have captured so far: a caller's capture adds those after the mark."""
        return self.num_peer_graphs

    def replay_peer_graphs(self, first: int, count: int) -> None:
        with self._call([Op.REPLAY, first, count]):
            pass

    # ---- lifetime

    def on_fatal_error(self, callback: Callable[[BaseException], None]) -> None:
        if self.state.spawned is not None:
            self.state.spawned.callbacks.append(callback)

    def shutdown(self) -> None:
        self._stop()


def _dead_rank(spawned: SpawnedRanks) -> str | None:
    """The first rank found dead (a collective failed: give the watcher's view a moment to agree). By the
    process's sentinel, which says it exited whoever reaps it: the watcher thread may be reaping it right now,
    and `is_alive()` then races it for waitpid and can report a dead rank alive."""
    for rank, p in spawned.procs.items():
        if multiprocessing.connection.wait([p.sentinel], timeout=0.5):
            return spawned.describe_exit(rank)
    return None
