"""How one step turns scheduled sequences into tokens: the `Decoder` interface and the plain decoder.

The step loop (llm_engine.py) sees a decoder only through `Decoder`. The plain decoder runs the target model over
every scheduled sequence's new tokens (one pass; two when a short prompt chunk beside decodes replays its own
graph), scores prompt tokens when asked, samples one token for each sequence whose prompt is complete, and hands it
to the output processor. The speculative decoder (spec_decode/decoder.py) implements the same interface and is
given a plain decoder for its prompt passes; it never sees the engine.

Overlapped decoding (`EngineConfig.async_scheduling`): a decode step of a batch that nothing is about to change is
launched from the previous step's samples while they are still on the device, and the host reads that previous step
(tokens, stop rules, outputs) while the GPU runs the new one. So the GPU never waits for the host's per-token work.
Sequences whose token in flight is their last by length (max_tokens, max_model_len) are left out of the new step and
the rest go on: with varied output lengths some sequence ends every few steps (nano-vllm's benchmark), and waiting
for each would idle the GPU there. The price: a sequence that stops on EOS or a stop string has one step computed
past its end, which is dropped. Greedy outputs are identical with and without it. A step whose sampling reads the
output so far (penalties, bans, a grammar's mask) is launched the same way; its forward pass needs only the token on
the device, so the host reads the step in flight while the forward runs, then builds the sampling batch from the
histories that now include it (a grammar's masks too: structured_output.MaskFiller, as the forward runs), and samples.
Seeded outputs are identical too.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from miniserve.engine.launch_hold import LaunchHold
from miniserve.engine.model_runner import ForwardInput, ModelRunner
from miniserve.engine.output_processor import OutputProcessor, record_prompt_logprobs
from miniserve.engine.sampler import SamplerOutput, SamplingBatch, TokenIds, draw_noise, sample
from miniserve.engine.structured_output import MaskFiller
from miniserve.engine.transfer import to_device, to_host_async
from miniserve.scheduler.scheduler import ScheduledSeq, Scheduler
from miniserve.scheduler.sequence import Sequence


class Decoder(Protocol):
    # tokens the target model computes for the last step() or continue_in_flight() (the iteration_tokens histogram)
    last_computed: int

    def continue_in_flight(self) -> list[Sequence] | None:
        """Run the next step of a batch in flight that nothing changes, without the scheduler (an overlapped
        decode step); returns the sequences that gained tokens, or None when there is no such batch."""
        ...

    def flush(self) -> list[Sequence]:
        """Before scheduling: emit work launched in an earlier step that the next batch cannot continue (a
        speculative round in flight); returns the sequences that gained tokens."""
        ...

    def step(self, scheduled: list[ScheduledSeq]) -> list[Sequence]:
        """Run the scheduled batch; returns the sequences that progressed."""
        ...

    def capture_graphs(self) -> None: ...

    def disable_graphs(self) -> None: ...

    def stats(self) -> dict: ...


@dataclass
class _InFlight:
    """A decode step launched and not read yet: its sequences, its samples (copying to pinned host memory, done
    when `ready` is), and its sampling batch. The next step reuses that batch when the same rows go on, with fresh
    masks when it is `penalized` (its sampling reads the output so far) by grammars alone; a batch whose rows
    changed, or whose penalties or bans read the token history, is rebuilt (a `penalized` one once the step in
    flight is read)."""

    seqs: list[Sequence]
    samples: torch.Tensor  # the sampled token ids on the device: the next step's inputs
    host: SamplerOutput  # the same outputs on the host
    ready: torch.cuda.Event | None
    batch: SamplingBatch
    launched_at: float = 0.0  # perf_counter when its forward pass was launched
    # a launch hold's timing: the predecessor's `ready`, when this step was launched while that one still ran (it
    # then started on the GPU as its predecessor ended, and the two events time it without any idle gap between)
    after: torch.cuda.Event | None = None


class PlainDecoder:
    """One target forward pass per step, one sampled token per sequence whose prompt is complete."""

    def __init__(
        self,
        target: ModelRunner,
        outputs: OutputProcessor,
        vocab_size: int,
        scheduler: Scheduler,
        overlap: bool = False,
        grammar_threads: int = 0,
    ):
        self.target = target
        self.masks = MaskFiller(vocab_size, target.device, grammar_threads)
        self.outputs = outputs
        self.vocab_size = vocab_size
        self.scheduler = scheduler
        self.overlap = overlap
        self.in_flight: _InFlight | None = None
        self.num_overlapped_steps = 0  # decode steps launched with their samples left on the device, read later
        self.hold: LaunchHold | None = None  # the served engine's late launches (launch_hold.py)
        self.read_at = 0.0  # perf_counter when the last step in flight was read
        self.last_computed = 0

    def continue_in_flight(self) -> list[Sequence] | None:
        """With a decode step in flight whose batch can go on: grow each sequence that continues by one slot, launch
        its next step from the samples on the device, then read the step in flight. The scheduler is not asked: it
        would plan exactly this (one new token each), and at large batches its bookkeeping costs milliseconds.
        In the server, a launch hold first waits for requests until the step in flight is about to end
        (launch_hold.py): one that comes is scheduled right after that step, not after the next one too."""
        f = self.in_flight
        limit = self.outputs.max_model_len
        rows = continuing_rows(f, self.scheduler, limit) if f is not None else None
        if rows is not None and self.hold is not None:
            started = max(self.read_at, f.launched_at)  # on the GPU: when the one before was read, or launched if later
            if self.hold.until_due(len(f.seqs), started, f.ready.query if f.ready is not None else None):
                # requests or aborts came while it waited: the batch may not go on
                rows = continuing_rows(f, self.scheduler, limit)
        if rows is None:
            return None
        begun = time.perf_counter()
        keep, tokens = f.seqs, f.samples
        if len(rows) < len(f.seqs):  # some end with the token in flight: the rest go on from their own samples
            keep = [f.seqs[i] for i in rows]
            tokens = f.samples.index_select(0, to_device(rows, torch.int64, f.samples.device))
        blocks = self.scheduler.blocks
        for seq in keep:
            blocks.grow(seq, seq.num_computed_tokens + 1)
        logits = self._forward(keep, tokens)
        launched_at = time.perf_counter()
        after = None
        if self._timed(len(f.seqs)) and f.ready is not None:  # (a held batch's every `ready` can time it)
            after = f.ready if not f.ready.query() else None  # launched while the step in flight still ran
            self.hold.launched(launched_at - begun, in_time=after is not None)
        if f.batch.penalized:  # its sampling reads the token in flight: read that while the forward runs
            taken = self._take(f)
            self._sample_in_flight(keep, logits, *self._next_batch(f, keep, taken))
            seqs = f.seqs
        else:
            batch = f.batch if keep is f.seqs else self._build_batch(keep)
            self._sample_in_flight(keep, logits, batch)
            seqs = self._read(f)
        self.in_flight.launched_at, self.in_flight.after = launched_at, after
        self.last_computed = len(keep)  # the step it launched: a token each
        return seqs

    def flush(self) -> list[Sequence]:
        """Read a step in flight whose batch cannot go on (the scheduler decides what runs next)."""
        return self._read() if self.in_flight is not None else []

    def step(self, scheduled: list[ScheduledSeq]) -> list[Sequence]:
        self.last_computed = sum(s.num_new_tokens for s in scheduled)
        prompts = [s for s in scheduled if not _is_decode(s)]
        if len(prompts) == 1 and len(scheduled) > 1 and self._has_prompt_graph(prompts[0]):
            decodes = [s for s in scheduled if s is not prompts[0]]
            if not self.overlap:
                return self._step_now(prompts) + self._step_now(decodes)
            first = self._launch_now(prompts)
            seqs = [s.seq for s in decodes]  # launched while the prompt pass runs, in flight after it
            self._launch(seqs, self.sampling_batch(seqs), None)
            if first is not None:  # the prompt's first token, read without waiting for the decodes
                self._read(first)
            return [prompts[0].seq]
        if self.overlap and not prompts and len(scheduled) == len(self.scheduler.running):
            seqs = [s.seq for s in scheduled]  # every running sequence decodes, and nothing else runs
            self._launch(seqs, self.sampling_batch(seqs), None)
            return []
        return self._step_now(scheduled)

    def _step_now(self, scheduled: list[ScheduledSeq]) -> list[Sequence]:
        """The step, waited for: prompt chunks, prompt scoring, and decode steps when overlapping is off."""
        launched = self._launch_now(scheduled)
        if launched is not None:
            self._read(launched)
        return [s.seq for s in scheduled]

    def _launch_now(self, scheduled: list[ScheduledSeq]) -> _InFlight | None:
        """A step's forward pass (prompt logprobs recorded on the way) and the sampling of the sequences whose
        prompt it completes, not waited for (None when it completes none): a prompt beside decodes has them
        launched behind it before its first token is read."""
        inputs = [self.forward_input(s) for s in scheduled]
        ready = [s.seq for s in scheduled if s.completes_prompt]
        logits = self.target.forward(inputs)
        sample_rows, row = [], 0
        for s, x in zip(scheduled, inputs):
            if s.seq.scores_prompt:
                record_prompt_logprobs(s.seq, logits[row : row + x.num_logits], x.start_pos)
            if s.completes_prompt:
                sample_rows.append(row + x.num_logits - 1)
            row += x.num_logits
            s.seq.num_computed_tokens += s.num_new_tokens
        if not ready:
            return None
        if row != len(sample_rows):  # prompt-scoring rows are mixed in: keep the last row of each ready seq
            logits = logits[to_device(sample_rows, torch.int64, logits.device)]
        batch = self.sampling_batch(ready)
        out = sample(logits, batch)
        host, done = _copy_to_host(out)
        return _InFlight(ready, out.token_ids, host, done, batch)

    def _has_prompt_graph(self, prompt: ScheduledSeq) -> bool:
        """A prompt chunk beside decodes that a captured prompt pass can run: the step then runs as two graph
        replays, the prompt first, instead of one eager pass over both. A request arriving while others decode
        (the usual case below saturation) gets its first token in a prompt pass's time (about 2 ms for 512 tokens of
        the Llama-3.2-1B shape on an H200), not an eager pass's (hundreds of kernel launches, each paid on the
        host)."""
        return self.target.prefill_length([self.forward_input(prompt)]) is not None

    @staticmethod
    def forward_input(s: ScheduledSeq) -> ForwardInput:
        """The sequence's new tokens; logits for its last one when it completes, for all when scoring a prompt."""
        seq, start = s.seq, s.seq.num_computed_tokens
        tokens = seq.token_ids[start : start + s.num_new_tokens]
        num_logits = len(tokens) if seq.scores_prompt else (1 if s.completes_prompt else 0)
        return ForwardInput(tokens, start, seq.block_table, num_logits)

    def sampling_batch(self, seqs: list[Sequence], histories: list[TokenIds] | None = None) -> SamplingBatch:
        """One sampling row per sequence (or per given output history, for speculative verification).

        A history is copied out of the sequence only when the sampler reads it: copying every sequence's
        output every step would cost O(length) per token."""
        masks = self.masks.build(_grammars(seqs))
        return self._build_batch(seqs, histories, masks)

    def _next_batch(
        self, f: _InFlight, keep: list[Sequence], taken: list[tuple[Sequence, int]]
    ) -> tuple[SamplingBatch, torch.Tensor | None]:
        """The sampling batch of the step after `f`, with its grammar masks, and its noise drawn ahead; `taken`, f's
        tokens, are appended and in their grammars, and get their text and stop rules here. A constrained step's
        host work, not its forward pass, sets its pace: so on a GPU the batch, the noise draws (one per seeded row)
        and the text are made on a helper thread while this one fills the masks (MaskFiller.build_beside). A
        sequence that a stop string ends meanwhile has its row filled all the same; its token is dropped, as any
        token sampled past a sequence's end is (a grammar that ended one has left it out already)."""
        work = functools.partial(self._beside_fill, f, keep, taken)
        masks, (batch, noise) = self.masks.build_beside(_grammars(keep), work)
        return replace(batch, token_bitmask=masks), noise

    def _beside_fill(
        self, f: _InFlight, keep: list[Sequence], taken: list[tuple[Sequence, int]]
    ) -> tuple[SamplingBatch, torch.Tensor | None]:
        """What goes on beside the masks' fill: the batch (f's own when it goes on whole and nothing in it reads the
        token history, the masks then being all it reads: rebuilding costs about 0.2 ms at batch 32; else a new
        one), its noise, drawn ahead, and the text and stop rules of f's tokens."""
        if keep is f.seqs and not any(s.params.needs_history for s in keep):
            batch = f.batch
        else:
            batch = self._build_batch(keep)
        noise = draw_noise(batch)
        self.outputs.finish_sampled(taken)
        return batch, noise

    def _build_batch(
        self, seqs: list[Sequence], histories: list[TokenIds] | None = None, masks: torch.Tensor | None = None
    ) -> SamplingBatch:
        prompts, outputs = _token_histories(seqs)
        return SamplingBatch.build(
            [s.params for s in seqs],
            [s.generator for s in seqs],
            prompts,
            outputs if histories is None else histories,
            self.outputs.eos_token_ids,
            self.vocab_size,
            self.target.device,
            token_bitmask=masks,
        )

    # ---------------------------------------------------------------- overlapped decode steps

    def _launch(self, seqs: list[Sequence], batch: SamplingBatch, device_tokens: torch.Tensor | None) -> None:
        """One decode step whose samples stay on the device; their host copy is started, not waited for."""
        self._sample_in_flight(seqs, self._forward(seqs, device_tokens), batch)

    def _forward(self, seqs: list[Sequence], device_tokens: torch.Tensor | None) -> torch.Tensor:
        """Launch a decode step's forward pass, from the host's last tokens or from samples on the device."""
        if device_tokens is None:
            inputs = [ForwardInput(seq.token_ids[-1:], seq.num_computed_tokens, seq.block_array(), 1) for seq in seqs]
        else:
            inputs = [ForwardInput([0], seq.num_computed_tokens, seq.block_array(), 1) for seq in seqs]
        logits = self.target.forward(inputs, device_tokens, float_logits=False)  # `sample` converts if it must
        for seq in seqs:
            seq.num_computed_tokens += 1
        return logits

    def _sample_in_flight(
        self, seqs: list[Sequence], logits: torch.Tensor, batch: SamplingBatch, noise: torch.Tensor | None = None
    ) -> None:
        """Launch the sampling of a step in flight (of a held batch, its `ready` event can time it)."""
        out = sample(logits, batch, noise)
        host, ready = _copy_to_host(out, timed=self._timed(len(seqs)))
        self.num_overlapped_steps += 1
        self.in_flight = _InFlight(seqs, out.token_ids, host, ready, batch)

    def _timed(self, batch: int) -> bool:
        """A launch hold holds, and so times, this batch's steps (none at saturation: no timing there)."""
        return self.hold is not None and self.hold.holds(batch)

    def _read(self, f: _InFlight | None = None) -> list[Sequence]:
        """Wait for a step's samples (that step only, not the one launched after it) and append them."""
        f = f or self.in_flight
        self._wait(f)
        self.outputs.append_sampled(f.seqs, f.host)  # sequences that finished meanwhile are skipped
        return f.seqs

    def _take(self, f: _InFlight) -> list[tuple[Sequence, int]]:
        """_read's first half: wait for f's samples and append them to their sequences and grammars
        (OutputProcessor.take_sampled; sequences that finished meanwhile are skipped)."""
        self._wait(f)
        return self.outputs.take_sampled(f.seqs, f.host)

    def _wait(self, f: _InFlight) -> None:
        """Until f's samples are on the host (f leaves the decoder's hands)."""
        if f is self.in_flight:
            self.in_flight = None
        if f.ready is not None:
            f.ready.synchronize()
        if f.after is not None:
            self.hold.observe_step(len(f.seqs), f.after.elapsed_time(f.ready) / 1e3)
        self.read_at = time.perf_counter()

    def capture_graphs(self) -> None:
        """Decode steps and one-sequence prompt passes replay from CUDA graphs."""
        self.target.capture_graphs([1])
        self.target.capture_prefill_graphs()

    def disable_graphs(self) -> None:
        self.target.disable_graphs()

    def stats(self) -> dict:
        return {}


