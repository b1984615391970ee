"""The offline API, shaped like vLLM's: `LLM(model=...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import difflib
import functools
import itertools
import json
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import fields, replace
from typing import Any

from tqdm.auto import tqdm

from miniserve.beam_search import BeamSearchOutput, BeamSearchParams, beam_search, check_width
from miniserve.chat_template import check_chat_options
from miniserve.config import EngineConfig, speculative_settings
from miniserve.detokenizer import decode_output
from miniserve.engine.llm_engine import LLMEngine
from miniserve.engine.outputs import RequestOutput
from miniserve.engine.prompts import as_prompt, is_token, unordered_or_bytes
from miniserve.sampling_params import SamplingParams
from miniserve.settings import check_combinations
from miniserve.vllm_no_ops import NO_OPS, keyword_warning

PromptType = str | list[int] | dict


class LLM:
    """Load a model once, then generate for batches of prompts with continuous batching under the hood.

    Keyword arguments are `EngineConfig` fields (dtype, kv_cache_dtype, device, block_size, max_model_len,
    speculative_model, num_speculative_tokens, ...), or vLLM's `speculative_config` dict for the last two.
    `LLM()` with no model loads the embedded demo model.
    """

    def __init__(self, model: str | None = None, *, speculative_config: dict | None = None, **kwargs):
        spec = speculative_settings(speculative_config)
        both = [name for name in spec if name in kwargs]
        if both:
            raise ValueError(f"{both[0]} is given twice: as an argument and in speculative_config")
        kwargs.update(spec)
        if isinstance(kwargs.get("override_generation_config"), dict):  # vLLM's LLM takes a dict; the setting is JSON
            kwargs["override_generation_config"] = json.dumps(kwargs["override_generation_config"])
        self.engine = LLMEngine(engine_config(model, kwargs))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What a request without sampling params gets (LLMEngine.default_sampling_params)."""
        return self.engine.default_sampling_params()

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prompt prefix: the next requests compute their prompts from scratch. True, as vLLM's
        returns when it could (here it always can: blocks in use keep their contents, only the index forgets)."""
        self.engine.reset_prefix_cache()
        return True

    def shutdown(self) -> None:
        """Stop the other tensor-parallel ranks now rather than at exit (then this LLM is unusable)."""
        self.engine.shutdown()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | Callable[..., Any] = True,
        priority: list[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in prompt order.

        A prompt is a string, a list of token ids, or vLLM's prompt dicts: {"prompt": "..."} or
        {"prompt_token_ids": [...]} (with the text as "prompt" too, it is the output's `prompt`), either with
        "cache_salt". `priority`: one per prompt (lower runs first), with scheduling_policy "priority", as vLLM's.
        """
        prompts = [as_prompt(p) for p in _as_prompt_list(prompts)]
        if priority is not None and not isinstance(priority, (list, tuple)):
            raise TypeError(f"priority must be a list of ints, one per prompt, got {type(priority).__name__}")
        priority = [0] * len(prompts) if priority is None else list(priority)
        if len(priority) != len(prompts):
            raise ValueError(f"priority has {len(priority)} values for {len(prompts)} prompts: give one per prompt")
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        # the caller sees finished requests only: the engine need not report (nor detokenize) every step
        params = [replace(p, output_kind="final_only") for p in _as_params_list(sampling_params, len(prompts))]
        bar = _progress(use_tqdm, len(prompts))  # (a progress bar that fails to start fails before any request)
        ids = []
        try:
            for prompt, p, urgency in zip(prompts, params, priority):
                rid = str(next(self._ids))  # (vLLM's offline ids: "0", "1", ...)
                self.engine.add_request(rid, prompt, p, priority=urgency)
                ids.append(rid)
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            bar.close()
            raise
        return self._run(ids, bar)

    def beam_search(
        self,
        prompts: PromptType | Sequence[PromptType],
        params: BeamSearchParams,
        *,
        use_tqdm: bool | Callable[..., Any] = False,
    ) -> list[BeamSearchOutput]:
        """vLLM's beam search: the beam_width likeliest continuations of each prompt (beam_search.py), run as one
        generate call a token (use_tqdm, as vLLM's: a bar over those steps, up to max_tokens)."""
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"params must be a BeamSearchParams, got {type(params).__name__}")
        tok, engine = self.engine.tokenizer, self.engine
        check_width(params.beam_width, engine.config.max_logprobs)
        ids = []
        for p in map(as_prompt, _as_prompt_list(prompts)):
            if p.cache_salt is not None:
                raise ValueError("cache_salt is not supported by beam_search")
            ids.append(tok.encode(p.prompt) if isinstance(p.prompt, str) else p.prompt)
            engine.check_length(ids[-1], SamplingParams(max_tokens=1))  # (as its first step's request)

        bar = _progress(use_tqdm, params.max_tokens, "Beam search")

        def generate(batch: list[list[int]], step: SamplingParams) -> list[RequestOutput]:
            bar.update(1)
            return self.generate(batch, step, use_tqdm=False)

        try:
            eos, decode = engine.outputs.eos_token_ids, functools.partial(decode_output, tok, skip_special_tokens=False)
            return beam_search(generate, ids, params, eos, engine.max_model_len, decode)
        finally:
            bar.close()

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | Callable[..., Any] = True,
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict] | None = None,
        chat_template: str | None = None,
        chat_template_kwargs: dict | None = None,
        chat_template_content_format: str | None = None,
    ) -> list[RequestOutput]:
        """Render each conversation with the model's chat template and generate the assistant's reply (vLLM's
        arguments: `tools` reach the template, `chat_template` replaces the model's, `chat_template_kwargs` become
        template variables such as `enable_thinking`, `continue_final_message` continues the last assistant
        message instead of starting a new one, `chat_template_content_format` overrides the engine's setting).
        Tool calls stay in the output text, as in vLLM's offline API."""
        conversations = _as_conversations(messages)
        check_chat_options(add_generation_prompt, continue_final_message, chat_template_kwargs)
        options = dict(tools=tools, chat_template=chat_template, continue_final_message=continue_final_message)
        options["content_format"] = chat_template_content_format
        tok = self.engine.tokenizer
        prompts = []
        for c in conversations:
            text, ids = tok.chat_prompt(c, add_generation_prompt, template_kwargs=chat_template_kwargs, **options)
            prompts.append({"prompt_token_ids": ids, "prompt": text})  # the output's prompt is the rendered text
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, request_ids: list[str], bar: Any) -> list[RequestOutput]:
        """Step the engine until this call's requests finish; their outputs in order. Requests added to the engine
        by other means (LLMEngine.add_request) run beside them, and count for nothing here."""
        wanted, results = set(request_ids), {}
        try:
            while len(results) < len(request_ids):
                for out in self.engine.step():
                    if out.finished and out.request_id in wanted:
                        results[out.request_id] = out
                        bar.update(1)
            return [results[rid] for rid in request_ids]
        except BaseException:
            for rid in request_ids:
                self.engine.abort_request(rid)
            raise
        finally:
            bar.close()


