"""Turn engine outputs into OpenAI response objects: choices, usage, both logprobs formats, SSE chunks."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.responses import Response

from miniserve.engine.outputs import Logprob

# How many preceding tokens give a token its context when decoded alone (SentencePiece drops a leading
# space at the start of a decode, byte-level BPE may need neighbours to finish a UTF-8 character).
_TOKEN_CONTEXT = 4


def dumps(obj: Any) -> bytes:
    """JSON as UTF-8 bytes: orjson (several times faster than json, and a stream encodes one chunk per token),
    or json's ASCII escapes for what orjson refuses (a lone surrogate in an echoed stop string)."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj).encode()


class JSONBytesResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content)


# Characters JSON may leave unescaped that Python's str.splitlines (httpx's iter_lines) and older JavaScript take for
# line ends: escaped in an event, so a client that reads the stream line by line gets each event whole
_LINE_ENDS = ((b"\xc2\x85", b"\\u0085"), (b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"))


def event_json(obj: Any) -> bytes:
    """`dumps` for a server-sent event: on one line for every line reader (_LINE_ENDS escaped)."""
    data = dumps(obj)
    if b"\xc2\x85" in data or b"\xe2\x80" in data:  # (U+2000..U+203F start so: quotes and dashes, mostly)
        for raw, escaped in _LINE_ENDS:
            data = data.replace(raw, escaped)
    return data


def sse(obj: Any) -> bytes:
    """One server-sent event line as OpenAI streams them."""
    return b"data: " + event_json(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def choice_chunk(
    head: dict[str, Any],
    index: int,
    content: dict[str, Any],
    logprobs: Any,
    finish: Any,
    stop: Any,
    extra: dict[str, Any] | None = None,
    usage: dict[str, Any] | None = None,
) -> bytes:
    """One streamed choice as an SSE event: `content` is {"text": ...} (completions) or {"delta": ...} (chat);
    `extra` adds vLLM's per-choice fields (token_ids, ...), `usage` the choice's usage so far (continuous usage)."""
    choice = {"index": index, **content, "logprobs": logprobs, "finish_reason": finish, "stop_reason": stop}
    if extra:
        choice.update(extra)
    event = {**head, "choices": [choice]}
    if usage is not None:
        event["usage"] = usage
    return sse(event)


class TextChunks:
    """The SSE events of one streamed choice's plain text pieces (no logprobs, finish reason or extras: most of
    a stream's events), byte for byte what `choice_chunk` makes of them, with only the piece encoded per event:
    the rest of the event is encoded once, around a marker. `key` is "text" (completions) or "content" (a chat
    delta). A head that itself holds the marker (a request id can be anything) gets `choice_chunk` every time."""

    MARK = "\x00miniserve:text\x00"

    def __init__(self, head: dict[str, Any], index: int, key: str):
        self.head, self.index, self.key = head, index, key
        parts = choice_chunk(head, index, self._content(self.MARK), None, None, None).split(dumps(self.MARK))
        self.parts = parts if len(parts) == 2 else None

    def _content(self, text: str) -> dict[str, Any]:
        return {"text": text} if self.key == "text" else {"delta": {"content": text}}

    def event(self, text: str) -> bytes:
        if self.parts is None:
            return choice_chunk(self.head, self.index, self._content(text), None, None, None)
        return self.parts[0] + event_json(text) + self.parts[1]


def token_text(tokenizer: Any, context: list[int], token_id: int, as_ids: bool = False) -> str:
    """The text `token_id` adds after `context` (so "▁world" reads " world", not "world"; a special token reads as
    itself, as in vLLM's logprobs and the offline decoded_token); with `as_ids`,
    "token_id:<id>" instead (vLLM's return_tokens_as_token_ids: every token identifiable, even partial UTF-8)."""
    if as_ids:
        return f"token_id:{token_id}"
    prefix_ids = context[-_TOKEN_CONTEXT:]
    prefix = tokenizer.decode(prefix_ids)
    full = tokenizer.decode(prefix_ids + [token_id])
    piece = full[len(prefix) :] if full.startswith(prefix) else ""
    # a byte token inside a character adds nothing to a text ending in its U+FFFD: it reads as it decodes alone,
    # "\ufffd", as vLLM's (and the offline decoded_token)
    return piece or tokenizer.decode([token_id])


# what a logprob of -inf (a token a grammar bans) reads in a response, as in vLLM: JSON has no infinity
MIN_SHOWN_LOGPROB = -9999.0


def top_entries(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    """The k most likely (token, logprob) pairs of one position (the engine adds the sampled token too), -inf
    shown as MIN_SHOWN_LOGPROB."""
    return [(t, max(lp, MIN_SHOWN_LOGPROB)) for t, lp in sorted(entry.items(), key=lambda kv: -kv[1])[:k]]


def completion_logprobs(
    tokenizer: Any,
    context: list[int],
    token_ids: list[int],
    logprobs: list[dict[int, float]],
    num_top: int,
    text_offset: int,
    as_ids: bool = False,
    skip_special: bool = True,
    echoed: str | None = None,
) -> tuple[dict[str, list], int]:
    """Legacy /v1/completions logprobs: parallel lists tokens / token_logprobs / top_logprobs / text_offset, and the
    offset after the last token.

    `context` is the prompt plus the tokens already produced before `token_ids` (for streaming). text_offset
    counts characters of the response's text, where the first token starts at `text_offset`: a special token the
    text leaves out (`skip_special`, the request's skip_special_tokens) takes none, whatever its listed token reads.
    A character split over byte tokens takes one "\ufffd" a token, as the tokens read (and as vLLM counts), so after
    one the offsets run ahead of the text: the text's own positions would need the detokenizer's, token by token.
    For an echoed prompt, `echoed` is its text in the response: a special token takes its characters only where
    that text holds them (typed into a prompt sent as text; not a BOS the tokenizer added), and offsets stop at its
    end (a prompt echoed as sent may read differently from its decoded tokens).
    """
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    ctx = list(context)
    for tid, entry in zip(token_ids, logprobs):
        piece = token_text(tokenizer, ctx, tid)
        text = token_text(tokenizer, ctx, tid, as_ids) if as_ids else piece
        # OpenAI's legacy format lists the sampled token as well; where two tokens read the same (partial
        # UTF-8 bytes all read "\ufffd") the likelier one keeps the key.
        ranked = top_entries(entry, num_top)
        if all(t != tid for t, _ in ranked):
            ranked.append((tid, entry[tid]))
        top: dict[str, float] = {}
        for t, lp in ranked:
            top.setdefault(text if t == tid else token_text(tokenizer, ctx, t, as_ids), lp)
        out["tokens"].append(text)
        out["token_logprobs"].append(entry[tid])
        out["top_logprobs"].append(top)
        out["text_offset"].append(text_offset if echoed is None else min(text_offset, len(echoed)))
        text_offset += _chars_taken(tokenizer, tid, piece, text_offset, skip_special, echoed)
        ctx.append(tid)
    return out, text_offset


def _chars_taken(tokenizer: Any, token_id: int, piece: str, at: int, skip_special: bool, echoed: str | None) -> int:
    """Characters of the response's text that a token reading `piece` takes at offset `at` (completion_logprobs'
    text_offset): its piece, but for a special token the text leaves out (skip_special; in an echoed prompt, one the
    echoed text does not hold there)."""
    if token_id not in tokenizer.special_ids:
        return len(piece)
    held = echoed.startswith(piece, at) if echoed is not None else not skip_special
    return len(piece) if held else 0


def prompt_logprobs(
    tokenizer: Any,
    prompt_ids: list[int],
    logprobs: list[dict[int, Logprob] | None],
    num_top: int,
    echoed: str,
    as_ids: bool = False,
) -> dict[str, list]:
    """The echoed prompt's part of legacy logprobs: the first token has no logprob (nothing precedes it). Offsets
    index `echoed`, the prompt's text in the response (completion_logprobs says how)."""
    start = _chars_taken(tokenizer, prompt_ids[0], token_text(tokenizer, [], prompt_ids[0]), 0, True, echoed)
    # (orjson writes no float subclass; in rank order, tokens of equal logprobs keep the engine's order)
    numbers = [{t: float(lp) for t, lp in sorted(e.items(), key=_rank)} for e in logprobs[1:]]
    rest, _ = completion_logprobs(
        tokenizer, prompt_ids[:1], prompt_ids[1:], numbers, num_top, start, as_ids, echoed=echoed
    )
    return {
        "tokens": [token_text(tokenizer, [], prompt_ids[0], as_ids), *rest["tokens"]],
        "token_logprobs": [None, *rest["token_logprobs"]],
        "top_logprobs": [None, *rest["top_logprobs"]],
        "text_offset": [0, *rest["text_offset"]],
    }


def join_logprobs(first: dict[str, list], second: dict[str, list]) -> dict[str, list]:
    return {key: first[key] + second[key] for key in first}


def chat_logprobs(
    tokenizer: Any,
    context: list[int],
    token_ids: list[int],
    logprobs: list[dict[int, float]],
    num_top: int,
    as_ids: bool = False,
) -> dict[str, list]:
    """Chat logprobs: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}, ...]}."""
    content = []
    ctx = list(context)
    for tid, entry in zip(token_ids, logprobs):
        text = token_text(tokenizer, ctx, tid, as_ids)
        tops = []
        for t, lp in top_entries(entry, num_top):
            t_text = token_text(tokenizer, ctx, t, as_ids)
            tops.append({"token": t_text, "logprob": lp, "bytes": list(t_text.encode("utf-8"))})
        content.append(
            {"token": text, "logprob": entry[tid], "bytes": list(text.encode("utf-8")), "top_logprobs": tops}
        )
        ctx.append(tid)
    return {"content": content}


def vllm_prompt_logprobs(
    tokenizer: Any, prompt_ids: list[int], logprobs: list[dict[int, Logprob] | None], num_top: int
) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's `prompt_logprobs`: per prompt token None (the first) or {token id: {logprob, rank, decoded_token}}
    for the top-N plus the prompt token; rank 1 is the likeliest (the engine's rank for a prompt token outside the
    top-N). The keys are ids already, so decoded_token is text even with return_tokens_as_token_ids (as vLLM's)."""
    out: list[dict[str, dict[str, Any]] | None] = [None]
    for pos in range(1, len(prompt_ids)):
        entry, token = logprobs[pos], prompt_ids[pos]
        ranked = [(t, lp, lp.rank) for t, lp in sorted(entry.items(), key=_rank)[:num_top]]
        if all(t != token for t, _, _ in ranked):  # (outside the top N its rank is above N)
            ranked.append((token, entry[token], entry[token].rank))
        context = prompt_ids[max(0, pos - _TOKEN_CONTEXT) : pos]
        out.append(
            {
                str(t): {
                    "logprob": float(lp),  # (orjson writes no float subclass)
                    "rank": rank,
                    "decoded_token": token_text(tokenizer, context, t),
                }
                for t, lp, rank in ranked
            }
        )
    return out


def _rank(item: tuple[int, Logprob]) -> int:
    return item[1].rank


def usage(prompt_tokens: int, completion_tokens: int, outputs: list[Any]) -> dict[str, Any]:
    """OpenAI usage (cached_tokens: prompt tokens served by the prefix cache), plus `spec_decode` when
    speculative decoding drafted for these requests."""
    metrics = [o.metrics or {} for o in outputs]
    u: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens for o in outputs)},
    }
    drafts = sum(m.get("num_spec_drafts", 0) for m in metrics)
    if drafts > 0:
        accepted = sum(m.get("num_spec_accepted_tokens", 0) for m in metrics)
        u["spec_decode"] = {
            "num_drafts": drafts,
            "num_draft_tokens": sum(m.get("num_spec_draft_tokens", 0) for m in metrics),
            "num_accepted_tokens": accepted,
            "mean_acceptance_length": 1.0 + accepted / drafts,
        }
    return u


class ChoiceTracker:
    """What one streamed choice has already sent, so each step's cumulative output becomes a delta."""

    def __init__(self, prompt_ids: list[int]):
        self.tail = list(prompt_ids[-_TOKEN_CONTEXT:])  # last tokens sent: context for token texts
        self.text_len = 0
        self.num_tokens = 0
        self.finished = False

    def advance(self, completion: Any) -> Delta:
        """The part of `completion` (cumulative) not sent yet; marks it sent."""
        delta = Delta(
            text=completion.text[self.text_len :],
            token_ids=completion.token_ids[self.num_tokens :],
            logprobs=completion.logprobs[self.num_tokens :] if completion.logprobs is not None else None,
            context=self.tail,
            finished_now=completion.finish_reason is not None and not self.finished,
        )
        self.tail = (self.tail + delta.token_ids)[-_TOKEN_CONTEXT:]
        self.text_len = len(completion.text)
        self.num_tokens = len(completion.token_ids)
        self.finished = completion.finish_reason is not None
        return delta


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    context: list[int]  # tokens just before token_ids
    finished_now: bool
