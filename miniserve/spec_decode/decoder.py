"""Speculative decoding: the draft worker proposes k tokens per sequence, the target verifies all k+1 positions
in one forward pass, and rejection sampling keeps the output distribution exactly the target's.

KV bookkeeping is by counters, not copies. Before a round a sequence has L tokens; the last one is not yet in
either cache. The draft runs k steps (caching t, d1..d_{k-1}), the target runs one extend pass over
[t, d1..dk]. If `a` drafts are accepted, the sequence gains a+1 tokens; the target cache is valid for the first
L+a tokens and the draft cache for the first L+min(a, k-1). Slots past those counters hold rejected tokens:
they are simply overwritten by the next writes (rollback), and the blocks stay with the sequence.

Overlapped greedy rounds: a greedy round's outputs include the next round's inputs (the last two tokens and the
length), so round N+1 can be launched from them on the device before the host has read round N. The host then
emits round N's tokens (detokenizing, stop checks, outputs) while the GPU runs round N+1. When the batch changes
(a sequence finished, a request arrived, blocks ran short) the round in flight is drained first: its rows of
finished sequences are dropped, the rest emitted. The next round writes up to 2k+1 slots past a sequence's known
length, which the scheduler reserves (EngineConfig.kv_lookahead).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from miniserve.engine.cuda_graphs import BucketedGraphs
from miniserve.engine.model_runner import ForwardInput
from miniserve.engine.sampler import SamplingBatch, random_uniform, sample_from_probs
from miniserve.engine.sampler import probs as processed_probs
from miniserve.engine.sequence import Sequence
from miniserve.engine.transfer import to_device
from miniserve.kernels.greedy_accept import greedy_accept_reference, greedy_accept_triton
from miniserve.scheduler.scheduler import ScheduledSeq

if TYPE_CHECKING:
    from miniserve.engine.llm_engine import LLMEngine


def rejection_sample(
    target_probs: torch.Tensor,  # [B, k+1, V] target distribution at each verified position
    draft_probs: torch.Tensor,  # [B, k, V] draft distribution each draft token was drawn from
    draft_tokens: torch.Tensor,  # [B, k]
    uniforms: torch.Tensor,  # [B, k] U(0,1) for the accept tests
    residual_draw,  # callable(probs [B, V]) -> tokens [B], drawing with each row's own generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard speculative sampling (Leviathan et al. / Chen et al.).

    Draft token d_j is accepted with probability min(1, p_j(d_j) / q_j(d_j)); at the first rejection the
    replacement is drawn from normalize(max(0, p_j - q_j)); if all k are accepted a bonus token is drawn from
    p_k. Returns (num_accepted [B], next_token [B]) where next_token is the replacement or the bonus.
    Greedy rows work unchanged: their p and q are one-hot, so acceptance means equality with the target argmax.
    """
    B, k = draft_tokens.shape
    p_at = target_probs[:, :k].gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)
    q_at = draft_probs.gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)
    accept = uniforms * q_at < p_at  # u < p/q without dividing by a zero q
    rejected = ~accept
    first_reject = torch.where(rejected.any(-1), rejected.float().argmax(-1), torch.full_like(draft_tokens[:, 0], k))
    rows = torch.arange(B, device=draft_tokens.device)
    p_next = target_probs[rows, first_reject]  # [B, V]
    q_next = torch.cat([draft_probs, torch.zeros_like(draft_probs[:, :1])], dim=1)[rows, first_reject]
    residual = (p_next - q_next).clamp_min(0.0)
    mass = residual.sum(-1, keepdim=True)
    # All accepted -> q_next is zero -> residual = p_k (the bonus). A rejection implies mass > 0 in exact
    # arithmetic; fall back to p if rounding left nothing.
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p_next)
    return first_reject, residual_draw(residual)


def _history(seq: Sequence, drafted: list[int]) -> list[int]:
    """The output a sampling row sees: the sequence's tokens plus the drafts before it (only if it reads them)."""
    return seq.output_token_ids + drafted if seq.params.needs_history else []


def _is_decode(s: ScheduledSeq) -> bool:
    """One new token after at least one cached one. (A one-token prompt also brings one token, but has no token
    before it: it is prefilled, so every speculated sequence has the two last tokens a round feeds the draft.)"""
    return s.num_new_tokens == 1 and s.completes_prompt and s.seq.num_tokens >= 2


