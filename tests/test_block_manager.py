"""BlockManager at its edges, without a model: the smallest pool, growing into exactly the free blocks, a lookup
of nothing, which freed blocks are reused first, and what a cache reset hides. The oracles are block ids and
counts worked out by hand from the documented rules (ids are handed out from 0 up; a freed block with nothing
worth keeping is reused before the never-used ones, a cached one after them)."""

from __future__ import annotations

import pytest

from miniserve import SamplingParams
from miniserve.scheduler.block_manager import BlockManager
from miniserve.scheduler.sequence import Sequence


def seq_of(tokens: list[int], seq_id: int = 0) -> Sequence:
    return Sequence(seq_id, f"r{seq_id}", 0, list(tokens), SamplingParams())


def test_a_pool_of_one_block_works_and_of_none_is_refused():
    with pytest.raises(ValueError, match="at least one block, got 0"):
        BlockManager(0, 4)
    bm = BlockManager(1, 4)
    assert bm.num_free_blocks == 1 and bm.num_used_blocks == 0
    assert bm.can_allocate([], 4) and not bm.can_allocate([], 5)
    seq = seq_of([3, 4, 5, 6])
    bm.allocate(seq, [], 4)
    assert seq.block_table == [0] and bm.num_free_blocks == 0 and bm.num_used_blocks == 1


def test_grow_fits_into_exactly_the_free_blocks():
    bm = BlockManager(3, 4)
    seq = seq_of([7] * 12)
    bm.allocate(seq, [], 4)  # 1 block; 2 free
    assert bm.can_grow(seq, 12)  # 2 more blocks: exactly the free ones
    assert not bm.can_grow(seq, 13)  # 3 more
    bm.grow(seq, 12)
    assert seq.block_table == [0, 1, 2] and bm.num_free_blocks == 0
    assert bm.can_grow(seq, 12) and not bm.can_grow(seq, 13)  # nothing missing fits in nothing free


def test_cached_blocks_in_use_take_no_free_block_and_idle_ones_take_theirs():
    """3 blocks of 4, caching on: A's 8 tokens fill two blocks, registered, so 1 block is free. B shares that prefix
    and needs 9 slots: its third block is the free one, as A still uses the two cached ones (exact fit); once A is
    freed, its cached blocks sit in the free list, and reviving them takes them out of it (3 needed, 3 free)."""
    bm = BlockManager(3, 4, enable_caching=True)
    a = seq_of(list(range(8)))
    bm.allocate(a, [], 8)
    bm.cache_blocks(a, 8)
    b = seq_of(list(range(8)) + [99], seq_id=1)
    cached = bm.cached_prefix(b, 8)
    assert cached == a.block_table and bm.num_free_blocks == 1
    assert bm.can_allocate(cached, 9) and not bm.can_allocate(cached, 13)
    bm.free(a)
    assert bm.num_free_blocks == 3 and bm.can_allocate(cached, 12) and not bm.can_allocate(cached, 13)


def test_lookup_of_no_tokens_finds_nothing_with_one_token_blocks():
    bm = BlockManager(4, 1)
    held = seq_of([5, 6, 7])
    bm.allocate(held, [], 3)
    bm.cache_blocks(held, 3)
    probe = seq_of([5, 6, 7], 1)
    assert bm.cached_prefix(probe, 0) == [] and bm.cached_prefix(probe, -1) == []
    assert bm.cached_prefix(probe, 1) == [0] and bm.cached_prefix(probe, 3) == [0, 1, 2]


def test_freed_blocks_without_contents_are_reused_first_and_cached_ones_last():
    bm = BlockManager(3, 2)
    a = seq_of([1, 2, 3])
    bm.allocate(a, [], 3)  # blocks 0 (full) and 1 (one token); block 2 never used
    bm.cache_blocks(a, 3)  # registers block 0 only
    bm.free(a)
    assert a.block_table == [] and a.num_cached_blocks == 0  # nothing of the table is left, cached or not
    assert bm.num_free_blocks == 3
    b = seq_of([9, 9], 1)
    bm.allocate(b, [], 2)
    assert b.block_table == [1]  # the partial block: nothing worth keeping
    c = seq_of([8, 8], 2)
    bm.allocate(c, [], 2)
    assert c.block_table == [2]  # then the never-used one
    assert bm.cached_prefix(seq_of([1, 2, 3], 3), 2) == [0]  # the cached block outlived both
    d = seq_of([4, 4], 4)
    bm.allocate(d, [], 2)
    assert d.block_table == [0] and bm.cached_prefix(seq_of([1, 2, 3], 5), 2) == []  # evicted last


def test_reset_cache_hides_the_blocks_in_use_for_good():
    """After a reset no new sequence finds a block computed before it, even once the sequence that holds the
    block registers its later blocks."""
    bm = BlockManager(4, 2)
    a = seq_of([1, 2, 3, 4])
    bm.allocate(a, [], 4)
    bm.cache_blocks(a, 4)
    assert bm.cached_prefix(seq_of([1, 2, 3, 4, 0], 1), 4) == [0, 1]
    bm.reset_cache()
    assert bm.cached_prefix(seq_of([1, 2, 3, 4, 0], 2), 4) == []
    a.token_ids.extend([5, 6])
    bm.grow(a, 6)
    bm.cache_blocks(a, 6)  # block 2 is new; blocks 0 and 1 hold pre-reset contents
    assert a.num_cached_blocks == 3
    assert bm.cached_prefix(seq_of([1, 2, 3, 4, 5, 6, 0], 3), 6) == []
    bm.free(a)
    assert bm.num_free_blocks == 4


def test_a_sequences_block_array_follows_its_table_through_growth_free_and_refill():
    """Sequence.block_array (what a decode step packs) equals the block table after every grow, and after the table
    is freed and refilled to a greater length before the next read (a preempted sequence readmitted): only appending
    to what it copied before would keep the old table's blocks. A view handed out before the free keeps its values."""
    bm = BlockManager(64, 2)
    a, b = seq_of(list(range(6)), 0), seq_of(list(range(6)), 1)
    bm.allocate(a, [], 6)
    bm.allocate(b, [], 6)
    for n in range(7, 30, 3):
        bm.grow(a, n)
        assert a.block_array().tolist() == a.block_table
    old_view, old_table = a.block_array(), list(a.block_table)
    bm.free(a)
    bm.free(b)  # b's blocks go first now: a's new table differs from its old one
    bm.allocate(a, [], 40)
    assert a.block_array().tolist() == a.block_table != old_table[: len(a.block_table)]
    assert old_view.tolist() == old_table


def test_pack_rows_puts_each_table_after_its_head_and_zeros_after_it():
    import numpy as np

    from miniserve.engine.cuda_graphs import pack_rows

    rows = [([5, 9, 1], [3, 4]), ([6, 2, 1], np.array([7, 8, 10], dtype=np.int64)), ([0, 0, 0], [11])]
    assert pack_rows(rows).tolist() == [[5, 9, 1, 3, 4, 0], [6, 2, 1, 7, 8, 10], [0, 0, 0, 11, 0, 0]]
