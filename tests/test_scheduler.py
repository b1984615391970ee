"""The scheduler's decisions step by step, without a model: which sequences run, with how many new tokens, whom
a full pool preempts, and what a preempted sequence keeps.

The engine's part is played by `step`: every scheduled sequence computes its new tokens, and one that completes
its prompt gets one more token. The expected schedules are worked out by hand in the comments, from the rules
in scheduler.py's docstring (blocks of 4 slots, ids handed out from 0 up), not by running the scheduler.
"""

from __future__ import annotations

import pytest

from miniserve import SamplingParams
from miniserve.scheduler.block_manager import BlockManager
from miniserve.scheduler.scheduler import Scheduler
from miniserve.scheduler.sequence import Sequence, SequenceStatus

BS = 4


def make(num_blocks: int, max_num_seqs: int = 8, budget: int = 64, caching: bool = False, **kw) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BS, enable_caching=caching), max_num_seqs, budget, **kw)


def seq_of(
    seq_id: int, prompt_len: int, parent_tokens: list[int] | None = None, index: int = 0, priority: int = 0
) -> Sequence:
    tokens = parent_tokens or [100 * (seq_id + 1) + i for i in range(prompt_len)]
    return Sequence(seq_id, f"r{seq_id}", index, list(tokens), SamplingParams(), priority=priority)


def step(sched: Scheduler) -> list[tuple[int, int]]:
    """One engine step: (seq_id, new tokens) as scheduled; the sequences compute them, completed ones sample."""
    scheduled = sched.schedule()
    for s in scheduled:
        completes = s.completes_prompt
        s.seq.num_computed_tokens += s.num_new_tokens
        s.seq.num_draft_computed_tokens = s.seq.num_computed_tokens
        if completes:
            s.seq.token_ids.append(7 + s.seq.seq_id)
    return [(s.seq.seq_id, s.num_new_tokens) for s in scheduled]


def test_a_full_pool_preempts_the_newest_and_the_step_that_preempts_admits_nobody():
    sched = make(4, budget=5)
    a, b = seq_of(0, 4), seq_of(1, 4)
    sched.add(a)
    sched.add(b)
    # 1: a's prompt (4 tokens, block 0); 1 token of budget left: b's first chunk (block 1)
    # 2: a decodes (5 tokens: block 2), b its 3 last prompt tokens; 3-5: both decode, a's 6th-8th and b's 5th-7th
    #    tokens fit their 2 blocks each (b's second block, 3, comes at step 3)
    expected = [[(0, 4), (1, 1)], [(0, 1), (1, 3)], [(0, 1), (1, 1)], [(0, 1), (1, 1)], [(0, 1), (1, 1)]]
    assert [step(sched) for _ in range(5)] == expected
    assert (a.block_table, b.block_table) == ([0, 2], [1, 3])
    # 6: a's 9th token needs a third block and none is free: b, the newest, is preempted; a takes one of its two.
    #    Nobody joins in that step, though b's first 4 tokens would fit the block left
    assert step(sched) == [(0, 1)]
    assert len(a.block_table) == 3 and sched.blocks.num_free_blocks == 1
    assert sched.num_preemptions == 1 and list(sched.waiting) == [b] and sched.running == [a]
    assert b.status == SequenceStatus.WAITING and b.block_table == []
    assert b.num_computed_tokens == 0 and b.num_draft_computed_tokens == 0  # its cache is gone: recomputed
    assert b.num_tokens == 8  # its sampled tokens stay
    # 7: a decodes (its 10th token, in its 3 blocks); b rejoins with the 4 tokens of budget left, in the free block
    assert step(sched) == [(0, 1), (1, 4)]
    assert len(b.block_table) == 1 and sched.blocks.num_free_blocks == 0


