"""Paged KV blocks: reference counts, a free list in LRU order, and automatic prefix caching.

A block holds `block_size` consecutive token slots of every layer of every worker (the target's and the draft's
pools are indexed by the same block ids). A sequence's block table lists its blocks in order, so token `i` lives
in slot `block_table[i // block_size] * block_size + i % block_size`. Reference counts let several sequences
share a block; a block nobody references goes to the free list.

Prefix caching. Once every worker has written a full block, the block is registered under a key: a hash chain, key =
H(parent block's key, this block's token ids), where the first block's parent is the engine's identity (models,
dtypes, KV scales: whatever makes the same tokens give other bytes), salted by the request's `cache_salt` when it
has one (a tenant's prompts are then never served from another's blocks). Equal keys mean equal token prefixes, so a
sequence that starts with cached blocks takes them instead of recomputing them. A freed block keeps its key and
contents: the free list runs from least to most recently freed, and a cached block is forgotten only when it is
taken for new contents (LRU eviction). Blocks with nothing worth keeping go to the front, to be reused first.

Why a hash chain over full blocks, not a radix tree (SGLang): the pool is already paged, and a full block's key is
a pure function of the tokens up to its end. A dict from key to block is then the whole index: no tree to split
and merge, no per-node bookkeeping. Matching per block loses at most block_size - 1 tokens per hit, tokens that
paged blocks could not share anyway (a block's slots are written by the one sequence that owns it). Keys are
BLAKE2b digests rather than Python's hash(): a client must not be able to craft a collision that serves it
another prompt's K/V.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from miniserve.scheduler.sequence import Sequence


def chain_key(parent: bytes, token_ids: list[int]) -> bytes:
    """The key of a full block: its parent's key and its own token ids."""
    return hashlib.blake2b(parent + array("q", token_ids).tobytes(), digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True, identity: bytes = b""):
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.root = hashlib.blake2b(identity, digest_size=16).digest()  # the first block's parent key
        self.ref_counts = [0] * num_blocks
        self.keys: list[bytes | None] = [None] * num_blocks  # what each block holds, if it is in the cache
        self.cached: dict[bytes, int] = {}  # key -> the block holding it
        self.free_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # unreferenced, LRU first

    @property
    def num_free_blocks(self) -> int:
        """Blocks nobody references: empty, or cached and evictable."""
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
            block, _ = self.free_ids.popitem(last=False)
            key, self.keys[block] = self.keys[block], None
            if key is not None:  # evict: it is about to hold other tokens
                del self.cached[key]
            self.ref_counts[block] = 1
            seq.block_table.append(block)

    def block_keys(self, seq: Sequence) -> list[bytes]:
        """The keys of the sequence's full blocks, extended as its tokens grow (earlier tokens never change)."""
        keys, bs = seq.block_keys, self.block_size
        while (len(keys) + 1) * bs <= seq.num_tokens:
            start = len(keys) * bs
            keys.append(chain_key(keys[-1] if keys else self.root_key(seq), seq.token_ids[start : start + bs]))
        return keys

    def root_key(self, seq: Sequence) -> bytes:
        """The parent key of the sequence's first block: the engine's identity, salted by the request's cache_salt
        (requests with different salts, or none, never share a block, whatever their tokens)."""
        salt = seq.params.cache_salt
        if salt is None:
            return self.root
        return hashlib.blake2b(self.root + b"salt:" + salt.encode("utf-8", "surrogatepass"), digest_size=16).digest()

    def cached_prefix(self, seq: Sequence, max_tokens: int) -> list[int]:
        """The cached blocks that hold the longest prefix of the sequence's first `max_tokens` tokens."""
        blocks: list[int] = []
        if self.enable_caching:
            for key in self.block_keys(seq)[: max(0, max_tokens) // self.block_size]:
                block = self.cached.get(key)
                if block is None:
                    break
                blocks.append(block)
        return blocks

    def can_allocate(self, cached: list[int], num_tokens: int) -> bool:
        """Room for a new table of `num_tokens` slots starting with the `cached` blocks (those nobody references
        leave the free list too)."""
        revived = sum(1 for b in cached if self.ref_counts[b] == 0)
        return self.blocks_for(num_tokens) - len(cached) + revived <= len(self.free_ids)

    def allocate(self, seq: Sequence, cached: list[int], num_tokens: int) -> None:
        """Start an empty block table with the `cached` blocks, then fresh ones up to `num_tokens` slots."""
        for block in cached:
            if self.ref_counts[block] == 0:
                del self.free_ids[block]
            self.ref_counts[block] += 1
            seq.block_table.append(block)
        seq.num_cached_blocks = len(cached)
        self.grow(seq, num_tokens)

    def cache_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Register the full blocks among the sequence's first `num_tokens` tokens: every worker has written them
        and nothing will write them again. A block whose key another block already holds stays unregistered."""
        if not self.enable_caching:
            return
        keys = self.block_keys(seq)
        end = min(num_tokens // self.block_size, len(keys))
        for i in range(seq.num_cached_blocks, end):
            block = seq.block_table[i]
            if keys[i] not in self.cached:
                self.cached[keys[i]] = block
                self.keys[block] = keys[i]
        seq.num_cached_blocks = max(seq.num_cached_blocks, end)

    def reset_cache(self) -> None:
        """Forget every cached block (blocks in use keep their contents, but no new sequence will find them)."""
        self.cached.clear()
        self.keys = [None] * self.num_blocks

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references. Its last blocks are freed first, so they are evicted before the
        leading ones, which other prompts are likelier to share."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_ids[block] = None
                if self.keys[block] is None:
                    self.free_ids.move_to_end(block, last=False)
        seq.clear_block_table()
        seq.num_cached_blocks = 0
