"""OpenAI-shaped request models and the error type every endpoint answers with.

The server parses bodies itself (not through FastAPI's signature magic) so that every bad input, from
malformed JSON to an out-of-range `top_p`, comes back as OpenAI's `{"error": {...}}` with a 4xx status and
`param` naming the offending field, which is what the official clients surface to users.
"""

from __future__ import annotations

import functools
import re
import typing
from collections.abc import Callable
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from miniserve.chat_template import check_chat_options

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# content parts a text-only model cannot take, by type, and what to call them in the error
MEDIA_PARTS = {
    "image_url": "images",
    "input_image": "images",
    "image": "images",
    "input_audio": "audio inputs",
    "audio_url": "audio inputs",
    "video_url": "videos",
    "file": "files",
}


class APIError(Exception):
    """An error the client caused (or an overload): rendered as OpenAI's error object."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        err_type: str | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.err_type = err_type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.err_type, "param": self.param, "code": self.code}}


class RequestModel(BaseModel):
    # strict: "3" is not an int and true is not 1; NaN and infinities are not numbers. Fields outside OpenAI's and
    # vLLM's schemas are kept aside and reported by `ignored_fields` (the server logs them once per request, as vLLM
    # does); every field the schemas name is either honoured or refused with a 400 naming it (`_REFUSED`).
    model_config = ConfigDict(strict=True, extra="allow", populate_by_name=True, allow_inf_nan=False)

    # field -> (accepts(value), why other values are refused); checked after validation
    _REFUSED: ClassVar[dict[str, tuple[Callable[[Any], bool], str]]] = {}

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """An explicit null for an optional field that takes no None means "not given": its default. OpenAI's
        schemas mark n, stream, the penalties, echo and chat's logprobs nullable (vLLM reads null so), and clients
        that write every field send them."""
        if isinstance(data, dict) and None in data.values():
            fields = _defaulted_on_null(cls)
            data = {k: v for k, v in data.items() if v is not None or k not in fields}
        return data

    @model_validator(mode="after")
    def _check_refused(self) -> RequestModel:
        fields = type(self).model_fields
        for name, (accepts, why) in self._REFUSED.items():
            if name in fields and not accepts(getattr(self, name)):
                raise ValueError(f"{fields[name].alias or name}: {why}")  # (async_ is "async" in JSON)
        return self

    def ignored_fields(self, prefix: str = "") -> list[str]:
        """Dotted names of fields no schema knows, here and in nested objects."""
        out = [prefix + key for key in sorted(self.model_extra or {})]
        for name in sorted(self.model_fields_set & type(self).model_fields.keys()):  # a default holds no extras
            value = getattr(self, name)
            if isinstance(value, list) and value and type(value[0]) is int:
                continue  # token ids (thousands of them in a prompt): no object inside
            items = value if isinstance(value, list) else [value]
            for j, item in enumerate(items):
                if isinstance(item, RequestModel):
                    where = f"{prefix}{name}[{j}]." if isinstance(value, list) else f"{prefix}{name}."
                    out += item.ignored_fields(where)
        return out


@functools.cache
def _defaulted_on_null(cls: type[BaseModel]) -> frozenset[str]:
    """Names (and aliases) of `cls`'s fields that have a default and whose type does not take None."""
    names: set[str] = set()
    for name, field in cls.model_fields.items():
        takes_none = field.annotation in (Any, None, type(None)) or type(None) in typing.get_args(field.annotation)
        if not field.is_required() and not takes_none:
            names |= {name, field.alias} - {None}
    return frozenset(names)


def unset(value: Any) -> bool:
    return value is None


def empty(value: Any) -> bool:
    return not value


class StreamOptions(RequestModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage on every chunk (with include_usage, asked or forced: state.py)
    include_obfuscation: bool | None = None

    _REFUSED = {"include_obfuscation": (lambda v: not v, "stream chunks carry no obfuscation")}


class JsonSchemaFormat(RequestModel):
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # outputs always follow the schema strictly (what strict=true asks)


class ResponseFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None

    _REFUSED = {"type": (lambda v: v != "structural_tag", "structural_tag response formats are not supported")}

    @model_validator(mode="after")
    def _needs_schema(self) -> ResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.json_schema is None):
            raise ValueError("json_schema: response_format of type json_schema needs json_schema.schema")
        if self.type != "json_schema" and self.json_schema is not None:  # it would constrain nothing
            raise ValueError(f"json_schema: a schema is read only with type json_schema, not {self.type}")
        return self


