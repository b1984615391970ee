"""The request of OpenAI's Responses API (POST /v1/responses), stateless: server/responses_api.py turns it into a
chat request. Input items and tools are checked here, so that what reaches the chat path is valid and a bad item's
400 names `input`. The shared request machinery (unknown fields, refusals, nulls) is protocol.py's."""

from __future__ import annotations

import json
import typing
from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from miniserve.server.protocol import (
    COMMON_REFUSED,
    INT64_MAX,
    INT64_MIN,
    MEDIA_PARTS,
    RequestModel,
    StructuredOutputsField,
    empty,
    unset,
)

RESPONSE_INCLUDES = ("message.output_text.logprobs",)  # the one `include` value the server produces


class InputTextPart(RequestModel):
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = None  # (an earlier response's output_text, passed back: read for its text)
    logprobs: list[Any] | None = None
    # the end of a prefix to cache: every prompt's prefix is cached anyway, block by block (prefix caching)
    prompt_cache_breakpoint: dict[str, Any] | None = None

    def chat_part(self) -> dict[str, str]:
        return {"type": "text", "text": self.text}


class RefusalPart(RequestModel):
    type: Literal["refusal"]
    refusal: str

    def chat_part(self) -> dict[str, str]:
        return {"type": "text", "text": self.refusal}


class Caller(RequestModel):
    """Who made a function call: the model itself ("direct"), or code it ran ("program", not supported)."""

    type: Literal["direct", "program"]
    caller_id: str | None = None


def _direct(caller: Caller | None) -> bool:
    return caller is None or caller.type == "direct"


# fields of function calls and tools that only tool search and code-made calls give a meaning
_CALL_REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "caller": (_direct, "calls made by code (caller type program) are not supported"),
    "namespace": (unset, "tool namespaces are not supported"),
    "async_": (lambda v: not v, "asynchronous calls are not supported"),
}


def _no_media_parts(item: Any) -> None:
    """Say plainly that media parts are not supported, instead of listing every union branch that failed."""
    content = (item.get("content") or item.get("output")) if isinstance(item, dict) else None
    for part in content if isinstance(content, list) else []:
        kind = part.get("type") if isinstance(part, dict) else None
        if isinstance(kind, str) and (kind in MEDIA_PARTS or kind == "input_file"):
            raise ValueError(
                f"{MEDIA_PARTS.get(kind, 'files')} are not supported ({kind!r} part): the model is text-only"
            )


class InputMessageItem(RequestModel):
    """A message item: EasyInputMessage, an input Message or an earlier response's output message."""

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputTextPart | RefusalPart]
    id: str | None = None
    status: str | None = None
    phase: str | None = None

    def chat_content(self) -> str | list[dict[str, str]]:
        """The content as chat takes it: text, or its parts as text parts (a template that loops over parts
        sees each, as in chat)."""
        return self.content if isinstance(self.content, str) else [p.chat_part() for p in self.content]


class FunctionCallItem(RequestModel):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str  # JSON text
    id: str | None = None
    status: str | None = None
    caller: Caller | None = None
    namespace: str | None = None
    async_: bool | None = Field(default=None, alias="async")

    _REFUSED = _CALL_REFUSED

    @field_validator("arguments")
    @classmethod
    def _json_text(cls, text: str) -> str:
        """Checked here, so that the error names the input item (the chat template reads the arguments as an
        object, and would name the chat message the item became); empty text is no arguments, as in chat."""
        if text:
            try:
                json.loads(text)
            except ValueError:
                raise ValueError(f"must be JSON text, got {text!r}") from None
        return text


class FunctionCallOutputItem(RequestModel):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[InputTextPart]
    id: str | None = None
    status: str | None = None
    name: str | None = None  # the tool's: the tool message's name
    caller: Caller | None = None
    namespace: str | None = None

    _REFUSED = _CALL_REFUSED

    def chat_content(self) -> str | list[dict[str, str]]:
        return self.output if isinstance(self.output, str) else [p.chat_part() for p in self.output]


