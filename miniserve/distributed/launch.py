"""Starting, joining, watching and stopping the ranks of a tensor-parallel group.

Two ways to start N ranks:

* the engine spawns ranks 1..N-1 with torch.multiprocessing (`SpawnedRanks`); they meet rank 0 through a TCP
  store that rank 0 opens on a free local port. Rank 0 watches them: a rank that exits takes the engine down with
  an error that says which rank, its exit code and the last line of its error;
* torchrun starts all N and each joins through `env://` (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE,
  LOCAL_RANK); torchrun watches them and stops all when one fails.

Each rank uses the GPU of its local rank (cuda:LOCAL_RANK) and the NCCL backend (RCCL on ROCm), or the CPU and
gloo. A second, gloo group carries rank 0's control messages (channel.py) on GPU runs.
"""

from __future__ import annotations

import logging
import multiprocessing.connection
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from miniserve.config import EngineConfig, resolve_device
from miniserve.distributed.channel import StepChannel
from miniserve.models.parallel import TensorParallel

logger = logging.getLogger("miniserve.distributed")

START_TIMEOUT_S = 600.0  # spawned ranks import torch and join within this (a loaded machine can be slow)
STOP_TIMEOUT_S = 10.0  # a rank told to stop exits within this, else it is terminated
FATAL_GRACE_S = 10.0  # on GPUs, rank 0 exits this long after another rank died (NCCL may never return)
# collectives wait this long: an idle server's ranks wait for the next step in a broadcast for hours
COLLECTIVE_TIMEOUT = timedelta(days=365)
WORKER_SETUP: Callable[[], None] | None = None  # run first in every spawned rank (tests patch graph capture)


# a rank that dies before its main function runs: most often a script that builds LLM(tensor_parallel_size=N) at
# its top level, which each spawned rank imports again
UNGUARDED_HINT = (
    " before it started (each rank is a new Python process that imports the main script again: a script that"
    ' builds LLM(tensor_parallel_size=...) at its top level needs an `if __name__ == "__main__":` guard; its'
    " traceback, above, says what stopped it)"
)


class TensorParallelError(RuntimeError):
    """A rank of the tensor-parallel group failed: the engine cannot run any more."""


