"""One token per row of a [B, V] logits tensor in two small launches: the Gumbel-max race for sampled rows, the
argmax for greedy ones.

Why a kernel: the torch sampler (engine/sampler.py) draws a token from `softmax(logits / T)` with the exponential
race, argmax(p / E) with E ~ Exp(1). For a batch of 256 at a 152k vocabulary that is seven full [B, V] passes
(the fp32 copy, the division, the softmax, the noise, the clamp, the quotient, the argmax): 636 us of GPU time on
an H200, against 218 us for this kernel (`benchmarks/results/sampling_kernel_h200.json`). The race in log space picks
the same way, argmax(logits / T - log E), and the softmax's normalisation is the same for every token of a row,
so this kernel reads the logits once, adds Gumbel noise -log(-log U) drawn on the fly (Philox, `tl.rand`), and
keeps each chunk's best; a second launch picks each row's best chunk.

A grammar's packed masks (structured outputs) are applied as the logits are read, a 32-bit word per 32 tokens, so
a constrained step costs the same two launches, where torch unpacked the bits into a [B, V] mask and made an fp32
copy to fill.

Greedy rows (and every row when `temperature` is None) take the plain argmax, with torch.argmax's rules: the first
index of the largest value, and NaN outranks every number. The noise is not the torch path's (its own generator,
seeded per call), so the sampled tokens are a different draw from the same distribution; rows with their own
seed keep the torch path, whose draws depend only on that seed.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the engine samples with torch there
    triton = None

BLOCK = 2048  # logits a program reads: a 128k vocabulary is 63 programs a row, enough to fill the GPU at batch 1
MAX_CHUNKS = 256  # chunks a row may span (stage 2 reads them in one tile): vocabularies up to 512k tokens


def gumbel_argmax_reference(
    logits: torch.Tensor, temperature: torch.Tensor | None, uniform: torch.Tensor, bitmask: torch.Tensor | None = None
) -> torch.Tensor:
    """The kernel's rule with its uniforms U [B, V] given (int64 [B]): argmax(logits / T - log(-log U)) on rows
    whose temperature is > 0, argmax(logits) on the others (temperature 0, or None for all); with a grammar's
    `bitmask` (int32 [B, >= V/32], bit j of word w = token 32w + j, set = allowed) the others score -inf."""
    scores = logits.float()
    if temperature is not None:
        t = temperature.float().unsqueeze(1)
        noisy = scores / t - torch.log(-torch.log(uniform))
        scores = torch.where(t > 0, noisy, scores)
    if bitmask is not None:
        cols = torch.arange(scores.shape[1], device=scores.device)
        allowed = (bitmask[:, cols // 32] >> (cols % 32)) & 1  # (arithmetic shift: bit 31 reads 1 as well)
        scores = scores.masked_fill(allowed == 0, -math.inf)
    return scores.argmax(dim=-1)


def covers(rows: int, vocab: int) -> bool:
    """The kernel's bounds: its noise offsets are int32 (rows x vocab < 2^31) and stage 2 reads MAX_CHUNKS."""
    return rows * vocab < 2**31 and vocab <= MAX_CHUNKS * BLOCK