def _is_plain_greedy(seq: Sequence) -> bool:
    """Greedy with nothing reshaping the logits (penalties, a min_tokens mask): the raw argmax decides."""
    p = seq.params
    return p.greedy and not p.penalized and seq.num_output_tokens >= p.min_tokens


ROUND_COLUMNS = 4  # a greedy round's packed row: the last two tokens, the length, a valid flag, then the block table


def _pad(rows: list[list[int]]) -> list[list[int]]:
    width = max(len(r) for r in rows)
    return [r + [0] * (width - len(r)) for r in rows]


def _catch_up_input(seq: Sequence) -> ForwardInput:
    """The tokens the draft has not cached yet; logits for the last one (the first draft token)."""
    cached = seq.num_draft_computed_tokens
    return ForwardInput(seq.token_ids[cached:], cached, seq.block_table, 1)


@dataclass
class _RoundInputs:
    """A greedy round's packed input, unpacked once (each conversion is a kernel in the round's graph)."""

    tokens: torch.Tensor  # [B, 2] the last two tokens
    valid: torch.Tensor  # [B] bool
    tables: torch.Tensor  # [B, W] int32 block tables
    length: torch.Tensor  # [B] tokens before the round
    positions: torch.Tensor  # [B, k+2] length - 2 .. length + k - 1: where each of the round's passes starts


@dataclass
class _InFlight:
    """A greedy round launched but not read yet."""

    seqs: list[Sequence]
    result: torch.Tensor  # [B, k+2] drafts, accepted count, next token: on its way to (pinned) host memory
    copied: torch.cuda.Event | None  # recorded after that copy (None on the CPU, where it is done)
    next_columns: torch.Tensor  # [B, 3] on the device: the next round's last two tokens and length


