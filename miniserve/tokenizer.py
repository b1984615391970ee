"""Tokenizer: Hugging Face tokenizer directories without transformers, plus streaming detokenization.

Everything runs on a `tokenizers.Tokenizer` backend, so encode/decode match what
`transformers.AutoTokenizer` (v5) gives for the same directory:

* `tokenizer.json` is loaded as-is (Llama-3, Qwen2/3, Mistral, TinyLlama...), except that, as in
  transformers 5, a non-byte-level BPE whose tokenizer_config.json says `LlamaTokenizer(Fast)` gets the
  Llama normalizer/pre-tokenizer/decoder rebuilt (Metaspace, prepend_scheme "first" unless `legacy`).
* a bare `tokenizer.model` is read with `sentencepiece` and converted once to the same BPE pipeline
  transformers 5 builds for Llama-style SentencePiece models (byte fallback, Metaspace, merges from piece
  order). Calling sentencepiece's own encoder instead would disagree with HF on leading spaces and on
  special tokens written in the text.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from miniserve.json_file import read_eos_token_ids, read_json_object

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
LLAMA_TOKENIZER_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")

# Longer texts are tokenized through the batch API, which releases the GIL, so a server thread tokenizing a huge
# prompt leaves the event loop running (the single-text API holds the GIL throughout).
_GIL_FREE_CHARS = 16384

PROMPT_CONTEXT = 5  # prompt tokens an IncrementalDetokenizer may re-decode as its first prefix window

# Used when the directory has no chat template: one "Role: content" line per message, then "Assistant:".
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
    last_role: str | None = None,
) -> None:
    """ValueError, starting with the field's name, for chat-template options that cannot go together (the server's
    400s and LLM.chat's errors); `last_role`: the last message's, when known."""
    if continue_final_message and add_generation_prompt:
        raise ValueError(
            "continue_final_message cannot be used with add_generation_prompt: set add_generation_prompt false"
        )
    if continue_final_message and last_role is not None and last_role != "assistant":
        raise ValueError("continue_final_message needs the last message to be an assistant message")
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


class Encoding(dict):
    """transformers' BatchEncoding as far as Python lists go: its keys also read as attributes (`.input_ids`)."""

    @classmethod
    def of(cls, ids: list[int]) -> Encoding:
        return cls(input_ids=ids, attention_mask=[1] * len(ids))

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Tokenizer:
    """Encode/decode/chat-template for one model directory; see the module docstring for the backends."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: dict[str, str | None],
        chat_template: str | None,
        extra_eos_token_ids: Iterable[int] = (),
        clean_up_tokenization_spaces: bool = False,
        name_or_path: str = "",
    ) -> None:
        self.backend = backend
        self.name_or_path = name_or_path
        self.special_tokens = special_tokens
        self.chat_template = chat_template
        # transformers 5 skips the clean-up for BPE models because it corrupts their output
        self._clean_up = clean_up_tokenization_spaces and type(backend.model).__name__ != "BPE"
        added = backend.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, t in added.items() if t.special)  # what skip_special_tokens drops
        self._eos_token_ids = set(extra_eos_token_ids)
        if self.eos_token_id is not None:
            self._eos_token_ids.add(self.eos_token_id)
        self._bos_prefix = self._special_prefix()
        self._byte_ids = _byte_fallback_ids(backend)
        self._jinja_template: Any = None

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str | Path, chat_template: str | None = None) -> Tokenizer:
        """Load `tokenizer.json` (or `tokenizer.model`) and the config files; `chat_template` replaces theirs."""
        directory = Path(path)
        if not directory.is_dir():
            raise FileNotFoundError(f"tokenizer directory {str(directory)!r} does not exist")
        config = read_json_object(directory / "tokenizer_config.json", missing_ok=True)
        special: dict[str, str | None] = {name: _token_content(config.get(name)) for name in SPECIAL_TOKEN_NAMES}
        backend = _load_backend(directory, config, special)
        tokenizer = cls(
            backend,
            special_tokens=special,
            chat_template=chat_template or _load_chat_template(directory, config),
            extra_eos_token_ids=_config_eos_ids(directory),
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            name_or_path=str(directory),
        )
        return _with_template_setting(tokenizer, chat_template)

    # ---------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        """Number of token strings including added tokens (== len(hf_tokenizer))."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self.token_to_id(self.special_tokens.get("pad_token"))

    @property
    def unk_token_id(self) -> int | None:
        return self.token_to_id(self.special_tokens.get("unk_token"))

    @property
    def eos_token_ids(self) -> set[int]:
        """eos_token plus every eos_token_id in generation_config.json and config.json (e.g. <|eot_id|>)."""
        return set(self._eos_token_ids)

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of every added token marked special: exactly what decode(skip_special_tokens=True) drops."""
        return sorted(self.special_ids)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    # ---------------------------------------------------------------- encode / decode
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; special tokens written in `text` become their ids; BOS/EOS per the post-processor."""
        if len(text) > _GIL_FREE_CHARS:  # encode_batch releases the GIL (encode holds it): other threads run
            return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: int | Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids` (or of one id); special tokens are kept unless asked, as transformers' default."""
        ids = [ids] if isinstance(ids, int) else list(ids)
        if len(ids) > _GIL_FREE_CHARS // 4:
            text = self.backend.decode_batch([ids], skip_special_tokens=skip_special_tokens)[0]
        else:
            text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up else text

    # ---------------------------------------------------------------- what transformers' tokenizers also offer
    # (`LLM.get_tokenizer()` returns this object where vLLM returns a transformers tokenizer: code written for
    # that finds the same calls with the same defaults)
    def __len__(self) -> int:
        return self.vocab_size

    def __call__(self, text: str | list[str], add_special_tokens: bool = True) -> Encoding:
        """input_ids and attention_mask of a text or of each text in a list (no padding, no tensors)."""
        if isinstance(text, str):
            return Encoding.of(self.encode(text, add_special_tokens))
        ids_list = [self.encode(t, add_special_tokens) for t in text]
        return Encoding(input_ids=ids_list, attention_mask=[[1] * len(ids) for ids in ids_list])

    def batch_decode(self, sequences: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in sequences]

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | None | list[str | None]:
        return self.id_to_token(ids) if isinstance(ids, int) else [self.id_to_token(i) for i in ids]

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | None | list[int | None]:
        return self.token_to_id(tokens) if isinstance(tokens, str) else [self.token_to_id(t) for t in tokens]

    # ---------------------------------------------------------------- chat
    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = False,
        *,
        tokenize: bool = True,
        return_dict: bool = True,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
        chat_template: str | None = None,
        continue_final_message: bool = False,
        **template_kwargs: Any,
    ) -> str | list[int] | Encoding:
        """Render `messages` with the model's chat template (or DEFAULT_CHAT_TEMPLATE when it has none); with
        transformers 5's defaults: input_ids and attention_mask of the rendered text (no specials added: the
        template writes them), `return_dict=False` for the ids alone, `tokenize=False` for the text.

        Message content may be a string or a list of OpenAI text parts, which are joined with newlines.
        Keys whose value is None are dropped (as transformers does) so templates see them as undefined.
        Tool-call arguments given as JSON text (OpenAI's messages) reach the template as objects.
        `tools` (OpenAI tool dicts) and `documents` reach the template as transformers passes them;
        `template_kwargs` become extra template variables (e.g. `enable_thinking`); `chat_template` replaces the
        model's template for this call. With `continue_final_message`, the text ends right after the last
        message's content (no end-of-turn marker), so the model continues that message.
        """
        text = self.render_chat(messages, add_generation_prompt, tools, documents, chat_template,
                                continue_final_message, template_kwargs)  # fmt: skip
        if not tokenize:
            return text
        ids = self.encode(text, add_special_tokens=False)
        return Encoding.of(ids) if return_dict else ids

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
        chat_template: str | None = None,
        continue_final_message: bool = False,
        template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """The chat as text (apply_chat_template(tokenize=False))."""
        template = self._template(chat_template)
        variables = {name: value for name, value in self.special_tokens.items() if value is not None}
        variables.update(template_kwargs or {})  # (the inputs named below are this method's own arguments)
        normalized = [_normalize_message(m, i) for i, m in enumerate(messages)]
        if continue_final_message and normalized:  # mark where the final message's content ends
            normalized[-1]["content"] = (normalized[-1].get("content") or "") + CONTINUE_MARK
        rendered = template.render(
            **variables,
            messages=normalized,
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
        )
        return _cut_at_continue_mark(rendered) if continue_final_message else rendered

    def _template(self, source: str | None) -> Any:
        if source is not None:  # a per-request template: compiled each time (rare; a cache could hold anything)
            return _compile_template(source)
        if self._jinja_template is None:
            self._jinja_template = _compile_template(self.chat_template or DEFAULT_CHAT_TEMPLATE)
        return self._jinja_template

    def chat_prompt(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        *,
        add_special_tokens: bool | None = None,
        template_kwargs: dict[str, Any] | None = None,
        check_text: Callable[[str], None] | None = None,
        **template_options: Any,
    ) -> tuple[str, list[int]]:
        """(rendered text, prompt ids): the ids get the BOS prefix unless the template already wrote it (never
        EOS). An explicit `add_special_tokens` has vLLM's meaning: True adds the tokenizer's specials on top of
        the template's text, False encodes exactly the template's text. `template_kwargs` (a request's
        chat_template_kwargs) are extra template variables, kept apart from this method's own arguments
        (`check_template_kwargs`). `check_text` sees the rendered text before it is tokenized (the server's
        size limit)."""
        check_template_kwargs(template_kwargs)
        text = self.render_chat(messages, add_generation_prompt, template_kwargs=template_kwargs, **template_options)
        if check_text is not None:
            check_text(text)
        if add_special_tokens is not None:
            return text, self.encode(text, add_special_tokens=add_special_tokens)
        ids = self.encode(text, add_special_tokens=False)
        prefix = self._bos_prefix
        if prefix and ids[: len(prefix)] != prefix:
            ids = prefix + ids
        return text, ids

    def encode_last(self, text: str, keep: int, add_special_tokens: bool = True) -> list[int]:
        """The text's last `keep` tokens, its special tokens (BOS) kept: transformers' left truncation
        (truncation=True, max_length=keep, truncation_side="left"), which vLLM's truncate_prompt_tokens uses."""
        full = self.encode(text, add_special_tokens=add_special_tokens)
        if len(full) <= keep:
            return full
        plain = self.encode(text, add_special_tokens=False)
        start = next((i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), 0)
        before, after = full[:start], full[start + len(plain) :]
        room = max(keep - len(before) - len(after), 0)
        return before + plain[len(plain) - room :] + after

    def _special_prefix(self) -> list[int]:
        """The ids the post-processor puts before the text (e.g. [BOS]), found by encoding a probe."""
        probe = "a"
        plain = self.encode(probe, add_special_tokens=False)
        full = self.encode(probe, add_special_tokens=True)
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return full[:start]
        return []


class IncrementalDetokenizer:
    """Turns a growing list of generated ids into text deltas for streaming.

    Only a short trailing window is decoded per call (prefix/read offsets, as in vLLM), so each `add` costs
    O(window). Text is held back while it ends in U+FFFD (an incomplete UTF-8 sequence) or in byte-fallback
    tokens (`<0xNN>`: the byte-fallback decoder turns a whole run of them into U+FFFD if any byte is bad, so
    the run may still change); `flush()` releases the held text when generation ends. The window always
    starts right after an emitted token, so SentencePiece's "strip the first space" rule hits the prefix
    and the full text identically: "".join(deltas) + flush() == tokenizer.decode(all_ids).

    With `prompt_ids`, the last few prompt tokens seed the window (as vLLM does), so the first generated
    token keeps its leading space ("▁Paris" -> " Paris") instead of having it stripped like decode() does;
    the stream then equals decode(context + ids) minus decode(context).
    """

    def __init__(
        self, tokenizer: Tokenizer, skip_special_tokens: bool = True, prompt_ids: Iterable[int] | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._skip = tokenizer.special_ids if skip_special_tokens else frozenset()  # ids decode leaves out
        # kept ids (skipped special tokens removed: decode ignores them), starting with the prompt context
        self.token_ids: list[int] = self._prompt_context(prompt_ids) if prompt_ids is not None else []
        self._prefix_offset = 0
        self._read_offset = len(self.token_ids)

    def _keep(self, token_ids: Iterable[int]) -> list[int]:
        return [int(t) for t in token_ids if int(t) not in self._skip]

    def _prompt_context(self, prompt_ids: Iterable[int]) -> list[int]:
        """Up to PROMPT_CONTEXT trailing prompt ids that end on a complete character (read from the end: a long
        prompt costs no more than a short one, on the server's event loop)."""
        ids = prompt_ids if isinstance(prompt_ids, (list, tuple)) else list(prompt_ids)
        context: list[int] = []
        for t in reversed(ids):
            if int(t) not in self._skip:
                context.append(int(t))
                if len(context) == PROMPT_CONTEXT:
                    break
        context.reverse()
        while context and (context[-1] in self.tokenizer._byte_ids or self._decode(context).endswith("\ufffd")):
            context.pop()
        return context

    def add(self, token_ids: Iterable[int]) -> str:
        """Append new ids; return the newly finished text (possibly "")."""
        kept = self._keep(token_ids)
        if not kept:
            return ""
        self.token_ids.extend(kept)
        if self.token_ids[-1] in self.tokenizer._byte_ids:
            return ""
        return self._emit(hold_incomplete=True)

    def flush(self) -> str:
        """Release held-back text; call once when the sequence is finished."""
        return self._emit(hold_incomplete=False)

    def pending(self) -> str:
        """The held-back text as it decodes now, not emitted: what flush() would release. (A stop string may sit
        in it: on Llama-2 or Mistral a newline is the byte token <0x0A>.)"""
        return self._window_text() if self._read_offset < len(self.token_ids) else ""

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
        if not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)


# ---------------------------------------------------------------------------- backend construction
def _load_backend(directory: Path, config: dict, special: dict[str, str | None]) -> tokenizers.Tokenizer:
    """The `tokenizers` pipeline of a directory, as transformers 5 builds it; fills in `special` what a bare
    tokenizer.model implies."""
    prefix_space = config.get("add_prefix_space") is not False  # null (as transformers 5 writes it) = default
    if (directory / "tokenizer.json").is_file():
        backend = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
        tokenizer_class = str(config.get("tokenizer_class") or "")
        if tokenizer_class in LLAMA_TOKENIZER_CLASSES and _is_sentencepiece_bpe(backend):
            _set_llama_pipeline(backend, config.get("legacy", False), prefix_space)
    elif (directory / "tokenizer.model").is_file():
        backend = _backend_from_sentencepiece(directory / "tokenizer.model", config.get("legacy", False), prefix_space)
        # LlamaTokenizer's defaults when the config does not name them
        for name, default in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>")):
            if name not in config:
                special[name] = default
    else:
        raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {str(directory)!r}: cannot build a tokenizer")
    _add_config_tokens(backend, config, special)
    _update_post_processor(backend, config, special)
    return backend


def _backend_from_sentencepiece(model_file: Path, legacy: bool, add_prefix_space: bool) -> tokenizers.Tokenizer:
    """Build transformers 5's Llama BPE pipeline from a SentencePiece model (pieces in id order)."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    backend = tokenizers.Tokenizer(
        BPE(vocab=vocab, merges=_merges_from_vocab(vocab), fuse_unk=True, byte_fallback=True, dropout=None)
    )
    _set_llama_pipeline(backend, legacy, add_prefix_space)
    control = [AddedToken(pieces[i], special=True, normalized=False) for i in range(len(pieces)) if sp.is_control(i)]
    backend.add_special_tokens(control)
    return backend


def _merges_from_vocab(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of a piece into two pieces is a merge; earlier pieces (higher SP score) merge first."""
    merges = []
    for piece, piece_id in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((piece_id, cut, left, right))
    merges.sort()
    return [(left, right) for _, _, left, right in merges]


def _set_llama_pipeline(backend: tokenizers.Tokenizer, legacy: bool, add_prefix_space: bool) -> None:
    """Metaspace without normalizer; '▁' is prepended to the first chunk only unless `legacy`."""
    scheme = ("always" if legacy else "first") if add_prefix_space else "never"
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(steps)


def _add_config_tokens(backend: tokenizers.Tokenizer, config: dict, special: dict[str, str | None]) -> None:
    """Add tokens from added_tokens_decoder and named special tokens the backend does not know yet."""
    known = {t.content for t in backend.get_added_tokens_decoder().values()}
    for _, spec in sorted((config.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0])):
        token = _added_token(spec)
        if token.content not in known:
            (backend.add_special_tokens if token.special else backend.add_tokens)([token])
            known.add(token.content)
    for content in special.values():
        if content is not None and content not in known:
            backend.add_special_tokens([AddedToken(content, special=True, normalized=False)])
            known.add(content)


def _update_post_processor(backend: tokenizers.Tokenizer, config: dict, special: dict[str, str | None]) -> None:
    """transformers 5 rebuilds the post-processor from add_bos/add_eos_token when the config sets them."""
    if "add_bos_token" not in config and "add_eos_token" not in config and backend.post_processor is not None:
        return
    bos, eos = special.get("bos_token"), special.get("eos_token")
    add_bos = bool(config.get("add_bos_token", False)) and bos is not None
    add_eos = bool(config.get("add_eos_token", False)) and eos is not None
    single = (f"{bos}:0 " if add_bos else "") + "$A:0" + (f" {eos}:0" if add_eos else "")
    pair = single + (f" {bos}:1" if add_bos else "") + " $B:1" + (f" {eos}:1" if add_eos else "")
    used = [(t, backend.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=used)


# ---------------------------------------------------------------------------- config helpers
def _token_content(value: Any) -> str | None:
    """Special tokens are strings or AddedToken dicts ({"content": ..., ...})."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"unsupported special token entry in tokenizer_config.json: {value!r}")


def _added_token(spec: Any) -> AddedToken:
    if isinstance(spec, str):
        return AddedToken(spec, special=True, normalized=False)
    special = bool(spec.get("special", False))
    return AddedToken(
        spec["content"],
        single_word=bool(spec.get("single_word", False)),
        lstrip=bool(spec.get("lstrip", False)),
        rstrip=bool(spec.get("rstrip", False)),
        normalized=bool(spec.get("normalized", not special)),
        special=special,
    )


def _config_eos_ids(directory: Path) -> set[int]:
    """The directory's generation_config.json and config.json stop tokens (read as the engine reads a model's)."""
    return read_eos_token_ids(directory / "generation_config.json") | read_eos_token_ids(directory / "config.json")


def _with_template_setting(tokenizer: Tokenizer, template: str | None) -> Tokenizer:
    """`tokenizer` with the chat_template setting's template compiled once, now: a broken one stops the start (a
    ValueError naming the setting), not the first chat request."""
    if template:
        import jinja2

        try:
            tokenizer._jinja_template = _compile_template(template)
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(f"chat_template does not compile: {exc} (line {exc.lineno})") from None
    return tokenizer


def _load_chat_template(directory: Path, config: dict) -> str | None:
    """chat_template.jinja (transformers 5 layout) wins over tokenizer_config.json's chat_template."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t["name"]: t["template"] for t in template}
        return named.get("default", next(iter(named.values()), None))
    return template


def _is_sentencepiece_bpe(backend: tokenizers.Tokenizer) -> bool:
    """A BPE that is not byte-level (transformers 5 loads byte-level ones as-is whatever the class says)."""
    parts = (backend.pre_tokenizer, backend.decoder)
    byte_level = any(part is not None and b'"ByteLevel"' in part.__getstate__() for part in parts)
    return type(backend.model).__name__ == "BPE" and not byte_level


def _byte_fallback_ids(backend: tokenizers.Tokenizer) -> frozenset[int]:
    """Ids of `<0xNN>` pieces, when the decoder groups them with ByteFallback (SentencePiece-style)."""
    decoder = backend.decoder
    if decoder is None or b'"ByteFallback"' not in decoder.__getstate__():
        return frozenset()
    vocab = backend.get_vocab(with_added_tokens=False)
    return frozenset(i for tok, i in vocab.items() if len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"))


def _clean_up_tokenization(text: str) -> str:
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't")):
        text = text.replace(before, after)
    for suffix in ("'m", "'s", "'ve", "'re"):
        text = text.replace(" " + suffix, suffix)
    return text


# ---------------------------------------------------------------------------- chat templates
class ChatMessageError(ValueError):
    """A message the chat template cannot be given (the caller's input, not the template's failure)."""


def _normalize_message(message: dict[str, Any], index: int) -> dict[str, Any]:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise ChatMessageError(f"messages[{index}] must be a dict with a 'role' string, got {message!r}")
    out = {key: value for key, value in message.items() if value is not None}
    content = out.get("content")
    if content is not None and not isinstance(content, (str, list)):
        raise ChatMessageError(f"messages[{index}].content must be a string or a list of parts, got {content!r}")
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ChatMessageError(f"messages[{index}].content: only text parts are supported, got {part!r}")
            texts.append(part["text"])
        out["content"] = "\n".join(texts)
    if isinstance(out.get("tool_calls"), list):
        out["tool_calls"] = [_template_tool_call(call, index) for call in out["tool_calls"]]
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


def _cut_at_continue_mark(rendered: str) -> str:
    """The rendered chat up to the end of the final message's content, found by the mark appended to it (not by
    searching for the content, which may also occur in the template's own text after it). A template that trims
    the content's trailing space trimmed the mark's too: the cut then drops trailing space, as transformers does."""
    at = rendered.rfind(CONTINUE_MARK.rstrip())
    if at == -1:
        raise ValueError("continue_final_message: the chat template does not render the final message's content")
    return rendered[:at] if rendered.startswith(CONTINUE_MARK, at) else rendered[:at].rstrip()


def _compile_template(source: str) -> Any:
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