def continuing_rows(f: _InFlight, sched: Scheduler, limit: int) -> list[int] | None:
    """The rows of the batch in flight that go on into the next step, when it can be launched before the step
    in flight is read: all but the sequences whose token in flight is their last by length (max_tokens,
    max_model_len `limit`: known before it is read). None when the scheduler must decide: someone finished or left
    otherwise, a waiting request could take a freed place, or the pool lacks a block."""
    running = sched.running
    if len(running) != len(f.seqs) or any(a is not b for a, b in zip(running, f.seqs)):
        return None
    if len(running) > sched.max_num_batched_tokens:
        return None
    block_size = sched.blocks.block_size
    rows, new_blocks = [], 0
    for i, seq in enumerate(f.seqs):  # inlined: this loop runs for every sequence at every step
        num_tokens, max_tokens = len(seq.token_ids), seq.params.max_tokens
        if num_tokens + 1 >= limit:
            continue
        if max_tokens is not None and num_tokens - len(seq.prompt_token_ids) + 1 >= max_tokens:
            continue
        rows.append(i)
        new_blocks += seq.num_computed_tokens >= len(seq.block_table) * block_size
    if not rows or (sched.waiting and len(rows) < sched.max_num_seqs):
        return None
    return rows if new_blocks <= sched.blocks.num_free_blocks else None


