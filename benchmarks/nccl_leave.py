"""Experiment: leaving a one-rank NCCL world after an all-reduce was captured in a CUDA graph and replayed, by
`destroy_process_group` or by `_abort_process_group` (what distributed/launch.py:leave_group does on NCCL), then
joining and leaving again in the same process (tp_check.py builds engine after engine). One GPU.

    python benchmarks/nccl_leave.py destroy 29511
    python benchmarks/nccl_leave.py abort 29512

Why: on 2 H200s, a TP=2 engine's shutdown never returned from rank 0's destroy_process_group after its CUDA-graph
passes (benchmarks/results/tp_shutdown_h200x2.md). One rank alone cannot show that hang (it needs a peer); this
checks that the abort path runs on the installed torch and NCCL, with graphs that captured the communicator.
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist


def leave(mode: str) -> float:
    start = time.perf_counter()
    if mode == "destroy":
        dist.destroy_process_group()
    else:
        dist.distributed_c10d._abort_process_group()
    return time.perf_counter() - start


def main() -> None:
    mode, port = sys.argv[1], sys.argv[2]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    device = torch.device("cuda:0")
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=device)
    dist.new_group(backend="gloo")  # as the engine's control group
    x = torch.ones(1024, device=device)
    with torch.cuda.stream(torch.cuda.Stream()):
        dist.all_reduce(x)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dist.all_reduce(x)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    print(mode, f"left in {leave(mode):.3f} s, initialized after: {dist.is_initialized()}", flush=True)
    del graph
    torch.cuda.synchronize()
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=device)
    dist.all_reduce(x)
    torch.cuda.synchronize()
    leave(mode)
    print(mode, "joined and left again", flush=True)


if __name__ == "__main__":
    main()
