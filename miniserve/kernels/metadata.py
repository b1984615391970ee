"""Attention metadata: how a packed batch of new tokens maps onto the paged KV cache.

One forward step runs `B` sequences. Sequence `i` brings `q_len_i = query_start_loc[i+1] - query_start_loc[i]`
new tokens (1 for decode, the prompt chunk for prefill, k+1 for speculative verification). Its KV length
`seq_lens[i]` counts every cached token *including* the new ones, so the new tokens sit at positions
`seq_lens[i] - q_len_i .. seq_lens[i] - 1` and query `j` attends causally to KV positions
`<= seq_lens[i] - q_len_i + j`.
All attention reads K/V from the paged cache after `reshape_and_cache` wrote the new tokens, so every backend
sees the same (possibly FP8) bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # int64 [num_tokens]: block_id * block_size + offset; negative = skip the write
    query_start_loc: torch.Tensor  # int32 [B + 1]: cumulative new-token counts
    seq_lens: torch.Tensor  # int32 [B]: KV length per sequence, new tokens included
    block_tables: torch.Tensor  # int32 [B, max_blocks_per_seq]: physical block ids, unused entries 0
    max_query_len: int  # host copy of max(q_len_i)
    max_seq_len: int  # host copy of max(seq_lens)

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def is_decode(self) -> bool:
        """Every sequence brings exactly one new token: the decode kernel applies."""
        return self.max_query_len == 1

    def as_decode_queries(self) -> AttentionMetadata:
        """The same batch with every new token as its own one-token query (its sequence's pages, its causal
        length), so the decode kernel can run it. A token then gets exactly the arithmetic of a plain decode
        step, which is what makes greedy speculative verification reproduce plain decoding bit for bit.
        Built on the device without host syncs (CUDA-graph safe)."""
        num_tokens = self.slot_mapping.shape[0]
        dev = self.seq_lens.device
        token = torch.arange(num_tokens, device=dev, dtype=torch.int32)
        ends = self.query_start_loc[1:]
        seq = torch.searchsorted(ends, token, right=True)  # the sequence each token belongs to
        # token t of sequence i sits at position seq_lens[i] - (query_start_loc[i + 1] - t)
        seq_lens = self.seq_lens[seq] - ends[seq] + token + 1
        return AttentionMetadata(
            slot_mapping=self.slot_mapping,
            query_start_loc=torch.arange(num_tokens + 1, device=dev, dtype=torch.int32),
            seq_lens=seq_lens.to(torch.int32),
            block_tables=self.block_tables[seq],
            max_query_len=1,
            max_seq_len=self.max_seq_len,
        )


def uniform_metadata_reference(
    start_pos: torch.Tensor,
    valid: torch.Tensor | None,
    block_tables: torch.Tensor,
    n: int,
    block_size: int,
    max_seq_len: int,
    counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, AttentionMetadata]:
    """The same as `uniform_metadata_triton` in torch ops, in the standard (one query of n tokens per sequence)
    form, which the torch attention reference runs; `as_decode_queries()` of it equals the kernel's metadata.

    `counts` [B]: only the first counts[i] tokens of row i are real (a prompt padded up to a captured length);
    the rest write no KV. They still sit at positions after the real ones, so causality keeps them unseen."""
    B = start_pos.shape[0]
    dev = start_pos.device
    positions = (start_pos.unsqueeze(1) + torch.arange(n, device=dev)).reshape(-1)
    rows = torch.arange(B, device=dev).repeat_interleave(n)
    slots = block_tables[rows, positions // block_size].long() * block_size + positions % block_size
    if valid is not None:
        slots = torch.where(valid[rows], slots, -1)
    if counts is not None:
        real = (torch.arange(n, device=dev) < counts.unsqueeze(1)).reshape(-1)
        slots = torch.where(real, slots, -1)
    meta = AttentionMetadata(
        slot_mapping=slots,
        query_start_loc=torch.arange(0, (B + 1) * n, n, dtype=torch.int32, device=dev),
        seq_lens=(start_pos + n).to(torch.int32),
        block_tables=block_tables,
        max_query_len=n,
        max_seq_len=max_seq_len,
    )
    return positions, meta