def test_the_last_running_sequence_preempts_itself_and_that_step_admits_nobody():
    sched = make(3, budget=5)
    a, b = seq_of(0, 4), seq_of(1, 4)
    sched.add(a)
    sched.add(b)
    # as above: 1: a's prompt (block 0), b's first token (block 1); 2: a decodes (block 2), b's 3 last prompt tokens
    assert [step(sched) for _ in range(2)] == [[(0, 4), (1, 1)], [(0, 1), (1, 3)]]
    assert sched.blocks.num_free_blocks == 0
    # 3: a's 6th token fits its 2 blocks; b's 5th needs a second block, none is free, and b is the newest: b goes.
    #    Its 4 first tokens would fit the block it freed, within the 4 tokens of budget left, but not in this step
    assert step(sched) == [(0, 1)]
    assert sched.num_preemptions == 1 and list(sched.waiting) == [b] and sched.running == [a]
    assert b.status == SequenceStatus.WAITING and b.num_computed_tokens == 0 and sched.blocks.num_free_blocks == 1
    # 4: a decodes; b rejoins with a chunk of 4 of its 5 tokens
    assert step(sched) == [(0, 1), (1, 4)]


def test_one_step_preempts_the_newest_then_the_one_before_and_counts_both():
    sched = make(5)
    a, b, c = seq_of(0, 8), seq_of(1, 8), seq_of(2, 4)
    for s in (a, b, c):
        sched.add(s)
    # 1: all three prompts: blocks 0-1, 2-3 and 4; the pool is full
    assert step(sched) == [(0, 8), (1, 8), (2, 4)]
    # 2: a's 9th token needs a third block: c, the newest, goes and a takes its block. b's 9th token needs a third
    #    block too, none is free, and b is now the newest: it goes itself
    assert step(sched) == [(0, 1)]
    assert sched.num_preemptions == 2 and list(sched.waiting) == [b, c] and sched.running == [a]
    assert a.block_table == [0, 1, 4] and sched.blocks.num_free_blocks == 2
    assert [(s.status, s.num_computed_tokens, s.block_table) for s in (b, c)] == [(SequenceStatus.WAITING, 0, [])] * 2
    # 3: a decodes in its 3 blocks; b (9 tokens: 3 blocks) does not fit the 2 free ones, and c waits behind it
    assert step(sched) == [(0, 1)]
    assert sched.num_preemptions == 2
    # 4: c (5 tokens: 2 blocks) would fit the 2 free blocks, but b, which does not, keeps the head of the queue
    assert step(sched) == [(0, 1)] and list(sched.waiting) == [b, c]


def test_lookahead_slots_are_taken_for_decode_steps_only():
    sched = make(3, budget=4, lookahead=2)
    a = seq_of(0, 8)
    sched.add(a)
    # prompt chunks of 4: slots 4 then 8, no lookahead (2 blocks); decoding: 9 + 2 slots then 10 + 2 (3 blocks)
    assert [step(sched) for _ in range(2)] == [[(0, 4)], [(0, 4)]]
    assert len(a.block_table) == 2
    assert [step(sched) for _ in range(2)] == [[(0, 1)], [(0, 1)]]
    assert len(a.block_table) == 3 and sched.num_preemptions == 0
    # 11 + 2 slots: a fourth block, and there is none: a, alone, preempts itself
    assert step(sched) == [] and sched.num_preemptions == 1


def test_no_more_than_max_num_seqs_run_at_once():
    """3 prompts, max_num_seqs 2: two start; the third waits while both run, and starts when one finishes."""
    sched = make(16, max_num_seqs=2)
    for i in range(3):
        sched.add(seq_of(i, 4))
    assert step(sched) == [(0, 4), (1, 4)] and [s.seq_id for s in sched.waiting] == [2]
    assert step(sched) == [(0, 1), (1, 1)]
    sched.finish(sched.running[0])
    assert step(sched) == [(1, 1), (2, 4)]


