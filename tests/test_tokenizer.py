"""miniserve.tokenizer against transformers.AutoTokenizer on tokenizers trained here on tinyshakespeare.

Three directories, each built once per module:
  * sp:     a Llama-style SentencePiece model (tokenizer.model only, byte fallback)
  * bpe:    a Llama-3/Qwen-style byte-level BPE tokenizer.json saved through PreTrainedTokenizerFast
  * legacy: a Llama-2-era tokenizer.json (Prepend/Replace normalizer) with tokenizer_class LlamaTokenizerFast
  * bytelevel_llama: the bpe directory relabelled LlamaTokenizerFast with add_bos_token (DeepSeek-R1-Distill)
"""

from __future__ import annotations

import functools
import io
import json
import random
import re
import shutil
from pathlib import Path

import jinja2
import numpy as np
import pytest
import sentencepiece
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as RawTokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from miniserve.chat_template import DEFAULT_CHAT_TEMPLATE, detect_content_format
from miniserve.detokenizer import PROMPT_CONTEXT, IncrementalDetokenizer
from miniserve.tokenizer import Tokenizer

CORPUS = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt"
EXTRA_LINES = [
    "héllo wörld café naïve",
    "日本語のテキスト 中文字符",
    "emoji 😀🎉👍 test",
    "tabs\tand  spaces",
]

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

CHATML_TEMPLATE = """{{- bos_token }}
{%- set ns = namespace(system_seen=false) %}
{%- for message in messages %}
    {%- if message.role == 'system' %}{% set ns.system_seen = true %}{% endif %}
    {%- if loop.first and not ns.system_seen %}
        {{- '<|im_start|>system\\nYou are helpful. Year ' + strftime_now('%Y') + '.<|im_end|>\\n' }}
    {%- endif %}
    {{- '<|im_start|>' + message.role + '\\n' + message.content | trim + '<|im_end|>\\n' }}
    {%- if message.tool_calls is defined %}{{ message.tool_calls | tojson }}{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

TEST_STRINGS = [
    "Hello world",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    " leading space",
    "  two leading spaces",
    "trailing spaces   ",
    "a\nb\n\nc\r\nd",
    "\t tab\tseparated\t",
    "",
    " ",
    "\n",
    "héllo wörld café naïve ünïcödé ẞ ﬁ ①",
    "日本語のテキスト 中文字符 한국어",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧",
    "numbers 1234567 3.14159 -42",
    "x</s>y <s> z",
    "<s>Hello",
    "Hello </s>",
    "<unk> and <0x41> literal",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|begin_of_text|>Text<|eot_id|>",
    "<|im_start|><|im_end|>",
    "ROMEO: O, she doth teach the torches to burn bright!",
    "   \n\n   \t\t  ",
    "What's up? I'm fine, you've been... they're here!",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hello, who art thou?"}],
    [
        {"role": "system", "content": "Speak like a Shakespearean actor."},
        {"role": "user", "content": "  Where is Romeo?  "},
        {"role": "assistant", "content": "He is in Verona, good sir."},
        {"role": "user", "content": "Café ☕ and 日本語 😀"},
    ],
    [
        {"role": "user", "content": "line one\nline two"},
        {"role": "assistant", "content": "reply", "tool_calls": None},
        {"role": "user", "content": "again"},
    ],
]


def corpus_lines(limit: int) -> list[str]:
    text = CORPUS.read_text(encoding="utf-8")[:limit]
    return [line for line in text.split("\n") if line.strip()] + EXTRA_LINES * 5


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory) -> Path:
    """tokenizer.model + tokenizer_config.json the way Llama-2/TinyLlama ship them."""
    directory = tmp_path_factory.mktemp("sp")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines(300_000)),
        model_writer=model,
        vocab_size=1000,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=0.9995,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=2,
        minloglevel=2,
    )
    (directory / "tokenizer.model").write_bytes(model.getvalue())

    def added(content: str) -> dict:
        return {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }

    write_json(
        directory / "tokenizer_config.json",
        {
            "add_bos_token": True,
            "add_eos_token": False,
            "added_tokens_decoder": {
                "0": added("<unk>"),
                "1": added("<s>"),
                "2": added("</s>"),
                "1000": added("<|pad|>"),
            },
            "bos_token": "<s>",
            "eos_token": {
                "__type": "AddedToken",
                "content": "</s>",
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
            },
            "unk_token": "<unk>",
            "pad_token": "<|pad|>",
            "legacy": False,
            "clean_up_tokenization_spaces": False,
            "tokenizer_class": "LlamaTokenizer",
            "chat_template": LLAMA2_TEMPLATE,
        },
    )
    write_json(directory / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2})
    return directory


def train_byte_level_bpe() -> RawTokenizer:
    tok = RawTokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    split = Regex(
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(split, behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=800,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = "\n".join(corpus_lines(200_000))
    tok.train_from_iterator([text[i : i + 1000] for i in range(0, len(text), 1000)], trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                special_tokens=[("<|begin_of_text|>", bos)],
            ),
        ]
    )
    return tok


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    """Llama-3-like: byte-level BPE, BOS from the post-processor, two EOS ids, chat_template.jinja."""
    directory = tmp_path_factory.mktemp("bpe")
    hf = PreTrainedTokenizerFast(
        tokenizer_object=train_byte_level_bpe(),
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|end_of_text|>",
    )
    hf.chat_template = CHATML_TEMPLATE
    hf.save_pretrained(directory)
    write_json(directory / "generation_config.json", {"eos_token_id": [1, 2]})
    write_json(directory / "config.json", {"model_type": "llama", "eos_token_id": 4})
    return directory


@pytest.fixture(scope="module")
def legacy_dir(sp_dir, tmp_path_factory) -> Path:
    """The sp model as an old Llama-2 tokenizer.json (normalizer-based), still marked LlamaTokenizerFast."""
    directory = tmp_path_factory.mktemp("legacy")
    backend = AutoTokenizer.from_pretrained(sp_dir).backend_tokenizer
    raw = RawTokenizer.from_str(backend.to_str())
    raw.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    raw.pre_tokenizer = None
    raw.save(str(directory / "tokenizer.json"))
    config = json.loads((sp_dir / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "LlamaTokenizerFast"
    write_json(directory / "tokenizer_config.json", config)
    return directory


@pytest.fixture(scope="module")
def bytelevel_llama_dir(bpe_dir, tmp_path_factory) -> Path:
    """A byte-level tokenizer.json that claims LlamaTokenizerFast (DeepSeek-R1-Distill style)."""
    directory = tmp_path_factory.mktemp("bytelevel_llama")
    shutil.copytree(bpe_dir, directory, dirs_exist_ok=True)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="LlamaTokenizerFast", add_bos_token=True, add_eos_token=False)
    write_json(directory / "tokenizer_config.json", config)
    return directory


@pytest.fixture(scope="module", params=["sp", "bpe", "legacy", "bytelevel_llama"])
def pair(request) -> tuple[Tokenizer, object]:
    """(ours, transformers') for each directory."""
    directory = request.getfixturevalue(f"{request.param}_dir")
    return Tokenizer.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)


