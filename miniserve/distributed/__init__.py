"""Tensor parallelism over torch.distributed: one process per rank, one shard of the target model per rank.

How the pieces fit:

* `launch.py` starts the ranks: the engine spawns ranks 1..N-1 with torch.multiprocessing (rank 0 is the engine's
  own process), or torchrun starts every rank and each joins through `env://`. Device collectives run on NCCL
  (RCCL on ROCm, through the same backend) or gloo on CPUs; a gloo group carries the control messages.
* `channel.py`: rank 0 sends each call's packed inputs to the other ranks, one broadcast per step.
* `runner.py`: rank 0's target, a ModelRunner that sends every call to the other ranks, then runs it itself.
* `worker.py`: the other ranks' loop: receive a call, run it on their own ModelRunner, repeat until told to stop.

The scheduler, the sampler, the outputs and any speculative draft model live on rank 0 only; the other ranks run
the same forward passes on their shards (models/parallel.py) and throw their copy of the logits away.
"""
