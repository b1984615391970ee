"""Chat templates: a model's jinja2 template rendered the way transformers renders it (a sandbox with its filters
and helpers), the messages normalized first (content as text or as OpenAI text parts, whichever the template reads;
tool-call arguments as objects), and the checks on the options that go with it (continue_final_message,
chat_template_kwargs). Tokenizer.render_chat (tokenizer.py) is the caller."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from miniserve.config import CONTENT_FORMATS

# Used when the directory has no chat template: one "Role: content" line per message, then "Assistant:" (encoded
# as a completion prompt is: Tokenizer.chat_prompt).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


CONTINUE_MARK = "<|miniserve:continue-here|> "  # appended to the content continue_final_message continues
# what a chat template is given by name: chat_template_kwargs add variables (e.g. enable_thinking), not these
TEMPLATE_INPUTS = ("messages", "add_generation_prompt", "tools", "documents", "chat_template", "continue_final_message")


def check_chat_options(
    add_generation_prompt: bool,
    continue_final_message: bool,
    template_kwargs: dict[str, Any] | None,
) -> None:
    """ValueError, starting with the field's name, for chat-template options that cannot go together (the server's
    400s and LLM.chat's errors). The message continued may have any role, as in transformers and vLLM."""
    if continue_final_message and add_generation_prompt:
        raise ValueError(
            "continue_final_message cannot be used with add_generation_prompt: set add_generation_prompt false"
        )
    check_template_kwargs(template_kwargs)


def check_template_kwargs(template_kwargs: dict[str, Any] | None) -> None:
    """ValueError (starting with the field's name) for chat_template_kwargs that would set a template input that
    has a request field, or an argument, of its own, or that are not a dict."""
    if template_kwargs is not None and not isinstance(template_kwargs, Mapping):
        raise ValueError(f"chat_template_kwargs must be a dict, got {type(template_kwargs).__name__}")
    clash = [k for k in TEMPLATE_INPUTS if k in (template_kwargs or {})]
    if clash:
        raise ValueError(
            f"chat_template_kwargs may not set {', '.join(clash)}: each is a field of the request (an argument of "
            "LLM.chat) of its own"
        )


def load_chat_templates(directory: Path, config: dict, setting: str | None = None) -> ChatTemplates:
    """The model's chat templates by name, as transformers 5 reads them: chat_template.jinja ("default") and
    additional_chat_templates/NAME.jinja, which win over tokenizer_config.json's chat_template (one template, the
    default; or a list of {name, template}). The default is "default", or lacking it the first. `setting` (the
    chat_template setting's text) replaces them all, as a template passed to transformers does."""
    if setting:
        return ChatTemplates(setting, {})
    named = {p.stem: p.read_text(encoding="utf-8") for p in sorted(directory.glob("additional_chat_templates/*.jinja"))}
    if (directory / "chat_template.jinja").is_file():
        named["default"] = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if not named and isinstance(template, list):
        named = {t["name"]: t["template"] for t in template}
    elif not named and isinstance(template, str):
        named = {"default": template}
    return ChatTemplates(named.get("default", next(iter(named.values()), None)), named)


class ChatTemplates:
    """A tokenizer's chat templates: the default (the chat_template setting's, else the model's; None:
    DEFAULT_CHAT_TEMPLATE) and the model's by name, each compiled once, on first use."""

    def __init__(self, default: str | None, named: dict[str, str]):
        self.default = default
        self.named = named
        self._compiled: dict[str | None, Any] = {}

    def source(self, chosen: str | None = None, tools: Any = None) -> str | None:
        """The template a chat renders with, as transformers' get_chat_template picks it: `chosen` (a request's
        chat_template) names one of the model's or is one; else the model's "tool_use" when the chat has tools
        (even []); else the default."""
        if chosen is not None:
            return self.named.get(chosen, chosen)
        return self.named["tool_use"] if tools is not None and "tool_use" in self.named else self.default

    def is_fallback(self, chosen: str | None = None, tools: Any = None) -> bool:
        """Whether the chat renders with DEFAULT_CHAT_TEMPLATE (no template, or an empty one): its plain lines are
        then encoded as a completion prompt is, with the tokenizer's BOS (Tokenizer.chat_prompt)."""
        return not self.source(chosen, tools)

    def compiled(self, source: str | None) -> Any:
        """`source` compiled: the default and the model's named ones cached, a request's own compiled each time
        (rare; a cache could hold anything)."""
        if source in self._compiled:
            return self._compiled[source]
        template = compile_template(source or DEFAULT_CHAT_TEMPLATE)
        if source == self.default or source in self.named.values():
            self._compiled[source] = template
        return template


class ChatMessageError(ValueError):
    """A message the chat template cannot be given (the caller's input, not the template's failure)."""


def read_format(chosen: str, source: str | None) -> str:
    """How message content reaches the template `source` (None: DEFAULT_CHAT_TEMPLATE): `chosen` (one of
    config.CONTENT_FORMATS), or with "auto" the format the template reads."""
    if chosen not in CONTENT_FORMATS:
        raise ValueError(f"chat_template_content_format must be one of {', '.join(CONTENT_FORMATS)}, got {chosen!r}")
    return detect_content_format(source or DEFAULT_CHAT_TEMPLATE) if chosen == "auto" else chosen