class StructuredOutputsField(RequestModel):
    """vLLM's `structured_outputs` object: one constraint plus options."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_fallback: bool = False  # there is one backend (xgrammar): never a fallback
    disable_additional_properties: bool = False  # schemas are compiled strictly: never additional properties
    whitespace_pattern: str | None = None
    structural_tag: str | None = None

    _REFUSED = {
        "whitespace_pattern": (unset, "custom whitespace patterns are not supported (xgrammar)"),
        "structural_tag": (unset, "structural tags are not supported"),
    }


class FunctionDefinition(RequestModel):
    # any non-empty name, as vLLM takes it (OpenAI's ^[a-zA-Z0-9_-]{1,64}$ would refuse vLLM users' "get.weather")
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # arguments of a forced call always follow `parameters` strictly


class ToolParam(RequestModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(RequestModel):
    name: str


class NamedToolChoice(RequestModel):
    type: Literal["function"] = "function"
    function: NamedFunction


def _distinct_tool_names(tools: list[ToolParam] | None) -> list[ToolParam] | None:
    """Tools whose names are all different: a call names its tool, so of two alike the model's call could mean
    either (and "required"'s schema would offer the same name twice)."""
    first: dict[str, int] = {}
    for j, tool in enumerate(tools or []):
        name = tool.function.name
        if name in first:
            raise ValueError(f"tools {first[name]} and {j} are both named {name!r}: tool names must be unique")
        first[name] = j
    return tools


# Fields both endpoints refuse unless left at what they honour. The value is what the field accepts.
COMMON_REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "spaces_between_special_tokens": (lambda v: v is True, "only true (the default) is supported"),
    "guided_decoding_backend": (
        lambda v: v in (None, "auto", "xgrammar"),
        "the only structured-output backend is xgrammar",
    ),
    "guided_whitespace_pattern": (unset, "custom whitespace patterns are not supported (xgrammar)"),
    "structural_tag": (unset, "structural tags are not supported"),
    "logits_processors": (empty, "custom logits processors are not supported"),
    "kv_transfer_params": (empty, "disaggregated serving (KV transfer) is not supported"),
    "vllm_xargs": (empty, "no extension reads vllm_xargs here"),
}