# ---------------------------------------------------------------------------- encode / decode


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(pair, add_special_tokens):
    ours, hf = pair
    for text in TEST_STRINGS + corpus_lines(3000)[:40]:
        assert ours.encode(text, add_special_tokens) == hf.encode(text, add_special_tokens=add_special_tokens), text


def test_decode_matches_transformers(pair):
    ours, hf = pair
    rng = random.Random(0)
    sequences = [hf.encode(text) for text in TEST_STRINGS]
    sequences += [[rng.randrange(len(hf)) for _ in range(rng.randrange(1, 16))] for _ in range(300)]
    for ids in sequences:
        for skip in (True, False):
            assert ours.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip), ids


def test_roundtrip_and_special_tokens_in_text(bpe_dir, sp_dir):
    bpe = Tokenizer.from_pretrained(bpe_dir)
    ids = bpe.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)
    assert ids[0] == bpe.token_to_id("<|im_start|>") and ids[-1] == bpe.token_to_id("<|im_end|>")
    assert bpe.encode("hi")[0] == bpe.bos_token_id  # Llama-3 style: BOS from the post-processor
    sp = Tokenizer.from_pretrained(sp_dir)
    assert sp.encode("hi")[0] == sp.bos_token_id and sp.encode("hi", False)[0] != sp.bos_token_id
    for text in TEST_STRINGS:
        if "<" not in text:
            assert bpe.decode(bpe.encode(text), skip_special_tokens=True) == text  # byte-level BPE is lossless


def test_the_transformers_calls_vllm_users_make(pair):
    """LLM.get_tokenizer() is this object where vLLM gives a transformers tokenizer: the common calls give what
    transformers gives, with its defaults (decode keeps special tokens)."""
    ours, hf = pair
    texts = [t for t in TEST_STRINGS if t][:6]
    assert len(ours) == len(hf) and ours.get_vocab() == hf.get_vocab()
    for text in texts:
        theirs = hf(text)
        assert dict(ours(text)) == {k: theirs[k] for k in ("input_ids", "attention_mask")}
        assert ours(text).input_ids == theirs.input_ids and ours(text, add_special_tokens=False).input_ids == (
            hf(text, add_special_tokens=False).input_ids
        )
        ids = theirs.input_ids
        assert ours.decode(ids) == hf.decode(ids) and ours.decode(ids[0]) == hf.decode(ids[0])
        assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
        assert ours.convert_ids_to_tokens(ids[-1]) == hf.convert_ids_to_tokens(ids[-1])
        tokens = hf.convert_ids_to_tokens(ids)
        assert ours.convert_tokens_to_ids(tokens) == ids and ours.convert_tokens_to_ids(tokens[-1]) == ids[-1]
        for array in (np.array(ids), torch.tensor(ids), np.int64(ids[0]), torch.tensor(ids[0])):  # as transformers
            assert ours.decode(array) == hf.decode(array)
        for array in (np.array(ids), torch.tensor(ids)):
            assert ours.convert_ids_to_tokens(array) == hf.convert_ids_to_tokens(array)
    assert ours(texts).input_ids == hf(texts).input_ids
    batch = [hf.encode(t) for t in texts]
    for skip in (False, True):
        assert ours.batch_decode(batch, skip_special_tokens=skip) == hf.batch_decode(batch, skip_special_tokens=skip)


