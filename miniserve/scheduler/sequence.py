"""A Sequence is one stream of tokens being generated: a request with `n` choices owns `n` of them.

It lives in scheduler/ because the scheduler is the lowest layer that works on it (its status, its lengths, its
block table); the engine and speculative decoding above append tokens to it and read its outputs. So every import
of it points down. Its `params` are the request's SamplingParams (miniserve/sampling_params.py, a leaf module).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from miniserve.sampling_params import SamplingParams


class AppendedArray:
    """A growing int list's int64 numpy copy, synced by copying what the list gained since the last read (a
    sequence's tokens and its block table are only ever appended to, until its blocks are freed: `reset`): the
    sampler reads a penalized sequence's whole history, and a decode step every sequence's block table, every step,
    and converting the list each time cost Python work in proportion to its length, per row, per step."""

    def __init__(self) -> None:
        self._buf = np.empty(0, dtype=np.int64)
        self._len = 0

    def reset(self) -> None:
        """The list was emptied: copy it all at the next read, into a new buffer (views already handed out keep
        their values)."""
        self._buf = np.empty(0, dtype=np.int64)
        self._len = 0

    def synced(self, values: list[int]) -> np.ndarray:
        """The list as an array: a view whose values never change (later appends go past it or to a new buffer)."""
        n = len(values)
        if n == self._len:  # (a block table, most steps)
            return self._buf[:n]
        if n < self._len:  # (never by appending; then copy it all again)
            self.reset()
        if n > len(self._buf):
            grown = np.empty(max(n, 2 * len(self._buf), 64), dtype=np.int64)
            grown[: self._len] = self._buf[: self._len]
            self._buf = grown
        self._buf[self._len : n] = values[self._len : n]
        self._len = n
        return self._buf[:n]


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int  # choice index within its request
    prompt_token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    priority: int = 0  # lower runs first under scheduling_policy "priority" (then the lower seq_id: arrival)
    token_ids: list[int] = field(default_factory=list)  # prompt + generated
    num_computed_tokens: int = 0  # tokens whose K/V sit in the target's cache
    num_draft_computed_tokens: int = 0  # tokens whose K/V sit in the draft's cache (speculative decoding)
    block_table: list[int] = field(default_factory=list)  # only appended to, or emptied by clear_block_table
    block_keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of its full blocks (BlockManager)
    num_cached_blocks: int = 0  # leading blocks of block_table registered in the prefix cache
    num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache when first scheduled
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text: str = ""
    logprobs: list[dict[int, float]] | None = None
    logprob_ranks: list[int] | None = None  # each sampled token's rank in its distribution (1 = most likely)
    prompt_logprobs: list[dict[int, float] | None] | None = None  # per prompt token; the first has none
    prompt_logprob_ranks: list[int | None] | None = None
    cumulative_logprob: float = 0.0
    stop_state: int = 0  # where the request's stop-string matcher stands after this sequence's text
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    first_scheduled_time: float | None = None  # when it first ran (queue time = this - arrival_time)
    finished_time: float | None = None
    grammar: Any = None  # a GrammarState (engine/structured_output.py) when the request has structured outputs
    num_spec_drafts: int = 0
    num_spec_draft_tokens: int = 0
    num_spec_accepted_tokens: int = 0
    _token_array: AppendedArray = field(default_factory=AppendedArray, repr=False)
    _block_array: AppendedArray = field(default_factory=AppendedArray, repr=False)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        if self.params.logprobs is not None:
            self.logprobs, self.logprob_ranks = [], []
        if self.params.prompt_logprobs is not None and self.index == 0:  # choices share one prompt
            self.prompt_logprobs, self.prompt_logprob_ranks = [None], [None]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    def token_array(self) -> np.ndarray:
        """token_ids as an int64 numpy array (AppendedArray.synced's view): prompt, then output."""
        return self._token_array.synced(self.token_ids)

    def block_array(self) -> np.ndarray:
        """block_table as an int64 numpy array (AppendedArray.synced's view): what a decode step packs for every
        sequence (engine/cuda_graphs.py: pack_rows), copied whole rather than converted from the list."""
        return self._block_array.synced(self.block_table)

    def clear_block_table(self) -> None:
        """Empty the block table (its blocks were freed), and its array, which otherwise assumes the table only
        grows: refilled to its old length before the next read, it would keep its old blocks."""
        self.block_table.clear()
        self._block_array.reset()

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def scores_prompt(self) -> bool:
        """Prompt logprobs were asked for and some prompt tokens are not scored yet."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED
