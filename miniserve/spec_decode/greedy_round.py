"""The greedy speculative round, on the device from one packed input.

All rows greedy without penalties: the drafts are argmaxes and acceptance is equality with the target's argmax.
The whole round (the draft's two-token catch-up, k-1 more draft steps, the target's verification, the acceptance
rule of kernels/greedy_accept.py) runs from one packed int64 row per sequence; with CUDA graphs it is a single
replay, and the host waits for the GPU once, for the result. Its outputs include the next round's inputs (the
last two tokens and the length), which is what lets the decoder launch round N+1 before reading round N.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from miniserve.config import EngineConfig
from miniserve.engine.cuda_graphs import BucketedGraphs, block_tables, pack_rows
from miniserve.engine.model_runner import ModelRunner
from miniserve.engine.transfer import to_device
from miniserve.kernels.greedy_accept import greedy_accept_reference, greedy_accept_triton
from miniserve.scheduler.sequence import Sequence
from miniserve.spec_decode.catch_up import catch_up_input, is_uniform

ROUND_COLUMNS = 4  # a greedy round's packed row: the last two tokens, the length, a valid flag, then the block table


@dataclass
class _RoundInputs:
    """A greedy round's packed input, unpacked once (each conversion is a kernel in the round's graph)."""

    tokens: torch.Tensor  # [B, 2] the last two tokens
    valid: torch.Tensor  # [B] bool
    tables: torch.Tensor  # [B, W] int32 block tables
    length: torch.Tensor  # [B] tokens before the round
    positions: torch.Tensor  # [B, k+2] length - 2 .. length + k - 1: where each of the round's passes starts


class GreedyRound:
    def __init__(self, config: EngineConfig, target: ModelRunner, draft: ModelRunner):
        self.config = config
        self.target, self.draft = target, draft
        self.k = config.num_speculative_tokens
        self.device = target.device
        self.graphs: BucketedGraphs | None = None
        self._offsets = torch.arange(-2, self.k, device=self.device)  # a constant: no kernel in the graph
        self._accept = greedy_accept_triton if target.backend == "triton" else greedy_accept_reference

    def capture_graphs(self) -> None:
        """The whole round as one graph per batch bucket, when both models replay graphs."""
        if self.graphs is None and self.target.use_graphs and self.draft.use_graphs:
            max_positions = max(self.target.max_positions, self.draft.max_positions)
            blocks = -(-max_positions // self.config.block_size)
            padding = [0, 0, 2, 0]  # padding rows: tokens 0, length 2 (positions stay >= 0), invalid
            self.graphs = BucketedGraphs(
                self._graph_round,
                ROUND_COLUMNS + blocks,
                padding,
                self.config.max_num_seqs,
                self.device,
                peer=self.target.graph_peer,  # a tensor-parallel target's other ranks replay their share
            )
        if self.graphs is not None:
            self.graphs.capture_all()

    def run(self, seqs: list[Sequence], base_len: list[int], device_columns: torch.Tensor | None):
        """Launch a greedy round: (result [B, k+2] = drafts, accepted count, next token; the target's logits
        [B*(k+1), V], in the model dtype; the next round's first columns [B, 3] = its last two tokens and length).
        With `device_columns` (a previous round's next columns, still on the device) the sequences' last two
        tokens and lengths come from there: up to k+1 tokens beyond what the host knows."""
        k = self.k
        rows = [([*s.token_ids[-2:], n, 1], s.block_array()) for s, n in zip(seqs, base_len)]
        if self.graphs is not None and self.graphs.supports(len(seqs)) and is_uniform(seqs, base_len):
            return self.graphs.run(rows, device_columns)
        packed = to_device(pack_rows(rows), torch.int64, self.device)
        max_len = max(base_len) + k
        if device_columns is not None:
            packed[:, : device_columns.shape[1]] = device_columns
            max_len += k + 1
        inputs = self._unpack(packed)
        if is_uniform(seqs, base_len):
            first = self._draft_catch_up(inputs, max_len)
        else:  # a draft more than two tokens behind (rare): catch up with a packed, non-uniform pass
            first = self.draft.forward([catch_up_input(s) for s in seqs]).argmax(-1)
        return self._propose_and_verify(inputs, first, max_len)

    def _unpack(self, packed: torch.Tensor) -> _RoundInputs:
        length = packed[:, 2]
        return _RoundInputs(
            tokens=packed[:, 0:2],
            valid=packed[:, 3].bool(),
            tables=block_tables(packed, ROUND_COLUMNS),
            length=length,
            positions=length[:, None] + self._offsets,
        )

    def _draft_catch_up(self, x: _RoundInputs, max_len: int) -> torch.Tensor:
        """Draft pass over each row's last two tokens; returns the first draft token [B]."""
        logits = self.draft.run_uniform(x.tokens, x.positions[:, 0], x.tables, max_len, x.valid, False)
        return logits.view(x.tokens.shape[0], 2, -1)[:, 1].argmax(-1)

    def _propose_and_verify(self, x: _RoundInputs, first: torch.Tensor, max_len: int):
        """k-1 more draft steps from `first`, the target's pass over [t, d1..dk], and the greedy acceptance rule."""
        k = self.k
        token, drafted = first, [first]
        for j in range(1, k):
            token = self.draft.run_uniform(token[:, None], x.positions[:, j + 1], x.tables, max_len, x.valid, False)
            token = token.argmax(-1)
            drafted.append(token)
        drafts = torch.stack(drafted, dim=1)  # [B, k]
        verify = torch.cat([x.tokens[:, 1:], drafts], dim=1)  # [B, k+1] at positions length-1 ..
        # in the model dtype: the argmax is the same (the conversion is exact), and a captured round then keeps
        # half the logits' memory and skips a [B*(k+1), V] conversion; _emit converts where logprobs are asked
        logits = self.target.run_uniform(verify, x.positions[:, 1], x.tables, max_len, x.valid, False)
        target = logits.argmax(-1).view(-1, k + 1)
        result, next_columns = self._accept(drafts, target, x.tokens, x.length)
        return result, logits, next_columns

    def _graph_round(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The captured round: worker-sized kernel grids (max positions) so any batch replays the same graph."""
        max_len = max(self.draft.max_positions, self.target.max_positions)
        x = self._unpack(packed)
        return self._propose_and_verify(x, self._draft_catch_up(x, max_len), max_len)