class SamplingFields(RequestModel):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI names, then vLLM extras)."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0)  # no upper bound, as vLLM (OpenAI stops at 2)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=128)
    best_of: int | None = Field(default=None, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)  # what torch.Generator takes
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float | int] | None = None
    user: str | None = None  # an end-user id for the caller's records: no effect on the output
    response_format: ResponseFormat | None = None
    # vLLM extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = Field(default=0, ge=0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    prompt_logprobs: int | None = Field(default=None, ge=-1)  # -1: the whole vocabulary (max_logprobs bounds it)
    use_beam_search: bool = False
    length_penalty: float = 1.0
    structured_outputs: StructuredOutputsField | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None
    structural_tag: str | None = None
    priority: int = 0
    request_id: str | None = Field(default=None, min_length=1, max_length=256)
    logits_processors: list[Any] | None = None
    return_tokens_as_token_ids: bool | None = None
    return_token_ids: bool | None = None
    cache_salt: str | None = Field(default=None, min_length=1)
    kv_transfer_params: dict[str, Any] | None = None
    vllm_xargs: dict[str, Any] | None = None

    _REFUSED = COMMON_REFUSED

    @model_validator(mode="after")
    def _check_common(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of must be >= n, got best_of={self.best_of} and n={self.n}")
        if self.best_of is not None and self.best_of > self.n and self.stream:
            raise ValueError("best_of cannot be used with stream: the best choices are known only at the end")
        if self.truncate_prompt_tokens == 0:
            raise ValueError("truncate_prompt_tokens must be >= 1 (or -1: the model's context length)")
        return self

    def structured_spec(self) -> tuple[str, dict[str, Any]] | None:
        """(the field it came from, StructuredOutputsParams keyword arguments), or None without a constraint."""
        options: dict[str, Any] = {}
        found: list[tuple[str, dict[str, Any]]] = []
        so = self.structured_outputs
        if so is not None:
            options["disable_any_whitespace"] = so.disable_any_whitespace
            given = {
                "json": so.json_,
                "regex": so.regex,
                "choice": so.choice,
                "grammar": so.grammar,
                "json_object": so.json_object or None,
            }
            given = {k: v for k, v in given.items() if v is not None}
            if len(given) > 1:
                raise ValueError(f"structured_outputs takes one constraint, got {', '.join(given)}")
            if given:
                found.append(("structured_outputs", given))
        for field, key in (
            ("guided_json", "json"),
            ("guided_regex", "regex"),
            ("guided_choice", "choice"),
            ("guided_grammar", "grammar"),
        ):
            if getattr(self, field) is not None:
                found.append((field, {key: getattr(self, field)}))
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            found.append(("response_format", {"json_object": True}))
        elif rf is not None and rf.type == "json_schema":
            found.append(("response_format", {"json": rf.json_schema.json_schema}))
        if len(found) > 1:
            names = ", ".join(name for name, _ in found)
            raise ValueError(f"{found[1][0]}: give one structured-output constraint, got several ({names})")
        if not found and so is not None:  # its options alone would run unconstrained (vLLM refuses it too)
            raise ValueError(
                "structured_outputs needs a constraint (json, regex, choice, grammar or json_object), here or in "
                "response_format or a guided_* field"
            )
        if not found:
            return None
        return found[0][0], {**found[0][1], **options}


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    # OpenAI's legacy default; 0 with echo scores the prompt and generates nothing (`echo_only`)
    max_tokens: int | None = Field(default=16, ge=0)
    logprobs: int | None = Field(default=None, ge=-1)
    echo: bool = False
    suffix: str | None = None
    add_special_tokens: bool = True
    prompt_embeds: Any = None

    _REFUSED = {
        **COMMON_REFUSED,
        "suffix": (empty, "suffix (insertion) is not supported"),
        "prompt_embeds": (unset, "prompt embeddings are not supported"),
    }

    @model_validator(mode="after")
    def _check_completion(self) -> CompletionRequest:
        p = self.prompt
        if p == "" or (isinstance(p, list) and (not p or (_is_batch(p) and any(len(x) == 0 for x in p)))):
            raise ValueError("prompt must not be empty")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens must be at least 1 (0 only with echo: the prompt scored, nothing generated)")
        if self.max_tokens == 0 and self.min_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens (0)")
        return self

    def echo_only(self) -> bool:
        """echo with max_tokens 0 (OpenAI's legacy way to score a text, as vLLM takes it): the engine runs the
        prompt pass (one token, which is dropped) and the choices carry the prompt alone."""
        return self.echo and self.max_tokens == 0

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of single prompts (text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        return list(p) if _is_batch(p) else [list(p)]


def _is_batch(prompt: list) -> bool:
    """A list prompt is a batch (texts or token-id lists) or one prompt of token ids: validation made the list one
    of the two (never mixed), so its first element says which, without a pass over a long prompt's ids."""
    return bool(prompt) and isinstance(prompt[0], (str, list))


class TextPart(RequestModel):
    type: Literal["text"]
    text: str


class ChatRefusalPart(RequestModel):
    """An assistant's refusal, passed back: read as its text."""

    type: Literal["refusal"]
    refusal: str


class ToolCallFunction(RequestModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(RequestModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(RequestModel):
    # system, developer, user, assistant, tool; or any other role the chat template knows (Llama 3.1's ipython, a
    # --response-role passed back), as vLLM takes them
    role: str = Field(min_length=1, max_length=64)
    content: str | list[TextPart | ChatRefusalPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant messages that called tools
    tool_call_id: str | None = None  # tool messages: the call this answers
    refusal: str | None = None  # an assistant's refusal: its text when it has no content
    # an assistant's reasoning, passed back (the server's `reasoning` field; `reasoning_content`, vLLM's older
    # name): the template gets it under both names and as `thinking` (Qwen3's renders it in a tool-calling turn)
    reasoning: str | None = None
    reasoning_content: str | None = None
    audio: Any = None
    function_call: Any = None

    _REFUSED = {
        "audio": (unset, "audio is not supported"),
        "function_call": (unset, "the deprecated function_call is not supported: use tool_calls"),
    }

    @model_validator(mode="after")
    def _check_roles(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("tool_calls are only allowed in assistant messages")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("tool_call_id is required in tool messages")
        given = {self.reasoning, self.reasoning_content} - {None}
        if given and self.role != "assistant":
            raise ValueError("reasoning is only allowed in assistant messages")
        if len(given) > 1:
            raise ValueError("reasoning and reasoning_content differ: give the reasoning once")
        return self

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        """Say plainly that media parts are not supported, instead of listing every union branch that failed."""
        for part in content if isinstance(content, list) else []:
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind in MEDIA_PARTS:
                raise ValueError(f"{MEDIA_PARTS[kind]} are not supported ({kind!r} part): the model is text-only")
        return content

    def text(self) -> str:
        """String content; text parts are joined with newlines (as vLLM does)."""
        if not self.content:
            return self.refusal or ""
        content = self.template_content()
        return content if isinstance(content, str) else "\n".join(part["text"] for part in content)

    def template_content(self) -> str | list[dict[str, str]] | None:
        """The content as given, for chat_template.normalize_message to shape as the template reads it (one text,
        or its parts: a refusal part read as its text); an assistant's refusal when it has no content; else None."""
        if isinstance(self.content, list) and self.content:
            return [{"type": "text", "text": p.text if isinstance(p, TextPart) else p.refusal} for p in self.content]
        return self.content if self.content is not None and self.content != [] else self.refusal

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it: "developer" -> "system", an assistant's reasoning (the tokenizer
        gives it under every name templates read, and turns tool-call arguments into objects)."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role}
        out["content"] = self.template_content()
        if self.name is not None:
            out["name"] = self.name
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        reasoning = self.reasoning if self.reasoning is not None else self.reasoning_content
        if reasoning is not None:  # (the tokenizer gives it under each of chat_template.REASONING_NAMES)
            out["reasoning"] = reasoning
        if self.tool_calls:
            out["tool_calls"] = [
                {
                    "id": c.id,
                    "type": c.type,
                    "function": {"name": c.function.name, "arguments": c.function.arguments},
                }
                for c in self.tool_calls
            ]
        return out


_CHAT_REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    **COMMON_REFUSED,
    "mm_processor_kwargs": (empty, "multimodal inputs are not supported"),
    "functions": (unset, "the deprecated functions field is not supported: use tools"),
    "function_call": (unset, "the deprecated function_call field is not supported: use tool_choice"),
    "audio": (unset, "audio output is not supported"),
    "modalities": (lambda v: v is None or v == ["text"], "only the text modality is supported"),
    "prediction": (unset, "predicted outputs are not supported"),
    "store": (lambda v: not v, "this server does not store completions"),
    "service_tier": (lambda v: v in (None, "auto", "default"), "there is one service tier (auto/default)"),
    "reasoning_effort": (
        unset,
        "reasoning_effort cannot be honoured: switch thinking with the chat template's own variable in "
        "chat_template_kwargs (e.g. enable_thinking)",
    ),
    "verbosity": (unset, "verbosity is not supported"),
    "web_search_options": (unset, "web search is not supported"),
    "moderation": (unset, "moderation is not supported"),
    "prompt_cache_options": (unset, "prompt cache options are not supported (prompts are cached automatically)"),
}


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=-1)
    tools: list[ToolParam] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None  # for the caller's records: no effect on the output
    safety_identifier: str | None = None  # an end-user id for the caller's records: no effect on the output
    prompt_cache_key: str | None = None  # a caching hint; prompts are cached (or not) whatever it says
    prompt_cache_retention: str | None = None
    prompt_cache_options: Any = None
    moderation: Any = None
    # vLLM extensions
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # vLLM's: False, exactly the template's text (the template writes the BOS a model wants); True, the tokenizer's
    # specials on top of it; unset, False, except for a model without a template (Tokenizer.chat_prompt)
    add_special_tokens: bool | None = None
    documents: list[dict[str, Any]] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    # refused unless unset (see _CHAT_REFUSED)
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    store: bool | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
    include_reasoning: bool = True  # false: the reasoning is left out (server/reasoning.py; needs a parser)
    verbosity: str | None = None
    web_search_options: Any = None

    _REFUSED = _CHAT_REFUSED

    _distinct_tools = field_validator("tools")(_distinct_tool_names)

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        check_chat_options(self.add_generation_prompt, self.continue_final_message, self.chat_template_kwargs)
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = [t.function.name for t in self.tools or []]
            if self.tool_choice.function.name not in names:
                raise ValueError(f"tool_choice names the function {self.tool_choice.function.name!r}, not in tools")
        return self

    def chat_messages(self) -> list[dict[str, Any]]:
        """Messages as chat templates read them (see ChatMessage.for_template)."""
        return [m.for_template() for m in self.messages]

    def token_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def tool_mode(self) -> str:
        """ "none" (no tools, or tool_choice none), "auto", "required" or "named"."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"


class TokenizeRequest(RequestModel):
    """vLLM's /tokenize: a prompt, or messages rendered as /v1/chat/completions renders them."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True  # for messages, only when given: as in chat (vLLM's TokenizeChatRequest)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ToolParam] | None = None
    documents: list[dict[str, Any]] | None = None
    return_token_strs: bool = False

    # what only a chat's rendering reads: beside a prompt, nothing would (a 400, not a template that never runs)
    _CHAT_ONLY: ClassVar[tuple[str, ...]] = (
        "add_generation_prompt", "continue_final_message", "chat_template", "chat_template_kwargs", "tools",
        "documents",
    )  # fmt: skip

    _distinct_tools = field_validator("tools")(_distinct_tool_names)

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("prompt or messages: give exactly one of them")
        given = self._chat_fields_given() if self.prompt is not None else []
        if given:
            raise ValueError(f"{given[0]} applies to messages (a chat), not to a prompt: leave it out")
        check_chat_options(self.add_generation_prompt, self.continue_final_message, self.chat_template_kwargs)
        return self

    def _chat_fields_given(self) -> list[str]:
        """The chat-only fields this request sets (null reads as not given)."""
        return [name for name in self._CHAT_ONLY if name in self.model_fields_set and getattr(self, name) is not None]


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[int]


def parse_request(model: type[RequestModel], body: Any) -> Any:
    """Validate a decoded JSON body; a pydantic error becomes a 400 whose `param` names the field."""
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _validation_to_api_error(exc, model, body) from None


def _validation_to_api_error(exc: ValidationError, model: type[RequestModel], body: dict) -> APIError:
    errors = exc.errors()
    err = _most_specific(errors)
    path = _request_path(err, body)
    param = str(path[0]) if path else None
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
        param = param or _param_from_message(msg, _fields_of(exc.title, model))
    where = ".".join(str(x) for x in path)
    return APIError(f"{where}: {msg}{_union_forms(errors, err, body)}" if where else msg, param=param)


def _most_specific(errors: list[Any]) -> Any:
    """Of the errors about the first error's field, the one that reached deepest into the value. A union field
    fails once per branch, the first branch's error first: a list of Responses input items with one bad item would
    be told "input: Input should be a valid string", where the list branch names the item's field."""
    field = errors[0]["loc"][:1]
    return max((e for e in errors if e["loc"][:1] == field), key=lambda e: len(e["loc"]))  # (ties: the first)


def _request_path(err: Any, body: Any) -> list[str | int]:
    """The error's loc as a path into the request's JSON: its parts but the union branches' tags (`_tags`)."""
    tags = _tags(err, body)
    return [part for i, part in enumerate(err["loc"]) if i not in tags]


def _tags(err: Any, body: Any) -> list[int]:
    """Where the error's loc names a union branch that pydantic tried ("str", "list[int]", a tagged union's tag
    such as "message"): parts that are no key of the request's value there (but a missing field's name, last)."""
    tags, value, loc = [], body, err["loc"]
    for i, part in enumerate(loc):
        if isinstance(value, dict) and part in value or isinstance(value, list) and isinstance(part, int):
            value = value[part] if isinstance(value, dict) or 0 <= part < len(value) else None
        elif not (i == len(loc) - 1 and err["type"] == "missing"):
            tags.append(i)
    return tags


def _union_forms(errors: list[Any], err: Any, body: Any) -> str:
    """Where `err` is a union's failure at the value or at one of its items, what the union takes (its branches
    as pydantic names them), so that `prompt: [true]` is not told only that its items are no strings; else ""."""
    tags, loc = _tags(err, body), err["loc"]
    if not tags or len(loc) - tags[-1] > 2:  # (deeper in, the error is about a branch that took the value)
        return ""
    j = tags[-1]
    forms = [_branch_name(str(e["loc"][j])) for e in errors if len(e["loc"]) > j and e["loc"][:j] == loc[:j]]
    forms = list(dict.fromkeys(forms))
    if len(forms) < 2:
        return ""
    where = ".".join(str(x) for x in _request_path({"loc": loc[:j], "type": ""}, body))
    return f" ({where} takes {', '.join(forms[:-1])} or {forms[-1]})"


def _branch_name(tag: str) -> str:
    """A branch's tag without pydantic's validator wrappers: "function-after[_check(), TextPart]" -> "TextPart"."""
    while (shorter := re.sub(r"function-\w+\[[^\[\]]*, (\w+)\]", r"\1", tag)) != tag:
        tag = shorter
    return tag


def _fields_of(title: str, model: type[RequestModel]) -> set[str]:
    """The fields of the model whose validator failed (`title`): the request's own, or a nested one's."""
    for m in (model, StructuredOutputsField, ResponseFormat):
        if m.__name__ == title:
            return set(m.model_fields)
    return set()


def _param_from_message(message: str, fields: set[str]) -> str | None:
    """The first word of `message` if it is a request field name ("top_k must be ..." -> "top_k")."""
    first = message.split(" ", 1)[0].strip(":'\"`,")
    return first if first in fields else None


def param_from_value_error(message: str, request_type: type[BaseModel]) -> str | None:
    """Map a SamplingParams/engine ValueError message to the request field it is about."""
    return _param_from_message(message, set(request_type.model_fields))
