"""SamplingParams: how to pick tokens for one request, with vLLM's names, defaults and validation.

It sits at the top of the package, beside config.py, because every layer speaks it: the server and `LLM` build
it, a scheduled `Sequence` carries it, the engine's sampler and output processor read it. It imports nothing from
miniserve, so any layer may import it without pointing up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GREEDY_EPS = 1e-5  # temperatures below this are greedy (dividing by them would overflow)
MAX_LOGPROBS = 20  # the OpenAI API's limit for top logprobs
OUTPUT_KINDS = ("cumulative", "delta", "final_only")  # vLLM's RequestOutputKind


@dataclass
class SamplingParams:
    """How to pick tokens for one request; defaults and validation follow vLLM."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16  # None = until the context is full
    min_tokens: int = 0
    stop: str | list[str] | None = None  # normalised to a list
    stop_token_ids: list[int] | None = None  # normalised to a list
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs per token; 0 = only the sampled token's
    prompt_logprobs: int | None = None  # top-N logprobs of every prompt token (scoring, `echo`); 0 = its own only
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # "cumulative": the engine reports the request at every step it progresses (streaming); "delta": likewise,
    # but each report holds only what is new since the last one (the server's streams: no per-step copies of the
    # whole output); "final_only": only when it finishes, which spares a per-token output and, without stop
    # strings, per-token detokenizing (`LLM.generate` asks for this)
    output_kind: str = "cumulative"
    # False: the engine leaves `text` empty and never detokenizes (the caller turns token ids into text itself,
    # as the server does off the engine's step loop); stop strings need the text, so they need True
    detokenize: bool = True

    def __post_init__(self) -> None:
        _check_int("n", self.n, low=1)
        _check_number("temperature", self.temperature, low=0.0)
        _check_number("top_p", self.top_p, low=0.0, low_open=True, high=1.0)
        _check_int("top_k", self.top_k, low=-1)
        _check_number("min_p", self.min_p, low=0.0, high=1.0)
        if self.seed is not None:
            _check_int("seed", self.seed, low=-(2**63), high=2**63 - 1)  # int64: what torch.Generator takes
        _check_number("presence_penalty", self.presence_penalty, low=-2.0, high=2.0)
        _check_number("frequency_penalty", self.frequency_penalty, low=-2.0, high=2.0)
        _check_number("repetition_penalty", self.repetition_penalty, low=0.0, low_open=True)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, low=1)
        _check_int("min_tokens", self.min_tokens, low=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        self.stop = _normalize_stop(self.stop)
        self.stop_token_ids = _normalize_stop_token_ids(self.stop_token_ids)
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens", "detokenize"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.output_kind not in OUTPUT_KINDS:
            raise ValueError(f"output_kind must be one of {OUTPUT_KINDS}, got {self.output_kind!r}")
        if self.stop and not self.detokenize:
            raise ValueError("detokenize=False cannot be combined with stop strings (they are matched in the text)")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, low=0, high=MAX_LOGPROBS)
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, low=0, high=MAX_LOGPROBS)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def penalized(self) -> bool:
        """Some penalty reshapes the logits from the token history."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def needs_history(self) -> bool:
        """The sampler reads the generated tokens (penalties, or the length for min_tokens)."""
        return self.penalized or self.min_tokens > 0


def _check_int(name: str, value: object, low: int | None = None, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ValueError(f"{name} must be in {bounds}, got {value}")


def _check_number(
    name: str, value: object, low: float | None = None, high: float | None = None, low_open: bool = False
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        lower = f"{'(' if low_open else '['}{low if low is not None else '-inf'}"
        bounds = f"{lower}, {high if high is not None else 'inf'}]"
        raise ValueError(f"{name} must be in {bounds}, got {value}")


def _normalize_stop(stop: object) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
    if any(s == "" for s in stop):
        raise ValueError("stop must not contain empty strings")
    return list(stop)


def _normalize_stop_token_ids(ids: object) -> list[int]:
    if ids is None:
        return []
    if not isinstance(ids, (list, tuple, set)):
        raise ValueError(f"stop_token_ids must be a list of integers, got {ids!r}")
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise ValueError(f"stop_token_ids must be non-negative integers, got {token!r}")
    return list(ids)
