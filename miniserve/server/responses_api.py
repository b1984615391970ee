"""POST /v1/responses: OpenAI's Responses API, stateless (as vLLM serves it without a store), on the chat path.

A ResponsesRequest becomes the chat request it stands for (`chat_request`: `instructions` as a system message
first, input items as messages, function tools in chat's nested shape, `text.format` as `response_format`), which
server/chat.py starts as any other; its output is then shaped as output items: `reasoning` (with the server's
reasoning parser), `message` (output_text, with logprobs when asked) and `function_call`s. A stream is chat's
deltas (reasoning split off, tool calls parsed: ChatEvents) re-told as OpenAI's typed events, numbered by
`sequence_number`. Nothing is stored: there is no GET /v1/responses/{id}, and `previous_response_id`,
`conversation` and `background` get a 400 naming them (server/responses_protocol.py: ResponsesRequest).
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from miniserve.server import responses as fmt
from miniserve.server.chat import ChatEvents, ChatRun, assistant_message, start_chat
from miniserve.server.event_stream import EventStream
from miniserve.server.protocol import APIError, ChatCompletionRequest, parse_request
from miniserve.server.reasoning import START, split_reasoning
from miniserve.server.request_group import collect_finals, request_usage
from miniserve.server.responses_protocol import (
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionToolChoice,
    InputMessageItem,
    ReasoningItem,
    ResponsesRequest,
)
from miniserve.server.state import ServerState, state_of
from miniserve.server.tool_calls import ToolSetup

# chat fields whose errors are about a Responses field of another name: as `param` (a top-level field) ...
_PARAMS = {
    "messages": "input",
    "max_completion_tokens": "max_output_tokens",
    "max_tokens": "max_output_tokens",
    "response_format": "text",
    "logprobs": "include",
}
# ... and as a message names them (logprobs left: in prose it is a word, "top logprobs per token"; where the field
# is meant, the client's include value says message.output_text.logprobs)
_NAMES = {**{k: v for k, v in _PARAMS.items() if k != "logprobs"}, "response_format": "text.format"}
# a chat name as a whole word, not quoted (a template's error may quote its own `messages` variable)
_NAMED = re.compile(r"(?<![\w'\"`.])(" + "|".join(_NAMES) + r")(?![\w'\"`])")
# Responses fields chat reads under the same name (vLLM's extensions among them)
_SAME_NAME = (
    "temperature", "top_p", "parallel_tool_calls", "top_k", "min_p", "repetition_penalty",
    "presence_penalty", "frequency_penalty", "seed", "stop", "ignore_eos", "logit_bias", "skip_special_tokens",
    "include_stop_str_in_output", "cache_salt", "include_reasoning", "stream", "priority",
)  # fmt: skip


async def create_response(request: Request) -> Response:
    state = state_of(request)
    req: ResponsesRequest = await state.parse(request, ResponsesRequest)
    chat = chat_request(req)
    if req.wants_logprobs() and chat.tool_mode() != "none":
        raise APIError("logprobs are given for a message's text, not beside tools: leave out tools", param="include")
    base_id = _new_id("resp")
    head = {"id": req.request_id or base_id, "object": "response", "created_at": int(time.time())}
    head["model"] = state.model_name
    try:
        run = await start_chat(state, chat, base_id)
    except APIError as exc:
        raise _renamed(exc) from None
    if req.wants_logprobs() and run.reasoning is not None and run.reasoning.thinking:
        run.group.abort()
        raise APIError("logprobs are given for a message's text, not beside a reasoning parser", param="include")
    echo = echoed_settings(state, req)
    if req.stream:
        return EventStream(run.group, request, ResponsesEvents(state, chat, {**head, **echo}, run))
    finals = await collect_finals(run.group, request)
    if finals is None:
        return Response(status_code=499)
    out = finals[0]
    o = out.outputs[0]
    items = await state.format_answer(req.wants_logprobs(), output_items, state, chat, run, o)
    return fmt.JSONBytesResponse(response_object({**head, **echo}, items, o.finish_reason, _usage(state, run, out)))


# a tool's field in chat's nested shape (tools.0.function.name): the Responses tool is flat (tools.0.name)
_TOOL_FIELD = re.compile(r"\b(tools\.\d+\.)function\.")


def _renamed(exc: APIError) -> APIError:
    """A chat error as the Responses request names its fields, in `param` and in the message: the client sent
    `input` and `text.format`, never `messages` or `response_format`. Every error of the chat path that the request
    started passes through here (chat_request, start_chat, a stream's error event)."""
    exc.param = _PARAMS.get(exc.param, exc.param)
    exc.message = _TOOL_FIELD.sub(r"\1", _NAMED.sub(lambda m: _NAMES[m[1]], exc.message))
    exc.args = (exc.message,)
    return exc


# ---------------------------------------------------------------------------------------------- the request


_CHAT_FUNCTION = {"name", "description", "parameters", "strict"}  # a function tool's fields that chat reads


def chat_request(req: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request a Responses request stands for (its checks already made by ResponsesRequest)."""
    body: dict[str, Any] = {"messages": chat_messages(req)}
    body.update({k: getattr(req, k) for k in _SAME_NAME if k in req.model_fields_set})
    if req.max_output_tokens is not None:
        body["max_completion_tokens"] = req.max_output_tokens
    if req.wants_logprobs():  # (top_logprobs 0 without include asks for none: OpenAI clients may send it)
        body["logprobs"], body["top_logprobs"] = True, req.top_logprobs
    if req.tools is not None:
        body["tools"] = [{"type": "function", "function": t.model_dump(include=_CHAT_FUNCTION, exclude_none=True)}
                         for t in req.tools]  # fmt: skip
    if isinstance(req.tool_choice, FunctionToolChoice):
        body["tool_choice"] = {"type": "function", "function": {"name": req.tool_choice.name}}
    elif req.tool_choice is not None and (req.tool_choice != "auto" or req.tools):  # (auto: OpenAI's default)
        body["tool_choice"] = req.tool_choice
    if req.text is not None and req.text.format is not None and req.text.format.type != "text":
        body["response_format"] = _response_format(req)
    if req.structured_outputs is not None:
        body["structured_outputs"] = req.structured_outputs.model_dump(by_alias=True, exclude_unset=True)
    kwargs = _template_kwargs(req)
    if kwargs is not None:
        body["chat_template_kwargs"] = kwargs
    try:
        return parse_request(ChatCompletionRequest, body)
    except APIError as exc:
        raise _renamed(exc) from None


def _response_format(req: ResponsesRequest) -> dict[str, Any]:
    """text.format (flat: name, schema, strict beside the type) as chat's response_format (nested)."""
    f = req.text.format
    if f.type == "json_object":
        return {"type": "json_object"}
    schema = {"name": f.name, "schema": f.json_schema, "strict": f.strict, "description": f.description}
    return {"type": "json_schema", "json_schema": {k: v for k, v in schema.items() if v is not None}}


def _template_kwargs(req: ResponsesRequest) -> dict[str, Any] | None:
    """chat_template_kwargs, with reasoning.effort "none" (the one effort ResponsesRequest lets through) as chat
    would be asked for it: `enable_thinking` false, unless the request sets the variable itself."""
    if req.reasoning is None or req.reasoning.effort != "none":
        return req.chat_template_kwargs
    return {"enable_thinking": False, **(req.chat_template_kwargs or {})}


def chat_messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    """instructions as a system message first; a string input as one user message; items as chat messages:
    function_call items join the assistant message before them (or start one) as its tool_calls, outputs become
    tool messages, a reasoning item's text is the `reasoning` of the assistant message that the next item makes or
    joins (none follows: dropped, as a template would drop it)."""
    messages: list[dict[str, Any]] = []
    if req.instructions is not None:
        messages.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        return [*messages, {"role": "user", "content": req.input}]
    reasoning = None  # the last reasoning item's text, for the next item's assistant message
    for item in req.input:
        if isinstance(item, ReasoningItem):
            reasoning = item.text()
            continue
        if isinstance(item, InputMessageItem):
            messages.append({"role": item.role, "content": item.chat_content()})
        elif isinstance(item, FunctionCallItem):
            _add_call(messages, item)
        elif isinstance(item, FunctionCallOutputItem):
            tool = {"role": "tool", "tool_call_id": item.call_id, "content": item.chat_content()}
            messages.append(tool if item.name is None else {**tool, "name": item.name})
        if reasoning is not None and messages[-1]["role"] == "assistant":
            messages[-1].setdefault("reasoning", reasoning)
        reasoning = None
    if not messages:
        raise APIError("input holds no message (reasoning items alone)", param="input")
    return messages


def _add_call(messages: list[dict[str, Any]], item: FunctionCallItem) -> None:
    call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant":
        last.setdefault("tool_calls", []).append(call)
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


def echoed_settings(state: ServerState, req: ResponsesRequest) -> dict[str, Any]:
    """The request's settings as a Response repeats them (the sampling ones as applied: the model's defaults
    where the request left them out)."""
    defaults = state.sampling_defaults
    tool_choice = req.tool_choice.model_dump() if isinstance(req.tool_choice, FunctionToolChoice) else req.tool_choice
    text_format = req.text.format.model_dump(by_alias=True, exclude_none=True) if req.text and req.text.format else None
    return {
        "instructions": req.instructions,
        "metadata": req.metadata,
        "user": req.user,
        "safety_identifier": req.safety_identifier,
        "prompt_cache_key": req.prompt_cache_key,
        "temperature": req.temperature if req.temperature is not None else defaults.get("temperature", 1.0),
        "top_p": req.top_p if req.top_p is not None else defaults.get("top_p", 1.0),
        "max_output_tokens": req.max_output_tokens,
        "top_logprobs": req.top_logprobs,
        "tools": [t.model_dump(by_alias=True, exclude_none=True) for t in req.tools or []],
        "tool_choice": tool_choice or "auto",
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "text": {"format": text_format or {"type": "text"}},
        "reasoning": req.reasoning.model_dump(exclude_none=True) if req.reasoning is not None else None,
        "truncation": "disabled",
        "service_tier": "default",
        "background": False,
        "previous_response_id": None,
    }


# ---------------------------------------------------------------------------------------------- the response


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "reasoning_text", "text": text}]
    return {"id": item_id, "type": "reasoning", "summary": [], "content": content, "status": status}