def _token_histories(seqs: list[Sequence]) -> tuple[list[TokenIds], list[TokenIds]]:
    """Each sequence's prompt and output as the sampler reads them: numpy views of its tokens (no copies) where it
    reads its history (penalties, bans), else its prompt list and nothing."""
    prompts, outputs = [], []
    for s in seqs:
        tokens = s.token_array() if s.params.needs_history else None
        prompts.append(s.prompt_token_ids if tokens is None else tokens[: s.num_prompt_tokens])
        outputs.append([] if tokens is None else tokens[s.num_prompt_tokens :])
    return prompts, outputs


def _grammars(seqs: list[Sequence]) -> list:
    """Each sequence's grammar state, None where it has none, has just ended (its row is dropped) or has not begun
    (a grammar waiting for the end of a thinking model's reasoning: its row is free)."""
    return [s.grammar if not s.is_finished and s.grammar is not None and not s.grammar.waiting else None for s in seqs]


def _is_decode(s: ScheduledSeq) -> bool:
    """One new token whose logits are sampled: a decode step's row."""
    return s.num_new_tokens == 1 and s.completes_prompt and not s.seq.scores_prompt


def _copy_to_host(out: SamplerOutput, timed: bool = False) -> tuple[SamplerOutput, torch.cuda.Event | None]:
    """Start copying a step's samples into pinned host memory; the event marks their arrival (`timed`: it can
    time the step). (A plain `.tolist()` would wait for everything queued on the stream, the next step
    included.)"""
    if out.token_ids.device.type != "cuda":
        return out, None
    host, tops = to_host_async, out.top_logprobs
    copied = SamplerOutput(
        token_ids=host(out.token_ids),
        logprobs=host(out.logprobs) if out.logprobs is not None else None,
        top_logprobs=(host(tops[0]), host(tops[1])) if tops is not None else None,
        ranks=host(out.ranks) if out.ranks is not None else None,
    )
    ready = torch.cuda.Event(enable_timing=timed)
    ready.record()
    return copied, ready