def gumbel_argmax(
    logits: torch.Tensor, temperature: torch.Tensor | None, seed: int, bitmask: torch.Tensor | None = None
) -> torch.Tensor:
    """One token per row (int64 [B]) of `logits` [B, V] (fp32, bf16 or fp16, unit stride along V): rows with
    temperature T > 0 drawn from softmax(logits / T) with noise from `seed`, the others their argmax. temperature:
    float32 [B] (0 marks a greedy row) or None (every row greedy). `bitmask`: a grammar's packed masks (xgrammar's
    int32 [B, >= ceil(V/32)], set = allowed): the kernel reads a row's word per 32 logits and rules out the rest,
    so a constrained step is sampled in the same two launches (a row allowing nothing gets index 0, as torch's
    argmax over -inf)."""
    rows, vocab = logits.shape
    if not covers(rows, vocab):
        raise ValueError(f"gumbel_argmax covers at most 2^31 logits and {MAX_CHUNKS * BLOCK} a row, got {rows}x{vocab}")
    if bitmask is not None and (
        bitmask.dtype != torch.int32 or bitmask.shape[0] != rows or 32 * bitmask.shape[1] < vocab
    ):
        raise ValueError(
            f"bitmask must be int32 [{rows}, >= {triton.cdiv(vocab, 32)}], got {bitmask.dtype} {tuple(bitmask.shape)}"
        )
    chunks = triton.cdiv(vocab, BLOCK)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if bitmask is not None and bitmask.stride(1) != 1:
        bitmask = bitmask.contiguous()
    best = torch.empty(rows, chunks, dtype=torch.float32, device=logits.device)
    where = torch.empty(rows, chunks, dtype=torch.int32, device=logits.device)
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    sampled = temperature is not None
    masked = bitmask is not None
    _chunk_best_kernel[(rows, chunks)](
        logits, logits.stride(0), temperature if sampled else best, seed, bitmask if masked else where,
        bitmask.stride(0) if masked else 0, best, where, vocab, chunks, SAMPLED=sampled, MASKED=masked, BLOCK=BLOCK,
    )  # fmt: skip
    _row_best_kernel[(rows,)](best, where, out, chunks, CHUNKS_POW2=triton.next_power_of_2(chunks))
    return out


if triton is not None:

    @triton.jit
    def _first_best(scores, index, valid):
        """(value, index) of the first largest score, NaN above all numbers (torch.argmax's rules); `index` is
        each score's position, `valid` masks padding."""
        nan = scores != scores
        key = tl.where(valid, tl.where(nan, float("inf"), scores), float("-inf"))
        top = tl.max(key, axis=0)
        any_nan = tl.max((nan & valid).to(tl.int32), axis=0) > 0
        hit = tl.where(any_nan, nan, key == top) & valid
        first = tl.min(tl.where(hit, index, 2147483647), axis=0)
        return tl.where(any_nan, float("nan"), top), first

    @triton.jit(do_not_specialize=["seed"])  # a new seed every step: one compile
    def _chunk_best_kernel(
        logits_ptr,
        stride_row,
        temperature_ptr,
        seed,
        bitmask_ptr,
        stride_mask,
        best_ptr,
        where_ptr,
        vocab,
        chunks,
        SAMPLED: tl.constexpr,
        MASKED: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        cols = chunk * BLOCK + tl.arange(0, BLOCK)
        valid = cols < vocab
        scores = tl.load(logits_ptr + row.to(tl.int64) * stride_row + cols, mask=valid, other=0.0).to(tl.float32)
        if SAMPLED:
            t = tl.load(temperature_ptr + row)
            if t > 0:
                u = tl.rand(seed, row * vocab + cols)  # [0, 1): u = 0 gives -inf noise, a token that cannot win
                scores = scores / t - tl.log(-tl.log(u))
        if MASKED:  # a grammar's word per 32 tokens (the loads of one word are merged): its bit rules a token in
            words = tl.load(bitmask_ptr + row.to(tl.int64) * stride_mask + cols // 32, mask=valid, other=0)
            scores = tl.where(((words >> (cols % 32)) & 1) != 0, scores, float("-inf"))
        value, first = _first_best(scores, cols, valid)
        tl.store(best_ptr + row * chunks + chunk, value)
        tl.store(where_ptr + row * chunks + chunk, first)

    @triton.jit
    def _row_best_kernel(best_ptr, where_ptr, out_ptr, chunks, CHUNKS_POW2: tl.constexpr):
        row = tl.program_id(0)
        c = tl.arange(0, CHUNKS_POW2)
        valid = c < chunks
        best = tl.load(best_ptr + row * chunks + c, mask=valid, other=float("-inf"))
        where = tl.load(where_ptr + row * chunks + c, mask=valid, other=0)
        _, first_chunk = _first_best(best, c, valid)
        token = tl.sum(tl.where(c == first_chunk, where, 0), axis=0)
        tl.store(out_ptr + row, token.to(tl.int64))
