"""How one step turns scheduled sequences into tokens: the `Decoder` interface and the plain decoder.

The step loop (llm_engine.py) sees a decoder only through `Decoder`. The plain decoder runs one forward pass of
the target model over every scheduled sequence's new tokens, scores prompt tokens when asked, samples one token
for each sequence whose prompt is complete, and hands it to the output processor. The speculative decoder
(spec_decode/decoder.py) implements the same interface and is given a plain decoder for its prompt passes; it
never sees the engine.
"""

from __future__ import annotations

from typing import Protocol

import torch

from miniserve.engine.model_runner import ForwardInput, ModelRunner
from miniserve.engine.output_processor import OutputProcessor
from miniserve.engine.sampler import SamplingBatch, sample
from miniserve.engine.transfer import to_device
from miniserve.scheduler.scheduler import ScheduledSeq
from miniserve.scheduler.sequence import Sequence


class Decoder(Protocol):
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


class PlainDecoder:
    """One target forward pass per step, one sampled token per sequence whose prompt is complete."""

    def __init__(self, target: ModelRunner, outputs: OutputProcessor, vocab_size: int):
        self.target = target
        self.outputs = outputs
        self.vocab_size = vocab_size

    def flush(self) -> list[Sequence]:
        return []

    def step(self, scheduled: list[ScheduledSeq]) -> list[Sequence]:
        inputs = [self.forward_input(s) for s in scheduled]
        ready = [s.seq for s in scheduled if s.completes_prompt]
        logits = self.target.forward(inputs)
        sample_rows, row = [], 0
        for s, x in zip(scheduled, inputs):
            if s.seq.scores_prompt:
                self.outputs.record_prompt_logprobs(s.seq, logits[row : row + x.num_logits], x.start_pos)
            if s.completes_prompt:
                sample_rows.append(row + x.num_logits - 1)
            row += x.num_logits
            s.seq.num_computed_tokens += s.num_new_tokens
        if ready:
            if row != len(sample_rows):  # prompt-scoring rows are mixed in: keep the last row of each ready seq
                logits = logits[to_device(sample_rows, torch.int64, logits.device)]
            self.outputs.append_sampled(ready, sample(logits, self.sampling_batch(ready)))
        return [s.seq for s in scheduled]

    @staticmethod
    def forward_input(s: ScheduledSeq) -> ForwardInput:
        """The sequence's new tokens; logits for its last one when it completes, for all when scoring a prompt."""
        seq, start = s.seq, s.seq.num_computed_tokens
        tokens = seq.token_ids[start : start + s.num_new_tokens]
        num_logits = len(tokens) if seq.scores_prompt else (1 if s.completes_prompt else 0)
        return ForwardInput(tokens, start, seq.block_table, num_logits)

    def sampling_batch(self, seqs: list[Sequence], histories: list[list[int]] | None = None) -> SamplingBatch:
        """One sampling row per sequence (or per given output history, for speculative verification).

        A history is copied out of the sequence only when the sampler reads it: copying every sequence's
        output every step would cost O(length) per token."""
        if histories is None:
            histories = [s.output_token_ids if s.params.needs_history else [] for s in seqs]
        return SamplingBatch.build(
            [s.params for s in seqs],
            [s.generator for s in seqs],
            [s.prompt_token_ids for s in seqs],
            histories,
            self.outputs.eos_token_ids,
            self.vocab_size,
            self.target.device,
        )

    def capture_graphs(self) -> None:
        """Decode steps and one-sequence prompt passes replay from CUDA graphs."""
        self.target.capture_graphs([1])
        self.target.capture_prefill_graphs()

    def disable_graphs(self) -> None:
        self.target.disable_graphs()

    def stats(self) -> dict:
        return {}