def message_item(item_id: str, text: str, logprobs: list | None, status: str) -> dict[str, Any]:
    part: dict[str, Any] = {"type": "output_text", "text": text, "annotations": []}
    if logprobs is not None:
        part["logprobs"] = logprobs
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": [part]}


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}  # fmt: skip


def output_items(state: ServerState, chat: ChatCompletionRequest, run: ChatRun, o: Any) -> list[dict[str, Any]]:
    """A finished output as items: its reasoning, its text as a message (when it has text, or nothing else) and
    its tool calls, in the order the model wrote them (and a stream sends them): under tool_choice "required" the
    text is what was left of a cut array after its complete calls, so the message comes after them."""
    message, _ = assistant_message(run.tools, run.reasoning, o, "")
    items, text = [], []
    calls = message.get("tool_calls") or []
    if message.get("reasoning"):  # (cut only where it is the whole output)
        status = item_status(o.finish_reason, "reasoning", run.tools, last=not (message["content"] or calls))
        items.append(reasoning_item(_new_id("rs"), message["reasoning"], status))
    if message["content"] or not (items or calls):
        logprobs = None
        if chat.logprobs:
            top = chat.top_logprobs or 0
            logprobs = fmt.chat_logprobs(state.tokenizer, run.ids, o.token_ids, o.logprobs, top)["content"]
        status = item_status(o.finish_reason, "message", run.tools)
        text.append(message_item(_new_id("msg"), message["content"] or "", logprobs, status))
    status = item_status(o.finish_reason, "function_call", run.tools)
    called = [call_item(_new_id("fc"), c["id"], c["function"]["name"], c["function"]["arguments"], status)
              for c in calls]  # fmt: skip
    return items + (called + text if run.tools.mode == "required" else text + called)