def test_properties_match_transformers(pair):
    ours, hf = pair
    assert ours.vocab_size == len(hf)
    assert ours.bos_token_id == hf.bos_token_id
    assert ours.eos_token_id == hf.eos_token_id
    assert ours.pad_token_id == hf.pad_token_id
    assert set(hf.all_special_ids) <= set(ours.all_special_ids)
    assert ours.all_special_ids == sorted(i for i, t in hf.added_tokens_decoder.items() if t.special)


def test_eos_token_ids_union(bpe_dir, sp_dir):
    bpe = Tokenizer.from_pretrained(bpe_dir)
    eot = bpe.token_to_id("<|eot_id|>")
    assert eot == 2 and bpe.eos_token_id == eot
    assert bpe.eos_token_ids == {1, 2, 4}  # tokenizer eos + generation_config list + config.json
    assert Tokenizer.from_pretrained(sp_dir).eos_token_ids == {2}


def test_missing_tokenizer_files_name_the_directory(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope"):
        Tokenizer.from_pretrained(tmp_path / "nope")


def test_prefers_tokenizer_json_over_tokenizer_model(bpe_dir, sp_dir, tmp_path):
    shutil.copytree(bpe_dir, tmp_path / "both")
    shutil.copy(sp_dir / "tokenizer.model", tmp_path / "both" / "tokenizer.model")
    both = Tokenizer.from_pretrained(tmp_path / "both")
    assert both.encode("Hello world") == Tokenizer.from_pretrained(bpe_dir).encode("Hello world")


def test_user_defined_sentencepiece_pieces_are_whole_tokens_as_in_transformers(tmp_path):
    """A tokenizer.model trained with user_defined_symbols (chat markers): transformers makes each an added,
    non-special token, matched whole inside any text and kept by decode(skip_special_tokens=True)."""
    import transformers

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines(60_000)), model_writer=model, vocab_size=400, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
        user_defined_symbols=["<|user|>", "<|assistant|>"],
    )  # fmt: skip
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    write_json(tmp_path / "tokenizer_config.json", {**config, "legacy": False, "add_bos_token": True})
    ours, hf = Tokenizer.from_pretrained(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    markers = [ours.token_to_id("<|user|>"), ours.token_to_id("<|assistant|>")]
    assert markers == [3, 4]
    for text in ["<|user|>Hi<|assistant|>", "Romeo<|user|> where <|assistant|>art thou", "<|user|><|user|>"]:
        ids = ours.encode(text)
        assert ids == hf.encode(text)
        assert [m in ids for m in markers] == [name in text for name in ("<|user|>", "<|assistant|>")]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert ours.decode([3, 4], skip_special_tokens=True) == "<|user|><|assistant|>"


def test_named_and_extra_special_tokens_are_special_whatever_tokenizer_json_says(bpe_dir, tmp_path):
    """A fine-tune's tokenizer.json may list its EOS (and extra special tokens) as plain added tokens; transformers 5
    re-adds every named and extra special token as special: decode(skip_special_tokens=True) drops them, a
    stream too. Also the named tokens beyond BOS/EOS/UNK/PAD (sep, cls, mask) reach the chat template."""
    shutil.copytree(bpe_dir, tmp_path / "plain")
    raw = json.loads((tmp_path / "plain" / "tokenizer.json").read_text())
    for token in raw["added_tokens"]:
        if token["content"] in ("<|eot_id|>", "<|end_of_text|>"):
            token["special"] = False
    write_json(tmp_path / "plain" / "tokenizer.json", raw)
    config = json.loads((tmp_path / "plain" / "tokenizer_config.json").read_text())
    config.pop("added_tokens_decoder", None)
    config.update(
        additional_special_tokens=["<|end_of_text|>", "<|extra|>"], sep_token="<|sep|>", cls_token="<|cls|>",
        chat_template="{{ cls_token }}{% for m in messages %}{{ m['content'] }}{{ sep_token }}{% endfor %}",
    )  # fmt: skip
    write_json(tmp_path / "plain" / "tokenizer_config.json", config)
    (tmp_path / "plain" / "chat_template.jinja").unlink()  # (it would win over the config's template)
    ours, hf = Tokenizer.from_pretrained(tmp_path / "plain"), AutoTokenizer.from_pretrained(tmp_path / "plain")
    text = "Hello<|eot_id|> world<|end_of_text|>!<|extra|> <|sep|>"
    ids = ours.encode(text, add_special_tokens=False)
    assert ids == hf.encode(text, add_special_tokens=False)
    for name in ("<|eot_id|>", "<|end_of_text|>", "<|extra|>", "<|sep|>"):
        assert ours.token_to_id(name) in ids and ours.token_to_id(name) in ours.special_ids, name
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert ours.decode(ids, skip_special_tokens=True) == "Hello world! "
    detok = IncrementalDetokenizer(ours)
    assert "".join(detok.add([i]) for i in ids) + detok.flush() == "Hello world! "
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    rendered = ours.render_chat(messages, False)
    assert rendered == hf.apply_chat_template(messages, tokenize=False) == "<|cls|>a<|sep|>b<|sep|>"


@pytest.mark.parametrize("flags", [{"add_eos_token": True}, {"add_bos_token": False}, {"add_bos_token": True},
                                   {"split_special_tokens": True}])  # fmt: skip
def test_tokenizer_config_flags_act_as_in_transformers(bpe_dir, tmp_path, flags):
    """Where a tokenizer.json is, its post-processor adds the BOS/EOS whatever add_bos/add_eos_token say (transformers
    5 drops the flags; a missing one used to turn the BOS off); split_special_tokens encodes a special token's text
    as text."""
    shutil.copytree(bpe_dir, tmp_path / "t")
    config = json.loads((tmp_path / "t" / "tokenizer_config.json").read_text())
    write_json(tmp_path / "t" / "tokenizer_config.json", {**config, "tokenizer_class": "LlamaTokenizerFast", **flags})
    ours, hf = Tokenizer.from_pretrained(tmp_path / "t"), AutoTokenizer.from_pretrained(tmp_path / "t")
    for text in ("hi", "Hello<|eot_id|> world", "<|begin_of_text|>x"):
        for add in (True, False):
            assert ours.encode(text, add_special_tokens=add) == hf.encode(text, add_special_tokens=add), text


# ---------------------------------------------------------------------------- chat templates


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(pair, conversation, add_generation_prompt):
    ours, hf = pair
    messages = CONVERSATIONS[conversation]
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt) == expected
    # both templates write the BOS themselves, so the token ids agree with HF's tokenize=True
    expected_ids = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, return_dict=False)
    assert ours.chat_prompt(messages, add_generation_prompt) == (expected, expected_ids)
    assert expected_ids.count(ours.bos_token_id) == expected.count(ours.bos_token)
    # transformers 5's defaults: token ids, in a dict unless return_dict=False, no generation prompt
    kw = {"add_generation_prompt": True} if add_generation_prompt else {}
    assert ours.apply_chat_template(messages, return_dict=False, **kw) == expected_ids
    theirs = hf.apply_chat_template(messages)
    assert ours.apply_chat_template(messages) == dict(theirs) and ours.apply_chat_template(messages).input_ids == (
        theirs.input_ids
    )


