"""Speculative decoding: the draft model proposes k tokens per sequence, the target verifies all k+1 positions in
one forward pass, and rejection sampling keeps the output distribution exactly the target's.

`SpeculativeDecoder` implements the engine's `Decoder` interface (engine/decoder.py). It is handed what it uses,
the two model runners, a plain decoder for prompt passes, the output processor and the scheduler, and never sees
the engine itself. Greedy rounds run on the device (greedy_round.py), sampled rounds with rejection sampling
(sampled_round.py).

KV bookkeeping is by counters, not copies. Before a round a sequence has L tokens; the last one is not yet in
either cache. The draft runs k steps (caching t, d1..d_{k-1}), the target runs one forward pass over
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

import torch

from miniserve.config import EngineConfig
from miniserve.engine.decoder import PlainDecoder
from miniserve.engine.model_runner import ForwardInput, ModelRunner
from miniserve.engine.output_processor import OutputProcessor
from miniserve.engine.sampler import token_ranks
from miniserve.engine.transfer import to_host_async
from miniserve.scheduler.scheduler import ScheduledSeq, Scheduler
from miniserve.scheduler.sequence import Sequence
from miniserve.spec_decode.catch_up import is_uniform
from miniserve.spec_decode.greedy_round import GreedyRound
from miniserve.spec_decode.sampled_round import SampledRound


def _is_decode(s: ScheduledSeq) -> bool:
    """The one token sampled last: a speculative round's input. A prompt's last token is not, even when it comes
    alone (a one-token prompt, or the last chunk of one the token budget cut): the prompt pass samples the first
    token, whatever the chunks, so a seed draws in the same order in any batch; and every speculated sequence has
    the two last tokens a round feeds the draft."""
    return s.num_new_tokens == 1 and s.completes_prompt and s.seq.num_output_tokens > 0


def _is_plain_greedy(seq: Sequence) -> bool:
    """Greedy with nothing reshaping the logits (penalties, a min_tokens mask): the raw argmax decides."""
    p = seq.params
    return p.greedy and not p.reshapes_logits and seq.num_output_tokens >= p.min_tokens


@dataclass
class _InFlight:
    """A greedy round launched but not read yet."""

    seqs: list[Sequence]
    result: torch.Tensor  # [B, k+2] drafts, accepted count, next token: on its way to (pinned) host memory
    copied: torch.cuda.Event | None  # recorded after that copy (None on the CPU, where it is done)
    next_columns: torch.Tensor  # [B, 3] on the device: the next round's last two tokens and length


class SpeculativeDecoder:
    def __init__(
        self,
        config: EngineConfig,
        target: ModelRunner,
        draft: ModelRunner,
        plain: PlainDecoder,
        outputs: OutputProcessor,
        scheduler: Scheduler,
        max_model_len: int,
    ):
        self.target, self.draft, self.plain, self.outputs = target, draft, plain, outputs
        self.scheduler = scheduler
        self.max_model_len = max_model_len
        self.k = config.num_speculative_tokens
        self.greedy = GreedyRound(config, target, draft)
        self.sampled = SampledRound(target, draft, self.k, plain.sampling_batch)
        self.overlap = config.overlap_spec_rounds
        self.in_flight: _InFlight | None = None
        self.num_launched_rounds = 0  # overlapped greedy rounds launched
        self.scored_rows = 0  # sequences' rounds the target has scored (launched)
        self.last_computed = 0
        self.num_overlapped_rounds = 0  # of which launched before their predecessor was read
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted = 0
        self.accepted_per_position = [0] * self.k

    def capture_graphs(self) -> None:
        """The target's decode steps and (k+1)-token verification, the draft's decode steps and two-token
        catch-up (sampled rounds), both models' prompt passes, and the whole greedy round."""
        self.target.capture_graphs([1, self.k + 1])
        self.draft.capture_graphs([1, 2])
        for runner in (self.target, self.draft):
            runner.capture_prefill_graphs()
        self.greedy.capture_graphs()

    def disable_graphs(self) -> None:
        self.target.disable_graphs()
        self.draft.disable_graphs()
        self.greedy.graphs = None

    def stats(self) -> dict:
        return {
            "spec_num_drafts": self.num_drafts,
            "spec_num_draft_tokens": self.num_draft_tokens,
            "spec_num_accepted_tokens": self.num_accepted,
            "spec_accepted_per_position": list(self.accepted_per_position),
        }

    @torch.inference_mode()
    def step(self, scheduled: list[ScheduledSeq]) -> list[Sequence]:
        """Run one step; returns the sequences that gained tokens (a round left in flight gains them later). The
        target computes the prompt chunks' tokens and k + 1 for each round it scores (the token before the drafts
        and the drafts): rounds launched, not read (one left unlaunched by `_continue` computes nothing)."""
        rows, self.last_computed = self.scored_rows, 0
        progressed = self._step(scheduled)
        self.last_computed += (self.k + 1) * (self.scored_rows - rows)
        return progressed

    def _step(self, scheduled: list[ScheduledSeq]) -> list[Sequence]:
        if self.in_flight is not None:
            seqs = [s.seq for s in scheduled]
            if seqs != self.in_flight.seqs or not all(_is_decode(s) for s in scheduled):
                raise RuntimeError("a round is in flight for another batch: the engine must drain it first")
            return self._continue(seqs)
        # sequences that are not `speculative` (a grammar's) decode one token a step, like a prompt chunk
        drafted = [_is_decode(s) and s.seq.params.speculative for s in scheduled]
        decodes = [s.seq for s, d in zip(scheduled, drafted) if d]
        prefills = [s for s, d in zip(scheduled, drafted) if not d]
        if prefills:
            self._prefill(prefills)
        progressed = [s.seq for s in prefills]
        if decodes:
            progressed += self._speculate(decodes)
        return progressed

    def _prefill(self, scheduled: list[ScheduledSeq]) -> None:
        """Prompt chunks run through both models so the draft's cache stays in step with the target's."""
        draft_inputs = []
        for s in scheduled:
            seq = s.seq
            end = seq.num_computed_tokens + s.num_new_tokens
            cached = seq.num_draft_computed_tokens
            draft_inputs.append(ForwardInput(seq.token_ids[cached:end], cached, seq.block_table, 0))
        self.draft.forward(draft_inputs)
        for s in scheduled:
            s.seq.num_draft_computed_tokens = s.seq.num_computed_tokens + s.num_new_tokens
        self.plain.step(scheduled)
        self.last_computed += self.plain.last_computed

    def _speculate(self, seqs: list[Sequence]) -> list[Sequence]:
        base_len = [s.num_tokens for s in seqs]
        if all(_is_plain_greedy(s) for s in seqs):
            if self._overlappable(seqs, base_len):
                self.in_flight = self._launch(seqs, base_len, None)
                return []
            result, logits, _ = self.greedy.run(seqs, base_len, None)
            self.scored_rows += len(seqs)
            result = result.tolist()  # the one host sync of the round
            k = self.k
            drafts, accepted, next_tokens = [r[:k] for r in result], [r[k] for r in result], [r[k + 1] for r in result]
        else:
            drafts, accepted, next_tokens, logits = self.sampled.run(seqs, base_len)
            self.scored_rows += len(seqs)
        self._emit(seqs, drafts, accepted, next_tokens, logits, base_len)
        return seqs

    # ---------------------------------------------------------------- overlapped greedy rounds

    def _overlappable(self, seqs: list[Sequence], base_len: list[int]) -> bool:
        """Overlap needs rounds that start from the device alone: uniform, and no logprobs (the logits of a
        round are overwritten by the next)."""
        return self.overlap and is_uniform(seqs, base_len) and all(s.params.logprobs is None for s in seqs)

    def continue_in_flight(self) -> list[Sequence] | None:
        """Rounds in flight continue through the scheduler (it reserves their lookahead slots): never here."""
        return None

    def flush(self) -> list[Sequence]:
        """Drain the round in flight unless the next step continues exactly its batch."""
        if self.in_flight is None or self._can_continue():
            return []
        return self.drain()

    def _can_continue(self) -> bool:
        """The next step would schedule exactly the round in flight's sequences, all decoding, with no
        preemption: then the next round can start from the device before this one is read."""
        f, sch = self.in_flight, self.scheduler
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
        return seq.num_tokens + ahead >= self.max_model_len

    def _launch(self, seqs: list[Sequence], base_len: list[int], device_columns: torch.Tensor | None) -> _InFlight:
        self.num_launched_rounds += 1
        self.scored_rows += len(seqs)
        result, _, next_columns = self.greedy.run(seqs, base_len, device_columns)
        if result.is_cuda:
            host = to_host_async(result)
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
        self._emit(seqs, drafts, accepted, next_tokens, None, [s.num_tokens for s in seqs])
        return seqs

    # ---------------------------------------------------------------- emitting a round

    def _emit(self, seqs, drafts, accepted, next_tokens, logits, base_len) -> None:
        """Emit accepted drafts plus the next token; logprobs come from the target's raw logits (in float32: a
        greedy round's are in the model dtype)."""
        k = self.k
        wants_logprobs = any(s.params.logprobs is not None for s in seqs)
        logprobs_all = torch.log_softmax(logits.float(), dim=-1) if wants_logprobs else None
        for i, seq in enumerate(seqs):
            a = accepted[i]
            seq.num_computed_tokens = base_len[i] + a
            seq.num_draft_computed_tokens = base_len[i] + min(a, k - 1)
            self._count(seq, a)
            for j, token in enumerate(drafts[i][:a] + [next_tokens[i]]):
                lp, top, rank = None, None, None
                if seq.params.logprobs is not None:
                    lp, top, rank = _logprobs(logprobs_all[i * (k + 1) + j], token, seq.params.logprobs)
                self.outputs.append_token(seq, token, lp, top, rank)
                if seq.is_finished:
                    break

    def _count(self, seq: Sequence, accepted: int) -> None:
        seq.num_spec_drafts += 1
        seq.num_spec_draft_tokens += self.k
        seq.num_spec_accepted_tokens += accepted
        self.num_drafts += 1
        self.num_draft_tokens += self.k
        self.num_accepted += accepted
        for j in range(accepted):
            self.accepted_per_position[j] += 1


def _logprobs(row: torch.Tensor, token: int, n: int) -> tuple[float, dict[int, float] | None, int]:
    """The token's logprob in `row` (log_softmax of the target's logits), the row's top `n` (None for 0), and the
    token's rank (how many tokens are at least as likely)."""
    top = None
    if n:
        values, ids = row.topk(n)
        top = dict(zip(ids.tolist(), values.tolist()))
    return float(row[token]), top, int(token_ranks(row[None], row[token].view(1, 1)))
