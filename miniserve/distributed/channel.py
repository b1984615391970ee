"""Rank 0 -> the other ranks: one int64 message per call, on a gloo (CPU) group.

A message is the operation code followed by its integer arguments; a forward pass's arguments are its packed
inputs (`encode_inputs`). Every message is broadcast in a buffer of fixed size, so a receiver needs no size
beforehand: one broadcast per step, and a second one for a message that does not fit (block tables are most of
it: a decode step of 64 sequences past ~930 tokens each, or of 256 past ~160, at block size 16). The control
plane is on the CPU even when the model is on GPUs, so the other ranks receive a step as soon as rank 0 sends it
and prepare it while the GPUs still run the previous one.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch
import torch.distributed as dist

from miniserve.engine.model_runner import ForwardInput

CAPACITY = 4096  # int64 words per broadcast (32 KiB): a decode step of 64 sequences with 58 blocks each fits


class Op(IntEnum):
    STOP = 0
    ALLOCATE_KV = 1  # [num_blocks]
    FORWARD = 2  # encode_inputs(...)
    RUN_UNIFORM = 3  # uniform_header(...), then the packed inputs by a device broadcast
    CAPTURE_UNIFORM = 4  # the same, captured into a CUDA graph of the receiver's (see ParallelModelRunner)
    REPLAY = 5  # [first, count]: replay the receiver's captured graphs first .. first + count - 1
    CAPTURE_GRAPHS = 6  # [n, ...]: ModelRunner.capture_graphs
    CAPTURE_PREFILL_GRAPHS = 7
    DISABLE_GRAPHS = 8
    GATHER_KV = 9  # every rank's KV pool bytes to rank 0 (checks and debugging)
    FORWARD_DEVICE_TOKENS = 10  # encode_inputs(...), then the new tokens by a device broadcast (overlapped decoding)


class StepChannel:
    """One broadcast per message from rank 0 (`send`) to every other rank (`recv`) of `group`."""

    def __init__(self, group: dist.ProcessGroup | None, capacity: int | None = None):
        self.group = group
        self.buffer = torch.zeros(capacity or CAPACITY, dtype=torch.int64)
        self.words = self.buffer.numpy()  # the same memory, filled from Python lists without a tensor per word

    def send(self, message: list[int]) -> None:
        n, room = len(message), len(self.words) - 1
        self.words[0] = n
        self.words[1 : 1 + min(n, room)] = message[:room]
        dist.broadcast(self.buffer, src=0, group=self.group)
        if n > room:
            dist.broadcast(torch.tensor(message[room:], dtype=torch.int64), src=0, group=self.group)

    def recv(self) -> list[int]:
        dist.broadcast(self.buffer, src=0, group=self.group)
        n, room = int(self.words[0]), len(self.words) - 1
        message = self.words[1 : 1 + min(n, room)].tolist()
        if n > room:
            rest = torch.empty(n - room, dtype=torch.int64)
            dist.broadcast(rest, src=0, group=self.group)
            message += rest.tolist()
        return message


def encode_inputs(op: Op, inputs: list[ForwardInput]) -> list[int]:
    """[op, count, (tokens, start_pos, num_logits, blocks) per input, then each input's tokens and block table]."""
    out = [op, len(inputs)]
    for x in inputs:
        out += (len(x.token_ids), x.start_pos, x.num_logits, len(x.block_table))
    for x in inputs:
        out += x.token_ids
        table = x.block_table  # (a decode step's is a numpy view: `out += view` would add it elementwise)
        out += table.tolist() if isinstance(table, np.ndarray) else table
    return out


def decode_inputs(words: list[int]) -> list[ForwardInput]:
    count = words[0]
    pos = 1 + 4 * count
    inputs = []
    for i in range(count):
        num_tokens, start_pos, num_logits, num_blocks = words[1 + 4 * i : 5 + 4 * i]
        tokens, pos = words[pos : pos + num_tokens], pos + num_tokens
        table, pos = words[pos : pos + num_blocks], pos + num_blocks
        inputs.append(ForwardInput(tokens, start_pos, table, num_logits))
    return inputs


def uniform_header(
    token_ids: torch.Tensor, block_tables: torch.Tensor, max_seq_len: int, valid: torch.Tensor | None, as_float: bool
) -> list[int]:
    """The shapes and flags of a `ModelRunner.run_uniform` call: [batch, tokens per sequence, block-table width,
    max_seq_len, has valid, float logits]."""
    batch, n = token_ids.shape
    return [batch, n, block_tables.shape[1], max_seq_len, int(valid is not None), int(as_float)]


def pack_uniform(
    token_ids: torch.Tensor, start_pos: torch.Tensor, block_tables: torch.Tensor, valid: torch.Tensor | None
) -> torch.Tensor:
    """A run_uniform call's device tensors as one int64 [batch, n + 2 + width] tensor (one device broadcast)."""
    flag = torch.ones_like(start_pos) if valid is None else valid.to(torch.int64)
    return torch.cat([token_ids, start_pos[:, None], flag[:, None], block_tables.to(torch.int64)], dim=1)


def unpack_uniform(packed: torch.Tensor, n: int, has_valid: bool):
    """(token_ids, start_pos, block_tables, valid) back from `pack_uniform`."""
    valid = packed[:, n + 1].bool() if has_valid else None
    return packed[:, :n], packed[:, n], packed[:, n + 2 :].to(torch.int32), valid