def test_with_a_draft_a_resumed_sequence_recomputes_up_to_before_its_last_token():
    """With a draft, a sequence recomputed after a preemption stops one token short of its last (Scheduler._end), so
    its next step is a round fed that token, as without the preemption; also when a chunk would end one further:
    10 tokens at a budget of 4 come back as chunks of 4, 4 and 1 (not 2), then that round."""
    sched = make(16, budget=4, has_draft=True, lookahead=2)
    a = seq_of(0, 4)
    sched.add(a)
    while a.num_tokens < 10:
        step(sched)
    sched._preempt(sched.running.pop())
    assert a.num_computed_tokens == 0 and a.num_tokens == 10
    assert [step(sched) for _ in range(4)] == [[(0, 4)], [(0, 4)], [(0, 1)], [(0, 1)]]


def test_a_token_budget_of_one_moves_one_token_a_step():
    sched = make(4, budget=1)
    a = seq_of(0, 3)
    sched.add(a)
    assert [step(sched) for _ in range(5)] == [[(0, 1)]] * 5  # 3 prompt tokens, then one decode step each
    assert a.num_tokens == 6 and a.num_computed_tokens == 5


def test_a_budget_as_large_as_the_batch_runs_every_decode_and_admits_nobody_more():
    sched = make(4, budget=2)
    a, b, c = seq_of(0, 1), seq_of(1, 1), seq_of(2, 1)
    for s in (a, b, c):
        sched.add(s)
    assert [step(sched) for _ in range(3)] == [[(0, 1), (1, 1)]] * 3  # c waits: no budget is left for it
    assert list(sched.waiting) == [c] and c.block_table == []


@pytest.mark.parametrize(("prompt_len", "shared"), [(8, 1), (9, 2), (10, 2), (11, 2)])
def test_a_choice_waits_for_its_first_choices_prompt_blocks_and_others_go_ahead(prompt_len, shared):
    """The choice waits for the full blocks before its last prompt token (always computed): (prompt_len - 1) // 4
    of them, no more, no fewer."""
    sched = make(8, caching=True)
    prompt = [100 + i for i in range(prompt_len)]
    first, second = seq_of(0, prompt_len, prompt), seq_of(1, prompt_len, prompt, index=1)
    other = seq_of(2, 4)
    sched.add(first)
    sched.add(second, parent=first)
    sched.add(other)
    # 1: the first choice computes the prompt; the second waits, the request behind it goes ahead
    assert step(sched) == [(0, prompt_len), (2, 4)]
    assert list(sched.waiting) == [second]
    # 2: the first choice's full blocks are registered; the second takes the ones it shares and computes the rest
    assert step(sched) == [(0, 1), (2, 1), (1, prompt_len - BS * shared)]
    assert second.block_table[:shared] == first.block_table[:shared] and second.num_cached_tokens == BS * shared
    assert not set(second.block_table[shared:]) & set(first.block_table)
    assert first.num_cached_tokens == other.num_cached_tokens == 0
    queries = prompt_len + 4 + prompt_len  # tokens looked up, and found
    assert (sched.prefix_cache_queries, sched.prefix_cache_hits) == (queries, BS * shared)
    for seq in (first, second, other):
        sched.finish(seq)
    assert not sched.running and not sched.waiting and not sched.parents  # nothing of them is kept
    assert sched.blocks.num_free_blocks == 8


def test_a_waiting_choice_keeps_its_place_ahead_of_later_requests():
    """A choice skipped while its first choice computes the prompt goes back to where it was in the queue: ahead
    of a later request that did not fit, so it joins first once the prompt blocks are cached."""
    sched = make(8, caching=True)
    prompt = [100 + i for i in range(8)]
    first, second = seq_of(0, 8, prompt), seq_of(1, 8, prompt, index=1)
    small, big = seq_of(2, 4), seq_of(3, 24)
    for seq, parent in ((first, None), (second, first), (small, None), (big, None)):
        sched.add(seq, parent=parent)
    # 1: first (blocks 0-1) and small (block 2) run; second waits for first's blocks; big needs 6 blocks, 5 are free
    assert step(sched) == [(0, 8), (2, 4)]
    assert list(sched.waiting) == [second, big]
    # 2: first and small decode (blocks 3 and 4); second takes block 0 and computes its last 4 prompt tokens in
    #    block 5; big (6 blocks) still does not fit the 3 free ones
    assert step(sched) == [(0, 1), (2, 1), (1, 4)]
    assert second.block_table == [0, 5] and list(sched.waiting) == [big]