@functools.lru_cache(maxsize=16)  # (a model's template, and the few per-request ones a server sees again)
def detect_content_format(source: str) -> str:
    """The content format a template reads (vLLM's auto detection): "openai", a list of parts, where it loops over
    a message's content (`{% for part in message['content'] %}`, also through a variable set to it), else
    "string"."""
    import jinja2.nodes as nodes

    def reads_content(node: Any, names: set[str]) -> bool:  # x['content'], x.content or a name set to it, filtered
        while isinstance(node, nodes.Filter):
            node = node.node
        if isinstance(node, nodes.Getitem):
            return isinstance(node.arg, nodes.Const) and node.arg.value == "content"
        if isinstance(node, nodes.Name):
            return node.name in names
        return isinstance(node, nodes.Getattr) and node.attr == "content"

    tree = compile_template(source).environment.parse(source)
    assigned = [a for a in tree.find_all(nodes.Assign) if isinstance(a.target, nodes.Name)]
    names = {a.target.name for a in assigned if reads_content(a.node, set())}
    if any(reads_content(loop.iter, names) for loop in tree.find_all(nodes.For)):
        return "openai"
    return "string"


# the names an assistant's reasoning goes by: vLLM's older response field, the one templates such as gpt-oss's
# read, and vLLM's current one. A message given any of them gets all three: transformers' apply_chat_template fills
# the first two from any of them (the first given wins, in this order); `reasoning` is filled too, so a template
# written against vLLM's current field reads the same text
REASONING_NAMES = ("reasoning_content", "thinking", "reasoning")


def normalize_message(message: dict[str, Any], index: int, content_format: str = "string") -> dict[str, Any]:
    """A fresh copy for the template: keys set to None dropped, content as text ("string": parts joined with
    newlines; none is "") or as a list of text parts ("openai": text becomes one part; none is []), tool-call
    arguments as objects, the reasoning under each of REASONING_NAMES."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise ChatMessageError(f"messages[{index}] must be a dict with a 'role' string, got {message!r}")
    out = {key: value for key, value in message.items() if value is not None}
    content = out.get("content")
    if content is not None and not isinstance(content, (str, list)):
        raise ChatMessageError(f"messages[{index}].content must be a string or a list of parts, got {content!r}")
    texts = [content] if isinstance(content, str) else []
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ChatMessageError(f"messages[{index}].content: only text parts are supported, got {part!r}")
            texts.append(part["text"])
    # no content (an assistant's tool calls alone) is no parts, or no text, as in vLLM
    out["content"] = [{"type": "text", "text": t} for t in texts] if content_format == "openai" else "\n".join(texts)
    if isinstance(out.get("tool_calls"), list):
        out["tool_calls"] = [_template_tool_call(call, index) for call in out["tool_calls"]]
    reasoning = next((out[name] for name in REASONING_NAMES if name in out), None)
    if reasoning is not None:
        for name in REASONING_NAMES:
            out.setdefault(name, reasoning)
    return out


def _template_tool_call(call: Any, index: int) -> Any:
    """A tool call with its arguments as an object, as templates read them (`tool_call.arguments | tojson`):
    OpenAI's messages carry them as JSON text; empty or missing text is no arguments ({}), as in vLLM."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments") or "", str):
        return call
    text = function.get("arguments") or "{}"
    try:
        arguments = json.loads(text)
    except ValueError:
        raise ChatMessageError(f"messages[{index}]: tool call arguments must be JSON text, got {text!r}") from None
    return {**call, "function": {**function, "arguments": arguments}}


def template_messages(messages: list[dict[str, Any]], content_format: str, continue_final: bool) -> list[dict]:
    """The messages as a template gets them (`normalize_message`); with continue_final_message the final one's
    content carries CONTINUE_MARK, where `cut_at_continue_mark` cuts the rendered text."""
    normalized = [normalize_message(m, i, content_format) for i, m in enumerate(messages)]
    if continue_final and normalized:
        mark_continue(normalized[-1])
    return normalized


def mark_continue(message: dict[str, Any]) -> None:
    """Append CONTINUE_MARK to the content the final message continues: its text, or its last text part (as
    transformers tags it)."""
    content = message.get("content")
    if isinstance(content, list):
        content[-1:] = content[-1:] or [{"type": "text", "text": ""}]
        content[-1]["text"] += CONTINUE_MARK
    else:
        message["content"] = (content or "") + CONTINUE_MARK


def cut_at_continue_mark(rendered: str) -> str:
    """The rendered chat up to the end of the final message's content, found by the mark appended to it (not by
    searching for the content, which may also occur in the template's own text after it). A template that trims
    the content's trailing space trimmed the mark's too: the cut then drops trailing space, as transformers does."""
    at = rendered.rfind(CONTINUE_MARK.rstrip())
    if at == -1:
        raise ValueError("continue_final_message: the chat template does not render the final message's content")
    return rendered[:at] if rendered.startswith(CONTINUE_MARK, at) else rendered[:at].rstrip()


def compile_template(source: str) -> Any:
    """A sandboxed jinja2 environment set up like transformers' (trim/lstrip blocks, tojson, helpers)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks: render as is."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        value: Any,
        ensure_ascii: bool = False,
        indent: Any = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
