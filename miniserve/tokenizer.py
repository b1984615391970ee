"""Tokenizer: Hugging Face tokenizer directories without transformers (streaming detokenization: detokenizer.py;
chat templates: chat_template.py).

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

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from miniserve.chat_template import (
    ChatTemplates,
    check_chat_options,
    check_template_kwargs,
    cut_at_continue_mark,
    load_chat_templates,
    read_format,
    template_messages,
)
from miniserve.json_file import read_eos_token_ids, read_json_object

# transformers' named special tokens: always special, and chat templates see each by its name
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
LLAMA_TOKENIZER_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")

# Longer texts are tokenized through the batch API, which releases the GIL, so a server thread tokenizing a huge
# prompt leaves the event loop running (the single-text API holds the GIL throughout).
_GIL_FREE_CHARS = 16384


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

    content_format = "auto"  # how message content reaches the chat template: chat_template.read_format

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: dict[str, str | None],
        templates: ChatTemplates,
        extra_eos_token_ids: Iterable[int] = (),
        clean_up_tokenization_spaces: bool = False,
        name_or_path: str = "",
    ) -> None:
        self.backend = backend
        self.name_or_path = name_or_path
        self.special_tokens = special_tokens
        self.templates = templates
        # transformers 5 skips the clean-up for BPE models because it corrupts their output
        self._clean_up = clean_up_tokenization_spaces and type(backend.model).__name__ != "BPE"
        added = backend.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, t in added.items() if t.special)  # what skip_special_tokens drops
        self._eos_token_ids = set(extra_eos_token_ids)
        if self.eos_token_id is not None:
            self._eos_token_ids.add(self.eos_token_id)
        # `<0xNN>` pieces -> their byte (SentencePiece's byte fallback): detokenizer.py decodes their runs itself
        self.byte_values = _byte_fallback_values(backend)

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls, path: str | Path, chat_template: str | None = None, content_format: str = "auto"
    ) -> Tokenizer:
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
            templates=load_chat_templates(directory, config, chat_template),
            extra_eos_token_ids=_config_eos_ids(directory),
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            name_or_path=str(directory),
        )
        return _with_template_settings(tokenizer, chat_template, content_format)

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
    def chat_template(self) -> str | dict[str, str] | None:
        """transformers' attribute: the chat template, or the model's templates by name when it has several."""
        return self.templates.named if len(self.templates.named) > 1 else self.templates.default

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
        ids = _as_ids(ids)
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
        return _each_id(self.id_to_token, ids)

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
        template writes them; the fallback's lines get the tokenizer's BOS, as in chat_prompt), `return_dict=False`
        for the ids alone, `tokenize=False` for the text.

        Message content may be a string or a list of OpenAI text parts; the template gets it as text (parts joined
        with newlines) or as a list of text parts, whichever it reads (`content_format`). Keys whose value is None
        are dropped (as transformers does) so templates see them as undefined. Tool-call arguments given as JSON
        text (OpenAI's messages) reach the template as objects. `tools` (OpenAI tool dicts) and `documents` reach
        the template as transformers passes them; `template_kwargs` become extra template variables (e.g.
        `enable_thinking`); `chat_template` replaces the model's template for this call, or names one of its
        templates. With `continue_final_message`, the text ends right after the last message's content (no
        end-of-turn marker), so the model continues that message. As transformers, a ValueError for an empty
        conversation, or for both continue_final_message and add_generation_prompt."""
        if not messages:
            raise ValueError("cannot apply a chat template to an empty conversation: give at least one message")
        check_chat_options(add_generation_prompt, continue_final_message, None)
        text = self.render_chat(messages, add_generation_prompt, tools, documents, chat_template,
                                continue_final_message, template_kwargs)  # fmt: skip
        if not tokenize:
            return text
        # (the fallback's lines as chat_prompt encodes them: transformers refuses a model without a template)
        ids = self.encode(text, add_special_tokens=self.templates.is_fallback(chat_template, tools))
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
        content_format: str | None = None,
    ) -> str:
        """The chat as text (apply_chat_template(tokenize=False)); `content_format` overrides the tokenizer's."""
        source = self.templates.source(chat_template, tools)
        template = self.templates.compiled(source)
        variables = {name: value for name, value in self.special_tokens.items() if value is not None}
        variables.update(template_kwargs or {})  # (the inputs named below are this method's own arguments)
        fmt = read_format(content_format or self.content_format, source)
        listed = template_messages(messages, fmt, continue_final_message)
        rendered = template.render(**variables, messages=listed, tools=tools, documents=documents,
                                   add_generation_prompt=add_generation_prompt)  # fmt: skip
        return cut_at_continue_mark(rendered) if continue_final_message else rendered

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
        """(rendered text, prompt ids). `add_special_tokens` has vLLM's meaning: False encodes exactly the
        template's text (the template writes the BOS a model wants), True adds the tokenizer's specials on top of
        it. None: False, but where the model has no template the fallback's plain lines are encoded as a
        completion prompt is (True: with the BOS the tokenizer adds). `template_kwargs` (a request's
        chat_template_kwargs) are extra template variables, kept apart from this method's own arguments
        (`check_template_kwargs`). `check_text` sees the rendered text before it is tokenized (the server's
        size limit)."""
        check_template_kwargs(template_kwargs)
        text = self.render_chat(messages, add_generation_prompt, template_kwargs=template_kwargs, **template_options)
        if check_text is not None:
            check_text(text)
        if add_special_tokens is None:
            add_special_tokens = self.templates.is_fallback(
                template_options.get("chat_template"), template_options.get("tools")
            )
        return text, self.encode(text, add_special_tokens=add_special_tokens)

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