def test_a_choice_joins_once_its_first_choices_first_prompt_chunk_fills_the_shared_block():
    """A prompt of 8 tokens shares one block (its last token, in block 1, is always computed): a choice joins as
    soon as the first choice has cached block 0, here after a first chunk of 6 tokens, not after its whole prompt."""
    sched = make(8, budget=6, caching=True)
    prompt = [100 + i for i in range(8)]
    first, second = seq_of(0, 8, prompt), seq_of(1, 8, prompt, index=1)
    sched.add(first)
    sched.add(second, parent=first)
    assert step(sched) == [(0, 6)]
    # 2: block 0 is cached: first computes its 2 last prompt tokens, second its 4 tokens after block 0
    assert step(sched) == [(0, 2), (1, 4)]
    assert second.block_table[0] == first.block_table[0] and second.num_cached_tokens == 4


def test_lookahead_slots_are_taken_for_speculative_rounds_only():
    sched = make(8, lookahead=4, has_draft=True)
    a, b = seq_of(0, 1), seq_of(1, 8)
    sched.add(a)
    sched.add(b)
    # a one-token prompt is a prompt pass, not a round: 1 slot, as b's 8 are its prompt's
    assert step(sched) == [(0, 1), (1, 8)]
    assert len(a.block_table) == 1 and len(b.block_table) == 2
    # then both decode: 1 + 1 + 4 = 6 slots (2 blocks) and 8 + 1 + 4 = 13 (4 blocks)
    assert step(sched) == [(0, 1), (1, 1)]
    assert len(a.block_table) == 2 and len(b.block_table) == 4


def test_a_preempted_sequence_finds_its_own_blocks_and_keeps_its_first_cache_report():
    sched = make(4, caching=True)
    a, b = seq_of(0, 8), seq_of(1, 8)
    sched.add(a)
    sched.add(b)
    assert step(sched) == [(0, 8), (1, 8)]  # blocks 0-1 and 2-3
    # 2: both register their 2 full blocks; a's 9th token needs a block: b goes, and a takes b's last block
    #    (cached blocks are freed last to first, and taken least recently freed first)
    assert step(sched) == [(0, 1)]
    assert a.block_table == [0, 1, 3] and b.block_table == [] and sched.num_preemptions == 1
    # 3: b (9 tokens) would find block 2 but needs 2 more, and only block 2 is free
    assert step(sched) == [(0, 1)]
    sched.finish(a)
    assert a.status == SequenceStatus.FINISHED and sched.running == [] and sched.blocks.num_free_blocks == 4
    # 4: b takes block 2 back and computes its 5 other tokens
    assert step(sched) == [(1, 5)]
    assert b.block_table[0] == 2 and b.num_computed_tokens == 9
    assert b.num_cached_tokens == 0  # what it found when it first joined
    # the cache counters count first admissions (vLLM's): b's return found its own block, which is no hit
    assert (sched.prefix_cache_queries, sched.prefix_cache_hits) == (8 + 8, 0)


def test_a_block_filled_exactly_is_shared_from_the_next_step():
    sched = make(8, caching=True)
    a = seq_of(0, 4)
    sched.add(a)
    assert step(sched) == [(0, 4)]  # a's prompt fills block 0 exactly
    b = seq_of(1, 6, a.prompt_token_ids + [1, 2])
    sched.add(b)
    assert step(sched) == [(0, 1), (1, 2)]  # b finds block 0 and computes its 2 other tokens
    assert b.block_table[0] == a.block_table[0] and b.num_cached_tokens == 4


