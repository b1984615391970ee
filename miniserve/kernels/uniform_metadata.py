"""Attention metadata of a uniform pass (every sequence brings `n` new tokens) in one kernel launch.

A decode step or a speculative verification pass of a small model costs a few microseconds per kernel, and
deriving its metadata with torch ops (positions, slots, sequence lengths, the per-token block tables of
`AttentionMetadata.as_decode_queries`) takes about fifteen of them. This kernel writes all of it at once, in the
decode-query form: token t = b * n + j of sequence b sits at position start_pos[b] + j and attends to the
positions up to its own. `metadata.uniform_metadata_reference(...)` followed by `as_decode_queries()` is the same
computation in torch (and the test oracle).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from miniserve.kernels.metadata import AttentionMetadata


@triton.jit(do_not_specialize=["stride_bt", "stride_tt", "num_blocks_per_seq"])  # per-step widths
def _uniform_metadata_kernel(
    start_pos_ptr,
    valid_ptr,
    block_tables_ptr,
    positions_ptr,
    slots_ptr,
    seq_lens_ptr,
    token_tables_ptr,
    stride_s,
    stride_v,
    stride_bt,
    stride_tt,
    num_blocks_per_seq,
    N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HAS_VALID: tl.constexpr,
    COPY_TABLES: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    t = tl.program_id(0)
    b = t // N
    pos = tl.load(start_pos_ptr + b * stride_s) + t % N
    page = tl.load(block_tables_ptr + b * stride_bt + pos // BLOCK_SIZE).to(tl.int64)
    slot = page * BLOCK_SIZE + pos % BLOCK_SIZE
    if HAS_VALID:
        slot = tl.where(tl.load(valid_ptr + b * stride_v) != 0, slot, -1)
    tl.store(positions_ptr + t, pos)
    tl.store(slots_ptr + t, slot)
    tl.store(seq_lens_ptr + t, (pos + 1).to(tl.int32))
    if COPY_TABLES:
        for w0 in range(0, num_blocks_per_seq, BLOCK_W):
            w = w0 + tl.arange(0, BLOCK_W)
            row = tl.load(block_tables_ptr + b * stride_bt + w, mask=w < num_blocks_per_seq)
            tl.store(token_tables_ptr + t * stride_tt + w, row, mask=w < num_blocks_per_seq)


_QUERY_STARTS: dict[tuple[torch.device, int], torch.Tensor] = {}


def _query_starts(num_tokens: int, device: torch.device) -> torch.Tensor:
    """0..num_tokens, cached: made once (outside any CUDA-graph capture, by the warm-up pass) and reused."""
    key = (device, num_tokens)
    if key not in _QUERY_STARTS:
        _QUERY_STARTS[key] = torch.arange(num_tokens + 1, dtype=torch.int32, device=device)
    return _QUERY_STARTS[key]


def uniform_metadata_triton(
    start_pos: torch.Tensor,  # int64 [B], any stride
    valid: torch.Tensor | None,  # bool [B], any stride: False rows write no KV (slot -1)
    block_tables: torch.Tensor,  # int32 [B, W], unit stride along W
    n: int,
    block_size: int,
    max_seq_len: int,
) -> tuple[torch.Tensor, AttentionMetadata]:
    """(positions int64 [B*n], decode-query metadata) for B sequences with n new tokens each."""
    B, width = block_tables.shape
    T = B * n
    dev = start_pos.device
    positions = torch.empty(T, dtype=torch.int64, device=dev)
    slots = torch.empty(T, dtype=torch.int64, device=dev)
    seq_lens = torch.empty(T, dtype=torch.int32, device=dev)
    token_tables = block_tables if n == 1 else torch.empty(T, width, dtype=block_tables.dtype, device=dev)
    if T:
        _uniform_metadata_kernel[(T,)](
            start_pos,
            valid if valid is not None else start_pos,
            block_tables,
            positions,
            slots,
            seq_lens,
            token_tables,
            start_pos.stride(0),  # a column of a CUDA graph's packed input: not contiguous
            valid.stride(0) if valid is not None else 0,
            block_tables.stride(0),
            token_tables.stride(0),
            width,
            N=n,
            BLOCK_SIZE=block_size,
            HAS_VALID=valid is not None,
            COPY_TABLES=n > 1,
            BLOCK_W=min(triton.next_power_of_2(max(width, 1)), 256),
            num_warps=1,
        )
    meta = AttentionMetadata(
        slot_mapping=slots,
        query_start_loc=_query_starts(T, dev),
        seq_lens=seq_lens,
        block_tables=token_tables,
        max_query_len=1,
        max_seq_len=max_seq_len,
    )
    return positions, meta
