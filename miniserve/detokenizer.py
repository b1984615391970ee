"""Streaming detokenization: a growing list of generated ids turned into text deltas whose concatenation equals
decoding all of them at once (the engine's text for stop strings, the API process's for streams).

Decoding is the tokenizer's, but for one thing: a run of SentencePiece byte-fallback tokens (`<0xNN>`) is read as
UTF-8 here, each invalid or unfinished sequence becoming one U+FFFD (Python's and Rust's lossy decoding, as a
byte-level BPE's decoder has it), so every character comes out as soon as its last byte does. Transformers'
ByteFallback decoder turns a whole run into U+FFFD when any byte in it is bad: a stream could then show no text
until the run ended, and an output cut inside its last character would lose the whole run. Where every run is
valid UTF-8, which is what models write, the text is transformers' decode exactly (but for a text that starts with
the byte token of a space, which transformers' Strip drops and SentencePiece keeps, as here).
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import groupby
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from miniserve.tokenizer import Tokenizer

PROMPT_CONTEXT = 5  # prompt tokens an IncrementalDetokenizer may re-decode as its first prefix window
# prompt ids read back at most for that window: past a trailing run of byte-fallback ids, which it leaves out
CONTEXT_LOOKBACK = 256


class IncrementalDetokenizer:
    """Turns a growing list of generated ids into text deltas for streaming.

    Only a short trailing window is decoded per call (prefix/read offsets, as in vLLM), so each `add` costs
    O(window). Text is held back while it ends in U+FFFD (an unfinished character, whose next bytes may still
    complete it); `flush()` releases the held text when generation ends. The window always starts right after
    an emitted token, so SentencePiece's "strip the first space" rule hits the prefix and the full text
    identically, and an emitted byte run ends on a whole character, so the rest of its run decodes on its own:
    "".join(deltas) + flush() == decode(all_ids) (`_decode`), however the ids are grouped into calls.

    With `prompt_ids`, the last few prompt tokens seed the window (as vLLM does), so the first generated
    token keeps its leading space ("▁Paris" -> " Paris") instead of having it stripped like decode() does;
    the stream then equals decode(context + ids) minus decode(context).
    """

    def __init__(
        self, tokenizer: Tokenizer, skip_special_tokens: bool = True, prompt_ids: Iterable[int] | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._bytes = tokenizer.byte_values  # byte-fallback id -> its byte
        # a byte token for "A": put before ids that follow a byte run, they decode as inside a text, not as its start
        self._anchor = next((i for i, b in self._bytes.items() if b == ord("A")), None)
        if self._anchor is not None and tokenizer.decode([self._anchor], skip_special_tokens=False) != "A":
            self._anchor = None  # (a decoder that does more than ByteFallback to it: runs left to the tokenizer)
        self._skip = tokenizer.special_ids if skip_special_tokens else frozenset()  # ids decode leaves out
        # kept ids (skipped special tokens removed: decode ignores them), starting with the prompt context
        self.token_ids: list[int] = self._prompt_context(prompt_ids) if prompt_ids is not None else []
        self._prefix_offset = 0
        self._read_offset = len(self.token_ids)

    def _keep(self, token_ids: Iterable[int]) -> list[int]:
        return [int(t) for t in token_ids if int(t) not in self._skip]

    def _prompt_context(self, prompt_ids: Iterable[int]) -> list[int]:
        """Up to PROMPT_CONTEXT prompt ids that decode keeps, the last before any trailing run of byte-fallback ids
        (the output's first bytes could still change that run's text), ending on a complete character. Read from
        the end, CONTEXT_LOOKBACK ids at most: a long prompt costs no more than a short one, on the server's event
        loop. (An empty context would let the decoder strip the first output token's leading space, as it strips
        the first token's of a whole text: a prompt ending in CJK text or an emoji the vocabulary spells in
        bytes.)"""
        ids = prompt_ids if isinstance(prompt_ids, (list, tuple)) else list(prompt_ids)
        context: list[int] = []
        for t in reversed(ids[-CONTEXT_LOOKBACK:]):
            t = int(t)
            if t in self._skip or (not context and t in self._bytes):
                continue
            context.append(t)
            if len(context) == PROMPT_CONTEXT:
                break
        context.reverse()
        while context and (context[-1] in self._bytes or self._decode(context).endswith("\ufffd")):
            context.pop()
        return context

    def add(self, token_ids: Iterable[int]) -> str:
        """Append new ids; return the newly finished text (possibly "")."""
        kept = self._keep(token_ids)
        if not kept:
            return ""
        self.token_ids.extend(kept)
        if self._anchor is None and self.token_ids[-1] in self._bytes:
            return ""  # (runs decoded by the tokenizer, whole: one may still turn all U+FFFD; held until it ends)
        return self._emit(hold_incomplete=True)

    def flush(self) -> str:
        """Release held-back text; call once when the sequence is finished."""
        return self._emit(hold_incomplete=False)

    def _window_text(self) -> str:
        prefix_text = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
        return self._decode(self.token_ids[self._prefix_offset :])[len(prefix_text) :]

    def _emit(self, hold_incomplete: bool) -> str:
        if self._read_offset == len(self.token_ids):
            return ""
        delta = self._window_text()
        if hold_incomplete and delta.endswith("\ufffd"):
            return ""
        # the last emitted chunk becomes the prefix window: it starts on an emitted (clean) boundary
        self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
        return delta

    def _decode(self, ids: list[int]) -> str:
        """The tokenizer's decode, with each run of byte-fallback ids read as lossy UTF-8 (the module's why)."""
        if not ids:
            return ""
        if self._anchor is None or self._bytes.keys().isdisjoint(ids):
            return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
        parts = []
        for is_byte, run in groupby(ids, key=self._bytes.__contains__):
            run = list(run)
            if is_byte:
                parts.append(bytes(self._bytes[t] for t in run).decode("utf-8", errors="replace"))
            elif not parts:  # the text's start: the decoder's own rules (SentencePiece strips one leading space)
                parts.append(self.tokenizer.decode(run, skip_special_tokens=self.skip_special_tokens))
            else:  # after a run: as inside a text, its leading space kept
                text = self.tokenizer.decode([self._anchor, *run], skip_special_tokens=self.skip_special_tokens)
                parts.append(text[1:])
        return "".join(parts)


def decode_output(tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> str:
    """The text of finished output ids, as a stream of them adds up to (byte runs read as lossy UTF-8): beam
    search's text, like every other output's."""
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
    return detok.add(ids) + detok.flush()