def torchrun_env() -> bool:
    """Started by torchrun (or any launcher that sets the env:// variables)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def rank_device(config: EngineConfig, local_rank: int) -> torch.device:
    """Rank r uses cuda:r of its node (or the CPU)."""
    device = resolve_device(config.device)
    if device.type != "cuda":
        return device
    if device.index is not None:
        raise ValueError(
            f"device={config.device!r}: with tensor_parallel_size > 1 rank r uses cuda:<local rank r>; "
            "set device='cuda' (choose the GPUs with CUDA_VISIBLE_DEVICES)"
        )
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(
            f"tensor_parallel_size={config.tensor_parallel_size} needs one GPU per rank on each node; "
            f"local rank {local_rank} has only {count} visible GPU(s)"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


@dataclass
class RankGroup:
    """One rank's membership: its collectives (`tp`), rank 0's control messages (`channel`) and its device."""

    tp: TensorParallel
    channel: StepChannel
    device: torch.device
    backend: str
    threads: int  # torch's CPU threads before joining (restored when rank 0 leaves)


def join_group(rank: int, size: int, device: torch.device, store: dist.Store | None = None) -> RankGroup:
    """Initialise torch.distributed for this rank: through `store` (spawned ranks) or env:// (torchrun)."""
    if dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is already initialised in this process: one tensor-parallel engine per process "
            "(shut the previous one down first)"
        )
    backend = "nccl" if device.type == "cuda" else "gloo"  # "nccl" is RCCL on ROCm builds
    where = {"init_method": "env://"} if store is None else {"store": store}
    device_id = device if backend == "nccl" else None  # NCCL: create the communicator now, on this GPU
    dist.init_process_group(
        backend, rank=rank, world_size=size, timeout=COLLECTIVE_TIMEOUT, device_id=device_id, **where
    )
    control = None if backend == "gloo" else dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)
    threads = torch.get_num_threads()
    if device.type == "cpu":  # the ranks share the cores: their spinning thread pools would take turns on them
        torch.set_num_threads(max(1, threads // size))
    return RankGroup(TensorParallel(rank, size, None), StepChannel(control), device, backend, threads)


def leave_group(group: RankGroup | None = None) -> None:
    """Leave torch.distributed. NCCL communicators are aborted (which waits for no peer), not destroyed: on 2
    H200s rank 0's destroy_process_group never returned at an engine's shutdown
    (benchmarks/results/tp_shutdown_h200x2.md); at a stop no pass is in flight, so nothing is lost."""
    if dist.is_initialized():
        if dist.get_backend() == "nccl":
            dist.distributed_c10d._abort_process_group()  # every group of this process, gloo's control one too
        else:
            dist.destroy_process_group()
    if group is not None:
        torch.set_num_threads(group.threads)


class SpawnedRanks:
    """Ranks 1..N-1 started from this process (rank 0) with torch.multiprocessing, watched until stopped.

    `target(rank, size, port, config, parent_pid, setup)` is the rank's main function (worker.main)."""

    def __init__(self, config: EngineConfig, target: Callable):
        size = config.tensor_parallel_size
        self.store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, wait_for_workers=False)
        ctx = torch.multiprocessing.get_context("spawn")  # CUDA cannot be used in forked children
        args = (self.store.port, config, os.getpid(), WORKER_SETUP)
        self.procs = {
            r: ctx.Process(target=target, args=(r, size, *args), name=f"miniserve-tp-rank{r}", daemon=True)
            for r in range(1, size)
        }
        self.stopping = False
        self.failure: str | None = None
        self._lock = threading.Lock()
        self._exits: dict[int, str] = {}
        self.callbacks: list[Callable[[BaseException], None]] = []
        self.fatal_exit = False  # set when the device backend is NCCL: a dead peer can hang rank 0 for good
        self._wake_r, self._wake_w = os.pipe()
        for p in self.procs.values():
            p.start()
        try:
            self._wait_joined()
        except BaseException:
            self.stop(None)
            raise
        self._watcher = threading.Thread(target=self._watch, name="miniserve-tp-watch", daemon=True)
        self._watcher.start()

    def _wait_joined(self) -> None:
        """Until every rank has reached its init_process_group (a rank that fails before says why)."""
        keys = [f"miniserve/joined/{r}" for r in self.procs]
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.store.check(keys):
            for r, p in self.procs.items():
                if not p.is_alive():
                    said = self.store.check([f"miniserve/error/{r}"])  # (else it died before its main function)
                    hint = UNGUARDED_HINT if not said and p.exitcode == 1 else ""  # (1: an exception, not a kill)
                    raise TensorParallelError(self.describe_exit(r) + hint)
            if time.monotonic() > deadline:
                raise TensorParallelError(f"tensor-parallel ranks did not start within {START_TIMEOUT_S:.0f} s")
            time.sleep(0.02)

    def describe_exit(self, rank: int) -> str:
        """How rank `rank` ended, once (the watcher and a failed call may both ask: one of them reaps it)."""
        with self._lock:
            if rank not in self._exits:
                p = self.procs[rank]
                deadline = time.monotonic() + 2.0
                while p.exitcode is None and time.monotonic() < deadline:
                    p.join(timeout=0.05)
                msg = f"tensor-parallel rank {rank} (pid {p.pid}) exited with code {p.exitcode}"
                key = f"miniserve/error/{rank}"
                if self.store.check([key]):
                    lines = self.store.get(key).decode(errors="replace").strip().splitlines()
                    if lines:
                        msg += f": {lines[-1]}"
                self._exits[rank] = msg
            return self._exits[rank]

    def _watch(self) -> None:
        sentinels = {p.sentinel: r for r, p in self.procs.items()}
        ready = multiprocessing.connection.wait([*sentinels, self._wake_r])
        if self.stopping:
            return
        rank = next(sentinels[s] for s in ready if s in sentinels)
        self.failure = self.describe_exit(rank)
        logger.error("miniserve: %s; the engine cannot continue", self.failure)
        error = TensorParallelError(self.failure)
        for callback in self.callbacks:
            try:
                callback(error)
            except Exception:
                logger.exception("fatal-error callback failed")
        if self.fatal_exit:  # NCCL collectives with a dead peer may block forever: leave rather than hang
            time.sleep(FATAL_GRACE_S)
            if not self.stopping:
                print(f"miniserve: {self.failure}; exiting", file=sys.stderr, flush=True)
                os._exit(1)

    def stop(self, send_stop: Callable[[], None] | None) -> None:
        """Stop every rank: `send_stop` tells them (when they are listening), then stragglers are terminated."""
        if self.stopping:
            return
        self.stopping = True
        os.write(self._wake_w, b"x")
        if send_stop is not None and self.failure is None:
            try:
                send_stop()
            except Exception:  # a rank is gone: the others are terminated below
                logger.debug("stop message failed", exc_info=True)
        deadline = time.monotonic() + (STOP_TIMEOUT_S if send_stop is not None else 0.0)
        for p in self.procs.values():
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in self.procs.values():
            if p.is_alive():  # (a rank ignores SIGINT and SIGTERM, which may reach the whole process group)
                p.kill()
                p.join()
        watcher = getattr(self, "_watcher", None)
        if watcher is not None:
            watcher.join(timeout=5.0)
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