# ---------------------------------------------------------------------------- backend construction
def _load_backend(directory: Path, config: dict, special: dict[str, str | None]) -> tokenizers.Tokenizer:
    """The `tokenizers` pipeline of a directory, as transformers 5 builds it; fills in `special` what a bare
    tokenizer.model implies."""
    prefix_space = config.get("add_prefix_space") is not False  # null (as transformers 5 writes it) = default
    from_json = (directory / "tokenizer.json").is_file()
    if from_json:
        try:
            backend = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as e:  # (the tokenizers library raises Exception itself)
            raise ValueError(
                f"{directory / 'tokenizer.json'}: not a tokenizer the tokenizers library reads ({e})"
            ) from None
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
    if not from_json:  # (transformers 5 drops add_bos/add_eos_token where tokenizer.json is)
        _update_post_processor(backend, config, special)
    # split_special_tokens: a special token's text in a prompt is encoded as text, never as the token itself
    backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
    return backend


def _backend_from_sentencepiece(model_file: Path, legacy: bool, add_prefix_space: bool) -> tokenizers.Tokenizer:
    """Build transformers 5's Llama BPE pipeline from a SentencePiece model (pieces in id order)."""
    import sentencepiece

    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    except RuntimeError as e:
        raise ValueError(f"{model_file}: not a SentencePiece model ({e})") from None
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    backend = tokenizers.Tokenizer(
        BPE(vocab=vocab, merges=_merges_from_vocab(vocab), fuse_unk=True, byte_fallback=True, dropout=None)
    )
    _set_llama_pipeline(backend, legacy, add_prefix_space)
    control = [AddedToken(pieces[i], special=True, normalized=False) for i in range(len(pieces)) if sp.is_control(i)]
    backend.add_special_tokens(control)
    # user-defined pieces (chat markers a model was trained with) are whole tokens wherever they appear in a text,
    # and plain text when decoded: non-special added tokens, as transformers converts them
    backend.add_tokens([AddedToken(piece, special=False, normalized=False) for piece in _user_defined(model_file)])
    return backend