def item_status(finish: str | None, kind: str, tools: ToolSetup, last: bool = True) -> str:
    """An output item's status: "incomplete" where max_output_tokens cut its text, as OpenAI marks it. The cut
    falls in the last reasoning or the message (content holds what the tool-call parser left unfinished); in a
    function call only where the call was named, its arguments being the output as it stands: the calls of auto
    and required are parsed whole, so they are complete."""
    if finish != "length" or not last:
        return "completed"
    return "incomplete" if kind != "function_call" or tools.mode == "named" else "completed"


def response_object(
    head: dict[str, Any], items: list[dict[str, Any]], finish: str | None, usage: dict[str, Any] | None
) -> dict[str, Any]:
    """The Response: `head` (id, times, model, echoed settings), the output and its status as `finish` says
    (None: still in progress)."""
    status, details, error = "completed", None, None
    if finish is None:
        status = "in_progress"
    elif finish == "length":
        status, details = "incomplete", {"reason": "max_output_tokens"}
    elif finish == "abort":
        status, error = "failed", {"code": "server_error", "message": "the request was ended by the server"}
    body = {**head, "status": status, "incomplete_details": details, "error": error, "output": items, "usage": usage}
    if status == "completed":
        body["completed_at"] = int(time.time())
    return body


def _usage(state: ServerState, run: ChatRun, out: Any) -> dict[str, Any]:
    """Chat's usage (server/request_group.py) in the Responses names, reasoning tokens counted."""
    u = request_usage([run.ids], [out])
    details = {"reasoning_tokens": _reasoning_tokens(state, run, out.outputs[0])}
    return {
        "input_tokens": u["prompt_tokens"],
        # cache writes: OpenAI bills the tokens a request stores for later ones; a prefix cache costs nothing more
        "input_tokens_details": {"cached_tokens": u["prompt_tokens_details"]["cached_tokens"], "cache_write_tokens": 0},
        "output_tokens": u["completion_tokens"],
        "output_tokens_details": details,
        "total_tokens": u["total_tokens"],
    }