def engine_config(model: str | None, kwargs: dict[str, Any]) -> EngineConfig:
    """The EngineConfig of LLM(model, **kwargs): vLLM keywords that change nothing here taken with a warning
    (vllm_no_ops.py), any other keyword not a setting refused by name, and a setting given (not None, not its
    default) where another makes it do nothing refused as the CLI refuses it."""
    settings = {f.name: f.default for f in fields(EngineConfig)}  # (name -> default)
    for name in [k for k in kwargs if k not in settings and k in NO_OPS and NO_OPS[k].offline]:
        if (warning := keyword_warning(name, kwargs.pop(name))) is not None:
            warnings.warn(warning, stacklevel=3)
    unknown = next((k for k in kwargs if k not in settings), None)
    if unknown is not None:
        near = difflib.get_close_matches(unknown, settings, n=1, cutoff=0.85)
        hint = f" (did you mean {near[0]!r}?)" if near else " (the settings are EngineConfig's fields: README)"
        raise TypeError(f"LLM() got an unexpected keyword argument {unknown!r}: not a miniserve setting{hint}")
    config = EngineConfig(model=model, **kwargs)
    given = {k: f"{k}={v!r}" for k, v in kwargs.items() if v is not None and v != settings[k]}  # (else: unset)
    check_combinations(config, given, lambda f, _: f.name)
    return config


PROMPTS_ERROR = "prompts must be a string, a list of token ids, a prompt dict, or a list of those"


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, (str, Mapping)):
        return [prompts]
    if not isinstance(prompts, Iterable) or unordered_or_bytes(prompts):
        raise ValueError(f"{PROMPTS_ERROR}, got {type(prompts).__name__}")
    prompts = list(prompts)
    if prompts and all(is_token(t) for t in prompts):
        return [prompts]  # one prompt given as token ids (a list, a numpy array, a tensor)
    return prompts


def _as_params_list(params, n: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * n
    if not isinstance(params, Iterable) or isinstance(params, (str, dict)):
        raise ValueError(f"sampling_params must be a SamplingParams or a list of them, got {type(params).__name__}")
    params = list(params)
    wrong = next((p for p in params if not isinstance(p, SamplingParams)), None)
    if wrong is not None:
        raise ValueError(f"sampling_params must be a SamplingParams or a list of them, got a {type(wrong).__name__}")
    if len(params) != n:
        raise ValueError(f"got {len(params)} sampling_params for {n} prompts")
    return params


def _as_conversations(messages) -> list[list[dict]]:
    """One conversation (a list of message dicts) or a list of them."""
    if isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages):
        return [messages]
    if isinstance(messages, list) and all(
        isinstance(c, list) and all(isinstance(m, dict) for m in c) for c in messages
    ):
        return messages
    raise ValueError(f"messages must be a list of message dicts or a list of such lists, got {type(messages).__name__}")


def _progress(use_tqdm: bool | Callable[..., Any], total: int, desc: str = "Generating") -> Any:
    """vLLM's use_tqdm: True, False, or a tqdm-like class to make the bar with."""
    make = use_tqdm if callable(use_tqdm) else tqdm
    return make(total=total, desc=desc, disable=not use_tqdm)