KEEPS_SPACE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"  # no trim of content


@pytest.mark.parametrize("last", ["Hello there ", "Step 1:\n", "s", "<", "\n", "Dear Sir,\n\n"])
@pytest.mark.parametrize("template", [None, KEEPS_SPACE])
def test_continue_final_message_cuts_where_transformers_does(pair, last, template):
    """The cut sits right after the final message's content, even when that content also occurs in the template's
    end-of-turn text ("s" in "</s>"), and keeps the content's trailing space where the template keeps it."""
    ours, hf = pair
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": last}]
    kw = {"chat_template": template} if template else {}
    expected = hf.apply_chat_template(messages, tokenize=False, continue_final_message=True, **kw)
    assert ours.apply_chat_template(messages, False, tokenize=False, continue_final_message=True, **kw) == expected


@pytest.mark.parametrize("tools", [None, [], [{"type": "function", "function": {"name": "f"}}]])
@pytest.mark.parametrize("documents", [None, [], [{"title": "t", "text": "x"}]])
def test_empty_tools_and_documents_reach_the_template_as_transformers_passes_them(pair, tools, documents):
    ours, hf = pair
    probe = "{{ tools is none }} {{ (tools or []) | length }} {{ documents is none }} {{ (documents or []) | length }}"
    messages = [{"role": "user", "content": "Hi"}]
    expected = hf.apply_chat_template(messages, tools=tools, documents=documents, chat_template=probe, tokenize=False)
    assert ours.render_chat(messages, False, tools=tools, documents=documents, chat_template=probe) == expected


@pytest.mark.parametrize("name", ["reasoning", "reasoning_content", "thinking"])
def test_an_assistants_reasoning_reaches_the_template_under_each_name_as_transformers_gives_it(pair, name):
    """Offline chat (LLM.chat) as the server: reasoning given under any of its names is rendered by a template
    that reads another (Qwen3's reads reasoning_content, gpt-oss's thinking)."""
    ours, hf = pair
    probe = "{% for m in messages %}{{ m.role }}:{{ m.reasoning_content }}|{{ m.thinking }}|{{ m.content }};"
    probe += "{% endfor %}"
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "No.", name: "I think"}]
    expected = hf.apply_chat_template(messages, chat_template=probe, tokenize=False)
    assert expected.endswith("assistant:I think|I think|No.;")
    assert ours.apply_chat_template(messages, chat_template=probe, tokenize=False) == expected


def test_chat_template_raise_exception(sp_dir):
    ours = Tokenizer.from_pretrained(sp_dir)
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(jinja2.TemplateError, match="must alternate"):
        ours.render_chat(bad, True)


LOOPS_PARTS = "{% for m in messages %}<|{{ m.role }}|>{% for p in m.content %}[{{ p.text }}]{% endfor %}{% endfor %}"
SET_THEN_LOOPS = (  # a template that takes either, looping over a variable set to the content
    "{% for m in messages %}{% set c = m['content'] %}{% if c is string %}{{ c }}{% else %}"
    "{% for p in c | list %}{{ p['text'] }};{% endfor %}{% endif %}|{% endfor %}"
)
STRINGS = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Yes"}]
PARTS = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in STRINGS]


@pytest.mark.parametrize(
    ("template", "reads"),
    [(KEEPS_SPACE, "string"), (DEFAULT_CHAT_TEMPLATE, "string"), (LOOPS_PARTS, "openai"), (SET_THEN_LOOPS, "openai")],
)
def test_content_reaches_the_template_in_the_format_it_reads(pair, template, reads):
    """auto: a template that loops over a message's content gets OpenAI's parts (text becomes one part), others
    text (parts joined); the oracle is transformers rendering the messages as given in that format. The formats
    by name are passed as they are, whatever the template reads; continue_final_message cuts after the last
    part's text, as transformers does."""
    ours, hf = pair
    assert detect_content_format(template) == reads  # (labelled by hand)
    want = {fmt: hf.apply_chat_template(messages, chat_template=template, tokenize=False)
            for fmt, messages in (("string", STRINGS), ("openai", PARTS))}  # fmt: skip
    for messages in (STRINGS, PARTS):
        assert ours.render_chat(messages, False, chat_template=template) == want[reads]
        for fmt in ("string", "openai"):
            assert ours.render_chat(messages, False, chat_template=template, content_format=fmt) == want[fmt]
    kw = dict(chat_template=template, continue_final_message=True)
    expected = hf.apply_chat_template(PARTS if reads == "openai" else STRINGS, tokenize=False, **kw)
    assert ours.render_chat(STRINGS, False, **kw) == expected
    with pytest.raises(ValueError, match="chat_template_content_format must be one of auto, string, openai"):
        ours.render_chat(STRINGS, False, content_format="parts")


def test_content_parts_are_flattened(bpe_dir):
    ours = Tokenizer.from_pretrained(bpe_dir)
    parts = [{"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]}]
    plain = [{"role": "user", "content": "first\nsecond"}]
    assert ours.render_chat(parts, True) == ours.render_chat(plain, True)
    with pytest.raises(ValueError, match="only text parts"):
        ours.render_chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], True)
    with pytest.raises(ValueError, match="messages\\[0\\]"):
        ours.render_chat([{"content": "no role"}], True)


def test_default_template_and_bos_handling(sp_dir, bpe_dir, tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    for source in (sp_dir, bpe_dir):
        directory = tmp_path / source.name
        shutil.copytree(source, directory)
        (directory / "chat_template.jinja").unlink(missing_ok=True)
        config = json.loads((directory / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        write_json(directory / "tokenizer_config.json", config)
        ours = Tokenizer.from_pretrained(directory)
        assert ours.templates.default is None
        text, ids = ours.chat_prompt(messages)
        assert text == "System: Be brief.\nUser: Hi\nAssistant:"
        assert ours.render_chat(messages, add_generation_prompt=False) == "System: Be brief.\nUser: Hi\n"
        hf = AutoTokenizer.from_pretrained(directory)
        options = dict(add_generation_prompt=True, chat_template=DEFAULT_CHAT_TEMPLATE)
        assert hf.apply_chat_template(messages, tokenize=False, **options) == text
        # the fallback writes no BOS: its lines are encoded as a completion prompt (the tokenizer's BOS, once)
        assert ids == hf.encode(text) and ids[0] == ours.bos_token_id and ids.count(ours.bos_token_id) == 1
        # the same ids by every way in: transformers' call, and an empty template (the fallback too)
        assert ours.apply_chat_template(messages, add_generation_prompt=True, return_dict=False) == ids
        assert ours.chat_prompt(messages, chat_template="")[1] == ids
        assert ours.chat_prompt(messages, add_special_tokens=False)[1] == hf.encode(text, add_special_tokens=False)
        # a model's template is encoded as vLLM and transformers encode it: its text exactly
        plain = "{% for m in messages %}{{ m['content'] }}|{% endfor %}"
        assert ours.chat_prompt(messages, chat_template=plain)[1] == hf.apply_chat_template(
            messages, tokenize=True, return_dict=False, add_generation_prompt=True, chat_template=plain
        )  # fmt: skip


NAMED_TEMPLATES = {
    "default": "DEFAULT{% for m in messages %}[{{ m['content'] }}]{% endfor %}",
    "tool_use": "TOOLS {{ tools | length }}{% for m in messages %}[{{ m['content'] }}]{% endfor %}",
    "rag": "RAG{% for m in messages %}<{{ m['content'] }}>{% endfor %}",
}


def test_apply_chat_template_refuses_what_transformers_refuses(pair):
    """An empty conversation, and continue_final_message with add_generation_prompt: ValueErrors in both."""
    ours, hf = pair
    said = [{"role": "user", "content": "x"}]
    for messages, options in (([], {}), (said, {"add_generation_prompt": True, "continue_final_message": True})):
        for tokenizer in (ours, hf):
            with pytest.raises(ValueError):
                tokenizer.apply_chat_template(messages, tokenize=False, **options)
    assert ours.apply_chat_template(said, tokenize=False, continue_final_message=True).endswith("x")


@pytest.mark.parametrize("layout", ["config list", "jinja files"])
def test_named_chat_templates_are_picked_as_transformers_picks_them(sp_dir, tmp_path, layout):
    """A model with several templates (tokenizer_config.json's list, or transformers 5's chat_template.jinja and
    additional_chat_templates/NAME.jinja): "tool_use" for a chat with tools (even []), a request's chat_template
    naming one, else "default"; the chat_template setting replaces them all."""
    directory = tmp_path / "named"
    shutil.copytree(sp_dir, directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    if layout == "config list":
        config["chat_template"] = [{"name": k, "template": v} for k, v in NAMED_TEMPLATES.items()]
    else:
        config.pop("chat_template", None)
        (directory / "chat_template.jinja").write_text(NAMED_TEMPLATES["default"])
        (directory / "additional_chat_templates").mkdir()
        for name in ("tool_use", "rag"):
            (directory / "additional_chat_templates" / f"{name}.jinja").write_text(NAMED_TEMPLATES[name])
    write_json(directory / "tokenizer_config.json", config)
    ours, hf = Tokenizer.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)
    assert ours.chat_template == hf.chat_template == NAMED_TEMPLATES  # (transformers' attribute: all, by name)
    messages = [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    cases = [({}, "DEFAULT[x][y]"), ({"tools": [tool]}, "TOOLS 1[x][y]"), ({"tools": []}, "TOOLS 0[x][y]"),
             ({"chat_template": "rag"}, "RAG<x><y>"), ({"chat_template": "rag", "tools": [tool]}, "RAG<x><y>"),
             ({"chat_template": "{{ 'own' }}"}, "own")]  # fmt: skip
    for options, expected in cases:
        assert ours.apply_chat_template(messages, tokenize=False, **options) == expected, options
        assert hf.apply_chat_template(messages, tokenize=False, **options) == expected, options
    setting = Tokenizer.from_pretrained(directory, chat_template="SET{{ messages | length }}")
    assert setting.apply_chat_template(messages, tokenize=False, tools=[tool]) == "SET2"
    assert setting.templates.source(None, [tool]) == "SET{{ messages | length }}"


# ---------------------------------------------------------------------------- incremental detokenizing


BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")


@functools.cache
def hf_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(directory)


def lossy_decode(tokenizer: Tokenizer, ids: list[int], skip: bool) -> str:
    """What a stream of `ids` must add up to: transformers' decode, except that SentencePiece's byte pieces are
    read as lossy UTF-8 (Python's errors="replace"), not each run all U+FFFD once a byte in it is bad. Written
    from the pieces: joined as bytes (a `<0xNN>` piece is its byte, "▁" a space), the one leading space that the
    first piece brings dropped (the decoder's Strip); test_the_lossy_oracle_is_transformers_decode checks it."""
    pieces = [tokenizer.id_to_token(t) for t in ids if not (skip and t in tokenizer.special_ids)]
    if not any(BYTE_PIECE.fullmatch(p) for p in pieces):
        return tokenizer.decode(ids, skip)
    raw = b"".join(
        bytes.fromhex(m[1]) if (m := BYTE_PIECE.fullmatch(p)) else p.replace("▁", " ").encode() for p in pieces
    )
    text = raw.decode("utf-8", errors="replace")
    return text[1:] if pieces[0].startswith("▁") else text


def stream(
    tokenizer: Tokenizer, ids: list[int], chunks: list[int], skip: bool, prompt: list[int] | None = None
) -> tuple[list[str], str]:
    """Feed ids in chunks of the given sizes; check every emitted prefix on the way."""
    detok = IncrementalDetokenizer(tokenizer, skip, prompt_ids=prompt)
    context = list(detok.token_ids)
    assert prompt is not None or not context
    context_text = lossy_decode(tokenizer, context, skip)
    deltas, position = [], 0
    for size in chunks + [len(ids)]:
        piece = ids[position : position + size]
        position += len(piece)
        deltas.append(detok.add(piece))
        so_far = lossy_decode(tokenizer, context + ids[:position], skip)
        assert so_far.startswith(context_text + "".join(deltas)), (ids[:position], deltas, so_far)
        if position == len(ids):
            break
    deltas.append(detok.flush())
    return deltas, context_text + "".join(deltas)


def pick_ids(tokenizer: Tokenizer, raw: list[int]) -> list[int]:
    vocab = tokenizer.backend.get_vocab()
    byte_ids = sorted(i for t, i in vocab.items() if t.startswith("<0x") and len(t) == 6)
    byte_level = sorted(i for t, i in vocab.items() if len(t) == 1 and ord(t) >= 0x80)  # GPT-2 byte chars
    space_ids = sorted(i for t, i in vocab.items() if t.strip("▁Ġ ") == "")
    pools = [byte_ids or byte_level, tokenizer.all_special_ids, space_ids, list(range(tokenizer.vocab_size))]
    return [pools[r % 4][(r // 4) % len(pools[r % 4])] for r in raw]


@pytest.fixture(scope="module")
def ours(sp_dir, bpe_dir) -> dict[str, Tokenizer]:
    return {"sp": Tokenizer.from_pretrained(sp_dir), "bpe": Tokenizer.from_pretrained(bpe_dir)}


@pytest.mark.parametrize("name", ["sp", "bpe"])
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_incremental_detokenizer_equals_full_decode(ours, name, data):
    tokenizer = ours[name]
    raw = data.draw(st.lists(st.integers(0, 10**6), max_size=40), label="raw ids")
    chunks = data.draw(st.lists(st.integers(1, 4), max_size=40), label="chunk sizes")
    skip = data.draw(st.booleans(), label="skip_special_tokens")
    raw_prompt = data.draw(st.none() | st.lists(st.integers(0, 10**6), max_size=12), label="raw prompt")
    ids = pick_ids(tokenizer, raw)
    prompt = None if raw_prompt is None else pick_ids(tokenizer, raw_prompt)
    deltas, streamed = stream(tokenizer, ids, chunks, skip, prompt)
    detok = IncrementalDetokenizer(tokenizer, skip, prompt_ids=prompt)
    full = lossy_decode(tokenizer, detok.token_ids + ids, skip)
    assert streamed == full
    if "\ufffd" not in full:
        assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("name", ["sp", "bpe"])
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_the_lossy_oracle_is_transformers_decode(ours, sp_dir, bpe_dir, name, data):
    """lossy_decode, the stream's oracle, equals transformers' decode wherever every byte run is valid UTF-8 (no
    U+FFFD: the text models write) and the text does not start with a byte piece (a space byte there is stripped
    by transformers' Strip, not by SentencePiece's rule the oracle follows)."""
    tokenizer, hf = ours[name], hf_tokenizer(sp_dir if name == "sp" else bpe_dir)
    ids = pick_ids(tokenizer, data.draw(st.lists(st.integers(0, 10**6), max_size=40), label="raw ids"))
    skip = data.draw(st.booleans(), label="skip_special_tokens")
    text = hf.decode(ids, skip_special_tokens=skip)
    kept = [t for t in ids if not (skip and t in tokenizer.special_ids)]
    if "\ufffd" not in text and not (kept and BYTE_PIECE.fullmatch(tokenizer.id_to_token(kept[0]))):
        assert lossy_decode(tokenizer, ids, skip) == text


def test_byte_runs_stream_each_character_as_it_completes(sp_dir):
    """An emoji and an accented letter the vocabulary spells in bytes come out as each one's last byte arrives,
    not when the run ends; a run cut inside its last character (max_tokens) keeps the characters before the cut
    and ends in one U+FFFD (transformers' decode makes the whole run U+FFFD); a bad byte is one U+FFFD."""
    tokenizer = Tokenizer.from_pretrained(sp_dir)
    byte = {b: i for i, b in tokenizer.byte_values.items()}
    emoji, accent = [byte[b] for b in "😀".encode()], [byte[b] for b in "é".encode()]
    word = tokenizer.backend.token_to_id("▁the")
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add([t]) for t in [*emoji, *accent, *emoji[:2], word]] + [detok.flush()]
    assert deltas == ["", "", "", "😀", "", "é", "", "", "\ufffd the", ""]
    cut = IncrementalDetokenizer(tokenizer)
    assert [cut.add([t]) for t in [*emoji, *accent, *emoji[:2]]] + [cut.flush()] == [*deltas[:7], "", "\ufffd"]
    assert tokenizer.decode([*emoji, *accent, *emoji[:2]]) == "\ufffd" * 8  # transformers' ByteFallback
    bad = IncrementalDetokenizer(tokenizer)
    assert bad.add([byte[0x80], *accent]) + bad.flush() == "\ufffdé"
    # without a byte token for "A" to decode beside, runs are the tokenizer's, whole, each held until it ends
    whole = IncrementalDetokenizer(tokenizer)
    whole._anchor = None
    ids = [word, *emoji, *accent, byte[0x80], word]
    deltas = [whole.add([t]) for t in ids] + [whole.flush()]
    assert "".join(deltas) == tokenizer.decode(ids) == "the\ufffd\ufffd\ufffd\ufffd\ufffd\ufffd\ufffd the"
    assert deltas[1:-2] == [""] * 7


@pytest.mark.parametrize("name", ["sp", "bpe"])
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_prompt_context_is_the_last_kept_prompt_ids_up_to_a_complete_character(ours, name, data):
    """The window a stream starts from: of the prompt's ids that decode keeps (special ones dropped when skipped),
    the last PROMPT_CONTEXT before any trailing run of byte-fallback ids, cut to the longest leading run that does
    not end inside a character."""
    tokenizer = ours[name]
    prompt = pick_ids(tokenizer, data.draw(st.lists(st.integers(0, 10**6), max_size=30), label="raw prompt"))
    skip = data.draw(st.booleans(), label="skip_special_tokens")
    kept = [t for t in prompt if not (skip and t in tokenizer.all_special_ids)]
    bytes_ = set(pick_ids(tokenizer, list(range(0, 4 * 256, 4)))) & tokenizer.byte_values.keys()  # pick_ids' pool
    while kept and kept[-1] in bytes_:
        kept.pop()
    kept = kept[-PROMPT_CONTEXT:]
    context = IncrementalDetokenizer(tokenizer, skip, prompt_ids=prompt).token_ids
    assert context == kept[: len(context)]
    if len(context) < len(kept):  # the next id would have ended it inside a character
        longer = kept[: len(context) + 1]
        assert longer[-1] in bytes_ or tokenizer.decode(longer, skip).endswith("\ufffd")


def test_a_prompt_ending_in_byte_tokens_keeps_the_first_output_space(sp_dir):
    """A prompt whose last PROMPT_CONTEXT ids and more are byte-fallback tokens (CJK text or an emoji that the
    vocabulary spells in bytes): the stream still starts with the first output token's space, as transformers'
    decode(prompt + output) minus decode(prompt) has it; the context reads back past the bytes."""
    import transformers

    tokenizer, hf = Tokenizer.from_pretrained(sp_dir), transformers.AutoTokenizer.from_pretrained(sp_dir)
    generated = hf.encode(" the king", add_special_tokens=False)
    for text in ["Hello 中文", "Hello 😀", "Hello 😀 中文", "中文"]:
        prompt = hf.encode(text)
        trailing = len(prompt) - max(i for i, t in enumerate(prompt) if t not in tokenizer.byte_values) - 1
        assert trailing >= (PROMPT_CONTEXT if text != "Hello 😀" else 4)
        streamed = stream(tokenizer, generated, [1] * len(generated), skip=True, prompt=prompt)[0]
        before = hf.decode(prompt, skip_special_tokens=True)
        expected = hf.decode(prompt + generated, skip_special_tokens=True).removeprefix(before)
        assert "".join(streamed) == expected == " the king", text


@pytest.mark.parametrize("name", ["sp", "bpe"])
def test_multibyte_characters_are_never_split(ours, name):
    tokenizer = ours[name]
    text = "Verona 😀🎉 日本語 naïve 👨‍👩‍👧 end"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add([i]) for i in ids] + [detok.flush()]
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)
    assert deltas.count("") > 0  # the emoji really were spread over several tokens


def test_sentencepiece_spaces_stream_like_decode(sp_dir):
    tokenizer = Tokenizer.from_pretrained(sp_dir)
    text = " Romeo,  where  art\n  thou?  "
    ids = tokenizer.encode(text, add_special_tokens=True)
    deltas, streamed = stream(tokenizer, ids, [1] * len(ids), skip=True)
    assert streamed == tokenizer.decode(ids, skip_special_tokens=True) == text.removeprefix(" ")  # strips one space
    assert streamed.count(" ") == text.count(" ") - 1


def test_a_newline_byte_token_comes_out_at_once(sp_dir):
    """A newline is the byte token <0x0A> in a SentencePiece vocabulary: a whole character, it comes out as it
    arrives (it was held until its byte run ended), so a stop string "\\n" matches in time; nothing is pending after
    it to flush. The oracle is transformers' decode."""
    tokenizer = Tokenizer.from_pretrained(sp_dir)
    ids = tokenizer.encode("Romeo\n", add_special_tokens=False)
    assert tokenizer.id_to_token(ids[-1]) == "<0x0A>"
    detok = IncrementalDetokenizer(tokenizer)
    assert "".join(detok.add([i]) for i in ids) == hf_tokenizer(sp_dir).decode(ids) == "Romeo\n"
    assert detok.flush() == ""


@pytest.mark.parametrize("value", [None, False])
def test_add_prefix_space_null_is_the_default_and_false_is_off(sp_dir, tmp_path, value):
    import shutil

    import transformers

    copy = tmp_path / "sp"
    shutil.copytree(sp_dir, copy)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    write_json(copy / "tokenizer_config.json", {**config, "add_prefix_space": value})
    ours, hf = Tokenizer.from_pretrained(copy), transformers.AutoTokenizer.from_pretrained(copy)
    text = "Hello world"
    assert ours.encode(text) == hf.encode(text)
    assert (ours.encode(text) == Tokenizer.from_pretrained(sp_dir).encode(text)) == (value is None)


def test_prompt_context_keeps_the_leading_space(sp_dir):
    tokenizer = Tokenizer.from_pretrained(sp_dir)
    prompt = tokenizer.encode("Where is the king? The king is")
    generated = tokenizer.encode(" dead, long live the king!", add_special_tokens=False)
    assert tokenizer.id_to_token(generated[0]).startswith("▁")
    without, _ = stream(tokenizer, generated, [1] * len(generated), skip=True)
    assert "".join(without) == tokenizer.decode(generated) == "dead, long live the king!"
    with_context, _ = stream(tokenizer, generated, [1] * len(generated), skip=True, prompt=prompt)
    assert "".join(with_context) == " dead, long live the king!"
    full = tokenizer.decode(prompt + generated)
    assert full == tokenizer.decode(prompt) + "".join(with_context)


def test_detokenizer_decodes_only_a_short_window(sp_dir):
    tokenizer = Tokenizer.from_pretrained(sp_dir)
    ids = tokenizer.encode(CORPUS.read_text(encoding="utf-8")[:6000], add_special_tokens=False)
    assert len(ids) > 1000
    lengths = []
    original = tokenizer.decode

    def recording_decode(token_ids, skip_special_tokens=True):
        lengths.append(len(token_ids))
        return original(token_ids, skip_special_tokens)

    tokenizer.decode = recording_decode
    detok = IncrementalDetokenizer(tokenizer)
    streamed = "".join(detok.add([i]) for i in ids) + detok.flush()
    tokenizer.decode = original
    assert streamed == tokenizer.decode(ids)
    assert max(lengths) <= 8  # windows stay tiny however long the sequence gets
