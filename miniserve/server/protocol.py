"""OpenAI-shaped request models and the error type every endpoint answers with.

The server parses bodies itself (not through FastAPI's signature magic) so that every bad input, from
malformed JSON to an out-of-range `top_p`, comes back as OpenAI's `{"error": {...}}` with a 4xx status and
`param` naming the offending field, which is what the official clients surface to users.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_TOP_LOGPROBS = 20
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


class _Request(BaseModel):
    # strict: "3" is not an int and true is not 1; NaN and infinities are not numbers; unknown fields (user,
    # metadata, ...) are ignored.
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(_Request):
    include_usage: bool = False


class SamplingFields(_Request):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI names, then vLLM extras)."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)  # what torch.Generator takes
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    # vLLM extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = Field(default=0, ge=0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    @model_validator(mode="after")
    def _check_common(self) -> SamplingFields:
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's legacy default
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None

    @model_validator(mode="after")
    def _check_completion(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix is not supported")
        if isinstance(self.prompt, list) and (
            len(self.prompt) == 0 or any(isinstance(p, (str, list)) and len(p) == 0 for p in self.prompt)
        ):
            raise ValueError("prompt must not be empty")
        if self.prompt == "":
            raise ValueError("prompt must not be empty")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of single prompts (text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

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
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def chat_messages(self) -> list[dict[str, str]]:
        """Messages as plain {"role", "content"} dicts for the chat template ("developer" -> "system")."""
        role = lambda m: "system" if m.role == "developer" else m.role
        return [{"role": role(m), "content": m.text()} for m in self.messages]

    def token_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


def parse_request(model: type[_Request], body: Any) -> Any:
    """Validate a decoded JSON body; a pydantic error becomes a 400 whose `param` names the field."""
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _validation_to_api_error(exc) from None


def _validation_to_api_error(exc: ValidationError) -> APIError:
    err = exc.errors()[0]
    loc = [str(x) for x in err["loc"] if isinstance(x, (int, str))]
    # Union branches show up as loc entries like "list[int]"; keep only real field names and indexes.
    loc = [x for x in loc if "[" not in x]
    param = loc[0] if loc else None
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
        param = param or _param_from_message(msg, model_fields(exc.title))
    where = ".".join(loc)
    return APIError(f"{where}: {msg}" if where else msg, param=param)


def model_fields(title: str) -> set[str]:
    models = {m.__name__: m for m in (CompletionRequest, ChatCompletionRequest, TokenizeRequest)}
    return set(models[title].model_fields) if title in models else set()


def _param_from_message(message: str, fields: set[str]) -> str | None:
    """The first word of `message` if it is a request field name ("top_k must be ..." -> "top_k")."""
    first = message.split(" ", 1)[0].strip(":'\"`,")
    return first if first in fields else None


def param_from_value_error(message: str, request_type: type[BaseModel]) -> str | None:
    """Map a SamplingParams/engine ValueError message to the request field it is about."""
    return _param_from_message(message, set(request_type.model_fields))
