"""Continuous batching: every step picks which sequences run and how many new tokens each brings.

One rule covers prefill, chunked prefill and decode: a running sequence brings `num_tokens - num_computed_tokens`
tokens (its whole uncomputed prompt, a chunk of it within the token budget, or the one token sampled last step).
Sequences join (from `waiting`) and leave (finished) at every step. When the KV pool runs dry, the newest running
sequence is preempted: its blocks are freed and it goes back to the front of `waiting`, to be recomputed later.
The sampled tokens are kept, so recomputation continues exactly where it stopped.
"""

from __future__ import annotations

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
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, lookahead: int = 0):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.lookahead = lookahead  # extra slots a decode step may write (speculative tokens)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.parents: dict[int, Sequence] = {}  # seq_id -> sibling whose prompt blocks it may share (n > 1)
        self.num_preemptions = 0

    def add(self, seq: Sequence, parent: Sequence | None = None) -> None:
        if parent is not None:
            self.parents[seq.seq_id] = parent
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            need = seq.num_computed_tokens + num_new + (self.lookahead if num_new == 1 else 0)
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

    def _parent_pending(self, seq: Sequence) -> bool:
        parent = self.parents.get(seq.seq_id)
        return (
            parent is not None
            and parent.status == SequenceStatus.RUNNING
            and seq.num_computed_tokens == 0
            and parent.num_computed_tokens < self._shared_len(seq)
        )

    def _shared_len(self, seq: Sequence) -> int:
        """Tokens of the prompt held in full blocks, leaving at least one token to compute for logits."""
        bs = self.blocks.block_size
        return ((seq.num_prompt_tokens - 1) // bs) * bs

    def _admit(self, seq: Sequence, budget: int, scheduled: list[ScheduledSeq]) -> bool:
        """Start `seq` if its blocks fit, sharing a running sibling's full prompt blocks when it has one."""
        parent = self.parents.get(seq.seq_id)
        share = 0
        if parent is not None and parent.status == SequenceStatus.RUNNING and seq.num_computed_tokens == 0:
            share = self._shared_len(seq) // self.blocks.block_size
        num_new = min(seq.num_tokens - share * self.blocks.block_size, budget)
        need_total = share * self.blocks.block_size + num_new
        if self.blocks.blocks_for(need_total) - share > self.blocks.num_free_blocks:
            return False
        if share:
            self.blocks.share(parent, seq, share)
            seq.num_computed_tokens = share * self.blocks.block_size
        self.blocks.grow(seq, need_total)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        scheduled.append(ScheduledSeq(seq, num_new))
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.num_draft_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence from the queues and return its blocks at once."""
        seq.status = SequenceStatus.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        self.parents.pop(seq.seq_id, None)
