"""Continuous batching: every step picks which sequences run and how many new tokens each brings.

One rule covers prefill, chunked prefill and decode: a running sequence brings `num_tokens - num_computed_tokens`
tokens (its whole uncomputed prompt, a chunk of it within the token budget, or the one token sampled last step).
Sequences join (from `waiting`) and leave (finished) at every step. When the KV pool runs dry, the newest running
sequence is preempted: its blocks are freed and it goes back to the front of `waiting`, to be recomputed later.
With `by_priority` (scheduling_policy "priority"), `waiting` and `running` are kept in (priority, arrival) order
instead, so the same rules start the most urgent waiting sequence first and preempt the least urgent running one.
The sampled tokens are kept, so recomputation continues exactly where it stopped (with a draft model it stops
one token short, so the sequence goes on with a speculative round: `_end`).

Prefix caching (block_manager.py): a sequence joining the batch first takes the cached blocks of its longest
cached prefix and computes only the rest; a preempted sequence usually finds its own blocks again. The full blocks
a sequence computes are registered at the start of the next scheduled step (or when it leaves). The `n` choices
of a request share their prompt this way: the others wait until the first has computed its full prompt blocks,
then find them in the cache.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from dataclasses import dataclass

from miniserve.scheduler.block_manager import BlockManager
from miniserve.scheduler.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int

    @property
    def completes_prompt(self) -> bool:
        """After this step the sequence's cache covers all its tokens, so its next token can be sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        lookahead: int = 0,
        has_draft: bool = False,
        by_priority: bool = False,
    ):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.lookahead = lookahead  # extra slots a decode step may write (speculative tokens)
        self.has_draft = has_draft
        self.by_priority = by_priority
        # the tokens a cache hit leaves to compute: the last one, whose logits give the next token; with a draft
        # also the one before, which the first speculative round's draft catch-up rewrites (see _cache_blocks)
        self.num_uncached = 2 if has_draft else 1
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.parents: dict[int, Sequence] = {}  # seq_id -> the first choice of its request, whose prompt it reuses
        self.num_preemptions = 0
        self.prefix_cache_queries = 0  # prompt tokens looked up in the prefix cache at first admission
        self.prefix_cache_hits = 0  # of which found there

    def add(self, seq: Sequence, parent: Sequence | None = None) -> None:
        if parent is not None:
            self.parents[seq.seq_id] = parent
        self._enqueue(self.waiting, seq)

    def schedule(self) -> list[ScheduledSeq]:
        for seq in self.running:
            self._cache_blocks(seq)
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(self._end(seq) - seq.num_computed_tokens, budget)
            need = seq.num_computed_tokens + num_new + self._lookahead(seq, num_new)
            while not self.blocks.can_grow(seq, need) and self.running[-1] is not seq:
                self._preempt(self.running.pop())
                preempted = True
            if not self.blocks.can_grow(seq, need):
                self._preempt(self.running.pop(i))  # it is the last one: nothing else to take from
                preempted = True
                break
            self.blocks.grow(seq, need)
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
            i += 1
        if preempted:
            return scheduled
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting.popleft()
            if self._parent_pending(seq):  # waits for its sibling's prompt blocks; later ones may go first
                skipped.append(seq)
                continue
            if not self._admit(seq, budget, scheduled):
                self.waiting.appendleft(seq)
                break
            budget -= scheduled[-1].num_new_tokens
        self.waiting.extendleft(reversed(skipped))
        return scheduled

    def _end(self, seq: Sequence) -> int:
        """Where the tokens `seq` brings this step end: at its last token. But with a draft, a sequence recomputed
        after a preemption stops before its last token, so that its next step is a speculative round fed that
        token, as it would have been without the preemption: a sampled round draws from the request's seed in the
        same order, and the seed gives the same output whatever else runs (sampling a token at the end of the
        recompute instead, as a decode step, drew differently)."""
        resumed = self.has_draft and seq.num_output_tokens > 0
        if resumed and seq.num_computed_tokens < seq.num_tokens - 1:
            return seq.num_tokens - 1
        return seq.num_tokens

    def _enqueue(self, queue: deque[Sequence] | list[Sequence], seq: Sequence, front: bool = False) -> None:
        """At the back of `queue` (the front: a preempted sequence, first to come back), or by priority."""
        if self.by_priority:
            bisect.insort(queue, seq, key=_urgency)
        elif front:
            queue.appendleft(seq)  # (only `waiting`, a deque, takes a sequence at the front)
        else:
            queue.append(seq)

    def _lookahead(self, seq: Sequence, num_new: int) -> int:
        """Slots past the new tokens a step may write: a speculative round's (one new token, after the first
        output); a prompt pass writes none, even of a one-token prompt or chunk, so a request that stops at its
        first token (max_tokens=1) fits the pool as it would without a draft, and nor does the step of a sequence
        that is not `speculative` (a grammar's)."""
        return self.lookahead if num_new == 1 and seq.num_output_tokens > 0 and seq.params.speculative else 0

    def _cache_blocks(self, seq: Sequence) -> None:
        """Register the sequence's full blocks that every worker has written and no worker will write again.
        A draft lags the target, and its catch-up pass rewrites position num_tokens - 2 when it had already
        computed it (speculative decoding): such a slot may not sit in a block others read."""
        num_tokens = seq.num_computed_tokens
        if self.has_draft:
            num_tokens = min(num_tokens, seq.num_draft_computed_tokens, seq.num_tokens - 2)
        if num_tokens >= (seq.num_cached_blocks + 1) * self.blocks.block_size:  # a block was filled (most steps: no)
            self.blocks.cache_blocks(seq, num_tokens)

    def _parent_pending(self, seq: Sequence) -> bool:
        """With prefix caching, a choice waits until its request's first choice has registered its full prompt
        blocks, rather than computing the same prompt beside it."""
        parent = self.parents.get(seq.seq_id)
        if parent is None or parent.status != SequenceStatus.RUNNING or not self.blocks.enable_caching:
            return False
        shared_blocks = (seq.num_prompt_tokens - self.num_uncached) // self.blocks.block_size
        return seq.num_computed_tokens == 0 and parent.num_cached_blocks < shared_blocks

    def _admit(self, seq: Sequence, budget: int, scheduled: list[ScheduledSeq]) -> bool:
        """Start `seq` if its blocks fit, beginning with the cached blocks of its longest cached prefix. A choice
        that scores its prompt (prompt_logprobs) computes every position: the logits are what it asks for."""
        lookup = self.blocks.enable_caching and not seq.scores_prompt
        cached = self.blocks.cached_prefix(seq, seq.num_tokens - self.num_uncached) if lookup else []
        num_cached = len(cached) * self.blocks.block_size
        num_new = min(self._end(seq) - num_cached, budget)
        need = num_cached + num_new + self._lookahead(seq, num_new)
        if not self.blocks.can_allocate(cached, need):
            return False
        self.blocks.allocate(seq, cached, need)
        seq.num_computed_tokens = seq.num_draft_computed_tokens = num_cached
        if seq.num_cached_tokens is None:  # its first admission, not a preempted sequence's return
            if lookup:  # (as vLLM's counters: a return finds its own blocks, which says nothing of the cache's use)
                self.prefix_cache_queries += seq.num_tokens
                self.prefix_cache_hits += num_cached
            seq.num_cached_tokens = num_cached
            seq.first_scheduled_time = time.monotonic()
        seq.status = SequenceStatus.RUNNING
        self._enqueue(self.running, seq)
        scheduled.append(ScheduledSeq(seq, num_new))
        return True

    def _preempt(self, seq: Sequence) -> None:
        self._cache_blocks(seq)
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.num_draft_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self._enqueue(self.waiting, seq, front=True)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence from the queues and return its blocks at once (the full ones
        it computed stay cached)."""
        if seq.status == SequenceStatus.RUNNING:
            self._cache_blocks(seq)
        seq.status = SequenceStatus.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        self.parents.pop(seq.seq_id, None)


def _urgency(seq: Sequence) -> tuple[int, int]:
    """The order of scheduling_policy "priority": the request's priority (lower first), then arrival (seq ids are
    handed out in arrival order)."""
    return seq.priority, seq.seq_id
