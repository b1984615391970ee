"""Beam search as vLLM's `LLM.beam_search` runs it: on top of plain generation, one token per step.

Every step asks the engine for one token of every live beam, with its top 2 x beam_width logprobs (the prompt of
each request is the beam's tokens so far: the prefix cache keeps their full blocks, so a step computes little more
than each beam's last block). Each beam is extended by every token listed, a beam ending in EOS is complete, and
the beam_width best of the rest live on. At the end the complete and the live ones are ranked together and the
beam_width best are returned. A beam's score is vLLM's: its cumulative logprob / length ** length_penalty, the
length counting the prompt's tokens and the generated ones but not a final EOS.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from miniserve.sampling_params import SamplingParams


@dataclass
class BeamSearchParams:
    """vLLM's BeamSearchParams."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0  # for the token each step samples (beams grow by its top logprobs, not by it)
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False  # whether a complete beam's text keeps its EOS token's text

    def __post_init__(self) -> None:
        for name in ("beam_width", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.length_penalty = _finite_float("length_penalty", self.length_penalty)


@dataclass
class BeamSearchSequence:
    """One beam: the prompt's tokens then the generated ones, a logprob dict per generated token (as a request's
    logprobs=2 x beam_width lists them), and the text of all its tokens (vLLM's)."""

    tokens: list[int]
    logprobs: list[dict] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None  # "stop": it ended with EOS; "length": max_tokens or the context ran out
    stop_reason: int | None = None  # the EOS token id that ended it

    def shown_tokens(self, include_stop_str_in_output: bool) -> list[int]:
        """The tokens its text shows: a final EOS only when asked for."""
        drop = self.finish_reason == "stop" and not include_stop_str_in_output
        return self.tokens[:-1] if drop else self.tokens


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # the beam_width best, best first


def check_width(beam_width: int, max_logprobs: int, name: str = "beam_width") -> None:
    """A step lists each beam's top 2 x beam_width logprobs, which max_logprobs (-1: no bound) bounds."""
    if max_logprobs != -1 and 2 * beam_width > max_logprobs:
        raise ValueError(
            f"{name}: beam search lists the top 2 x {name} logprobs a step, more than max_logprobs={max_logprobs} "
            f"allows: {name} <= {max_logprobs // 2}"
        )


def beam_score(beam: BeamSearchSequence, eos_token_ids: set[int], length_penalty: float) -> float:
    """How a beam ranks (larger is better): vLLM's `get_beam_search_score`, the cumulative logprob over the length
    (prompt included, a final EOS not) to the length_penalty, taken in log space: length_penalty * log(length) -
    log(-cum_logprob) orders beams as that quotient does (cum_logprob <= 0), and stays a float at any finite
    penalty, where the power overflows and vLLM raises."""
    length = len(beam.tokens) - (1 if beam.tokens[-1] in eos_token_ids else 0)
    if beam.cum_logprob == 0.0:  # a sure beam: its score, 0, beats any other
        return math.inf
    if math.isinf(beam.cum_logprob):
        return -math.inf
    return length_penalty * math.log(length) - math.log(-beam.cum_logprob)


def _finite_float(name: str, value: object) -> float:
    """`value` as a finite float (an int too, if a float holds it): NaN or an infinity would rank no beam."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return number


class BeamSearch:
    """The search over a batch of prompts, a step at a time: `next_prompts()` are the step's one-token requests
    (every live beam's tokens; none once the search is over), to be run with `step_params`; `advance` grows the
    beams from each request's logprob dict; `results()` ranks what was found. The offline API drives it through
    `beam_search`, the server through its own requests."""

    def __init__(self, prompts: list[list[int]], params: BeamSearchParams, eos_token_ids: set[int], max_len: int):
        self.params, self.eos_token_ids, self.max_len = params, eos_token_ids, max_len
        self.step_params = SamplingParams(
            max_tokens=1, temperature=params.temperature, logprobs=2 * params.beam_width, ignore_eos=True
        )
        self.live = [[BeamSearchSequence(list(p))] for p in prompts]
        self.done: list[list[BeamSearchSequence]] = [[] for _ in prompts]
        self.steps = 0

    def next_prompts(self) -> list[list[int]]:
        """The tokens of every live beam, prompt by prompt (a beam that fills the context ends first)."""
        for beams, complete in zip(self.live, self.done):
            complete += [_ended(b, "length") for b in beams if len(b.tokens) >= self.max_len]
            beams[:] = [b for b in beams if len(b.tokens) < self.max_len]
        if self.steps == self.params.max_tokens:
            return []
        return [b.tokens for beams in self.live for b in beams]

    def advance(self, entries: list[dict]) -> None:
        """Grow the beams of `next_prompts` by every token of their logprob dicts (one dict each, in order)."""
        self.steps += 1
        entries = iter(entries)
        for i, beams in enumerate(self.live):
            grown = []
            for beam in beams:
                entry = next(entries)
                for token, logprob in entry.items():
                    child = BeamSearchSequence(
                        beam.tokens + [token], beam.logprobs + [entry], beam.cum_logprob + logprob
                    )
                    if token in self.eos_token_ids and not self.params.ignore_eos:
                        self.done[i].append(_ended(child, "stop", token))
                    else:
                        grown.append(child)
            self.live[i] = sorted(grown, key=self._score, reverse=True)[: self.params.beam_width]

    def results(self) -> list[BeamSearchOutput]:
        """The beam_width best beams of each prompt, complete and live ranked together (their text left unset)."""
        ranked = [sorted(done + [_ended(b, "length") for b in live], key=self._score, reverse=True)
                  for live, done in zip(self.live, self.done)]  # fmt: skip
        return [BeamSearchOutput(beams[: self.params.beam_width]) for beams in ranked]

    def _score(self, beam: BeamSearchSequence) -> float:
        return beam_score(beam, self.eos_token_ids, self.params.length_penalty)


def beam_search(
    generate: Callable[[list[list[int]], SamplingParams], list],
    prompts: list[list[int]],
    params: BeamSearchParams,
    eos_token_ids: set[int],
    max_model_len: int,
    decode: Callable[[list[int]], str],
) -> list[BeamSearchOutput]:
    """Beam search for each prompt (token ids); `generate(prompts, sampling_params)` returns one RequestOutput per
    prompt, in order (LLM.generate)."""
    search = BeamSearch(prompts, params, eos_token_ids, max_model_len)
    while batch := search.next_prompts():
        search.advance([out.outputs[0].logprobs[0] for out in generate(batch, search.step_params)])
    outputs = search.results()
    for beam in (b for out in outputs for b in out.sequences):  # vLLM's text: the prompt's and the beam's tokens
        beam.text = decode(beam.shown_tokens(params.include_stop_str_in_output))
    return outputs


def _ended(beam: BeamSearchSequence, reason: str, stop: int | None = None) -> BeamSearchSequence:
    beam.finish_reason, beam.stop_reason = reason, stop
    return beam