class ReasoningItem(RequestModel):
    """An earlier response's reasoning, passed back: its text goes with the assistant message after it, as that
    message's `reasoning` in chat (ChatMessage)."""

    type: Literal["reasoning"]
    id: str | None = None
    summary: list[Any] = []
    content: list[Any] | None = None
    encrypted_content: str | None = None
    status: str | None = None

    _REFUSED = {"encrypted_content": (unset, "encrypted reasoning is not supported: pass its content")}

    def text(self) -> str | None:
        """Its reasoning_text parts, joined; None where it has none (a summary alone)."""
        texts = [
            part["text"]
            for part in self.content or []
            if isinstance(part, dict) and part.get("type") == "reasoning_text" and isinstance(part.get("text"), str)
        ]
        return "\n".join(texts) if texts else None


INPUT_ITEMS = {"message": InputMessageItem, "function_call": FunctionCallItem,
               "function_call_output": FunctionCallOutputItem, "reasoning": ReasoningItem}  # fmt: skip
InputItem = typing.Annotated[
    InputMessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem, Field(discriminator="type")
]


class FunctionTool(RequestModel):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # arguments of a forced call always follow `parameters` strictly
    allowed_callers: list[Literal["direct", "programmatic"]] | None = None
    defer_loading: bool | None = None
    output_schema: dict[str, Any] | None = None
    async_: bool | None = Field(default=None, alias="async")

    _REFUSED = {
        "allowed_callers": (lambda v: v is None or "direct" in v, "only direct calls by the model are supported"),
        "defer_loading": (lambda v: not v, "tool search (deferred loading) is not supported"),
        "output_schema": (unset, "output schemas (for calls made by code) are not supported"),
        "async_": _CALL_REFUSED["async_"],
    }


class FunctionToolChoice(RequestModel):
    type: Literal["function"]
    name: str


class TextFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # outputs always follow the schema strictly (what strict=true asks)

    @model_validator(mode="after")
    def _needs_schema(self) -> TextFormat:
        if self.type == "json_schema" and (self.json_schema is None or self.name is None):
            raise ValueError("format of type json_schema needs a name and a schema")
        if self.type != "json_schema":  # what only a schema format reads would constrain nothing
            for field in ("json_schema", "name", "description", "strict"):
                if getattr(self, field) is not None:
                    raise ValueError(f"{field.removeprefix('json_')}: read only with type json_schema, not {self.type}")
        return self


class TextConfig(RequestModel):
    format: TextFormat | None = None
    verbosity: str | None = None

    _REFUSED = {"verbosity": (unset, "verbosity is not supported")}


class ReasoningConfig(RequestModel):
    effort: str | None = None  # "none": thinking off in the chat template (server/responses_api.py)
    summary: str | None = None
    generate_summary: str | None = None
    context: str | None = None
    mode: str | None = None

    _REFUSED = {
        # as chat's reasoning_effort (protocol.py): a template variable no template is known to read; "none" is
        # chat_template_kwargs' enable_thinking false, which chat honours (and the qwen3 reasoning parser reads)
        "effort": (
            lambda v: v in (None, "none"),
            'only "none" (thinking off, as chat_template_kwargs enable_thinking false) can be honoured: set the '
            "chat template's own variable in chat_template_kwargs for other efforts",
        ),
        "summary": (lambda v: v in (None, "auto"), "reasoning summaries are not produced (the reasoning is returned)"),
        "generate_summary": (unset, "reasoning summaries are not produced (the reasoning is returned)"),
        "context": (lambda v: v in (None, "auto", "current_turn"), "earlier turns' reasoning is never rendered"),
        "mode": (lambda v: v in (None, "standard"), "there is one reasoning mode (standard)"),
    }


class ResponseStreamOptions(RequestModel):
    include_obfuscation: bool | None = None

    _REFUSED = {"include_obfuscation": (lambda v: not v, "stream events carry no obfuscation")}