class SpeculativeDecoder:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.k = engine.config.num_speculative_tokens
        self.graphs: BucketedGraphs | None = None
        if engine.target.use_graphs and engine.draft.use_graphs:
            blocks = -(-max(engine.target.max_positions, engine.draft.max_positions) // engine.config.block_size)
            # padding rows: tokens 0, length 2 (positions stay >= 0), invalid
            padding = [0, 0, 2, 0]
            self.graphs = BucketedGraphs(
                self._graph_round, ROUND_COLUMNS + blocks, padding, engine.config.max_num_seqs, engine.device
            )
        self._offsets = torch.arange(-2, self.k, device=engine.device)  # a constant: no kernel in the graph
        self._accept = greedy_accept_triton if engine.target.backend == "triton" else greedy_accept_reference
        self.overlap = engine.config.overlap_spec_rounds
        self.in_flight: _InFlight | None = None
        self.num_launched_rounds = 0  # overlapped greedy rounds launched
        self.num_overlapped_rounds = 0  # of which launched before their predecessor was read
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted = 0
        self.accepted_per_position = [0] * self.k

    def stats(self) -> dict:
        return {
            "spec_num_drafts": self.num_drafts,
            "spec_num_draft_tokens": self.num_draft_tokens,
            "spec_num_accepted_tokens": self.num_accepted,
            "spec_accepted_per_position": list(self.accepted_per_position),
        }

    @torch.inference_mode()
    def step(self, scheduled: list[ScheduledSeq]) -> list[Sequence]:
        """Run one step; returns the sequences that gained tokens (a round left in flight gains them later)."""
        if self.in_flight is not None:
            seqs = [s.seq for s in scheduled]
            if seqs != self.in_flight.seqs or not all(_is_decode(s) for s in scheduled):
                raise RuntimeError("a round is in flight for another batch: the engine must drain it first")
            return self._continue(seqs)
        decodes = [s.seq for s in scheduled if _is_decode(s)]
        prefills = [s for s in scheduled if not _is_decode(s)]
        if prefills:
            self._prefill(prefills)
        progressed = [s.seq for s in prefills]
        if decodes:
            progressed += self._speculate(decodes)
        return progressed

    def can_continue(self) -> bool:
        """The next step would schedule exactly the round in flight's sequences, all decoding, with no
        preemption: then the next round can start from the device before this one is read."""
        f, sch = self.in_flight, self.engine.scheduler
        if f is None or sch.waiting or sch.running != f.seqs or len(f.seqs) > sch.max_num_batched_tokens:
            return False
        blocks = sch.blocks
        missing = sum(blocks.num_missing_blocks(s, s.num_tokens + sch.lookahead) for s in f.seqs)
        return missing <= blocks.num_free_blocks

    @torch.inference_mode()
    def drain(self) -> list[Sequence]:
        """Read the round in flight and emit its tokens; rows of finished sequences are dropped (no wait at all
        when every sequence has finished)."""
        f, self.in_flight = self.in_flight, None
        if f is None or all(s.is_finished for s in f.seqs):
            return []
        return self._read(f)

    def _continue(self, seqs: list[Sequence]) -> list[Sequence]:
        """Launch round N+1 from round N's device outputs, then read round N while the GPU runs N+1."""
        previous = self.in_flight
        if all(self._may_finish_in_flight(s) for s in seqs):  # round N+1 would likely go unread: wait for N
            self.in_flight = None
            return self._read(previous)
        self.in_flight = self._launch(seqs, [s.num_tokens for s in seqs], previous.next_columns)
        self.num_overlapped_rounds += 1
        progressed = self._read(previous)
        if all(s.is_finished for s in seqs):  # round N finished them all: nobody reads N+1 (the GPU may finish it)
            self.in_flight = None
        return progressed

    def _may_finish_in_flight(self, seq: Sequence) -> bool:
        """The round in flight (up to k+1 tokens) may end the sequence by length. Then the next round is not
        launched blind: a round launched for a finished sequence is GPU time nobody reads, where one launched
        after reading costs only this round's overlap."""
        max_tokens, ahead = seq.params.max_tokens, self.k + 1
        if max_tokens is not None and seq.num_output_tokens + ahead >= max_tokens:
            return True
        return seq.num_tokens + ahead >= self.engine.max_model_len

    def _launch(self, seqs: list[Sequence], base_len: list[int], device_columns: torch.Tensor | None) -> _InFlight:
        self.num_launched_rounds += 1
        result, _, next_columns = self._run_greedy(seqs, base_len, device_columns)
        if result.is_cuda:
            host = torch.empty(result.shape, dtype=result.dtype, pin_memory=True)
            host.copy_(result, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        else:  # a copy all the same: a graph's next replay overwrites its result
            host, copied = result.clone(), None
        # a graph's next_columns are overwritten by its next replay, which is also the next launch: that launch
        # copies them into its input first (in stream order), so they need no copy of their own
        return _InFlight(seqs, host, copied, next_columns)

    def _read(self, f: _InFlight) -> list[Sequence]:
        if f.copied is not None:
            f.copied.synchronize()
        rows = [(s, r) for s, r in zip(f.seqs, f.result.tolist()) if not s.is_finished]
        seqs = [s for s, _ in rows]
        k = self.k
        drafts, accepted, next_tokens = [r[:k] for _, r in rows], [r[k] for _, r in rows], [r[k + 1] for _, r in rows]
        self._append(seqs, drafts, accepted, next_tokens, None, [s.num_tokens for s in seqs])
        return seqs

    def _prefill(self, scheduled: list[ScheduledSeq]) -> None:
        """Prompt chunks run through both workers so the draft's cache stays in step with the target's."""
        eng = self.engine
        draft_inputs = []
        for s in scheduled:
            seq = s.seq
            end = seq.num_computed_tokens + s.num_new_tokens
            draft_inputs.append(
                ForwardInput(
                    seq.token_ids[seq.num_draft_computed_tokens : end],
                    seq.num_draft_computed_tokens,
                    seq.block_table,
                    0,
                )
            )
        eng.draft.forward(draft_inputs)
        for s in scheduled:
            s.seq.num_draft_computed_tokens = s.seq.num_computed_tokens + s.num_new_tokens
        eng._plain_step(scheduled)

    def _speculate(self, seqs: list[Sequence]) -> list[Sequence]:
        base_len = [s.num_tokens for s in seqs]
        if all(_is_plain_greedy(s) for s in seqs):
            if self._overlappable(seqs, base_len):
                self.in_flight = self._launch(seqs, base_len, None)
                return []
            drafts, accepted, next_tokens, logits = self._greedy_round(seqs, base_len)
        else:
            drafts, accepted, next_tokens, logits = self._sampled_round(seqs, base_len)
        self._append(seqs, drafts, accepted, next_tokens, logits, base_len)
        return seqs

    def _overlappable(self, seqs: list[Sequence], base_len: list[int]) -> bool:
        """Overlap needs rounds that start from the device alone: uniform, and no logprobs (the logits of a
        round are overwritten by the next)."""
        return self.overlap and self._uniform(seqs, base_len) and all(s.params.logprobs is None for s in seqs)

    def _greedy_round(self, seqs: list[Sequence], base_len: list[int]):
        """All rows greedy without penalties: argmax drafts, and acceptance is equality with the target's argmax.

        The whole round (draft catch-up, k-1 more draft steps, verification, acceptance) runs on the device from one
        packed input; with CUDA graphs it is a single replay, and the host waits for the GPU once, for the result.
        """
        k = self.k
        result, logits, _ = self._run_greedy(seqs, base_len, None)
        result = result.tolist()  # the one host sync of the round
        return [r[:k] for r in result], [r[k] for r in result], [r[k + 1] for r in result], logits

    def _run_greedy(self, seqs: list[Sequence], base_len: list[int], device_columns: torch.Tensor | None):
        """Launch a greedy round: (result [B, k+2], target logits, next round's first columns [B, 3]).
        With `device_columns` (a previous round's next columns, still on the device) the sequences' last two
        tokens and lengths come from there: up to k+1 tokens beyond what the host knows."""
        k = self.k
        rows = [[*s.token_ids[-2:], n, 1, *s.block_table] for s, n in zip(seqs, base_len)]
        if self.graphs is not None and self.graphs.supports(len(seqs)) and self._uniform(seqs, base_len):
            return self.graphs.run(rows, device_columns)
        packed = to_device(_pad(rows), torch.int64, self.engine.device)
        max_len = max(base_len) + k
        if device_columns is not None:
            packed[:, : device_columns.shape[1]] = device_columns
            max_len += k + 1
        inputs = self._unpack(packed)
        if self._uniform(seqs, base_len):
            first = self._draft_catch_up(inputs, max_len)
        else:  # a draft more than two tokens behind (rare): catch up with a packed, non-uniform pass
            first = self.engine.draft.forward([_catch_up_input(s) for s in seqs]).argmax(-1)
        return self._propose_and_verify(inputs, first, max_len)

    def _unpack(self, packed: torch.Tensor) -> _RoundInputs:
        length = packed[:, 2]
        return _RoundInputs(
            tokens=packed[:, 0:2],
            valid=packed[:, 3].bool(),
            tables=packed[:, ROUND_COLUMNS:].to(torch.int32),
            length=length,
            positions=length[:, None] + self._offsets,
        )

    @staticmethod
    def _uniform(seqs: list[Sequence], base_len: list[int]) -> bool:
        """The draft lags by one or two tokens everywhere (the steady state): feeding the last two tokens for
        everyone (recomputing a cached token rewrites its K/V at the same slot) makes the catch-up uniform."""
        return all(n - s.num_draft_computed_tokens <= 2 for s, n in zip(seqs, base_len))

    def _draft_catch_up(self, x: _RoundInputs, max_len: int) -> torch.Tensor:
        """Draft pass over each row's last two tokens; returns the first draft token [B]."""
        logits = self.engine.draft.run_uniform(x.tokens, x.positions[:, 0], x.tables, max_len, x.valid, False)
        return logits.view(x.tokens.shape[0], 2, -1)[:, 1].argmax(-1)

    def _propose_and_verify(self, x: _RoundInputs, first: torch.Tensor, max_len: int):
        """k-1 more draft steps from `first`, the target's pass over [t, d1..dk], and the greedy acceptance rule
        (kernels/greedy_accept.py). Returns ([B, k+2] = drafts, accepted count, next token; the target's logits
        [B*(k+1), V]; the next round's first columns [B, 3] = its last two tokens and length)."""
        eng, k = self.engine, self.k
        token, drafted = first, [first]
        for j in range(1, k):
            token = eng.draft.run_uniform(token[:, None], x.positions[:, j + 1], x.tables, max_len, x.valid, False)
            token = token.argmax(-1)
            drafted.append(token)
        drafts = torch.stack(drafted, dim=1)  # [B, k]
        verify = torch.cat([x.tokens[:, 1:], drafts], dim=1)  # [B, k+1] at positions length-1 ..
        logits = eng.target.run_uniform(verify, x.positions[:, 1], x.tables, max_len, x.valid)
        target = logits.argmax(-1).view(-1, k + 1)
        result, next_columns = self._accept(drafts, target, x.tokens, x.length)
        return result, logits, next_columns

    def _graph_round(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The captured round: worker-sized kernel grids (max positions) so any batch replays the same graph."""
        max_len = max(self.engine.draft.max_positions, self.engine.target.max_positions)
        x = self._unpack(packed)
        return self._propose_and_verify(x, self._draft_catch_up(x, max_len), max_len)

    def _sampled_round(self, seqs: list[Sequence], base_len: list[int]):
        """The general round: per-request sampling settings, draft distributions kept for rejection sampling."""
        eng, k = self.engine, self.k
        # 1. the draft catches up on tokens it has not seen and proposes k tokens, one decode step each
        drafts: list[list[int]] = [[] for _ in seqs]
        draft_probs = []
        if self._uniform(seqs, base_len):  # the last two tokens for everyone: a captured two-token pass
            inputs = [ForwardInput(s.token_ids[-2:], n - 2, s.block_table, 1) for s, n in zip(seqs, base_len)]
        else:
            inputs = [_catch_up_input(s) for s in seqs]
        # without penalties no row reads its history: one sampling batch serves every draft step
        fixed: SamplingBatch | None = None if any(s.params.needs_history for s in seqs) else eng.sampling_batch(seqs)
        for j in range(k):
            logits = eng.draft.forward(inputs)
            batch = fixed
            if batch is None:
                batch = eng.sampling_batch(seqs, [_history(s, d) for s, d in zip(seqs, drafts)])
            q = processed_probs(logits, batch)
            tokens = sample_from_probs(q, batch).tolist()
            draft_probs.append(q)
            for i in range(len(seqs)):
                drafts[i].append(tokens[i])
            inputs = [ForwardInput([tokens[i]], base_len[i] + j, s.block_table, 1) for i, s in enumerate(seqs)]
        # 2. the target scores [t, d1..dk] for every sequence in one extend pass
        verify = [
            ForwardInput([s.token_ids[-1]] + d, s.num_tokens - 1, s.block_table, k + 1) for s, d in zip(seqs, drafts)
        ]
        logits = eng.target.forward(verify)  # [B*(k+1), V]
        rows_seqs = [s for s in seqs for _ in range(k + 1)]
        histories = [_history(s, d[:j]) for s, d in zip(seqs, drafts) for j in range(k + 1)]
        p = processed_probs(logits, eng.sampling_batch(rows_seqs, histories)).view(len(seqs), k + 1, -1)
        seq_batch = eng.sampling_batch(seqs)
        draft_tokens = to_device(drafts, torch.int64, logits.device)
        uniforms = random_uniform(seq_batch, (k,))
        accepted, next_tokens = rejection_sample(
            p, torch.stack(draft_probs, dim=1), draft_tokens, uniforms, lambda r: sample_from_probs(r, seq_batch)
        )
        return drafts, accepted.tolist(), next_tokens.tolist(), logits

    def _append(self, seqs, drafts, accepted, next_tokens, logits, base_len) -> None:
        """Emit accepted drafts plus the next token; logprobs come from the target's raw logits."""
        eng, k = self.engine, self.k
        wants_logprobs = any(s.params.logprobs is not None for s in seqs)
        logprobs_all = torch.log_softmax(logits, dim=-1) if wants_logprobs else None
        for i, seq in enumerate(seqs):
            a = accepted[i]
            emitted = drafts[i][:a] + [next_tokens[i]]
            seq.num_computed_tokens = base_len[i] + a
            seq.num_draft_computed_tokens = base_len[i] + min(a, k - 1)
            seq.num_spec_drafts += 1
            seq.num_spec_draft_tokens += k
            seq.num_spec_accepted_tokens += a
            self.num_drafts += 1
            self.num_draft_tokens += k
            self.num_accepted += a
            for j in range(a):
                self.accepted_per_position[j] += 1
            for j, token in enumerate(emitted):
                row = i * (k + 1) + j
                lp, top = None, None
                if seq.params.logprobs is not None:
                    lp = float(logprobs_all[row, token])
                    n = seq.params.logprobs
                    if n:
                        values, ids = logprobs_all[row].topk(n)
                        top = dict(zip(ids.tolist(), values.tolist()))
                eng.append_token(seq, token, lp, top)
                if seq.is_finished:
                    break
