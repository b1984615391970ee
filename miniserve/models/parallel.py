"""The Megatron split of a Llama-family model over `size` tensor-parallel ranks, and its three collectives.

Each rank holds a slice of every large matrix, so no rank ever holds the whole model:

* column-parallel fused QKV and gate_up: rank r keeps its query heads, its KV heads and its slice of the
  intermediate dimension, so attention and the SiLU-and-mul run on local data with no communication;
* row-parallel o and down projections: each rank multiplies its slice of the input dimension and the partial
  sums are added with one all-reduce per projection;
* vocab-parallel embedding and LM head: rank r keeps vocabulary rows [r*V', (r+1)*V') (V' = ceil(V / size), the
  last rank zero-padded): the embedding looks up the ids it owns and an all-reduce fills in the rest; the LM head
  computes its slice of the logits and an all-gather assembles them.

When there are fewer KV heads than ranks, each KV head is replicated over size / num_kv_heads consecutive ranks
(as vLLM does): rank r keeps KV head r // (size / num_kv_heads), the one its query heads attend to.

`ShardLayout` is pure arithmetic (the loader uses it to read each rank's rows and columns straight from the
safetensors files); `TensorParallel` adds the process group for the collectives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from miniserve.models.config import ModelConfig


@dataclass(frozen=True)
class ShardLayout:
    """What rank `rank` of `size` holds. With size 1 every slice is the whole dimension."""

    rank: int
    size: int
    num_heads: int  # query heads on this rank
    q_head_start: int
    num_kv_heads: int  # KV heads on this rank (1 when replicated)
    kv_head_start: int
    intermediate_size: int
    intermediate_start: int
    vocab_rows: int  # V' = ceil(vocab_size / size): rows of the embedding and LM head on every rank
    vocab_start: int
    vocab_real: int  # rows of this rank that are real tokens (the rest is zero padding)

    @classmethod
    def of(cls, cfg: ModelConfig, rank: int = 0, size: int = 1) -> ShardLayout:
        check_divisible(cfg, size)
        heads = cfg.num_heads // size
        if cfg.num_kv_heads >= size:
            kv_heads, kv_start = cfg.num_kv_heads // size, rank * (cfg.num_kv_heads // size)
        else:  # replicated: size / num_kv_heads consecutive ranks share one KV head
            kv_heads, kv_start = 1, rank // (size // cfg.num_kv_heads)
        inter = cfg.intermediate_size // size
        rows = -(-cfg.vocab_size // size)
        start = rank * rows
        return cls(
            rank=rank,
            size=size,
            num_heads=heads,
            q_head_start=rank * heads,
            num_kv_heads=kv_heads,
            kv_head_start=kv_start,
            intermediate_size=inter,
            intermediate_start=rank * inter,
            vocab_rows=rows,
            vocab_start=start,
            vocab_real=max(0, min(rows, cfg.vocab_size - start)),
        )


def check_divisible(cfg: ModelConfig, size: int) -> None:
    """The shapes a split over `size` ranks needs; a clear error naming the field otherwise."""
    if size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {size}")
    if cfg.num_heads % size:
        raise ValueError(f"tensor_parallel_size={size} must divide the model's num_attention_heads={cfg.num_heads}")
    if cfg.intermediate_size % size:
        raise ValueError(
            f"tensor_parallel_size={size} must divide the model's intermediate_size={cfg.intermediate_size}"
        )
    kv = cfg.num_kv_heads
    if (kv >= size and kv % size) or (kv < size and size % kv):
        raise ValueError(
            f"tensor_parallel_size={size} and the model's num_key_value_heads={kv}: one must divide the other"
        )


# torch 2.13 renamed all_gather_into_tensor (torch 2.11 has only the old name)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in the split plus the process group its collectives run on (NCCL/RCCL on GPUs, gloo
    on CPUs). Every op here is capturable in a CUDA graph: fixed shapes, no host synchronisation."""

    rank: int
    size: int
    group: dist.ProcessGroup | None = None  # None: the default group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """In place sum over the ranks (the row-parallel projections' partial products)."""
        dist.all_reduce(x, group=self.group)
        return x

    def embedding(self, input_ids: torch.Tensor, weight: torch.Tensor, layout: ShardLayout) -> torch.Tensor:
        """Vocab-parallel lookup: rows of ids this rank owns, zeros elsewhere, summed over the ranks (exactly one
        rank contributes each row, so the sum is the row itself)."""
        local = input_ids - layout.vocab_start
        outside = (local < 0) | (local >= layout.vocab_rows)
        x = F.embedding(local.masked_fill(outside, 0), weight)
        x.masked_fill_(outside[:, None], 0.0)
        return self.all_reduce(x)

    def gather_vocab(self, logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """[T, V'] logits of this rank's vocabulary slice -> [T, V] on every rank (padding columns dropped)."""
        logits = logits.contiguous()
        rows, cols = logits.shape
        out = torch.empty(self.size * rows, cols, dtype=logits.dtype, device=logits.device)
        _all_gather(out, logits, group=self.group)  # the ranks' slices one under the other
        full = out.view(self.size, rows, cols).permute(1, 0, 2).reshape(rows, self.size * cols)
        return full if full.shape[1] == vocab_size else full[:, :vocab_size].contiguous()

    def gather_bytes(self, x: torch.Tensor) -> torch.Tensor:
        """[size, nbytes] uint8: every rank's `x` (same shape on every rank) as raw bytes (any dtype, fp8 too)."""
        local = x.contiguous().view(-1).view(torch.uint8)
        out = torch.empty(self.size * local.numel(), dtype=torch.uint8, device=x.device)
        _all_gather(out, local, group=self.group)
        return out.view(self.size, -1)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """In place: rank 0's `x` on every rank (inputs that exist only on rank 0's device, e.g. drafts)."""
        dist.broadcast(x, src=0, group=self.group)
        return x