_STATELESS = "this server is stateless: it stores no responses or conversations"
_RESPONSES_REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{k: COMMON_REFUSED[k] for k in ("kv_transfer_params", "vllm_xargs")},
    "previous_response_id": (unset, f"{_STATELESS}: send the earlier items in `input`"),
    "conversation": (unset, f"{_STATELESS}: send the earlier items in `input`"),
    "background": (lambda v: not v, f"{_STATELESS}, so it cannot run one in the background"),
    "background_options": (unset, f"{_STATELESS}, so it cannot run one in the background"),
    "prompt": (unset, "prompt templates are not supported"),
    "max_tool_calls": (unset, "there are no built-in tools (only function tools, which the client runs)"),
    "truncation": (lambda v: v in (None, "disabled"), "only truncation disabled: an input too long is a 400"),
    "include": (
        lambda v: all(x in RESPONSE_INCLUDES for x in v or []),
        f"the only value supported is {RESPONSE_INCLUDES[0]!r}",
    ),
    "context_management": (empty, "context management (compaction) is not supported"),
    "moderation": (unset, "moderation is not supported"),
    "image": (unset, "the model is text-only"),
    "access_programs": (unset, "there are no access programs"),
    "prompt_cache_options": (unset, "prompt cache options are not supported (prompts are cached automatically)"),
    "service_tier": (lambda v: v in (None, "auto", "default"), "there is one service tier (auto/default)"),
    "mm_processor_kwargs": (empty, "multimodal inputs are not supported"),
    "enable_response_messages": (lambda v: not v, "response messages are not returned"),
    "previous_input_messages": (unset, "Harmony input messages are not supported"),
}


class ResponsesRequest(RequestModel):
    """POST /v1/responses: OpenAI's fields, then vLLM's extensions (those it shares with chat)."""

    model: str | None = None
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_logprobs: int | None = Field(default=None, ge=0)  # (chat's check bounds it by max_logprobs)
    include: list[str] | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionToolChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    metadata: dict[str, str] | None = None  # echoed back: no effect on the output
    user: str | None = None  # echoed back: no effect on the output
    safety_identifier: str | None = None  # echoed back: no effect on the output
    prompt_cache_key: str | None = None  # a caching hint; prompts are cached (or not) whatever it says
    prompt_cache_retention: str | None = None
    store: bool | None = None  # accepted: nothing is stored (the README says so; there is no GET)
    stream: bool = False
    stream_options: ResponseStreamOptions | None = None
    service_tier: str | None = None
    # refused unless unset (see _RESPONSES_REFUSED)
    previous_response_id: str | None = None
    conversation: Any = None
    background: bool | None = None
    background_options: Any = None
    prompt: Any = None
    max_tool_calls: int | None = None
    truncation: str | None = None
    context_management: list[Any] | None = None
    moderation: Any = None
    image: Any = None
    access_programs: Any = None
    prompt_cache_options: Any = None
    # vLLM extensions (as chat reads them)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    logit_bias: dict[str, float | int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    request_id: str | None = Field(default=None, min_length=1, max_length=256)
    cache_salt: str | None = Field(default=None, min_length=1)
    structured_outputs: StructuredOutputsField | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    include_reasoning: bool = True
    session_id: str | None = None  # for the caller's records: no effect on the output
    priority: int = 0
    vllm_xargs: dict[str, Any] | None = None
    kv_transfer_params: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    enable_response_messages: bool = False
    previous_input_messages: list[Any] | None = None

    _REFUSED = _RESPONSES_REFUSED

    @field_validator("input", mode="before")
    @classmethod
    def _typed_items(cls, items: Any) -> Any:
        """A message item may leave out its type (EasyInputMessage); an item of another type is named plainly."""
        if not isinstance(items, list):
            return items
        out = []
        for j, item in enumerate(items):
            if isinstance(item, dict) and "type" not in item and "role" in item:
                item = {**item, "type": "message"}
            kind = item.get("type") if isinstance(item, dict) else None
            if isinstance(kind, str) and kind not in INPUT_ITEMS:
                raise ValueError(f"[{j}]: {kind!r} items are not supported (only {', '.join(INPUT_ITEMS)})")
            _no_media_parts(item)
            out.append(item)
        return out

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools_only(cls, tools: Any) -> Any:
        for tool in tools if isinstance(tools, list) else []:
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind != "function":
                raise ValueError(f"{kind!r} tools are not supported: only function tools (which the client runs)")
        return tools

    @model_validator(mode="after")
    def _check_responses(self) -> ResponsesRequest:
        if self.input == "" or self.input == []:
            raise ValueError("input must not be empty")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if isinstance(self.tool_choice, FunctionToolChoice) and self.tool_choice.name not in {
            t.name for t in self.tools or []
        }:
            raise ValueError(f"tool_choice names the function {self.tool_choice.name!r}, not in tools")
        if self.tool_choice == "required" and not self.tools:
            raise ValueError("tool_choice required needs tools")
        return self

    def wants_logprobs(self) -> bool:
        return "message.output_text.logprobs" in (self.include or []) or bool(self.top_logprobs)
