"""use_beam_search on /v1/completions and /v1/chat/completions, as vLLM's: the n best of n beams (beam_search.py's
search), each step's one-token requests posted together and awaited whole, so the answer is not streamed. A field
the search would not honour (sampling filters, stop lists, logprobs, grammars, tools...) is refused by name,
unless its value asks for nothing (top_k -1, tool_choice none...)."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

from fastapi import Request

from miniserve.beam_search import BeamSearch, BeamSearchParams, BeamSearchSequence, check_width
from miniserve.detokenizer import decode_output
from miniserve.server import responses as fmt
from miniserve.server.protocol import APIError, SamplingFields
from miniserve.server.request_group import RequestGroup, collect_finals
from miniserve.server.state import ServerState

# what a beam-search request may set: the search's own fields, the prompt's, and what only names or routes it
HONOURED = frozenset({
    "use_beam_search", "n", "max_tokens", "max_completion_tokens", "temperature", "ignore_eos", "length_penalty",
    "include_stop_str_in_output", "skip_special_tokens", "priority", "seed", "cache_salt", "model", "user",
    "request_id", "prompt", "messages", "add_special_tokens", "truncate_prompt_tokens", "add_generation_prompt",
    "continue_final_message", "chat_template", "chat_template_kwargs", "documents", "stream_options",
    "return_tokens_as_token_ids",  # (no logprobs to show them in)
})  # fmt: skip

# fields the search does not honour, and the values besides their default that ask for nothing either (what the
# sampler reads as off, vLLM's spellings included): accepted as the default is, since there is nothing to refuse
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "top_k": (0, -1),  # no top-k (vLLM's -1, and 0)
    "top_p": (1.0,),
    "min_p": (0.0,),
    "repetition_penalty": (1.0,),
    "stop": ([],),
    "stop_token_ids": ([],),
    "bad_words": ([],),
    "logit_bias": ({},),
    "tool_choice": ("none",),  # (tools themselves are refused: the template would show them)
}


def check_beam_fields(req: SamplingFields) -> None:
    """With use_beam_search, every field set away from its default (and from what means the same: NEUTRAL) must be
    one the search honours; without it, length_penalty (the search's) must stay 1."""
    if not req.use_beam_search:
        if req.length_penalty != 1.0:
            raise APIError("length_penalty applies to beam search only: set use_beam_search", param="length_penalty")
        return
    for name in sorted(req.model_fields_set - HONOURED):
        if not _asks_nothing(req, name):
            raise APIError(f"{name} cannot be combined with use_beam_search", param=name)
    if req.stream:  # (stream_options too: they ride on stream)
        raise APIError("use_beam_search answers are not streamed: leave stream false", param="stream")


def _asks_nothing(req: SamplingFields, name: str) -> bool:
    """Whether the field `name` is at its default or at a value that means the same (NEUTRAL; best_of: n, none of
    the n choices dropped)."""
    value = getattr(req, name)
    if value == type(req).model_fields[name].get_default(call_default_factory=True) or value in NEUTRAL.get(name, ()):
        return True
    return name == "best_of" and value == req.n


async def beam_outputs(
    state: ServerState, request: Request, req: SamplingFields, prompts: list[list[int]], budgets: list[int]
) -> tuple[list[list[dict[str, Any]]], dict[str, Any]] | None:
    """Each prompt's n best beams as choice fields (text, token_ids, finish_reason, stop_reason), and the answer's
    usage; None when the client left. One search over every prompt: each step's requests are one group. Its
    max_tokens is the largest budget: a budget is max_tokens (the same for every prompt) or the rest of the
    context, where the search ends a beam anyway."""
    try:
        check_width(req.n, state.config.max_logprobs, "n")
    except ValueError as exc:
        raise APIError(f"{exc} (--max-logprobs)", param="n") from None
    if min(budgets) < 1:  # (max_tokens 0 is for echo, which beam search refuses)
        raise APIError("max_tokens: beam search generates at least one token", param="max_tokens")
    params = BeamSearchParams(
        beam_width=req.n,
        max_tokens=max(budgets),
        ignore_eos=req.ignore_eos,
        temperature=req.temperature or 0.0,
        length_penalty=req.length_penalty,
        include_stop_str_in_output=req.include_stop_str_in_output,
    )
    search = BeamSearch(prompts, params, set(state.engine.info["eos_token_ids"]), state.max_model_len)
    step = dataclasses.replace(search.step_params, output_kind="final_only", detokenize=False, seed=req.seed,
                               cache_salt=req.cache_salt)  # fmt: skip
    first: list[Any] = []  # the first step's outputs: its requests are the prompts (their cached tokens count)
    while batch := search.next_prompts():
        group = RequestGroup(state, f"beam-{uuid.uuid4().hex}", False)
        await group.start(batch, [step] * len(batch), "prompt", 1, req.priority)
        finals = await collect_finals(group, request)
        if finals is None:
            return None
        first = first or list(finals.values())
        search.advance([finals[i].outputs[0].logprobs[0] for i in range(len(batch))])
    found = search.results()
    outputs = [[_choice(state, req, ids, beam) for beam in out.sequences] for ids, out in zip(prompts, found)]
    completion_tokens = sum(len(c["token_ids"]) for choices in outputs for c in choices)
    return outputs, fmt.usage(sum(len(ids) for ids in prompts), completion_tokens, first)


def _choice(state: ServerState, req: SamplingFields, ids: list[int], beam: BeamSearchSequence) -> dict[str, Any]:
    """A beam as choice fields; as vLLM's server search, a beam's final EOS is in its token ids (and usage) only
    with include_stop_str_in_output, as in its text."""
    shown = beam.shown_tokens(req.include_stop_str_in_output)[len(ids) :]
    text = decode_output(state.tokenizer, shown, req.skip_special_tokens)
    return {"text": text, "token_ids": shown, "finish_reason": beam.finish_reason, "stop_reason": beam.stop_reason}
