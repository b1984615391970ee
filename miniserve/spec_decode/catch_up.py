"""What the draft must see before it proposes: the tokens it has not cached yet.

Before a round a sequence has L tokens and the draft has cached the first L-1 or L-2 of them (L-2 after a
round that accepted all k drafts, L-1 after one that rejected a draft; see decoder.py). In that state every row
feeds the draft its last two tokens (recomputing a cached token rewrites its K/V at the same slot), which makes
the catch-up a uniform two-token pass that CUDA graphs can replay. A draft further behind (rare: after a
preemption) catches up with a packed pass over everything it misses.
"""

from __future__ import annotations

from miniserve.engine.model_runner import ForwardInput
from miniserve.scheduler.sequence import Sequence


def is_uniform(seqs: list[Sequence], base_len: list[int]) -> bool:
    """The draft lags by one or two tokens everywhere: the last two tokens catch every row up."""
    return all(n - s.num_draft_computed_tokens <= 2 for s, n in zip(seqs, base_len))


def catch_up_input(seq: Sequence) -> ForwardInput:
    """The tokens the draft has not cached yet; logits for the last one (the first draft token)."""
    cached = seq.num_draft_computed_tokens
    return ForwardInput(seq.token_ids[cached:], cached, seq.block_table, 1)