def _reasoning_tokens(state: ServerState, run: ChatRun, o: Any) -> int:
    """The reasoning's tokens (0 without a thinking output): those between the markers where the model wrote
    `</think>` as its one token (as Qwen3 and DeepSeek-R1 do), else the reasoning's text encoded (a marker the
    model spelled in pieces has no token boundary of its own)."""
    r, ids = run.reasoning, o.token_ids
    if r is None or not r.thinking:
        return 0
    if r.end_token_id is not None and r.end_token_id in ids:
        opened = bool(ids) and ids[0] == state.tokenizer.token_to_id(START)
        return ids.index(r.end_token_id) - int(opened)
    thought, _ = split_reasoning(o.text)
    return len(state.tokenizer.encode(thought, add_special_tokens=False)) if thought else 0


# ---------------------------------------------------------------------------------------------- streaming


class ResponsesEvents(ChatEvents):
    """A streamed Response: chat's deltas (ChatEvents._delta: reasoning split off, tool calls parsed) as OpenAI's
    events. response.created and response.in_progress first; then per output item output_item.added, its
    content's deltas and done events, output_item.done; then response.completed (incomplete, failed)."""

    done = b""  # (OpenAI's Responses streams end with their last event, no [DONE])

    def __init__(self, state: ServerState, chat: ChatCompletionRequest, head: dict[str, Any], run: ChatRun):
        super().__init__(state, chat, {}, run.ids, run.tools, run.reasoning)
        self.run, self.body_head = run, head
        self.sequence = 0
        self.items: list[dict[str, Any]] = []  # finished items
        self.current: dict[str, Any] | None = None  # the item being streamed: its kind, id, text, logprobs
        self.finish: str | None = None

    def event(self, kind: str, **fields: Any) -> bytes:
        """One numbered event, named as OpenAI names its SSE events."""
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + fmt.event_json(data) + b"\n\n"

    def error(self, exc: APIError) -> bytes:
        e = _renamed(exc).body()["error"]
        return self.event("error", code=e["code"], message=e["message"], param=e["param"])

    def opening(self) -> list[bytes]:
        body = response_object(self.body_head, [], None, None)
        return [self.event("response.created", response=body), self.event("response.in_progress", response=body)]

    def choice(self, i: int, o: Any, d: fmt.Delta) -> list[bytes]:
        lp = None
        if self.top is not None and d.token_ids:
            lp = fmt.chat_logprobs(self.state.tokenizer, d.context, d.token_ids, d.logprobs, self.top)["content"]
        delta = self._delta(o, d.text)
        events = []
        if delta.get("reasoning"):
            events += self._reasoning(delta["reasoning"])
        if delta.get("content") or lp:
            events += self._text(delta.get("content") or "", lp or [])
        for call in delta.get("tool_calls") or []:
            events += self._call(call)
        if d.finished_now:
            self.finish = o.finish_reason
        return events

    def closing(self) -> list[bytes]:
        events = self._close()
        if not self.items:  # an output of no text at all: one empty message, as the whole response has
            events += self._text("", []) + self._close()
        kind = {"length": "incomplete", "abort": "failed"}.get(self.finish, "completed")
        body = response_object(self.body_head, self.items, self.finish, _usage(self.state, self.run, self.finals[0]))
        return events + [self.event(f"response.{kind}", response=body)]

    def _open(self, kind: str, item: dict[str, Any]) -> list[bytes]:
        """Close the item being streamed and start `item`."""
        events = self._close()
        self.current = {"kind": kind, "item": item, "text": "", "logprobs": []}
        events.append(self.event("response.output_item.added", output_index=len(self.items), item=item))
        return events

    def _reasoning(self, text: str) -> list[bytes]:
        events = []
        if self.current is None or self.current["kind"] != "reasoning":
            item = {"id": _new_id("rs"), "type": "reasoning", "summary": [], "content": [], "status": "in_progress"}
            events += self._open("reasoning", item)
            events.append(self._part_event("added", {"type": "reasoning_text", "text": ""}))
        self.current["text"] += text
        return [*events, self.event("response.reasoning_text.delta", **self._where(), content_index=0, delta=text)]

    def _text(self, text: str, logprobs: list) -> list[bytes]:
        events = []
        if self.current is None or self.current["kind"] != "message":
            item = {"id": _new_id("msg"), "type": "message", "role": "assistant", "status": "in_progress",
                    "content": []}  # fmt: skip
            events += self._open("message", item)
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            events.append(self._part_event("added", part))
        self.current["text"] += text
        self.current["logprobs"] += logprobs
        where = {**self._where(), "content_index": 0}
        return [*events, self.event("response.output_text.delta", **where, delta=text, logprobs=logprobs)]

    def _call(self, call: dict[str, Any]) -> list[bytes]:
        """A tool call's delta: one with an id starts a function_call item, its arguments' text follows."""
        events = []
        if "id" in call:
            item = call_item(_new_id("fc"), call["id"], call["function"]["name"], "", "in_progress")
            events += self._open("function_call", item)
        arguments = call["function"].get("arguments") or ""
        if arguments:
            self.current["text"] += arguments
            events.append(self.event("response.function_call_arguments.delta", **self._where(), delta=arguments))
        return events

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.current["item"]["id"], "output_index": len(self.items)}

    def _part_event(self, stage: str, part: dict[str, Any]) -> bytes:
        return self.event(f"response.content_part.{stage}", **self._where(), content_index=0, part=part)

    def _close(self) -> list[bytes]:
        """The item being streamed, finished: its done events, and it joins the output."""
        cur = self.current
        if cur is None:
            return []
        status = item_status(self.finish, cur["kind"], self.tools)
        item_id, text, where = cur["item"]["id"], cur["text"], self._where()
        if cur["kind"] == "reasoning":
            item = reasoning_item(item_id, text, status)
            events = [self.event("response.reasoning_text.done", **where, content_index=0, text=text)]
            events.append(self._part_event("done", item["content"][0]))
        elif cur["kind"] == "message":
            logprobs = cur["logprobs"] if self.top is not None else None
            item = message_item(item_id, text, logprobs, status)
            events = [self.event("response.output_text.done", **where, content_index=0, text=text,
                                 logprobs=cur["logprobs"])]  # fmt: skip
            events.append(self._part_event("done", item["content"][0]))
        else:
            item = call_item(item_id, cur["item"]["call_id"], cur["item"]["name"], text, status)
            events = [self.event("response.function_call_arguments.done", **where, arguments=text, name=item["name"])]
        events.append(self.event("response.output_item.done", output_index=len(self.items), item=item))
        self.items.append(item)
        self.current = None
        return events
