"""Reasoning outputs: a thinking model's chat output split into its reasoning and its content, as vLLM's
`--reasoning-parser` does (server setting `reasoning_parser`), whole or as streaming deltas.

Both parsers read Qwen3's and DeepSeek-R1's `<think> ... </think>`:
  - an opening `<think>` at the very start of the output is dropped (older Qwen3 templates let the model write it;
    DeepSeek-R1's and newer Qwen3's put it in the prompt, so the output starts inside the reasoning);
  - the text before the first `</think>` is the reasoning, the text after it the content; an output that never
    closes its reasoning (cut short by max_tokens) is all reasoning, as in vLLM;
  - no reasoning at all where the prompt already closed it (a template that renders `<think></think>` when
    thinking is off), and for `qwen3` where the request turned thinking off (`chat_template_kwargs`
    `enable_thinking: false`): the whole output is content.

The markers are matched in the text, so they may span several tokens and several streamed deltas:
`StreamingReasoningSplitter` holds back a tail that may still grow into one, and at the end splits the whole text
with the same function as the non-streamed path, so both agree. Tool calls are parsed out of the content alone
(server/chat.py gives it to server/tool_calls.py), and a structured-output grammar starts after `</think>`
(`end_token_id`, as vLLM's grammar waits for the reasoning's end).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from miniserve.sampling_params import StructuredOutputsParams
from miniserve.server.protocol import APIError, ChatCompletionRequest

START, END = "<think>", "</think>"
_PROMPT_TAIL_TOKENS = 8  # enough of the prompt's end to see a `</think>` (and the whitespace after it)


def split_reasoning(text: str, thinking: bool = True) -> tuple[str | None, str]:
    """(reasoning or None, content) of a whole output; `thinking` False: no reasoning, all content."""
    if not thinking:
        return None, text
    body = text[len(START) :] if text.startswith(START) else text
    reasoning, marker, content = body.partition(END)
    return (reasoning or None), content if marker else ""


def _partial_marker(text: str) -> int:
    """Length of the longest end of `text` that is the start of a marker but not yet all of it."""
    for k in range(min(len(END) - 1, len(text)), 0, -1):
        tail = text[-k:]
        if END.startswith(tail) or (len(text) == k < len(START) and START.startswith(tail)):
            return k
    return 0


class StreamingReasoningSplitter:
    """Fed a choice's cumulative text; returns what is new of its reasoning and of its content each time. Until
    the end, each call reads only the text added since the last one: searching a long reasoning's whole text for
    `</think>` at every step cost a stream ~55 us a step at 72k characters, and the API process serves hundreds."""

    def __init__(self, thinking: bool):
        self.thinking = thinking
        self.reasoning_sent = 0
        self.content = ""  # the content so far: what the tool-call parser reads
        self._end = -1  # where `</think>` starts in the text, once found
        self._searched = 0  # characters of the text searched for it

    def feed(self, text: str, final: bool) -> tuple[str, str]:
        """(new reasoning, new content). Until the reasoning has ended, a tail that may be a marker's start is
        held back (it is neither yet); the final call splits the whole text."""
        if final or not self.thinking:
            reasoning, content = split_reasoning(text, self.thinking)
            reasoning = reasoning or ""
            return self._new_reasoning(reasoning, 0, len(reasoning)), self._new_content(content)
        body = len(START) if text.startswith(START) else 0
        end = self._find_end(text)
        if end < 0:
            return self._new_reasoning(text, body, len(text) - _partial_marker(text)), ""
        return self._new_reasoning(text, body, end), self._new_content(text, end + len(END))

    def _find_end(self, text: str) -> int:
        """Index of the first `</think>` in the text (-1: none yet), searching only what is new (the text only
        grows) and the marker's length before it."""
        if self._end < 0:
            self._end = text.find(END, max(0, self._searched - len(END) + 1))
            self._searched = len(text)
        return self._end

    def _new_reasoning(self, text: str, start: int, stop: int) -> str:
        """The part of the reasoning text[start:stop] not returned yet."""
        new = text[start + self.reasoning_sent : stop]
        self.reasoning_sent = max(self.reasoning_sent, stop - start)
        return new

    def _new_content(self, text: str, start: int = 0) -> str:
        """The part of the content text[start:] not returned yet."""
        new = text[start + len(self.content) :]
        self.content = text[start:]  # (the text itself where it is all content: no copy)
        return new