@pytest.mark.parametrize(("prompt_len", "shared"), [(8, 1), (9, 2)])
def test_with_a_draft_the_block_of_the_second_last_token_is_not_shared(prompt_len, shared):
    """The draft's catch-up pass rewrites position num_tokens - 2: after a prompt of 8 tokens (and one sampled)
    that is position 7, in block 1, so only block 0 may be shared; after 9 tokens it is position 8, in block 2."""
    sched = make(8, caching=True, has_draft=True)
    a = seq_of(0, prompt_len)
    sched.add(a)
    assert step(sched) == [(0, prompt_len)]
    b = seq_of(1, 10, a.prompt_token_ids + [1] * (10 - prompt_len))  # its last 2 tokens are left to compute
    sched.add(b)
    assert step(sched) == [(0, 1), (1, 10 - BS * shared)]
    assert b.block_table[:shared] == a.block_table[:shared] and b.num_cached_tokens == BS * shared


def test_the_full_blocks_of_a_finished_sequence_stay_cached():
    sched = make(4, caching=True)
    a = seq_of(0, 5)
    sched.add(a)
    assert step(sched) == [(0, 5)]
    sched.finish(a)  # after one token: its first block was full, and nobody registered it yet
    assert a.status == SequenceStatus.FINISHED and sched.blocks.num_free_blocks == 4
    b = seq_of(1, 6, a.prompt_token_ids[:4] + [1, 2])
    sched.add(b)
    assert step(sched) == [(1, 2)]
    assert b.block_table[0] == 0 and b.num_cached_tokens == 4


def test_by_priority_the_most_urgent_waiting_sequence_starts_first():
    """Priorities 2, 0, 1, 0 (arrival order 0..3), one running at a time, each done after its first token: they
    start 1, 3 (priority 0, by arrival), 2, 0; fcfs starts them by arrival."""
    for by_priority, order in ((True, [1, 3, 2, 0]), (False, [0, 1, 2, 3])):
        sched = make(16, max_num_seqs=1, by_priority=by_priority)
        for i, priority in enumerate([2, 0, 1, 0]):
            sched.add(seq_of(i, 4, priority=priority))
        started = []
        for _ in range(4):
            started += [i for i, n in step(sched) if n == 4]
            sched.finish(sched.running[0])
        assert started == order, by_priority


def test_by_priority_a_more_urgent_later_arrival_is_kept_over_a_running_one():
    """3 blocks of 4: a (priority 1) starts alone and decodes into a second block; b (priority 0) comes a step later
    and takes the last block. Next step b needs a block for its first decode: by priority a, the less urgent
    though it came first, is preempted (fcfs: b, the newest, preempts itself)."""
    for by_priority, kept, waiting in ((True, 1, 0), (False, 0, 1)):
        sched = make(3, by_priority=by_priority)
        a, b = seq_of(0, 4, priority=1), seq_of(1, 4, priority=0)
        sched.add(a)
        assert step(sched) == [(0, 4)]
        sched.add(b)
        assert sorted(step(sched)) == [(0, 1), (1, 4)] and sched.blocks.num_free_blocks == 0
        assert step(sched) == [(kept, 1)] and sched.num_preemptions == 1
        assert [s.seq_id for s in sched.waiting] == [waiting]


def test_by_priority_the_least_urgent_running_sequence_is_preempted_even_if_it_came_first():
    """4 blocks of 4: a (priority 1, first) and b (priority 0) take 2 each; both need a third block to decode. By
    priority b goes first and preempts a; fcfs: a goes first and preempts b (the newest)."""
    for by_priority, kept, waiting in ((True, 1, 0), (False, 0, 1)):
        sched = make(4, by_priority=by_priority)
        a, b = seq_of(0, 8, priority=1), seq_of(1, 8, priority=0)
        sched.add(a)
        sched.add(b)
        assert sorted(step(sched)) == [(0, 8), (1, 8)]
        assert step(sched) == [(kept, 1)] and sched.num_preemptions == 1
        assert [s.seq_id for s in sched.waiting] == [waiting]
