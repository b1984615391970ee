"""What generation returns, shaped like vLLM's RequestOutput / CompletionOutput."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


class Logprob(float):
    """vLLM's Logprob: `.logprob`, `.rank` (the top N are ranked 1..N in order; a chosen token outside them by
    how many tokens are at least as likely) and `.decoded_token` (the token decoded alone; None with
    detokenize=False). It is also the float itself, so code that reads `logprobs[i][token]` as a number keeps
    working."""

    __slots__ = ("rank", "decoded_token")

    def __new__(cls, logprob: float, rank: int | None = None, decoded_token: str | None = None) -> Logprob:
        self = super().__new__(cls, logprob)
        self.rank, self.decoded_token = rank, decoded_token
        return self

    @property
    def logprob(self) -> float:
        return float(self)

    def __repr__(self) -> str:
        return f"Logprob(logprob={float(self)!r}, rank={self.rank!r}, decoded_token={self.decoded_token!r})"

    def __reduce__(self) -> tuple:
        return Logprob, (float(self), self.rank, self.decoded_token)


def logprob_dict(
    entry: dict[int, float], token: int, rank: int, num_top: int, decode: Callable[[int], str] | None
) -> dict[int, Logprob]:
    """One position's {token_id: logprob} as vLLM builds it: the chosen (sampled or prompt) token first with its
    rank, then the top `num_top` in order with ranks 1..num_top (a chosen token among them keeps its top rank).
    `entry` holds the top ones in order, and the chosen one (in place when it is among them, else last)."""
    top = [t for t in entry if t != token] if len(entry) > num_top else list(entry)
    out = {token: Logprob(entry[token], rank, decode(token) if decode else None)}
    for r, t in enumerate(top, start=1):
        out[t] = Logprob(entry[t], r, decode(t) if decode else None)
    return out


def logprob_dicts(
    entries: list, tokens: list[int], ranks: list, num_top: int, decode: Callable[[int], str] | None
) -> list[dict[int, Logprob] | None]:
    """logprob_dict at each position (None stays None: a prompt's first token)."""
    return [None if e is None else logprob_dict(e, t, r, num_top, decode) for e, t, r in zip(entries, tokens, ranks)]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # None while running, then "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    logprobs: list[dict[int, float]] | None = None  # per token: the sampled one and the top N (Logprob in collect())
    cumulative_logprob: float | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: dict = field(default_factory=dict)
    prompt_logprobs: list[dict[int, float] | None] | None = None  # SamplingParams(prompt_logprobs=N) (as logprobs)
    num_cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache (usage.cached_tokens)
