"""A validated request's fields as the engine's SamplingParams, and `best_of`'s choice among what came back.

Every sampling field a request may carry is read here (protocol.py refuses the ones the server cannot honour), so
a field that reaches the engine is never silently dropped on the way. A ValueError of SamplingParams becomes a
400 naming the request field it is about.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from miniserve.sampling_params import SamplingParams, StructuredOutputsParams
from miniserve.server.protocol import APIError, SamplingFields, param_from_value_error


def sampling_params(
    req: SamplingFields,
    max_tokens: int,
    logprobs: int | None,
    vocab_size: int,
    prompt_logprobs: int | None = None,
    structured: StructuredOutputsParams | None = None,
    defaults: dict[str, Any] | None = None,
) -> SamplingParams:
    """SamplingParams for one prompt of `req`. With best_of > n the engine runs best_of choices (with logprobs,
    for their cumulative logprob) and `pick_best` keeps n of them. `defaults` (the model's generation_config.json:
    ServerState.sampling_defaults) fill the sampling fields the request leaves unset, as vLLM's do."""
    defaults = defaults or {}
    best_of = req.best_of if req.best_of is not None and req.best_of > req.n else None
    kwargs: dict[str, Any] = {
        "n": best_of or req.n,
        "max_tokens": max_tokens,
        "min_tokens": req.min_tokens,
        "seed": req.seed,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "stop": [req.stop] if isinstance(req.stop, str) else req.stop,
        "stop_token_ids": req.stop_token_ids,
        "ignore_eos": req.ignore_eos,
        "logprobs": 0 if best_of and logprobs is None else logprobs,
        "prompt_logprobs": prompt_logprobs,
        "include_stop_str_in_output": req.include_stop_str_in_output,
        "skip_special_tokens": req.skip_special_tokens,
        # a stream gets what is new at every step; a plain request only its final output (as LLM.generate)
        "output_kind": "delta" if req.stream else "final_only",
        # a stream's text is made by the API process (off the engine's step loop), unless stop strings are
        # matched in it, which the engine does
        "detokenize": not req.stream or bool(req.stop),
        "logit_bias": _logit_bias(req.logit_bias, vocab_size),
        "allowed_token_ids": req.allowed_token_ids,
        "bad_words": req.bad_words or None,
        "structured_outputs": structured,
        "cache_salt": req.cache_salt,
    }
    # the request's value, else the model's default, else SamplingParams' own
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
        if getattr(req, name) is not None:
            kwargs[name] = getattr(req, name)
        elif name in defaults:
            kwargs[name] = defaults[name]
    try:
        params = SamplingParams(**kwargs)
        params.check_token_ids(vocab_size)
    except ValueError as exc:
        raise APIError(str(exc), param=param_from_value_error(str(exc), type(req))) from None
    return params


def _logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's logit_bias: JSON object keys are token ids written as strings."""
    if not bias:
        return None
    out: dict[int, float] = {}
    keys: dict[int, str] = {}
    for key, value in bias.items():
        token = _token_id(key, vocab_size)
        if token in keys:
            raise APIError(
                f"logit_bias keys {keys[token]!r} and {key!r} both name token {token}: give each token once",
                param="logit_bias",
            )
        keys[token], out[token] = key, value
    return out


def _token_id(key: str, vocab_size: int) -> int:
    """A logit_bias key as a token id: ASCII digits only (int() would also take " 5", "1_0" and other scripts'
    digits, each a token the client may not have meant)."""
    if not (key.isascii() and key.isdigit()):
        raise APIError(f"logit_bias key {key!r} is not a token id (digits 0-9 only)", param="logit_bias")
    digits = key.lstrip("0") or "0"
    token = int(digits) if len(digits) <= len(str(vocab_size)) else vocab_size  # (int() refuses 4,300 digits)
    if token >= vocab_size:
        raise APIError(
            f"logit_bias key {key!r} is outside the vocabulary: the model has {vocab_size} tokens "
            f"(ids 0..{vocab_size - 1})",
            param="logit_bias",
        )
    return token


def pick_best(out: Any, req: SamplingFields) -> list[Any]:
    """The choices to return: all of them, or with best_of > n the n with the highest cumulative logprob (numbered
    0..n-1 in that order), their logprobs dropped unless asked for."""
    outputs = sorted(out.outputs, key=lambda o: o.index)
    if req.best_of is None or req.best_of <= req.n:
        return outputs
    best = sorted(outputs, key=lambda o: -(o.cumulative_logprob or 0.0))[: req.n]
    asked = getattr(req, "logprobs", None)  # completions: top-N (0 asks for the sampled token's); chat: a bool
    wants_logprobs = asked is not None and asked is not False
    return [
        dataclasses.replace(o, index=j, logprobs=o.logprobs if wants_logprobs else None) for j, o in enumerate(best)
    ]
