"""A prompt as vLLM's APIs take it (a string, token ids, or a TextPrompt / TokensPrompt dict), read into one form
the engine adds (LLMEngine.add_request, LLM.generate)."""

from __future__ import annotations

import numbers
import operator
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass, replace

import torch

from miniserve.sampling_params import SamplingParams


@dataclass
class Prompt:
    """One prompt as the engine takes it: text or token ids, the text of token ids if known, a cache salt."""

    prompt: str | list
    text: str | None = None
    cache_salt: str | None = None


PROMPT_KEYS = ("prompt", "prompt_token_ids", "cache_salt")
# vLLM's multimodal inputs: a text-only engine refuses them rather than answering without them
MULTIMODAL_KEYS = ("multi_modal_data", "mm_processor_kwargs", "multi_modal_uuids")
# the token ids of get_tokenizer().apply_chat_template(...): transformers 5 returns a dict by default
ENCODING_HINT = "; apply_chat_template returns a dict of input_ids (or pass it return_dict=False)"


def as_prompt(prompt) -> Prompt:
    """vLLM's prompt forms: a string, token ids, or a prompt dict."""
    if isinstance(prompt, Mapping):  # (a dict, or transformers' BatchEncoding)
        return prompt_from_dict(prompt)
    if isinstance(prompt, str):
        return Prompt(prompt)
    if not isinstance(prompt, Iterable) or unordered_or_bytes(prompt):
        raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
    return Prompt(token_ids(prompt))


def read_prompt(
    prompt: str | list[int] | dict | Prompt, params: SamplingParams, text: str | None
) -> tuple[str | list, SamplingParams, str | None]:
    """(text or token ids, params with a prompt dict's cache_salt, the text of token ids if known) of any prompt
    LLMEngine.add_request takes."""
    if isinstance(prompt, Mapping):
        prompt = as_prompt(prompt)
    if not isinstance(prompt, Prompt):
        return prompt, params, text
    if prompt.cache_salt is not None:
        params = replace(params, cache_salt=prompt.cache_salt)
    return prompt.prompt, params, prompt.text if text is None else text


def unordered_or_bytes(values) -> bool:
    """Iterables of ints that are no token sequence: bytes (text not decoded: bytes iterate as byte values) and
    sets (no order)."""
    return isinstance(values, (bytes, bytearray, memoryview, Set))


def prompt_from_dict(prompt: Mapping) -> Prompt:
    """vLLM's TextPrompt / TokensPrompt; a key it would act on that this engine cannot is refused by name."""
    media = [k for k in MULTIMODAL_KEYS if prompt.get(k)]
    if media:
        raise ValueError(f"{media[0]}: multimodal inputs are not supported (the model is text-only)")
    unknown = [k for k in prompt if k not in PROMPT_KEYS + MULTIMODAL_KEYS]
    if unknown:
        hint = ENCODING_HINT if "input_ids" in prompt else ""
        raise ValueError(f"a prompt dict has no key {unknown[0]!r} (it takes {', '.join(PROMPT_KEYS)}){hint}")
    text, salt = prompt.get("prompt"), prompt.get("cache_salt")
    if text is not None and not isinstance(text, str):
        raise ValueError(f"a prompt dict's 'prompt' must be a string, got {type(text).__name__}")
    if "prompt_token_ids" in prompt:
        ids = prompt["prompt_token_ids"]
        if isinstance(ids, (str, Mapping)) or not isinstance(ids, Iterable) or unordered_or_bytes(ids):
            hint = ENCODING_HINT if isinstance(ids, Mapping) else ""
            raise ValueError(f"'prompt_token_ids' must be a list of token ids, got {type(ids).__name__}{hint}")
        return Prompt(token_ids(ids), text, salt)
    if text is None:
        raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
    return Prompt(text, None, salt)


def is_token(value) -> bool:
    """An integer token id: an int, or a numpy or torch integer (bool is not one)."""
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not value.is_floating_point() and value.dtype != torch.bool
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # (numpy's integers are Integral)


def token_ids(values) -> list:
    """Token ids as Python ints; anything else stays as it is, for the engine to refuse by name."""
    return [operator.index(t) if is_token(t) else t for t in values]
