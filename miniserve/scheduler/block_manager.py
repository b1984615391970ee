"""Paged KV blocks: a free list plus reference counts.

A block holds `block_size` consecutive token slots of every layer. A sequence's block table lists its blocks in
order, so token `i` lives in slot `block_table[i // block_size] * block_size + i % block_size`. Reference counts
let several sequences share a block (a forked prompt); a block returns to the free list when its count drops to 0.
"""

from __future__ import annotations

from collections import deque

from miniserve.scheduler.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free_ids: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_ids)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_missing_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` still needs so that its table covers `num_tokens` slots."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.num_missing_blocks(seq, num_tokens) <= len(self.free_ids)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Extend the block table to cover `num_tokens` slots; the caller checked `can_grow`."""
        for _ in range(self.num_missing_blocks(seq, num_tokens)):
            block = self.free_ids.popleft()
            self.ref_counts[block] = 1
            seq.block_table.append(block)

    def share(self, src: Sequence, dst: Sequence, num_blocks: int) -> None:
        """Let `dst` reference the first `num_blocks` blocks of `src` (read-only sharing of a common prefix)."""
        for block in src.block_table[:num_blocks]:
            self.ref_counts[block] += 1
            dst.block_table.append(block)

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references; blocks nobody references go back to the pool."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_ids.append(block)
        seq.block_table.clear()
