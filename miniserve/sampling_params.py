"""SamplingParams: how to pick tokens for one request, with vLLM's names, defaults and validation.

It sits at the top of the package, beside config.py, because every layer speaks it: the server and `LLM` build
it, a scheduled `Sequence` carries it, the engine's sampler and output processor read it. It imports nothing from
miniserve, so any layer may import it without pointing up.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

GREEDY_EPS = 1e-5  # temperatures below this are greedy: 0 (the constructor raises others to MIN_TEMPERATURE)
# a positive temperature below this is raised to it, with a warning, as vLLM does (lower ones risk inf and NaN)
MIN_TEMPERATURE = 1e-2
# penalties are applied in float32: a smaller positive value divides logits into infinities (or 0 flushed to zero)
MIN_REPETITION_PENALTY = 1e-6
OUTPUT_KINDS = ("cumulative", "delta", "final_only")  # vLLM's RequestOutputKind
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for logit_bias values: [-100, 100]
STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """A grammar the output must follow (compiled by xgrammar, engine/structured_output.py): exactly one of a JSON
    schema, a regex, a list of choices, an EBNF grammar, or any JSON object.

    `json` is a schema as a dict or a JSON string; `grammar` is xgrammar's EBNF (GBNF-style, `root ::= ...`).
    JSON allows a few whitespace characters between tokens (structured_output.MAX_JSON_WHITESPACE);
    `disable_any_whitespace` makes it compact instead (`{"a": 1, "b": [2, 3]}`: one space after `:` and `,`).
    `start_after_token`: the grammar applies only after the output's first such token (a thinking model's
    `</think>`: the server's reasoning parser, as vLLM's grammar waits for the reasoning's end); before it, any token.
    """

    json: dict | str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    disable_any_whitespace: bool = False
    start_after_token: int | None = None  # (not part of the grammar: `key` leaves it out)

    def __post_init__(self) -> None:
        if self.choice is not None:
            if not isinstance(self.choice, (list, tuple)) or not all(isinstance(c, str) for c in self.choice):
                raise ValueError(f"choice must be a list of strings, got {self.choice!r}")
            if not self.choice:
                raise ValueError("choice must not be empty")
            object.__setattr__(self, "choice", tuple(self.choice))
        given = [k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            kinds, got = ", ".join(STRUCTURED_KINDS), ", ".join(given) or "none"
            raise ValueError(f"structured outputs take exactly one of {kinds}; got {got}")

    @property
    def kind(self) -> str:
        return next(k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False))

    def key(self) -> tuple:
        """What identifies the compiled grammar (a schema dict by its JSON text: key order matters, properties are
        generated in the schema's order)."""
        value = getattr(self, self.kind)
        if self.kind == "json":
            value = _schema_text(value)
        return (self.kind, value, self.disable_any_whitespace)


def _schema_text(schema: dict | str) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise ValueError(f"json: the schema is not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise ValueError(f"json: a JSON schema must be an object, got {type(schema).__name__}")
    return json.dumps(schema, separators=(",", ":"))


@dataclass
class SamplingParams:
    """How to pick tokens for one request; defaults and validation follow vLLM."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    seed: int | None = None  # -1 = none (vLLM's)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16  # None = until the context is full
    min_tokens: int = 0
    stop: str | list[str] | None = None  # normalised to a list
    stop_token_ids: list[int] | None = None  # normalised to a list
    ignore_eos: bool = False
    # top-N logprobs per token; 0 = only the sampled token's; True = 1, -1 = the whole vocabulary (vLLM's); N is
    # bounded by the engine's max_logprobs
    logprobs: int | None = None
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
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling (OpenAI's meaning)
    allowed_token_ids: list[int] | None = None  # only these tokens may be sampled
    bad_words: list[str] | None = None  # words never generated: a word's last token is banned after its others
    truncate_prompt_tokens: int | None = None  # keep only the prompt's last N tokens; -1 = as many as fit
    structured_outputs: StructuredOutputsParams | None = None  # a grammar the output follows (JSON schema, regex...)
    # a request's own prefix-cache namespace: only requests with the same salt share cached KV blocks
    cache_salt: str | None = None
    # vLLM's, for slow tokenizers only: fast ones (every one here) never put spaces between special tokens
    spaces_between_special_tokens: bool = True
    logits_processors: list | None = None  # vLLM's per-request processors: not supported (None or [] only)
    # bad_words as token-id sequences (each word with and without a leading space), set by the engine
    bad_words_token_ids: list[list[int]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.spaces_between_special_tokens is not True:
            raise ValueError("spaces_between_special_tokens: only True (the default) is supported")
        if self.logits_processors:
            raise ValueError("logits_processors: per-request logits processors are not supported")
        _check_int("n", self.n, low=1)
        _check_number("temperature", self.temperature, low=0.0)
        if 0 < self.temperature < MIN_TEMPERATURE:
            logger.warning("temperature %s is below %s: raised to it, as vLLM does", self.temperature, MIN_TEMPERATURE)
            self.temperature = MIN_TEMPERATURE
        _check_number("top_p", self.top_p, low=0.0, low_open=True, high=1.0)
        _check_int("top_k", self.top_k, low=-1)
        _check_number("min_p", self.min_p, low=0.0, high=1.0)
        if self.seed == -1:
            self.seed = None
        if self.seed is not None:
            _check_int("seed", self.seed, low=-(2**63), high=2**63 - 1)  # int64: what torch.Generator takes
        _check_number("presence_penalty", self.presence_penalty, low=-2.0, high=2.0)
        _check_number("frequency_penalty", self.frequency_penalty, low=-2.0, high=2.0)
        _check_number("repetition_penalty", self.repetition_penalty, low=MIN_REPETITION_PENALTY)
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
        for name in ("logprobs", "prompt_logprobs"):
            setattr(self, name, _check_logprobs(name, getattr(self, name)))
        self._check_controls()

    def _check_controls(self) -> None:
        """The token controls (bias, masks, bad words), prompt truncation, the grammar and the cache salt."""
        self.logit_bias = _normalize_logit_bias(self.logit_bias)
        self.allowed_token_ids = _normalize_token_ids("allowed_token_ids", self.allowed_token_ids, allow_empty=False)
        if self.bad_words is not None:
            if not isinstance(self.bad_words, (list, tuple)) or not all(isinstance(w, str) for w in self.bad_words):
                raise ValueError(f"bad_words must be a list of strings, got {self.bad_words!r}")
            if any(w.strip() == "" for w in self.bad_words):
                raise ValueError(
                    "bad_words must not contain empty or whitespace-only words (a word is matched without the "
                    "spaces around it)"
                )
            self.bad_words = list(self.bad_words) or None
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens != -1:
            _check_int("truncate_prompt_tokens", self.truncate_prompt_tokens, low=1)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError(f"structured_outputs must be a StructuredOutputsParams, got {self.structured_outputs!r}")
        if self.structured_outputs is not None and self.min_tokens:
            raise ValueError(
                "min_tokens cannot be combined with structured outputs (or a tool_choice that constrains the output): "
                "the grammar decides where the output may end"
            )
        if self.bad_words_token_ids is not None and not all(
            isinstance(w, list) and w and all(isinstance(t, int) and not isinstance(t, bool) for t in w)
            for w in self.bad_words_token_ids
        ):
            raise ValueError(f"bad_words_token_ids must be non-empty token-id lists, got {self.bad_words_token_ids!r}")
        if self.cache_salt is not None and (not isinstance(self.cache_salt, str) or not self.cache_salt):
            raise ValueError(f"cache_salt must be a non-empty string, got {self.cache_salt!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def penalized(self) -> bool:
        """Some penalty reshapes the logits from the token history."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def speculative(self) -> bool:
        """Whether a draft may propose this request's tokens: a grammar's sequences decode one token a step, as
        the draft's proposals are not checked against the grammar (spec_decode/decoder.py)."""
        return self.structured_outputs is None

    def clone(self) -> SamplingParams:
        """A deep copy (vLLM's): the engine fills some fields in (bad_words_token_ids), so reuse needs its own."""
        return copy.deepcopy(self)

    @property
    def needs_history(self) -> bool:
        """The sampler reads the generated tokens (penalties, bad_words, or the length for min_tokens)."""
        return self.penalized or self.min_tokens > 0 or bool(self.bad_words)

    @property
    def reshapes_logits(self) -> bool:
        """Something besides temperature/top-k/top-p/min-p changes which token wins: penalties, logit_bias, token
        masks, a grammar (then the raw argmax is not the greedy choice)."""
        return (
            self.penalized
            or bool(self.logit_bias)
            or self.allowed_token_ids is not None
            or bool(self.bad_words)
            or self.structured_outputs is not None
        )

    def check_logprobs(self, max_logprobs: int, vocab_size: int) -> None:
        """logprobs and prompt_logprobs within the engine's max_logprobs; -1 becomes the vocabulary's size."""
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                setattr(self, name, logprobs_count(name, getattr(self, name), max_logprobs, vocab_size))

    def check_token_ids(self, vocab_size: int) -> None:
        """Token ids the request names must exist in the model's vocabulary (ValueError naming the field)."""
        named = [
            ("stop_token_ids", self.stop_token_ids or []),
            ("logit_bias", list(self.logit_bias or {})),
            ("allowed_token_ids", self.allowed_token_ids or []),
        ]
        for name, ids in named:
            bad = next((t for t in ids if not 0 <= t < vocab_size), None)
            if bad is not None:
                raise ValueError(
                    f"{name} contains token id {bad}, which is outside the vocabulary: the model has {vocab_size} "
                    f"tokens (ids 0..{vocab_size - 1})"
                )


def truncation_length(truncate_prompt_tokens: int | None, max_model_len: int) -> int | None:
    """How many of a prompt's last tokens truncate_prompt_tokens keeps: -1 keeps as many as leave one token of
    room to generate (vLLM's -1 keeps max_model_len, a prompt it then refuses as too long). More than the context
    holds is a ValueError, as in vLLM (it would truncate nothing a request could run)."""
    if truncate_prompt_tokens is not None and truncate_prompt_tokens > max_model_len:
        raise ValueError(
            f"truncate_prompt_tokens: {truncate_prompt_tokens} is more than the model's context length "
            f"(max_model_len) {max_model_len}"
        )
    return max_model_len - 1 if truncate_prompt_tokens == -1 else truncate_prompt_tokens


def logprobs_count(name: str, value: int, max_logprobs: int, vocab_size: int) -> int:
    """How many top logprobs a token `value` asks for (-1: the whole vocabulary), if max_logprobs (-1: no bound)
    allows it; ValueError naming `name` otherwise (the engine's check, and the server's by its own field names)."""
    count = vocab_size if value == -1 else value
    if count > (vocab_size if max_logprobs == -1 else max_logprobs):
        asked = f"the whole vocabulary ({vocab_size})" if value == -1 else str(value)
        raise ValueError(
            f"{name}: {asked} top logprobs per token, more than max_logprobs={max_logprobs} allows (the setting "
            "max_logprobs, --max-logprobs; -1 allows the whole vocabulary)"
        )
    return min(count, vocab_size)


def _check_logprobs(name: str, value: object) -> int | None:
    """None, an integer >= 0, True (= 1, vLLM's) or -1 (vLLM's whole vocabulary); the engine's bound is
    `SamplingParams.check_logprobs`."""
    if value is None:
        return None
    if value is True:
        return 1
    _check_int(name, value, low=-1)
    return value


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
    return _normalize_token_ids("stop_token_ids", ids) or []


def _normalize_token_ids(name: str, ids: object, allow_empty: bool = True) -> list[int] | None:
    if ids is None:
        return None
    if not isinstance(ids, (list, tuple, set)):
        raise ValueError(f"{name} must be a list of integers, got {ids!r}")
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise ValueError(f"{name} must be non-negative integers, got {token!r}")
    if not ids and not allow_empty:
        raise ValueError(f"{name} must not be empty (it would allow no token at all)")
    return list(ids)


def _normalize_logit_bias(bias: object) -> dict[int, float] | None:
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias must be a mapping of token id to bias, got {bias!r}")
    out = {}
    for token, value in bias.items():
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise ValueError(f"logit_bias keys must be non-negative token ids, got {token!r}")
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not is_number or not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias for token {token} must be a number in [-100, 100], got {value!r}")
        out[token] = float(value)
    return out or None
