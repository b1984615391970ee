"""Tool calls: finding them in a model's output and returning them in OpenAI's shape, whole or as streaming deltas.

Four output formats cover the supported model families; which one a model writes is read off its chat template:
  hermes      Qwen2.5 / Qwen3 (and Hermes): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks
              after optional text (the last may be left open: a stop string `</tool_call>`)
  llama3_json Llama 3.1+: the whole output is `{"name": ..., "parameters": {...}}` (several joined by `; `),
              optionally after `<|python_tag|>`
  qwen3_coder Qwen3-Coder: `<tool_call>\\n<function=NAME>\\n<parameter=KEY>\\nVALUE\\n</parameter>...</function>`
              blocks, each value typed by the tool's parameter schema
  mistral     `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]` (or `[TOOL_CALLS]name[CALL_ID]id[ARGS]{...}`,
              the id optional); [TOOL_CALLS] is a special token, so these requests keep special tokens in the text

`tool_choice: "required"` and a named function do not parse free text: the server constrains the output with a
JSON schema (structured outputs), so the arguments always parse, unless max_tokens cuts the output short: then a
named call's arguments are the text as it stands, and "required" returns the calls it completed with the unfinished
rest as content (`parse_required_output`), streamed or not. `required` generates a JSON array of
`{"name", "parameters"}` objects (as vLLM does), a named function its arguments object.

Streaming: `StreamingToolParser` is fed the cumulative text and returns what is new: content that can no longer be
the start of a tool call, and tool calls, each with its header and all its arguments in one delta. In auto mode the
text from the first marker on is held back and parsed when the output ends, with the same function as the
non-streamed path, so both agree: its calls come in the last delta (a marker alone does not make a call: the text
may turn out to be content after all). Under "required" each call comes once the array holds it whole.

`ToolSetup` is a chat request's tool handling from start to end: which mode (`tool_setup`), the output constraint
it needs (`constraint`), the assistant message of a finished choice (`message`) and a streamed choice's deltas
(`delta`).
"""

from __future__ import annotations

import json
import re
import secrets
import string
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from miniserve.engine.structured_output import map_subschemas
from miniserve.server.protocol import APIError, ChatCompletionRequest


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text

    def openai(self, call_id: str) -> dict[str, Any]:
        return {"id": call_id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id(fmt: str | None = None) -> str:
    """A tool call's id; Mistral's templates refuse any but 9 letters and digits (as vLLM makes them)."""
    if fmt == "mistral":
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))
    return f"chatcmpl-tool-{uuid.uuid4().hex}"  # vLLM's random_tool_call_id: 32 hex digits


def detect_format(chat_template: str | None) -> str | None:
    """The tool-call format a chat template teaches its model, or None when it shows none."""
    template = chat_template or ""
    if "<function=" in template:  # Qwen3-Coder: XML inside <tool_call> blocks
        return "qwen3_coder"
    if "<tool_call>" in template:
        return "hermes"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3_json"
    return None


# -------------------------------------------------------------------------------------------------- parsing


def _call_from(obj: Any) -> ToolCall | None:
    """{"name", "arguments"|"parameters"} -> ToolCall (arguments re-serialised as JSON text). An object without a
    name or without either arguments key is no call (as vLLM's parsers: any JSON answer with a "name" would be)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    if "arguments" not in obj and "parameters" not in obj:
        return None
    args = obj["arguments"] if "arguments" in obj else obj["parameters"]
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    text = _json_text(args)
    return None if text is None else ToolCall(obj["name"], text)


def _json_text(value: Any) -> str | None:
    """A call's arguments as JSON text; None where a number is past a double's range (json reads 1e400 as inf, and
    `Infinity` is no JSON a client could parse): such a call is malformed, its text stays content."""
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except ValueError:
        return None


def _json_values(text: str) -> list[Any] | None:
    """Consecutive JSON values separated by whitespace, `;` or `,`; None unless the whole text is such values."""
    decoder, values, pos = json.JSONDecoder(), [], 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n;,":
            pos += 1
        if pos == len(text):
            return values
        try:
            value, pos = decoder.raw_decode(text, pos)
        except ValueError:
            return None
        values.append(value)


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _hermes_values(text: str) -> list[Any] | None:
    """The JSON value of each `<tool_call>` block: closed blocks, and a last one left open (a stop string
    `</tool_call>`, or the end of the output). The value is read as JSON, so `</tool_call>` inside one of its
    strings is text, not the block's end. None for a block that is not one JSON value."""
    decoder, values, pos = json.JSONDecoder(), [], 0
    while (start := text.find("<tool_call>", pos)) != -1:
        try:
            value, end = decoder.raw_decode(text, _skip_space(text, start + len("<tool_call>")))
        except ValueError:
            return None
        end = _skip_space(text, end)
        if text.startswith("</tool_call>", end):
            end += len("</tool_call>")
        elif end < len(text):
            return None
        values.append(value)
        pos = end
    return values


def parse_hermes(text: str, tools: Sequence[dict[str, Any]] = ()) -> tuple[str, list[ToolCall]]:
    start = text.find("<tool_call>")
    if start == -1:
        return text, []
    calls = [_call_from(v) for v in _hermes_values(text) or [None]]
    if any(c is None for c in calls):
        return text, []  # a malformed block: the text stays content, as written
    return text[:start], calls  # type: ignore[return-value]


def parse_llama3_json(text: str, tools: Sequence[dict[str, Any]] = ()) -> tuple[str, list[ToolCall]]:
    body = text.strip()
    if body.startswith("<|python_tag|>"):
        body = body[len("<|python_tag|>") :].lstrip()
    if not body.startswith("{"):
        return text, []
    values = _json_values(body)
    calls = [_call_from(v) for v in values or []]
    if not calls or any(c is None for c in calls):
        return text, []
    return "", calls


def parse_mistral(text: str, tools: Sequence[dict[str, Any]] = ()) -> tuple[str, list[ToolCall]]:
    start = text.find("[TOOL_CALLS]")
    if start == -1:
        return text, []
    body = text[start + len("[TOOL_CALLS]") :].strip()
    calls: list[ToolCall | None]
    if body[:1] in ("[", "{"):  # older tokenizers: a JSON array (or objects) of calls
        values = _json_values(body)
        items = values[0] if values and len(values) == 1 and isinstance(values[0], list) else values or []
        calls = [_call_from(v) for v in items]
    else:  # newer tokenizers: name[ARGS]{...} per call, each after its [TOOL_CALLS]
        calls = _mistral_named_calls(body) or []
    if not calls or any(c is None for c in calls):
        return text, []
    return text[:start], calls  # type: ignore[return-value]


def _mistral_named_calls(body: str) -> list[ToolCall | None] | None:
    """`name[ARGS]{...}` calls joined by [TOOL_CALLS] (`name[CALL_ID]id[ARGS]{...}`: the id is the model's, not
    ours), each call's arguments read as one JSON object, so a marker inside one of its strings is text. None
    unless the whole body is such calls."""
    decoder, calls, pos = json.JSONDecoder(), [], 0
    while True:
        at = body.find("[ARGS]", pos)
        if at == -1:
            return None
        name = body[pos:at].partition("[CALL_ID]")[0].strip()
        try:
            args, end = decoder.raw_decode(body, _skip_space(body, at + len("[ARGS]")))
        except ValueError:
            return None
        calls.append(_call_from({"name": name, "arguments": args}) if isinstance(args, dict) else None)
        end = _skip_space(body, end)
        if end == len(body):
            return calls
        if not body.startswith("[TOOL_CALLS]", end):
            return None
        pos = end + len("[TOOL_CALLS]")


_XML_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)
_XML_FUNCTION = re.compile(r"\s*<function=([^>\n]+)>(.*?)</function>\s*", re.S)
# a value ends at its </parameter>, or where the next parameter or the function's end shows it was left open
_XML_PARAMETER = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?(?:</parameter>|(?=<parameter=)|$)", re.S)


def parse_qwen3_coder(text: str, tools: Sequence[dict[str, Any]] = ()) -> tuple[str, list[ToolCall]]:
    """Qwen3-Coder: `<tool_call>\\n<function=NAME>\\n<parameter=KEY>\\nVALUE\\n</parameter>...</function>` blocks
    after optional text. A value is text; the tool's schema (`tools`) says what it stands for (`_xml_value`).
    A block holds one function or several (as vLLM reads them); a block that is not functions of parameters leaves
    the whole text as content."""
    start = text.find("<tool_call>")
    if start == -1:
        return text, []
    calls = []
    for block in _XML_BLOCK.findall(text[start:]):
        functions = _xml_functions(block)
        if functions is None:
            return text, []
        for name, body in functions:
            schemas = _parameter_schemas(tools, name)
            args = {
                key.strip(): _xml_value(value, schemas.get(key.strip())) for key, value in _XML_PARAMETER.findall(body)
            }
            arguments = _json_text(args)
            if arguments is None:
                return text, []
            calls.append(ToolCall(name, arguments))
    return (text[:start], calls) if calls else (text, [])


def _xml_functions(block: str) -> list[tuple[str, str]] | None:
    """A block's (name, body) functions, one after another with only whitespace around them, each body nothing but
    parameters; None for any other block."""
    functions, pos = [], 0
    for match in _XML_FUNCTION.finditer(block):
        if match.start() != pos or _XML_PARAMETER.sub("", match[2]).strip():
            return None
        functions.append((match[1].strip(), match[2]))
        pos = match.end()
    return functions if functions and pos == len(block) else None


def _parameter_schemas(tools: Sequence[dict[str, Any]], name: str) -> dict[str, Any]:
    for tool in tools:
        if tool["function"]["name"] == name:
            return (tool["function"].get("parameters") or {}).get("properties") or {}
    return {}


_XML_TYPES = {"integer": int, "number": (int, float), "object": dict, "array": list}


def _xml_value(value: str, schema: Any) -> Any:
    """An XML parameter's text as its schema's type says (the first of a list of types that reads it): a number, a
    boolean, an object or array (JSON); `null` is null whatever the type (as vLLM reads it); the text itself for
    strings, for a parameter the tool does not declare, and where the text is none of its types."""
    kind = schema.get("type") if isinstance(schema, dict) else None
    if value.strip().lower() == "null":
        return None
    for k in kind if isinstance(kind, list) else [kind]:
        if k in _XML_TYPES:
            try:
                parsed = json.loads(value)
            except ValueError:
                continue
            if isinstance(parsed, _XML_TYPES[k]) and not isinstance(parsed, bool) and _json_text(parsed) is not None:
                return parsed  # (not a number past a double's range: that stays text)
        elif k == "boolean" and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
    return value


# format -> parse(text, tools) -> (content, calls); the JSON formats carry their values' types, so they need no tools
PARSERS = {
    "hermes": parse_hermes,
    "llama3_json": parse_llama3_json,
    "mistral": parse_mistral,
    "qwen3_coder": parse_qwen3_coder,
}
# where a tool call may begin: text from the first of these on is held back while streaming
_MARKERS = {
    "hermes": ("<tool_call>",),
    "mistral": ("[TOOL_CALLS]",),
    "llama3_json": ("<|python_tag|>", "{"),
    "qwen3_coder": ("<tool_call>",),
}


def parse_required(text: str) -> list[ToolCall] | None:
    """tool_choice "required": the output is a JSON array of {"name", "parameters"} (schema-constrained)."""
    try:
        items = json.loads(text)
    except ValueError:
        return None
    calls = [_call_from(v) for v in items] if isinstance(items, list) else [None]
    return None if any(c is None for c in calls) else calls  # type: ignore[return-value]


def parse_required_output(text: str) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a finished tool_choice "required" output: the array's calls; for an array cut short
    (max_tokens, a stop string) the calls it completed, which a stream has sent, and the unfinished rest as content
    (from the first element not complete; the whole text when none is)."""
    calls = parse_required(text)
    if calls is not None:
        return "", calls
    calls, end = _complete_array_items(text, final=True)
    return text[end:].lstrip(" \t\r\n,") if calls else text, calls


# -------------------------------------------------------------------------------------------------- schemas


DEFINITION_KEYS = ("$defs", "definitions")  # where a schema keeps what "#/$defs/X" refers to (2019-09+, draft 7)


def required_schema(tools: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """JSON schema of tool_choice "required": one or more calls (one without parallel_tool_calls). Each tool's
    parameters sit deep in the array's schema, so their definitions move to its root, where their "#/$defs/..."
    references resolve (as vLLM does; two tools defining one name differently cannot share it), and their other
    references ("#", "#/properties/...") are rebased onto where the parameters now sit."""
    root: dict[str, Any] = {"type": "array", "minItems": 1}
    variants = []
    for i, t in enumerate(tools):
        where = f"#/items/anyOf/{i}/properties/parameters"
        parameters = rebase_refs(t["function"].get("parameters") or {"type": "object", "properties": {}}, where)
        for key in (k for k in DEFINITION_KEYS if isinstance(parameters.get(k), dict)):
            for name, definition in parameters.pop(key).items():
                if root.setdefault(key, {}).setdefault(name, definition) != definition:
                    raise APIError(
                        f"tools: two tools define {key}/{name} differently; tool_choice required needs one "
                        "definition of each name",
                        param="tools",
                    )
        variants.append(
            {
                "type": "object",
                "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]}, "parameters": parameters},
                "required": ["name", "parameters"],
            }
        )
    root["items"] = {"anyOf": variants}
    if not parallel:
        root["maxItems"] = 1
    return root


def rebase_refs(schema: Any, where: str) -> Any:
    """A copy of `schema` whose local references into itself ("#", "#/properties/a") point below `where`, the JSON
    pointer of the place it is moved to; references into its definitions ("#/$defs/X"), which move to the new root,
    and references elsewhere stay as they are. Only schemas are walked: a "$ref" in an enum value is data."""
    if not isinstance(schema, dict):
        return schema
    out = map_subschemas(schema, lambda sub: rebase_refs(sub, where))
    ref = schema.get("$ref")
    if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")) and not _into_definitions(ref):
        out["$ref"] = where + ref[1:]
    return out


def _into_definitions(ref: str) -> bool:
    return any(ref == f"#/{key}" or ref.startswith(f"#/{key}/") for key in DEFINITION_KEYS)


def named_schema(tools: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """JSON schema of a named tool_choice: the function's arguments object."""
    function = next(t["function"] for t in tools if t["function"]["name"] == name)
    return function.get("parameters") or {"type": "object", "properties": {}}


# -------------------------------------------------------------------------------------------------- streaming


class StreamingToolParser:
    """Fed a choice's cumulative text; returns (new content, new tool calls) each time (the module docstring says
    when calls come)."""

    def __init__(
        self, mode: str, fmt: str | None, named: str | None = None, parallel: bool = True, tools: Sequence[dict] = ()
    ):
        self.mode, self.fmt, self.named, self.parallel, self.tools = mode, fmt, named, parallel, tools
        self.content_sent = 0  # characters of content already returned
        self.calls_sent = 0
        self._marker_at = -1  # where the first marker starts in the text, once found
        self._searched = 0  # characters of the text searched for one

    def feed(self, text: str, final: bool) -> tuple[str, list[ToolCall]]:
        if self.mode == "named":  # arguments stream as they come (the schema constrains them)
            return "", []
        if self.mode == "required":
            content, calls = parse_required_output(text) if final else ("", _complete_array_items(text)[0])
            return content, self._new(calls)
        if final:  # the held-back text is either tool calls or, if they do not parse, content after all
            content, calls = self.parse(text)
            new = content[self.content_sent :]
            self.content_sent = max(self.content_sent, len(content))
            return new, self._new(calls)
        start = self._marker_start(text)
        safe = len(text) if start is None else start
        new = text[self.content_sent : safe] if safe > self.content_sent else ""
        self.content_sent = max(self.content_sent, safe)
        return new, []

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """The whole output's (content, calls) in auto mode, as the non-streamed response gives them."""
        content, calls = PARSERS[self.fmt](text, self.tools) if self.fmt else (text, [])
        return content, calls if self.parallel else calls[:1]

    def _new(self, calls: list[ToolCall]) -> list[ToolCall]:
        if not self.parallel:
            calls = calls[:1]
        new = calls[self.calls_sent :]
        self.calls_sent = max(self.calls_sent, len(calls))
        return new

    def _marker_start(self, text: str) -> int | None:
        """Where held-back text starts: the first marker, or a tail that may still grow into one."""
        if self.fmt is None:
            return None
        markers = _MARKERS[self.fmt]
        if self.fmt == "llama3_json":  # only a call if the output opens with it (after whitespace, which a call drops)
            stripped = text.lstrip()
            if not stripped or any(m.startswith(stripped) or stripped.startswith(m) for m in markers):
                return 0
            return None
        if self._marker_at < 0:  # search only what is new (the text only grows) and a marker's length before it
            start = max(0, self._searched - max(map(len, markers)) + 1)
            self._marker_at = min((i for i in (text.find(m, start) for m in markers) if i != -1), default=-1)
            self._searched = len(text)
        if self._marker_at >= 0:
            return self._marker_at
        for m in markers:  # a partial marker at the end
            for k in range(min(len(m) - 1, len(text)), 0, -1):
                if text.endswith(m[:k]):
                    return len(text) - k
        return None


def _complete_array_items(text: str, final: bool = False) -> tuple[list[ToolCall], int]:
    """The complete elements of a JSON array still being written ("[{...}, {..." -> the first call), and where the
    last of them ends in `text`; `final`: the output ended, so an element complete at its end counts too."""
    decoder, pos, out = json.JSONDecoder(), text.find("["), []
    if pos == -1:
        return [], 0
    pos += 1
    done = pos
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        try:
            value, end = decoder.raw_decode(text, pos)
        except ValueError:
            return out, done
        if not final and not text[end:].lstrip():  # complete once a separator follows, or the output ended
            return out, done
        call = _call_from(value)
        if call is None:
            return out, done
        out.append(call)
        pos = done = end


# -------------------------------------------------------------------------------------------------- a request's tools


@dataclass
class ToolSetup:
    """How a chat request's tools shape its output: mode none/auto/required/named, the model's call format."""

    mode: str
    format: str | None
    named: str | None
    parallel: bool
    tools: list[dict[str, Any]]

    @property
    def reads_special_tokens(self) -> bool:
        """Mistral tokenizers make [TOOL_CALLS] a special token: where the model may call tools, its text keeps
        special tokens (as vLLM's Mistral parser asks), or the marker would never reach the parser."""
        return self.format == "mistral" and self.mode == "auto"

    def parser(self) -> StreamingToolParser:
        return StreamingToolParser(self.mode, self.format, self.named, self.parallel, self.tools)

    def constraint(self) -> dict[str, Any] | None:
        """StructuredOutputsParams keywords for tool_choice required/named (their JSON schemas), else None."""
        if self.mode == "required":
            schema = required_schema(self.tools, self.parallel)
        elif self.mode == "named":
            schema = named_schema(self.tools, self.named)
        else:
            return None
        return {"json": schema, "disable_any_whitespace": True}  # compact: arguments are for machines

    def message(self, text: str, finish: str | None, echo: str) -> tuple[dict[str, Any], Any]:
        """The assistant message of one finished choice (content and/or tool calls) and its finish_reason."""
        if self.mode == "none":
            content, calls = text, []
        elif self.mode == "named":  # the output is the arguments, as streamed (cut short by max_tokens or not)
            content, calls = "", [ToolCall(self.named, text)]
        else:  # auto, required: the whole text through a stream's parser, so both answer alike
            content, calls = self.parser().feed(text, final=True)
        shown = content or echo or not calls  # (a reply of tool calls alone has no content, unless echoed)
        message: dict[str, Any] = {"role": "assistant", "content": echo + content if shown else None}
        if calls:
            message["tool_calls"] = [c.openai(new_call_id(self.format)) for c in calls]
            if finish == "stop" and self.mode != "named":  # OpenAI: "stop" when a named function was forced
                finish = "tool_calls"
        return message, finish

    def delta(self, parser: StreamingToolParser, num_calls: dict[int, int], o: Any, text: str) -> dict[str, Any]:
        """One streamed step of choice `o` (cumulative; `text` is what is new) as a chat delta: content, and tool
        calls in OpenAI's delta shape; `num_calls` counts each choice's calls sent so far."""
        if self.mode == "none":
            return {"content": text} if text else {}
        if self.mode == "named":  # the output is the arguments: a header with their first text (or the end), then more
            if num_calls[o.index] == 0 and (text or o.finish_reason is not None):
                num_calls[o.index] = 1
                header = {"name": self.named, "arguments": text}
                call = {"index": 0, "id": new_call_id(self.format), "type": "function", "function": header}
                return {"tool_calls": [call]}
            return {"tool_calls": [{"index": 0, "function": {"arguments": text}}]} if text else {}
        content, new_calls = parser.feed(o.text, final=o.finish_reason is not None)
        delta: dict[str, Any] = {"content": content} if content else {}
        if new_calls:
            start = num_calls[o.index]
            num_calls[o.index] += len(new_calls)
            made = [c.openai(new_call_id(self.format)) for c in new_calls]
            delta["tool_calls"] = [{"index": start + k, **call} for k, call in enumerate(made)]
        return delta

    def finish_reason(self, finish: str | None, num_calls: int) -> str | None:
        """A streamed choice's finish_reason: "tool_calls" once it called any (unless the call was forced by name)."""
        return "tool_calls" if finish == "stop" and num_calls and self.mode != "named" else finish


def tool_setup(req: ChatCompletionRequest, template: str | None, parser: str, auto_enabled: bool) -> ToolSetup:
    """The request's tool mode, and the call format: the server's `parser` (tool_call_parser), else the one taught
    by `template`, the chat template the request renders with (ChatTemplates.source). A 400 naming
    tool_choice when auto needs a format and has none, or is disabled (enable_auto_tool_choice off)."""
    mode = req.tool_mode()
    named = req.tool_choice.function.name if mode == "named" else None
    tools = [t.model_dump(by_alias=True, exclude_none=True) for t in req.tools or []]
    fmt = detect_format(template) if parser == "auto" else parser
    setup = ToolSetup(mode, fmt, named, req.parallel_tool_calls is not False, tools)
    if mode == "auto" and not auto_enabled:
        raise APIError(
            "tool_choice auto is off on this server (enable_auto_tool_choice false): use tool_choice required, a "
            "named function or none",
            param="tool_choice",
        )
    if mode == "auto" and setup.format is None:
        raise APIError(
            "tool_choice auto needs a model whose chat template shows a tool-call format (<tool_call> blocks, "
            "[TOOL_CALLS] or Llama 3.1 JSON); this one shows none: use tool_choice required or a named function",
            param="tool_choice",
        )
    return setup