def _user_defined(model_file: Path) -> list[str]:
    """The pieces a SentencePiece model marks USER_DEFINED (its Python API has no is_user_defined: the proto says)."""
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(model_file.read_bytes())
    kind = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    return [p.piece for p in model.pieces if p.type == kind]


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
    """Add the tokens of added_tokens_decoder the backend does not know yet; then, as transformers 5 does, (re)add
    every named special token and every extra special token as special, whatever tokenizer.json says of it (so
    skip_special_tokens drops a fine-tune's EOS that its tokenizer.json lists as a plain added token)."""
    known = {t.content for t in backend.get_added_tokens_decoder().values()}
    listed = {}
    for _, spec in sorted((config.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0])):
        token = _added_token(spec)
        listed[token.content] = token
        if token.content not in known:
            (backend.add_special_tokens if token.special else backend.add_tokens)([token])
            known.add(token.content)
    values = [config.get(name, content) for name, content in special.items() if content is not None]
    extra = config.get("extra_special_tokens", config.get("additional_special_tokens"))
    values += list(extra) if isinstance(extra, (list, tuple)) else []
    backend.add_special_tokens([_special_token(value, listed) for value in values])


def _special_token(value: Any, listed: dict[str, AddedToken]) -> AddedToken:
    """A special token as transformers 5 adds it: the added_tokens_decoder entry of that content, else the config's
    own entry (an AddedToken dict), else the bare content (neither stripped nor normalized)."""
    content = _token_content(value)
    if content in listed:
        return listed[content]
    return _added_token(value) if isinstance(value, dict) else AddedToken(content, special=True, normalized=False)


def _update_post_processor(backend: tokenizers.Tokenizer, config: dict, special: dict[str, str | None]) -> None:
    """transformers 5 rebuilds a tokenizer.model's post-processor from add_bos/add_eos_token when the config sets
    them; tokenizer.json's own post-processor is what adds a BOS or EOS there, whatever the flags say."""
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


def _plain(ids: Any) -> Any:
    """numpy's or torch's ids (an array or a scalar) as Python's, as transformers takes them; others as they are."""
    return ids.tolist() if hasattr(ids, "tolist") else ids


def _as_ids(ids: Any) -> list[int]:
    """Token ids as a list: of one id, or of a list (numpy's and torch's too). A list is taken as it is: the
    detokenizer decodes one per token of every sequence."""
    if isinstance(ids, list):
        return ids
    ids = _plain(ids)
    return [ids] if isinstance(ids, int) else list(ids)


def _each_id(fn: Any, ids: Any) -> Any:
    """fn of one id, or of each id of a list (numpy's and torch's too)."""
    ids = _plain(ids)
    return fn(ids) if isinstance(ids, int) else [fn(i) for i in ids]


def _config_eos_ids(directory: Path) -> set[int]:
    """The directory's generation_config.json and config.json stop tokens (read as the engine reads a model's)."""
    return read_eos_token_ids(directory / "generation_config.json") | read_eos_token_ids(directory / "config.json")


def _with_template_settings(tokenizer: Tokenizer, template: str | None, content_format: str) -> Tokenizer:
    """`tokenizer` with the chat_template setting's template compiled once, now: a broken one stops the start (a
    ValueError naming the setting), not the first chat request; and with the chat_template_content_format setting."""
    tokenizer.content_format = content_format
    if template:
        import jinja2

        try:
            tokenizer.templates.compiled(template)
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(f"chat_template does not compile: {exc} (line {exc.lineno})") from None
    return tokenizer


def _is_sentencepiece_bpe(backend: tokenizers.Tokenizer) -> bool:
    """A BPE that is not byte-level (transformers 5 loads byte-level ones as-is whatever the class says)."""
    parts = (backend.pre_tokenizer, backend.decoder)
    byte_level = any(part is not None and b'"ByteLevel"' in part.__getstate__() for part in parts)
    return type(backend.model).__name__ == "BPE" and not byte_level


def _byte_fallback_values(backend: tokenizers.Tokenizer) -> dict[int, int]:
    """The byte of each `<0xNN>` piece by id, when the decoder groups them with ByteFallback (SentencePiece-style)."""
    decoder = backend.decoder
    if decoder is None or b'"ByteFallback"' not in decoder.__getstate__():
        return {}
    vocab = backend.get_vocab(with_added_tokens=False)
    return {i: int(tok[3:5], 16) for tok, i in vocab.items() if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", tok)}


def _clean_up_tokenization(text: str) -> str:
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't")):
        text = text.replace(before, after)
    for suffix in ("'m", "'s", "'ve", "'re"):
        text = text.replace(" " + suffix, suffix)
    return text