@dataclass
class ContentOutput:
    """A choice's output as the tool-call code reads it (server/tool_calls.py): its content in place of its text."""

    index: int
    text: str
    finish_reason: str | None


@dataclass
class ReasoningSetup:
    """A chat request's reasoning handling: whether its output thinks, whether the reasoning is returned, and the
    token after which its grammar starts (None: the tokenizer has no single `</think>` token)."""

    thinking: bool
    include: bool
    end_token_id: int | None

    def split(self, text: str) -> tuple[str | None, str]:
        reasoning, content = split_reasoning(text, self.thinking)
        return (reasoning if self.include else None), content

    def splitter(self) -> StreamingReasoningSplitter:
        return StreamingReasoningSplitter(self.thinking)

    def defer(self, structured: StructuredOutputsParams | None, field: str) -> StructuredOutputsParams | None:
        """The request's compiled output constraint, its grammar waiting for the reasoning's end (vLLM's order:
        think freely, then follow the grammar). A 400 naming the constraint's field where that end is no token."""
        if structured is None or not self.thinking:
            return structured
        if self.end_token_id is None:
            raise APIError(
                f"{field} with a reasoning parser needs {END} as one token of the vocabulary, for the grammar to "
                "start after it; this tokenizer has none",
                param=field,
            )
        return dataclasses.replace(structured, start_after_token=self.end_token_id)


def check_reasoning_fields(req: ChatCompletionRequest, parser: str | None) -> None:
    """400 naming the field: include_reasoning false without a parser (nothing to leave out), and beside
    logprobs or token ids (which would show the reasoning's tokens)."""
    if req.include_reasoning:
        return
    if parser is None:
        raise APIError(
            "include_reasoning false needs a server started with --reasoning-parser (MINISERVE_REASONING_PARSER): "
            "without one, reasoning is never separated from the content",
            param="include_reasoning",
        )
    for name, shown in (("logprobs", req.logprobs), ("return_token_ids", req.return_token_ids)):
        if shown:
            raise APIError(
                f"{name} cannot be combined with include_reasoning false: they would show the reasoning's tokens",
                param=name,
            )


def reasoning_setup(
    req: ChatCompletionRequest, parser: str | None, tokenizer: Any, prompt_ids: list[int]
) -> ReasoningSetup | None:
    """The request's reasoning handling under the server's `reasoning_parser` (None: off, the output is all
    content, as without the setting)."""
    if parser is None:
        return None
    final = req.messages[-1].text() if req.continue_final_message else ""
    thinking = _prompt_left_thinking(tokenizer, prompt_ids, final)
    if thinking is None:  # the prompt shows no marker: the model opens its reasoning itself, unless switched off
        thinking = not (parser == "qwen3" and (req.chat_template_kwargs or {}).get("enable_thinking") is False)
    return ReasoningSetup(thinking, req.include_reasoning, tokenizer.token_to_id(END))


def _prompt_left_thinking(tokenizer: Any, prompt_ids: list[int], final: str) -> bool | None:
    """Whether the rendered prompt leaves the model inside its reasoning: True where the prompt's end is an open
    `<think>` (a template that opens it, whatever enable_thinking says), False where it is `</think>` (the template
    closed it: thinking off), None where it shows neither. With continue_final_message the end is the final
    message's own text, where a marker may be (its last one decides), and else what comes before that text: an
    answer continued after `</think>` is content."""
    marker = _last_marker(final)
    if marker is not None:
        return marker == START
    window = _PROMPT_TAIL_TOKENS + len(final.encode())  # (a token is at least one byte of the text)
    text = tokenizer.decode(prompt_ids[-window:], skip_special_tokens=False)
    if final.strip() and final.strip() in text:
        text = text[: text.rfind(final.strip())]
    tail = text.rstrip()
    return True if tail.endswith(START) else False if tail.endswith(END) else None


def _last_marker(text: str) -> str | None:
    """`<think>` or `</think>`, whichever comes last in the text (None: neither)."""
    start, end = text.rfind(START), text.rfind(END)
    return None if start == end == -1 else START if start > end else END
