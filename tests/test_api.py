"""The OpenAI API as vLLM users rely on it: every request field of OpenAI's and vLLM's schemas is honoured or
refused with a 400 naming it, unknown fields are ignored with a warning, and the sampling controls (logit_bias,
allowed_token_ids, bad_words, best_of, prompt_logprobs, ...) do what they say. A real uvicorn server on a tiny
random Llama, driven with the official openai client; transformers is the oracle for greedy outputs.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch

from tests.conftest import build_model_dir
from tests.test_server import assert_openai_error, uvicorn_server

REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "tiny-api"
MAX_BAD_WORDS = 4  # the server's max_bad_words
VOCAB = 384  # tests/conftest.py's tokenizer
MAX_LOGPROBS = VOCAB  # the server's max_logprobs: -1, the whole vocabulary, fits exactly

# A Qwen2.5-style template: tools in a system block, <tool_call> blocks for calls, <tool_response> for results.
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n"
    "</tools><|im_end|>\n{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{%- elif m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n"
    "{%- for c in m.tool_calls %}<tool_call>\n"
    '{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}\n</tool_call>'
    "{%- endfor %}<|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}{% if mood is defined %} ({{ mood }}){% endif %}"
    "<|im_end|>\n{%- endif %}"
    "{%- endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# Every request field of OpenAI's completions / chat completions schemas and of vLLM's extensions, with a value a
# client would send. The server must honour it (200) or answer 400 with `param` naming it: REFUSED lists those it
# refuses; the rest are honoured (their behaviour is tested below and in test_server.py / test_structured_outputs.py).
# Written from the APIs' documentation, not from the server's models.
PROMPT = {"prompt": "ROMEO:"}
MESSAGES = {"messages": [{"role": "user", "content": "Speak."}]}
OPENAI_COMPLETION_FIELDS = {
    "model": MODEL_NAME, "prompt": "ROMEO:", "best_of": 2, "echo": True, "frequency_penalty": 0.5,
    "logit_bias": {"5": 2.0}, "logprobs": 2, "max_tokens": 4, "n": 2, "presence_penalty": 0.5, "seed": 3,
    "stop": ["\n"], "stream": False, "stream_options": None, "suffix": "THE END", "temperature": 0.7,
    "top_p": 0.9, "user": "user-1234",
}  # fmt: skip
OPENAI_CHAT_FIELDS = {
    "messages": MESSAGES["messages"], "model": MODEL_NAME, "audio": {"voice": "alloy", "format": "wav"},
    "frequency_penalty": 0.5, "function_call": "auto",
    "functions": [{"name": "f", "parameters": {"type": "object"}}], "logit_bias": {"5": 2.0}, "logprobs": True,
    "max_completion_tokens": 4, "max_tokens": 4, "metadata": {"k": "v"}, "modalities": ["text", "audio"],
    "moderation": {"model": "omni-moderation-latest"}, "n": 2, "parallel_tool_calls": True,
    "prediction": {"type": "content", "content": "x"}, "presence_penalty": 0.5, "prompt_cache_key": "k1",
    "prompt_cache_options": {"ttl": "12h"}, "prompt_cache_retention": "in-memory", "reasoning_effort": "low",
    "response_format": {"type": "json_object"}, "safety_identifier": "abc", "seed": 3,
    "service_tier": "flex", "stop": ["\n"], "store": True, "stream": False, "stream_options": None,
    "temperature": 0.7, "tool_choice": "none",
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    "top_logprobs": 2, "top_p": 0.9, "user": "user-1234", "verbosity": "low",
    "web_search_options": {},
}  # fmt: skip
VLLM_COMMON_FIELDS = {
    "use_beam_search": True, "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2, "length_penalty": 0.5,
    "stop_token_ids": [7], "include_stop_str_in_output": True, "ignore_eos": True, "min_tokens": 1,
    "skip_special_tokens": False, "spaces_between_special_tokens": False, "truncate_prompt_tokens": 3,
    "allowed_token_ids": [5, 6, 7], "prompt_logprobs": 1, "bad_words": ["the"], "best_of": 2,
    "response_format": {"type": "json_object"}, "structured_outputs": {"regex": "[a-z]+"},
    "guided_json": {"type": "object"}, "guided_regex": "[a-z]+", "guided_choice": ["yes", "no"],
    "guided_grammar": 'root ::= "yes" | "no"', "guided_decoding_backend": "outlines",
    "guided_whitespace_pattern": " ?", "structural_tag": "{}", "priority": 1, "request_id": "my-request-1",
    "logits_processors": ["mod.Proc"], "return_tokens_as_token_ids": True, "return_token_ids": True,
    "cache_salt": "salt", "kv_transfer_params": {"x": 1}, "vllm_xargs": {"x": 1}, "add_special_tokens": False,
    "echo": True,
}  # fmt: skip
VLLM_COMPLETION_ONLY = {"prompt_embeds": "AAAA"}
VLLM_CHAT_ONLY = {
    "add_generation_prompt": True, "continue_final_message": False, "documents": [{"title": "t", "text": "x"}],
    "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}", "chat_template_kwargs": {"mood": "calm"},
    "mm_processor_kwargs": {"x": 1}, "include_reasoning": False,
}  # fmt: skip
COMPANIONS = {"top_logprobs": {"logprobs": True}}  # fields that need another one to make sense
REFUSED = {
    "suffix", "audio", "function_call", "functions", "modalities", "prediction", "reasoning_effort",
    "service_tier", "store", "verbosity", "web_search_options", "length_penalty",
    "spaces_between_special_tokens", "guided_decoding_backend", "guided_whitespace_pattern", "structural_tag",
    "logits_processors", "kv_transfer_params", "vllm_xargs", "prompt_embeds", "mm_processor_kwargs",
    "include_reasoning", "moderation", "prompt_cache_options",
}  # fmt: skip


@contextmanager
def run_server(model_dir: Path, log_path: Path, **env: str) -> Iterator[str]:
    """`uvicorn server:app` on a free port, its log written to `log_path` (the test reads the warnings)."""
    with open(log_path, "w+b") as log:
        with uvicorn_server(model_dir, log, MINISERVE_SERVED_MODEL_NAME=MODEL_NAME, **env) as (url, _):
            yield url


def build_api_model(out: Path, tokenizer_dir: Path) -> Path:
    """The tiny Llama these tests serve, its chat template TOOL_TEMPLATE (also tests/test_responses_api.py's)."""
    build_model_dir(out, "LlamaForCausalLM", tokenizer_dir, seed=11, max_position_embeddings=2048)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["chat_template"] = TOOL_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return build_api_model(tmp_path_factory.mktemp("api-model"), tokenizer_dir)


@pytest.fixture(scope="module")
def log_path(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("api-log") / "server.log"


@pytest.fixture(scope="module")
def url(model_dir, log_path) -> Iterator[str]:
    env = {"MINISERVE_MAX_BAD_WORDS": str(MAX_BAD_WORDS), "MINISERVE_TRUST_REQUEST_CHAT_TEMPLATE": "1"}
    env["MINISERVE_MAX_LOGPROBS"] = str(MAX_LOGPROBS)
    env["MINISERVE_SCHEDULING_POLICY"] = "priority"  # (tests/test_responses_api.py's server keeps fcfs)
    with run_server(model_dir, log_path, **env) as base:
        yield base


def hf_greedy_processed(model, prompt_ids: list[int], steps: int, process) -> list[int]:
    """Greedy decoding where `process(logits [V]) -> logits` reshapes each step's logits: the oracle."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            ids.append(int(process(logits).argmax()))
    return ids[len(prompt_ids) :]


def post(url: str, path: str, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(url + path, json=body, headers=headers, timeout=60)


def sse_events(r: httpx.Response) -> list[dict]:
    """A whole event stream's JSON events (it must end with [DONE])."""
    lines = [line for line in r.text.split("\n\n") if line]
    assert r.status_code == 200 and lines[-1] == "data: [DONE]", r.text
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


# ---------------------------------------------------------------------------------------------- the field walk


@pytest.mark.parametrize(
    ("path", "base", "fields"),
    [
        ("/v1/completions", PROMPT, {**OPENAI_COMPLETION_FIELDS, **VLLM_COMMON_FIELDS, **VLLM_COMPLETION_ONLY}),
        ("/v1/chat/completions", MESSAGES, {**OPENAI_CHAT_FIELDS, **VLLM_COMMON_FIELDS, **VLLM_CHAT_ONLY}),
    ],
)
def test_every_schema_field_is_honoured_or_refused_by_name(url, path, base, fields):
    from miniserve.server.protocol import ChatCompletionRequest, CompletionRequest

    model = CompletionRequest if "chat" not in path else ChatCompletionRequest
    known = set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}
    for name, value in fields.items():
        assert name in known, f"{name} is not in the server's schema: it would be ignored"
        body = {"model": MODEL_NAME, **base, "max_tokens": 3, **COMPANIONS.get(name, {}), name: value}
        r = post(url, path, body)
        if name in REFUSED:
            assert r.status_code == 400, (name, r.text)
            assert r.json()["error"]["param"] == name, (name, r.json())
        else:
            assert r.status_code == 200, (name, r.text)


def test_refused_fields_at_their_default_are_accepted(url):
    defaults = {"use_beam_search": False, "length_penalty": 1.0, "spaces_between_special_tokens": True,
                "guided_decoding_backend": "xgrammar", "priority": 0, "suffix": "", "logits_processors": [],
                "vllm_xargs": {}}  # fmt: skip
    r = post(url, "/v1/completions", {"model": MODEL_NAME, **PROMPT, "max_tokens": 2, **defaults})
    assert r.status_code == 200, r.text
    chat = {"store": False, "service_tier": "auto", "modalities": ["text"], "include_reasoning": True}
    r = post(url, "/v1/chat/completions", {"model": MODEL_NAME, **MESSAGES, "max_tokens": 2, **chat})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("path", "base", "fields"),
    [
        ("/v1/completions", PROMPT, {**OPENAI_COMPLETION_FIELDS, **VLLM_COMMON_FIELDS, **VLLM_COMPLETION_ONLY}),
        ("/v1/chat/completions", MESSAGES, {**OPENAI_CHAT_FIELDS, **VLLM_COMMON_FIELDS, **VLLM_CHAT_ONLY}),
    ],
)
def test_every_field_sent_as_null_reads_as_not_given(url, path, base, fields):
    """OpenAI's schemas mark optional fields nullable (n, stream, the penalties, echo, chat logprobs, ...), and
    clients that write every field send null for the unset ones: the answer equals the one without them."""
    plain = {"model": MODEL_NAME, **base, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    nulls = {name: None for name in fields if name not in plain and name not in base}
    r = post(url, path, {**plain, **nulls})
    assert r.status_code == 200, r.text
    want = post(url, path, plain).json()["choices"]
    assert r.json()["choices"] == want and len(nulls) > 40


def test_unknown_fields_are_ignored_with_one_warning(url, log_path):
    body = {"model": MODEL_NAME, **PROMPT, "max_tokens": 2, "made_up_field": 1, "another_one": "x"}
    assert post(url, "/v1/completions", body).status_code == 200
    messages = [{"role": "user", "content": "hi", "mystery": True}]
    assert post(url, "/v1/chat/completions", {"model": MODEL_NAME, "messages": messages, "max_tokens": 2}).status_code
    log = log_path.read_text(errors="replace")
    lines = [line for line in log.splitlines() if "fields ignored" in line]
    assert any("made_up_field" in line and "another_one" in line for line in lines), log
    assert sum("made_up_field" in line for line in lines) == 1  # one warning per request, naming all of them
    assert any("messages[0].mystery" in line for line in lines), log


def test_openai_message_and_stream_option_fields_are_honoured_or_refused(url, log_path):
    """An assistant message as the openai client returns it (`message.model_dump()`: refusal, audio and
    function_call null) goes back into the next request without a warning; a refusal is the message's text
    (as a refusal part is), audio and the deprecated function_call are refused, and so is
    stream_options.include_obfuscation true (chunks carry no obfuscation)."""
    said = {"role": "assistant", "content": "No.", "refusal": None, "audio": None, "function_call": None}
    body = {"model": MODEL_NAME, "messages": [*MESSAGES["messages"], said], "max_tokens": 2}
    assert post(url, "/v1/chat/completions", body).status_code == 200
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if "fields ignored" in line]
    passed_back = ("messages[1].refusal", "messages[1].audio", "messages[1].function_call")
    assert not any(name in line for line in lines for name in passed_back), lines

    def ids(message: dict) -> list[int]:
        r = post(url, "/tokenize", {"model": MODEL_NAME, "messages": [*MESSAGES["messages"], message]})
        assert r.status_code == 200, r.text
        return r.json()["tokens"]

    said = {"role": "assistant", "content": "I cannot."}
    assert ids({"role": "assistant", "content": None, "refusal": "I cannot."}) == ids(said)
    assert ids({"role": "assistant", "content": [{"type": "refusal", "refusal": "I cannot."}]}) == ids(said)
    for field, value in (("audio", {"id": "audio_1"}), ("function_call", {"name": "f", "arguments": "{}"})):
        message = {"role": "assistant", "content": "x", field: value}
        r = post(url, "/v1/chat/completions", {**body, "messages": [*MESSAGES["messages"], message]})
        assert r.status_code == 400 and field in r.json()["error"]["message"], (field, r.text)
    for path, base in (("/v1/chat/completions", MESSAGES), ("/v1/completions", PROMPT)):
        stream = {"model": MODEL_NAME, **base, "max_tokens": 2, "stream": True}
        r = post(url, path, {**stream, "stream_options": {"include_obfuscation": True}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options", r.text
        r = post(url, path, {**stream, "stream_options": {"include_obfuscation": False, "include_usage": True}})
        assert r.status_code == 200 and '"usage"' in r.text, r.text


# ---------------------------------------------------------------------------------------------- sampling controls


def test_logit_bias_changes_greedy_output_as_specified(client, hf_model, hf_tok):
    prompt = "To be, or not to be"
    ids = hf_tok(prompt).input_ids
    plain = hf_greedy_processed(hf_model, ids, 8, lambda x: x)
    # push the second greedy token's id up a little and ban the first one: the oracle adds the same bias
    bias = {plain[1]: 3.5, plain[0]: -100.0}

    def add_bias(logits):
        logits = logits.clone()
        for t, b in bias.items():
            logits[t] += b
        return logits

    expected = hf_greedy_processed(hf_model, ids, 8, add_bias)
    assert expected != plain
    r = client.completions.create(
        model=MODEL_NAME,
        prompt=prompt,
        max_tokens=8,
        temperature=0,
        logit_bias={str(t): b for t, b in bias.items()},
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    assert r.choices[0].model_extra["token_ids"] == expected
    assert plain[0] not in r.choices[0].model_extra["token_ids"]


def test_allowed_token_ids_change_greedy_output_as_specified(client, hf_model, hf_tok):
    prompt = "My lord, the king"
    ids = hf_tok(prompt).input_ids
    plain = hf_greedy_processed(hf_model, ids, 6, lambda x: x)
    allowed = [t for t in range(40, 60) if t not in plain][:6]

    def only_allowed(logits):
        out = torch.full_like(logits, -float("inf"))
        out[allowed] = logits[allowed]
        return out

    expected = hf_greedy_processed(hf_model, ids, 6, only_allowed)
    for create in (client.completions.create, client.chat.completions.create):
        kwargs = {"prompt": prompt} if create == client.completions.create else {}
        if not kwargs:
            kwargs = {"messages": [{"role": "user", "content": prompt}]}
        r = create(
            model=MODEL_NAME,
            max_tokens=6,
            temperature=0,
            extra_body={"ignore_eos": True, "allowed_token_ids": allowed, "return_token_ids": True},
            **kwargs,
        )
        got = r.choices[0].model_extra["token_ids"]
        assert set(got) <= set(allowed)
        if "prompt" in kwargs:
            assert got == expected


def test_bad_words_are_never_generated(client, hf_model, hf_tok):
    prompt = "What light through yonder window breaks?"
    ids = hf_tok(prompt).input_ids
    plain = hf_greedy_processed(hf_model, ids, 10, lambda x: x)
    # a generated token that is a whole word on its own: banning the word bans that token at every step
    word, token = next(
        (w, t)
        for t in plain
        for w in [hf_tok.decode([t]).strip()]
        if w.isalpha()
        and hf_tok(w, add_special_tokens=False).input_ids in ([t], [])
        or w.isalpha()
        and hf_tok(" " + w, add_special_tokens=False).input_ids == [t]
    )
    word_ids = {tuple(hf_tok(v, add_special_tokens=False).input_ids) for v in (word, " " + word)}
    single = {ws[0] for ws in word_ids if len(ws) == 1}

    def ban(logits):
        logits = logits.clone()
        logits[list(single)] = -float("inf")
        return logits

    expected = hf_greedy_processed(hf_model, ids, 10, ban)
    assert token not in expected and expected != plain
    r = client.completions.create(
        model=MODEL_NAME,
        prompt=prompt,
        max_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True, "bad_words": [word], "return_token_ids": True},
    )
    got = r.choices[0].model_extra["token_ids"]
    # multi-token spellings of the word are banned only after their first tokens; none occur in the oracle's output
    assert got == expected, (word, word_ids)


def test_bad_words_beyond_the_limit_are_refused_by_name(url):
    words = ["alpha", "beta", "gamma", "delta", "omega"][: MAX_BAD_WORDS + 1]
    chat = {"messages": [{"role": "user", "content": "Speak."}]}
    for path, body in (("/v1/completions", {"prompt": "ROMEO:"}), ("/v1/chat/completions", chat)):
        body = {"model": MODEL_NAME, **body, "max_tokens": 2}
        assert httpx.post(url + path, json={**body, "bad_words": words[:-1]}, timeout=60).status_code == 200
        refused = httpx.post(url + path, json={**body, "bad_words": words}, timeout=60)
        err = assert_openai_error(refused, 400, "bad_words")
        assert "max_bad_words" in err["message"]


def test_token_ids_outside_the_vocabulary_get_400s_naming_the_field(url):
    cases = [
        ({"logit_bias": {str(VOCAB): 1.0}}, "logit_bias", str(VOCAB)),
        ({"logit_bias": {"abc": 1.0}}, "logit_bias", "abc"),
        ({"logit_bias": {"5": 150}}, "logit_bias", "100"),
        ({"stop_token_ids": [VOCAB + 5]}, "stop_token_ids", str(VOCAB)),
        ({"allowed_token_ids": [VOCAB]}, "allowed_token_ids", str(VOCAB)),
        ({"allowed_token_ids": []}, "allowed_token_ids", "empty"),
        ({"allowed_token_ids": [7], "stop_token_ids": [7], "min_tokens": 1}, "allowed_token_ids", "nothing is left"),
    ]
    for extra, param, mentioned in cases:
        for path, base in (("/v1/completions", PROMPT), ("/v1/chat/completions", MESSAGES)):
            r = post(url, path, {"model": MODEL_NAME, **base, **extra})
            assert r.status_code == 400, (extra, r.text)
            err = r.json()["error"]
            assert err["param"] == param and mentioned in err["message"], (extra, err)
    # the last valid id and the bias bounds themselves are fine
    ok = {"logit_bias": {str(VOCAB - 1): 100, "0": -100}, "stop_token_ids": [VOCAB - 1]}
    ok |= {"allowed_token_ids": [7, VOCAB - 1], "min_tokens": 1}  # 7 may be sampled while VOCAB - 1 may not
    assert post(url, "/v1/completions", {"model": MODEL_NAME, **PROMPT, "max_tokens": 2, **ok}).status_code == 200


def test_logit_bias_keys_are_plain_decimal_token_ids_each_given_once(url):
    """Python's int() would read " 5" and "5\\n" as 5, "1_0" as 10 and "\u0665" (an Arabic-Indic 5) as 5; and "5"
    with "05" would bias token 5 twice, one of the two silently lost."""
    for key in (" 5", "5\n", "1_0", "\u0665", "+5", "-1", "5.0", "0x5", ""):
        for path, base in (("/v1/completions", PROMPT), ("/v1/chat/completions", MESSAGES)):
            r = post(url, path, {"model": MODEL_NAME, **base, "max_tokens": 2, "logit_bias": {key: 1.0}})
            err = assert_openai_error(r, 400, "logit_bias")
            assert f"{key!r} is not a token id" in err["message"], (key, err)
    for bias in ({"5": -100, "05": 100}, {"007": 1, "7": 1}):
        r = post(url, "/v1/completions", {"model": MODEL_NAME, **PROMPT, "max_tokens": 2, "logit_bias": bias})
        err = assert_openai_error(r, 400, "logit_bias")
        assert " and ".join(map(repr, bias)) in err["message"] and "both name token" in err["message"], err
    # a key with leading zeros names its token (once): "05" pushes token 5 as "5" does
    body = {"model": MODEL_NAME, **PROMPT, "max_tokens": 4, "temperature": 0}
    body |= {"ignore_eos": True, "return_token_ids": True}
    for key in ("5", "05"):
        r = post(url, "/v1/completions", {**body, "logit_bias": {key: 100}})
        assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == [5] * 4, (key, r.text)


def test_top_logprobs_are_bounded_by_max_logprobs_and_minus_one_is_the_whole_vocabulary(url):
    """The server's max_logprobs bounds each field that asks for top logprobs (a 400 naming the field past it);
    -1 asks for the whole vocabulary, which fits it here exactly, and lists every token."""
    chat = {"model": MODEL_NAME, **MESSAGES, "max_tokens": 1, "logprobs": True}
    completion = {"model": MODEL_NAME, **PROMPT, "max_tokens": 1}
    cases = [("/v1/chat/completions", chat, "top_logprobs"), ("/v1/completions", completion, "logprobs")]
    cases += [("/v1/chat/completions", chat, "prompt_logprobs"), ("/v1/completions", completion, "prompt_logprobs")]
    for path, body, field in cases:
        err = assert_openai_error(post(url, path, {**body, field: MAX_LOGPROBS + 1}), 400, field)
        assert f"max_logprobs={MAX_LOGPROBS}" in err["message"], err
    whole = post(url, "/v1/chat/completions", {**chat, "top_logprobs": -1}).json()["choices"][0]
    assert len(whole["logprobs"]["content"][0]["top_logprobs"]) == VOCAB
    scored = post(url, "/v1/completions", {**completion, "prompt_logprobs": -1}).json()["choices"][0]
    assert scored["prompt_logprobs"][0] is None and len(scored["prompt_logprobs"]) > 1
    assert all(sorted(map(int, p)) == list(range(VOCAB)) for p in scored["prompt_logprobs"][1:])


def test_beam_search_answers_the_offline_engines_beams_and_refuses_what_it_would_not_honour(url, client, model_dir):
    """use_beam_search: the n choices are the offline LLM.beam_search's n beams, best first (completions: each
    prompt's n, indexed as n does; chat: the reply's); fields the search would not honour are refused by name, and
    length_penalty needs use_beam_search."""
    from miniserve import LLM, BeamSearchParams

    llm = LLM(str(model_dir), dtype="float32", device="cpu")
    tok = llm.get_tokenizer()
    prompts = ["ROMEO:", "JULIET: O"]
    params = BeamSearchParams(beam_width=3, max_tokens=4, ignore_eos=True, length_penalty=0.5)
    offline = [[tok.decode(b.tokens[len(tok.encode(p)) :], skip_special_tokens=True) for b in out.sequences]
               for p, out in zip(prompts, llm.beam_search(prompts, params))]  # fmt: skip
    extra = {"use_beam_search": True, "ignore_eos": True, "length_penalty": 0.5}
    got = client.completions.create(model=MODEL_NAME, prompt=prompts, n=3, max_tokens=4, extra_body=extra)
    assert [c.index for c in got.choices] == list(range(6))
    assert [[c.text for c in got.choices[i * 3 : i * 3 + 3]] for i in range(2)] == offline
    assert got.usage.completion_tokens == 6 * 4 and all(c.finish_reason == "length" for c in got.choices)
    assert got.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)
    assert got.usage.prompt_tokens_details.cached_tokens == 0  # (prompts shorter than a block: nothing to cache)
    conversation = [{"role": "user", "content": "Speak."}]
    chat = client.chat.completions.create(model=MODEL_NAME, messages=conversation, n=2, max_tokens=4, extra_body=extra)
    ids = llm.engine.tokenizer.chat_prompt(conversation)[1]
    beams = llm.beam_search([{"prompt_token_ids": ids}], BeamSearchParams(2, 4, ignore_eos=True, length_penalty=0.5))
    want = [tok.decode(b.tokens[len(ids) :], skip_special_tokens=True) for b in beams[0].sequences]
    assert [c.message.content for c in chat.choices] == want and chat.choices[0].message.role == "assistant"
    beam = {"model": MODEL_NAME, **PROMPT, "max_tokens": 2, "use_beam_search": True}
    refused = (("stream", True), ("top_p", 0.5), ("logprobs", 1), ("stop", ["x"]), ("n", 200), ("max_tokens", 0))
    for field, value in refused:
        assert_openai_error(post(url, "/v1/completions", {**beam, field: value}), 400, field)
    err = assert_openai_error(post(url, "/v1/completions", {**beam, "use_beam_search": False, "length_penalty": 2}),
                              400, "length_penalty")  # fmt: skip
    assert "use_beam_search" in err["message"]


def test_best_of_returns_the_n_likeliest_of_best_of(client, url):
    kwargs = dict(model=MODEL_NAME, prompt="ROMEO:", max_tokens=5, temperature=1.0, seed=5)
    every = client.completions.create(n=4, logprobs=0, extra_body={"ignore_eos": True}, **kwargs)
    sums = sorted(((sum(c.logprobs.token_logprobs), c.text) for c in every.choices), reverse=True)
    from tests.test_server import metric, scrape

    before = scrape(url)
    best = client.completions.create(n=2, best_of=4, extra_body={"ignore_eos": True}, **kwargs)
    assert [c.text for c in best.choices] == [text for _, text in sums[:2]]
    assert [c.index for c in best.choices] == [0, 1] and all(c.logprobs is None for c in best.choices)
    after = scrape(url)  # the request's n, not the best_of the engine ran
    assert metric(after, "request_params_n_sum") - metric(before, "request_params_n_sum") == 2
    # logprobs=0 (falsy, still asked for): each choice keeps its sampled tokens' logprobs
    best = client.completions.create(n=2, best_of=4, logprobs=0, extra_body={"ignore_eos": True}, **kwargs)
    assert [c.text for c in best.choices] == [text for _, text in sums[:2]]
    assert [sum(c.logprobs.token_logprobs) for c in best.choices] == pytest.approx([lp for lp, _ in sums[:2]])
    r = post(url, "/v1/completions", {**kwargs, "n": 3, "best_of": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"
    r = post(url, "/v1/completions", {**kwargs, "best_of": 2, "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"


def test_prompt_logprobs_in_the_server_match_transformers(client, hf_model, hf_tok):
    prompt = "Now is the winter"
    ids = hf_tok(prompt).input_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), dim=-1)
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=1, extra_body={"prompt_logprobs": 2})
    plp = r.choices[0].model_extra["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    for pos in range(1, len(ids)):
        entry = plp[pos]
        assert entry[str(ids[pos])]["logprob"] == pytest.approx(ref[pos - 1, ids[pos]].item(), abs=1e-3)
        top2 = ref[pos - 1].topk(2).indices.tolist()
        ranked = {int(k): v["rank"] for k, v in entry.items()}
        assert ranked[top2[0]] == 1 and ranked[top2[1]] == 2
        # the prompt token's own rank, in the top or not: how many tokens are at least as likely
        assert ranked[ids[pos]] == int((ref[pos - 1] >= ref[pos - 1, ids[pos]]).sum())
        assert len(entry) == (2 if ids[pos] in top2 else 3)
    chat = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES["messages"], max_tokens=1, extra_body={"prompt_logprobs": 0}
    )
    assert chat.model_extra["prompt_logprobs"][0] is None and len(chat.model_extra["prompt_logprobs"]) > 3


@pytest.mark.parametrize("logits", [[3.0, 2.0, 2.0, 1.0], [2.0, 2.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
def test_prompt_logprobs_with_tied_logprobs_keep_the_top_n_and_ranks(logits):
    """Ties are common (bf16 logits): the server's prompt_logprobs and echo's legacy top_logprobs keep topk's N
    tokens ranked 1..N in its order, and the prompt token beside them with its rank (tokens at least as likely),
    through the engine's scoring and the pipe's (float dicts, ranks) form."""
    from miniserve import SamplingParams
    from miniserve.engine.output_processor import record_prompt_logprobs
    from miniserve.engine.outputs import logprob_dicts
    from miniserve.scheduler.sequence import Sequence
    from miniserve.server import responses as fmt

    class Ids:  # token text as its id (return_tokens_as_token_ids); text offsets still read the decoded text
        special_ids = frozenset()

        def decode(self, ids: list[int]) -> str:
            return "".join(f"<{i}>" for i in ids)

    logprobs = torch.log_softmax(torch.tensor(logits), -1)
    top = logprobs.topk(2).indices.tolist()
    for chosen in range(4):
        prompt = [0, chosen]
        seq = Sequence(0, "r", 0, prompt, SamplingParams(prompt_logprobs=2, max_tokens=1))
        record_prompt_logprobs(seq, torch.tensor([logits]), 0)
        entries = logprob_dicts(seq.prompt_logprobs, prompt, seq.prompt_logprob_ranks, 2, None)  # as the server
        want = {str(t): i + 1 for i, t in enumerate(top)}
        want.setdefault(str(chosen), int((logprobs >= logprobs[chosen]).sum()))
        served = fmt.vllm_prompt_logprobs(Ids(), prompt, entries, 2)[1]
        assert {t: v["rank"] for t, v in served.items()} == want, (logits, chosen)
        legacy = fmt.prompt_logprobs(Ids(), prompt, entries, 2, "", as_ids=True)["top_logprobs"][1]
        assert set(legacy) == {f"token_id:{t}" for t in want}, (logits, chosen)


def test_truncate_and_add_special_tokens(client, hf_tok):
    import openai

    prompt = "To be, or not to be, that is the question"
    ids = hf_tok(prompt).input_ids
    assert ids[0] == 0  # conftest's tokenizer adds BOS
    # a text prompt: transformers' left truncation, as vLLM's tokenizer does it (the BOS stays); token ids: the last
    left = type(hf_tok).from_pretrained(hf_tok.name_or_path, truncation_side="left")
    for keep in (1, 2, 4):
        want = left(prompt, truncation=True, max_length=keep).input_ids
        extra = {"truncate_prompt_tokens": keep, "return_token_ids": True}
        r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=1, extra_body=extra)
        assert r.usage.prompt_tokens == keep and r.choices[0].model_extra["prompt_token_ids"] == want
        assert want[0] == 0 and want[1:] == ids[len(ids) - keep + 1 :]
    r = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=1,
                                  extra_body={"truncate_prompt_tokens": 4, "return_token_ids": True})  # fmt: skip
    assert r.choices[0].model_extra["prompt_token_ids"] == ids[-4:]
    # at most the context length: exactly it is taken, one more is refused by name, as vLLM refuses it
    context = client.models.list().data[0].model_extra["max_model_len"]
    r = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=1,
                                  extra_body={"truncate_prompt_tokens": context, "return_token_ids": True})  # fmt: skip
    assert r.choices[0].model_extra["prompt_token_ids"] == ids
    for create, body in ((client.completions.create, {"prompt": ids}), (client.chat.completions.create, MESSAGES)):
        with pytest.raises(openai.BadRequestError) as err:
            create(model=MODEL_NAME, max_tokens=1, extra_body={"truncate_prompt_tokens": context + 1}, **body)
        assert err.value.status_code == 400 and err.value.body["param"] == "truncate_prompt_tokens", err.value
        assert f"{context + 1} is more" in err.value.message
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=1,
                                  extra_body={"add_special_tokens": False, "return_token_ids": True})  # fmt: skip
    assert r.choices[0].model_extra["prompt_token_ids"] == ids[1:]
    chat_ids = {}
    for value in (True, False, None):
        extra = {"return_token_ids": True} | ({} if value is None else {"add_special_tokens": value})
        r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES["messages"], max_tokens=1,
                                           extra_body=extra)  # fmt: skip
        chat_ids[value] = r.model_extra["prompt_token_ids"]
    # this template writes no BOS: by default (False, as vLLM's) the prompt is the template's text alone; True adds
    # the tokenizer's specials to it
    assert chat_ids[False][0] != 0 and chat_ids[True] == [0] + chat_ids[False] and chat_ids[None] == chat_ids[False]


def test_usage_details_continuous_usage_and_token_ids_when_streaming(client):
    stream = client.completions.create(
        model=MODEL_NAME,
        prompt="ROMEO:",
        max_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    chunks = list(stream)
    counts = [c.usage.completion_tokens for c in chunks if c.choices]
    assert counts == sorted(counts) and counts[-1] == 5 and all(c.usage is not None for c in chunks)
    streamed = [t for c in chunks for ch in c.choices for t in ch.model_extra.get("token_ids", [])]
    final = chunks[-1].usage
    assert final.prompt_tokens_details.cached_tokens == 0 and final.completion_tokens == 5
    whole = client.completions.create(model=MODEL_NAME, prompt="ROMEO:", max_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True, "return_token_ids": True})  # fmt: skip
    assert streamed == whole.choices[0].model_extra["token_ids"]
    assert whole.usage.prompt_tokens_details.cached_tokens == 0
    # tokens as ids in logprobs
    r = client.completions.create(model=MODEL_NAME, prompt="ROMEO:", max_tokens=3, temperature=0, logprobs=1,
                                  extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})  # fmt: skip
    assert r.choices[0].logprobs.tokens == [f"token_id:{t}" for t in whole.choices[0].model_extra["token_ids"][:3]]


def test_byte_tokens_of_a_split_character_read_as_each_decodes_alone(tokenizer_dir):
    """Logprob token texts on a byte-level BPE: a character split over byte tokens reads "\ufffd" for each (as
    vLLM's, and as transformers decodes each alone), never "" for the ones inside it; whole tokens read the
    text they add after the context, as the output text (legacy and chat logprobs, prompt_logprobs' decoded_token)."""
    from transformers import AutoTokenizer

    from miniserve.engine.outputs import Logprob
    from miniserve.server import responses as fmt
    from miniserve.tokenizer import Tokenizer

    hf, ours = AutoTokenizer.from_pretrained(tokenizer_dir), Tokenizer.from_pretrained(tokenizer_dir)
    ids = hf.encode("To 日本 be", add_special_tokens=False)
    alone = [hf.decode([t]) for t in ids]
    assert alone.count("\ufffd") == 6  # two characters of three byte tokens each
    want = [a if a == "\ufffd" else hf.decode(ids[: i + 1])[len(hf.decode(ids[:i])) :] for i, a in enumerate(alone)]
    legacy, _ = fmt.completion_logprobs(ours, [], ids, [{t: -1.0} for t in ids], 0, 0)
    chat = fmt.chat_logprobs(ours, [], ids, [{t: -1.0} for t in ids], 0)
    prompt = fmt.vllm_prompt_logprobs(ours, ids, [None] + [{t: Logprob(-1.0, 1)} for t in ids[1:]], 0)
    assert legacy["tokens"] == [c["token"] for c in chat["content"]] == want
    assert [next(iter(d.values()))["decoded_token"] for d in prompt[1:]] == want[1:]


def test_prompt_logprobs_read_as_text_with_return_tokens_as_token_ids(url):
    """prompt_logprobs are keyed by token id already: their decoded_token stays text with
    return_tokens_as_token_ids (as vLLM's), in completions and chat."""
    for path, base in (("/v1/completions", {"prompt": "ROMEO:"}), ("/v1/chat/completions", MESSAGES)):
        body = {"model": MODEL_NAME, **base, "max_tokens": 1, "prompt_logprobs": 0}
        plain, by_id = (post(url, path, {**body, "return_tokens_as_token_ids": flag}).json() for flag in (False, True))
        if path == "/v1/completions":
            plain, by_id = plain["choices"][0], by_id["choices"][0]
        decoded = [e["decoded_token"] for d in plain["prompt_logprobs"] if d for e in d.values()]
        assert by_id["prompt_logprobs"] == plain["prompt_logprobs"] and not any("token_id:" in t for t in decoded)


def test_continuous_usage_without_include_usage_is_refused_by_name(url):
    """continuous_usage_stats alone would put usage on no chunk at all (vLLM ignores it so): a 400 naming it."""
    opts = {"continuous_usage_stats": True}
    for path, base in (("/v1/completions", PROMPT), ("/v1/chat/completions", MESSAGES)):
        body = {"model": MODEL_NAME, **base, "max_tokens": 2, "stream": True, "stream_options": opts}
        err = assert_openai_error(post(url, path, body), 400, "stream_options")
        assert "continuous_usage_stats needs include_usage" in err["message"], err


def test_continuous_usage_is_each_choices_own(client, hf_tok):
    """As vLLM's chunks: every chunk's usage is its own prompt's tokens and its own choice's tokens so far (not the
    request's running total over prompts and choices); the closing usage chunk has the request's totals."""
    prompts, opts = ["ROMEO:", "JULIET: O Romeo, Romeo"], {"include_usage": True, "continuous_usage_stats": True}
    lengths = [len(hf_tok(p)["input_ids"]) for p in prompts]
    assert lengths[0] != lengths[1]
    kw = dict(model=MODEL_NAME, n=2, temperature=1.0, seed=3, stream=True, stream_options=opts)
    chunks = list(client.completions.create(prompt=prompts, max_tokens=6, extra_body={"return_token_ids": True}, **kw))
    seen: dict[int, int] = {}  # choice index -> its tokens so far
    for c in chunks[:-1]:
        (ch,) = c.choices
        seen[ch.index] = seen.get(ch.index, 0) + len(ch.model_extra.get("token_ids") or [])
        assert (c.usage.prompt_tokens, c.usage.completion_tokens) == (lengths[ch.index // 2], seen[ch.index])
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == sum(seen.values())
    assert chunks[-1].usage.prompt_tokens == sum(lengths) and sorted(seen) == [0, 1, 2, 3]
    messages = [{"role": "user", "content": "Speak."}]
    chat = list(
        client.chat.completions.create(messages=messages, max_tokens=5, extra_body={"return_token_ids": True}, **kw)
    )
    seen = {}
    for c in chat[:-1]:
        (ch,) = c.choices
        seen[ch.index] = seen.get(ch.index, 0) + len(ch.model_extra.get("token_ids") or [])
        assert c.usage.completion_tokens == seen[ch.index] and c.usage.prompt_tokens == chat[-1].usage.prompt_tokens
    assert chat[-1].usage.completion_tokens == sum(seen.values()) and sorted(seen) == [0, 1]


@pytest.mark.parametrize("stream", [False, True])
def test_the_stop_token_is_in_the_token_ids_and_its_text_only_when_asked(client, hf_tok, stream):
    """As vLLM: a choice ended by a stop token id keeps the id, and leaves its text out unless
    include_stop_str_in_output. Streamed without stop strings the API process detokenizes; otherwise the engine."""
    kw = dict(model=MODEL_NAME, prompt="ROMEO:", max_tokens=8, temperature=0)
    free = client.completions.create(**kw, extra_body={"ignore_eos": True, "return_token_ids": True})
    ids = free.choices[0].model_extra["token_ids"]
    cut = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])  # a token first seen there
    for keep in (False, True):
        body = {"ignore_eos": True, "return_token_ids": True, "stop_token_ids": [ids[cut]]}
        r = client.completions.create(**kw, stream=stream, extra_body={**body, "include_stop_str_in_output": keep})
        choices = [c.choices[0] for c in r] if stream else r.choices
        text = "".join(c.text for c in choices)
        got = [t for c in choices for t in c.model_extra.get("token_ids") or []]
        assert got == ids[: cut + 1] and choices[-1].finish_reason == "stop"
        assert text == hf_tok.decode(ids[: cut + 1] if keep else ids[:cut])


def test_a_chat_rendered_past_the_character_limit_is_refused_before_tokenizing(url):
    """A request's template (this server trusts them) or its tools may render far more text than the messages
    hold: the limit applies to the rendered text."""
    body = {"model": MODEL_NAME, **MESSAGES, "max_tokens": 1, "chat_template": "{{ 'ab' * 600000 }}"}
    for path in ("/v1/chat/completions", "/tokenize"):
        err = assert_openai_error(post(url, path, body), 400, "messages")
        assert err["code"] == "prompt_too_long" and "1200000 characters" in err["message"], path


def test_cache_salt_separates_prefix_cache_namespaces(client):
    """Prefix caching is on: the same long prompt is served from the cache again, unless its salt differs (or one of
    the two has none); a salted request hits only its own salt's blocks."""
    prompt = "Now is the winter of our discontent made glorious summer by this sun of York. " * 3

    def cached(salt: str | None) -> int:
        extra = {"cache_salt": salt} if salt is not None else {}
        r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=1, extra_body=extra)
        return r.usage.prompt_tokens_details.cached_tokens

    assert cached(None) == 0 and cached(None) > 0  # the feature off: the plain prefix cache hits
    assert cached("tenant-a") == 0  # another namespace than no salt
    hit = cached("tenant-a")
    assert hit > 0  # the same salt shares its own blocks
    assert cached("tenant-b") == 0 and cached("tenant-b") == hit


def test_request_id_tokenize_strs_and_version(url, client, hf_tok):
    # the response's id is vLLM's: its prefix and the client's id, the X-Request-Id header's before the field's
    r = post(url, "/v1/completions", {"model": MODEL_NAME, **PROMPT, "max_tokens": 1, "request_id": "abc-123"})
    assert r.json()["id"] == "cmpl-abc-123"
    chat = {"model": MODEL_NAME, **MESSAGES, "max_tokens": 1}
    assert post(url, "/v1/chat/completions", {**chat, "request_id": "abc-123"}).json()["id"] == "chatcmpl-abc-123"
    streamed = client.chat.completions.create(
        **chat, stream=True, extra_body={"request_id": "abc-123"}, extra_headers={"X-Request-Id": "trace-7"}
    )
    assert {c.id for c in streamed} == {"chatcmpl-trace-7"}
    alone = client.completions.create(model=MODEL_NAME, **PROMPT, max_tokens=1)
    assert re.fullmatch(r"cmpl-[0-9a-f]{32}", alone.id)
    r = post(url, "/tokenize", {"prompt": "To be", "return_token_strs": True}).json()
    assert r["token_strs"] == hf_tok.convert_ids_to_tokens(r["tokens"])
    from miniserve import __version__

    assert httpx.get(url + "/version").json() == {"version": __version__}


def test_chat_fields_beside_a_prompt_are_refused_by_name(url):
    """/tokenize renders a chat only for messages: a chat field sent with a prompt would be ignored (a template that
    never runs, tools that never reach one), so it is a 400 naming it; sent as null it reads as not given."""
    chat_only = {"tools": TOOLS, "chat_template": "{{ 1/0 }}", "add_generation_prompt": False, "documents": [{}],
                 "continue_final_message": False, "chat_template_kwargs": {"mood": "calm"}}  # fmt: skip
    for name, value in chat_only.items():
        err = assert_openai_error(post(url, "/tokenize", {"prompt": "To be", name: value}), 400, name)
        assert "not to a prompt" in err["message"], err
    r = post(url, "/tokenize", {"prompt": "To be", **dict.fromkeys(chat_only)})
    assert r.status_code == 200 and r.json()["count"] > 0, r.text


def test_chat_echo_continue_final_message_and_template_kwargs(client, url):
    messages = [{"role": "user", "content": "Speak."}, {"role": "assistant", "content": "Once upon"}]
    body = {"model": MODEL_NAME, "messages": messages, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
            "add_generation_prompt": False, "continue_final_message": True}  # fmt: skip
    r = post(url, "/v1/chat/completions", {**body, "echo": True, "return_token_ids": True}).json()
    plain = post(url, "/v1/chat/completions", body).json()
    content = r["choices"][0]["message"]["content"]
    assert content == "Once upon" + plain["choices"][0]["message"]["content"]
    # the prompt ends right after the final message's text: no end-of-turn marker, no new turn
    tokenized = post(url, "/detokenize", {"tokens": r["prompt_token_ids"]}).json()["prompt"]
    assert tokenized.endswith("assistant\nOnce upon")
    # streamed echo: the first delta carries the echoed text; the prompt's ids ride beside the first chunk's choices,
    # as in vLLM's chunks (and the response above), the generated ones in each choice
    stream = list(client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=4, temperature=0, stream=True,
        extra_body={"ignore_eos": True, "add_generation_prompt": False, "continue_final_message": True, "echo": True,
                    "return_token_ids": True},
    ))  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == content
    assert stream[0].model_extra["prompt_token_ids"] == r["prompt_token_ids"]
    assert "prompt_token_ids" not in stream[0].choices[0].model_extra
    assert sum((c.choices[0].model_extra.get("token_ids") or [] for c in stream), []) == r["choices"][0]["token_ids"]
    # a user's message may be continued too (as transformers and vLLM allow): the reply then has the user's role
    said = {**body, "messages": [{"role": "user", "content": "Once upon"}], "return_token_ids": True}
    r = post(url, "/v1/chat/completions", said).json()
    assert post(url, "/detokenize", {"tokens": r["prompt_token_ids"]}).json()["prompt"].endswith("user\nOnce upon")
    assert r["choices"][0]["message"]["role"] == "user", r
    # both at once is a 400
    both = post(url, "/v1/chat/completions", {**body, "add_generation_prompt": True})
    assert both.status_code == 400 and both.json()["error"]["param"] == "continue_final_message"
    # chat_template_kwargs reach the template; chat_template replaces it
    calm_body = {"model": MODEL_NAME, **MESSAGES, "max_tokens": 1, "chat_template_kwargs": {"mood": "calm"}}
    calm = post(url, "/v1/chat/completions", {**calm_body, "return_token_ids": True})
    text = post(url, "/detokenize", {"tokens": calm.json()["prompt_token_ids"]}).json()["prompt"]
    assert "Speak. (calm)" in text
    custom = post(url, "/v1/chat/completions", {"model": MODEL_NAME, **MESSAGES, "max_tokens": 1,
                                               "chat_template": "PLAIN {{ messages[0].content }}",
                                               "return_token_ids": True})  # fmt: skip
    text = post(url, "/detokenize", {"tokens": custom.json()["prompt_token_ids"]}).json()["prompt"]
    assert text == "PLAIN Speak."  # no BOS the template did not write (vLLM's add_special_tokens=False)
    # tools: [] reaches the template as an empty list, absent tools as none (as vLLM passes them)
    probe = {"chat_template": "{{ tools is none }} {{ tools | length if tools is not none else '-' }}"}
    for path in ("/v1/chat/completions", "/tokenize"):
        for extra, expected in (({}, "True -"), ({"tools": []}, "False 0"), ({"tools": TOOLS}, "False 2")):
            if path != "/tokenize" and extra.get("tools"):  # (auto needs a template that shows a call format)
                extra = {**extra, "tool_choice": "none"}
            r = post(url, path, {"model": MODEL_NAME, **MESSAGES, "max_tokens": 1, "return_token_ids": True, **probe,
                                 **extra})  # fmt: skip
            ids = r.json()["prompt_token_ids" if path != "/tokenize" else "tokens"]
            assert post(url, "/detokenize", {"tokens": ids}).json()["prompt"] == expected, (path, extra)
    # content reaches the template as vLLM passes it: parts one by one to a template that loops over them, none as
    # no parts (or as "" to one that reads text)
    history = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
               {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                   "name": "f", "arguments": "{}"}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "ok"}]  # fmt: skip
    loops = (
        "{% for m in messages %}{{ m.content | length }}{% for p in m.content %}:{{ p.text }}{% endfor %};{% endfor %}"
    )
    reads = "{% for m in messages %}{{ m.content | length }}={{ m.content }};{% endfor %}"
    for template, expected in ((loops, "2:a:b;0;1:ok;"), (reads, "3=a\nb;0=;2=ok;")):
        r = post(url, "/tokenize", {"model": MODEL_NAME, "messages": history, "chat_template": template})
        assert post(url, "/detokenize", {"tokens": r.json()["tokens"]}).json()["prompt"] == expected
    # template variables named like the server's own arguments are variables all the same ...
    named = {"chat_template": "{{ truncate }} {{ add_special_tokens }}", "chat_template_kwargs": {"truncate": 7,
             "add_special_tokens": "yes"}}  # fmt: skip
    for path in ("/v1/chat/completions", "/tokenize"):
        r = post(url, path, {"model": MODEL_NAME, **MESSAGES, "max_tokens": 1, "return_token_ids": True, **named})
        ids = r.json()["prompt_token_ids" if path != "/tokenize" else "tokens"]
        assert post(url, "/detokenize", {"tokens": ids}).json()["prompt"].endswith("7 yes"), path
    # ... but the template's inputs that have fields of their own are refused, not overridden or dropped
    for key in ("messages", "add_generation_prompt", "tools", "documents", "chat_template", "continue_final_message"):
        for path in ("/v1/chat/completions", "/tokenize"):
            r = post(url, path, {"model": MODEL_NAME, **MESSAGES, "chat_template_kwargs": {key: None}})
            err = r.json()["error"]
            assert r.status_code == 400 and err["param"] == "chat_template_kwargs" and key in err["message"], path


def test_the_models_generation_config_fills_unset_fields_and_caps_max_tokens(model_dir, tmp_path, hf_model, hf_tok):
    """vLLM's generation_config="auto": a field the request leaves unset takes generation_config.json's value
    (top_k 1 here: greedy), one it sets keeps its own, and max_new_tokens caps max_tokens."""
    import shutil

    tuned = shutil.copytree(model_dir, tmp_path / "tuned")
    (tuned / "generation_config.json").write_text(json.dumps({"top_k": 1, "temperature": 0.7, "max_new_tokens": 4}))
    prompt = "What light through yonder window breaks?"
    greedy = hf_greedy_processed(hf_model, hf_tok(prompt).input_ids, 4, lambda x: x)
    with run_server(tuned, tmp_path / "server.log") as base:

        def tokens(**fields) -> tuple[list[int], str]:
            body = {"model": MODEL_NAME, "prompt": prompt, "ignore_eos": True, "return_token_ids": True, **fields}
            choice = post(base, "/v1/completions", body).json()["choices"][0]
            return choice["token_ids"], choice["finish_reason"]

        assert tokens(max_tokens=50) == (greedy, "length")  # top_k 1 from the file, 4 tokens at most
        assert tokens(max_tokens=2) == (greedy[:2], "length")
        sampled, _ = tokens(max_tokens=50, top_k=-1, seed=1)  # the request's own top_k
        assert len(sampled) == 4 and sampled != greedy


# ---------------------------------------------------------------------------------------------- tool calls

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                         "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"]}}},
]  # fmt: skip
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def _streamed_calls(stream) -> tuple[list[tuple[str, str]], str, str | None]:
    """Accumulate streamed tool-call deltas by index: [(name, arguments)], content, finish_reason."""
    calls: dict[int, list[str]] = {}
    content, finish = "", None
    for chunk in stream:
        for c in chunk.choices:
            content += c.delta.content or ""
            finish = c.finish_reason or finish
            for call in c.delta.tool_calls or []:
                entry = calls.setdefault(call.index, ["", ""])
                entry[0] += call.function.name or ""
                entry[1] += call.function.arguments or ""
    return [tuple(calls[i]) for i in sorted(calls)], content, finish


def test_tool_round_trip_forced_with_required_streamed_equals_non_streamed(client, url):
    import jsonschema

    messages = [{"role": "user", "content": "Weather in Verona?"}]
    kwargs = dict(model=MODEL_NAME, messages=messages, tools=TOOLS, tool_choice="required", temperature=1.0,
                  seed=2, max_tokens=400)  # fmt: skip
    r = client.chat.completions.create(**kwargs)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    assert calls and all(c.id and c.type == "function" for c in choice.message.tool_calls)
    for name, arguments in calls:
        jsonschema.validate(json.loads(arguments), PARAMS[name])
    streamed, content, finish = _streamed_calls(client.chat.completions.create(stream=True, **kwargs))
    assert streamed == calls and content == "" and finish == "tool_calls"
    # the calls and their results go back through the chat template
    follow = messages + [
        choice.message.model_dump(exclude_none=True),
        *({"role": "tool", "tool_call_id": c.id, "content": '{"ok": true}'} for c in choice.message.tool_calls),
    ]
    again = post(url, "/v1/chat/completions", {"model": MODEL_NAME, "messages": follow, "tools": TOOLS,
                                              "max_tokens": 2, "return_token_ids": True})  # fmt: skip
    assert again.status_code == 200, again.text
    prompt = post(url, "/detokenize", {"tokens": again.json()["prompt_token_ids"]}).json()["prompt"]
    assert f'<tool_call>\n{{"name": "{calls[0][0]}", "arguments": {calls[0][1]}}}' in prompt
    assert '<tool_response>\n{"ok": true}\n</tool_response>' in prompt and '"name": "get_weather"' in prompt
    # one call only without parallel_tool_calls
    one = client.chat.completions.create(**{**kwargs, "parallel_tool_calls": False, "seed": 3})
    assert len(one.choices[0].message.tool_calls) == 1


def test_named_tool_choice_and_auto_parsing(client):
    import jsonschema

    messages = [{"role": "user", "content": "What time is it?"}]
    named = {"type": "function", "function": {"name": "get_time"}}
    kwargs = dict(model=MODEL_NAME, messages=messages, tools=TOOLS, tool_choice=named, temperature=1.0, seed=1,
                  max_tokens=200)  # fmt: skip
    r = client.chat.completions.create(**kwargs)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_time" and r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(call.function.arguments), PARAMS["get_time"])
    streamed, _, _ = _streamed_calls(client.chat.completions.create(stream=True, **kwargs))
    assert streamed == [("get_time", call.function.arguments)]
    # auto: the model's own <tool_call> block is parsed (a regex makes the tiny model write one)
    block = r'Let me check\.\n<tool_call>\n\{"name": "get_time", "arguments": \{"zone": "(utc|cet)"\}\}\n</tool_call>'
    auto = dict(kwargs, tool_choice="auto", extra_body={"structured_outputs": {"regex": block}})
    r = client.chat.completions.create(**auto)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content == "Let me check.\n"
    assert [(c.function.name, json.loads(c.function.arguments)["zone"] in ("utc", "cet")) for c in msg.tool_calls] == [
        ("get_time", True)
    ]
    streamed, content, finish = _streamed_calls(client.chat.completions.create(stream=True, **auto))
    assert streamed == [(c.function.name, c.function.arguments) for c in msg.tool_calls]
    assert content == msg.content and finish == "tool_calls"


def test_a_models_tool_use_template_renders_and_teaches_the_calls_of_a_chat_with_tools(model_dir, tmp_path):
    """A model with named templates (a plain "default" and TOOL_TEMPLATE as "tool_use", as Hermes-style models ship
    them): a chat with tools renders with "tool_use", as vLLM picks it through transformers, and auto tool choice
    parses the <tool_call> blocks that template teaches; a chat without tools renders with "default"."""
    import shutil

    named = shutil.copytree(model_dir, tmp_path / "named")
    config = json.loads((named / "tokenizer_config.json").read_text())
    plain = "{% for m in messages %}{{ m.content }}~{% endfor %}"
    config["chat_template"] = [{"name": "default", "template": plain}, {"name": "tool_use", "template": TOOL_TEMPLATE}]
    (named / "tokenizer_config.json").write_text(json.dumps(config))
    block = r'<tool_call>\n\{"name": "get_time", "arguments": \{"zone": "utc"\}\}\n</tool_call>'
    body = {"model": MODEL_NAME, "messages": MESSAGES["messages"], "max_tokens": 150, "return_token_ids": True}
    with run_server(named, tmp_path / "named.log") as url:
        answer = post(url, "/v1/chat/completions", {**body, "tools": TOOLS, "tool_choice": "auto",
                                                    "structured_outputs": {"regex": block}})  # fmt: skip
        assert answer.status_code == 200, answer.text
        choice = answer.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and not choice["message"]["content"]
        assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == ["get_time"]
        prompt = post(url, "/detokenize", {"tokens": answer.json()["prompt_token_ids"]}).json()["prompt"]
        assert '"name": "get_weather"' in prompt and "~" not in prompt
        without = post(url, "/v1/chat/completions", body).json()
        prompt = post(url, "/detokenize", {"tokens": without["prompt_token_ids"]}).json()["prompt"]
        assert prompt.endswith("Speak.~") and "get_weather" not in prompt


MISTRAL_LIKE = "{% for m in messages %}[INST]{{ m.content }}[/INST]{% endfor %}{# [TOOL_CALLS] #}"


def test_tool_choice_errors(url):
    base = {"model": MODEL_NAME, "messages": MESSAGES["messages"], "tools": TOOLS}
    cases = [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": None, "tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": "auto", "chat_template": "{{ messages[0].content }}"}, "tool_choice"),  # no call format
        ({"tool_choice": "auto", "chat_template": "<tool_call>\n<function={{ name }}>"}, None),  # Qwen3-Coder's XML
        # Mistral's calls start with a special token: kept in the text, unless the request says otherwise
        ({"tool_choice": "auto", "chat_template": MISTRAL_LIKE, "skip_special_tokens": True}, "skip_special_tokens"),
        ({"tool_choice": "auto", "chat_template": MISTRAL_LIKE}, None),
        ({"tool_choice": "none", "chat_template": MISTRAL_LIKE, "skip_special_tokens": True}, None),
        ({"tool_choice": "required", "guided_regex": "a"}, "guided_regex"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
                "tool_choice": "required",
            },
            "tools",
        ),  # a tool's schema that does not compile
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),  # no tool_call_id
        ({"messages": [{"role": "user", "content": "x", "tool_calls": []}], "tool_choice": "none"}, None),
    ]
    for extra, param in cases:
        r = post(url, "/v1/chat/completions", {**base, "max_tokens": 2, **extra})
        if param is None:
            assert r.status_code == 200, r.text
        else:
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (extra, r.text)


def test_tool_names_are_non_empty_and_unique_but_not_restricted_to_openais_pattern(client, url):
    """A function named "" could never be called (the call parsers take no empty name; with tool_choice required
    the request could only fail), and of two tools with one name a call could mean either. Other names are taken
    as vLLM takes them: "get.weather" is outside OpenAI's ^[a-zA-Z0-9_-]{1,64}$ but served, and called."""

    def tool(name: str) -> dict:
        return {"type": "function", "function": {"name": name, "parameters": PARAMS["get_time"]}}

    for tools in ([tool("")], [tool("get_time"), tool("")], [tool("a"), tool("b"), tool("a")]):
        for choice in ("auto", "required", "none"):
            body = {"model": MODEL_NAME, **MESSAGES, "max_tokens": 2, "tools": tools, "tool_choice": choice}
            err = assert_openai_error(post(url, "/v1/chat/completions", body), 400, "tools")
            assert "at least 1 character" in err["message"] or "tools 0 and 2 are both named 'a'" in err["message"]
        body = {"model": MODEL_NAME, **MESSAGES, "tools": tools}
        assert_openai_error(post(url, "/tokenize", body), 400, "tools")
    named = {"type": "function", "function": {"name": "get.weather"}}
    r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES["messages"], tools=[tool("get.weather")],
                                       tool_choice=named, temperature=1.0, seed=1, max_tokens=200)  # fmt: skip
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get.weather" and json.loads(call.function.arguments)["zone"] in ("utc", "cet")


def test_vllms_chat_server_flags_tool_parser_auto_choice_response_role_request_id_headers(model_dir, tmp_path):
    """--tool-call-parser replaces the format read off the chat template (TOOL_TEMPLATE teaches <tool_call>
    blocks; the server parses Llama 3.1 JSON); with --no-enable-auto-tool-choice, tool_choice auto, also implied by
    tools alone, is a 400 naming tool_choice, while required and named calls still work. --response-role names the
    reply's role after a generation prompt (without one, the last message's role goes on; echo repeats the last
    message when its role is the reply's); --enable-request-id-headers echoes X-Request-Id or makes one."""
    call = r'\{"name": "get_time", "parameters": \{"zone": "(utc|cet)"\}\}'
    base = {"model": MODEL_NAME, "messages": MESSAGES["messages"], "tools": TOOLS, "max_tokens": 150}
    env = {"MINISERVE_TOOL_CALL_PARSER": "llama3_json", "MINISERVE_RESPONSE_ROLE": "narrator",
           "MINISERVE_ENABLE_REQUEST_ID_HEADERS": "1"}  # fmt: skip
    with run_server(model_dir, tmp_path / "parser.log", **env) as url:
        said = [{"role": "user", "content": "Speak."}, {"role": "assistant", "content": "Once"}]
        short = {"model": MODEL_NAME, "max_tokens": 2, "echo": True}
        for messages, generation_prompt, role, echoed in (
            (said, True, "narrator", ""),  # the last message is the assistant's, not the reply's role
            (said, False, "assistant", "Once"),
            (said[:1], False, "user", "Speak."),
            ([*said, {"role": "narrator", "content": "Then"}], True, "narrator", "Then"),
        ):
            body = {**short, "messages": messages, "add_generation_prompt": generation_prompt}
            message = post(url, "/v1/chat/completions", body).json()["choices"][0]["message"]
            assert message["role"] == role and message["content"].startswith(echoed), (body, message)
            if echoed:
                assert message["content"] != echoed, message  # (two tokens came after it)
            else:
                assert not message["content"].startswith(messages[-1]["content"]), message
            events = sse_events(post(url, "/v1/chat/completions", {**body, "stream": True}))
            assert events[0]["choices"][0]["delta"] == {"role": role, "content": echoed}, events[0]
        ids = post(url, "/tokenize", {"model": MODEL_NAME, "messages": messages}).json()["tokens"]
        prompt = post(url, "/detokenize", {"tokens": ids}).json()["prompt"]
        assert prompt.endswith("<|im_start|>narrator\nThen<|im_end|><|im_start|>assistant\n"), prompt
        r = httpx.get(f"{url}/v1/models", headers={"X-Request-Id": "trace-7"})
        assert r.headers["x-request-id"] == "trace-7"
        fresh = [httpx.get(f"{url}/health").headers["x-request-id"] for _ in range(2)]
        assert fresh[0] != fresh[1] and all(len(h) >= 16 for h in fresh), fresh
        r = post(url, "/v1/chat/completions", {**short, "messages": said, "stream": True}, {"X-Request-Id": "s-1"})
        assert r.headers["x-request-id"] == "s-1" and r.text.rstrip().endswith("data: [DONE]")
        r = post(url, "/v1/chat/completions", {"model": MODEL_NAME, "messages": []}, {"X-Request-Id": "bad-2"})
        assert r.status_code == 400 and r.headers["x-request-id"] == "bad-2"
        r = post(url, "/v1/chat/completions", {**base, "tool_choice": "auto", "structured_outputs": {"regex": call}})
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls", r.text
        assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == ["get_time"]
        block = r'<tool_call>\n\{"name": "get_time", "arguments": \{"zone": "utc"\}\}\n</tool_call>'
        r = post(url, "/v1/chat/completions", {**base, "tool_choice": "auto", "structured_outputs": {"regex": block}})
        choice = r.json()["choices"][0]  # the template's own format is not what this server parses
        assert choice["finish_reason"] == "stop" and not choice["message"].get("tool_calls"), r.text
    env = {"MINISERVE_ENABLE_AUTO_TOOL_CHOICE": "false"}
    with run_server(model_dir, tmp_path / "no-auto.log", **env) as url:
        for extra in ({"tool_choice": "auto"}, {}):
            err = assert_openai_error(post(url, "/v1/chat/completions", {**base, **extra}), 400, "tool_choice")
            assert "enable_auto_tool_choice" in err["message"]
        named = {"type": "function", "function": {"name": "get_time"}}
        for choice in ("required", named):
            r = post(url, "/v1/chat/completions", {**base, "tool_choice": choice})
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["tool_calls"], r.text
        r = post(url, "/v1/chat/completions", {**base, "tool_choice": "none"}, {"X-Request-Id": "r-3"})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
        assert "x-request-id" not in r.headers  # (off by default)


def test_a_prompt_too_long_by_its_characters_says_so_without_a_made_up_count(url):
    """Refused before tokenizing (more characters than the context's tokens could hold): the message says what
    is known, not a token count."""
    context = httpx.get(f"{url}/v1/models").json()["data"][0]["max_model_len"]
    text = "to be " * 15_000
    for path, body, param in (("/v1/completions", {"prompt": text}, "prompt"), ("/v1/chat/completions",
            {"messages": [{"role": "user", "content": text}]}, "messages")):  # fmt: skip
        err = assert_openai_error(post(url, path, {"model": MODEL_NAME, "max_tokens": 1, **body}), 400, param)
        assert err["code"] == "context_length_exceeded", err
        assert f"has {len(text)} characters, so more than {context} tokens" in err["message"], err


def test_an_assistants_reasoning_passed_back_reaches_the_template(url, log_path):
    """The reasoning this server returns (`message.reasoning`), or under vLLM's older name `reasoning_content`,
    goes back into the next request's template under both names and as `thinking` (gpt-oss's), as transformers
    gives it (Qwen3's template renders it in a tool-calling turn), null as the client dumps it without a warning; on
    another role, or given twice differently, a 400."""
    template = "{% for m in messages %}{{ m.role }}:{{ m.reasoning_content }}|{{ m.reasoning }}|{{ m.thinking }}|"
    template += "{{ m.content }};{% endfor %}"

    def rendered(message: dict) -> str:
        body = {"model": MODEL_NAME, "messages": [*MESSAGES["messages"], message], "chat_template": template}
        r = post(url, "/tokenize", body)
        assert r.status_code == 200, r.text
        return post(url, "/detokenize", {"tokens": r.json()["tokens"]}).json()["prompt"]

    for field in ("reasoning", "reasoning_content"):
        said = rendered({"role": "assistant", "content": "No.", field: "I think"})
        assert said.endswith("user:|||Speak.;assistant:I think|I think|I think|No.;"), said
    said = rendered({"role": "assistant", "content": "No.", "reasoning": None})
    assert said.endswith("assistant:|||No.;"), said
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if "fields ignored" in line]
    assert not any("reasoning" in line for line in lines), lines
    for message in (
        {"role": "user", "content": "Hi", "reasoning": "I think"},
        {"role": "assistant", "content": "No.", "reasoning": "I think", "reasoning_content": "I thought"},
    ):
        body = {"model": MODEL_NAME, "messages": [*MESSAGES["messages"], message], "max_tokens": 2}
        assert_openai_error(post(url, "/v1/chat/completions", body), 400, "messages")


def test_tool_call_arguments_in_messages(url):
    """Empty arguments are none ({}, as vLLM reads them); text that is not JSON is the client's 400, on chat and
    /tokenize alike."""

    def messages(arguments: str) -> list[dict]:
        call = {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": arguments}}
        return [
            {"role": "user", "content": "Time?"},
            {"role": "assistant", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "noon"},
        ]

    body = {"model": MODEL_NAME, "tools": TOOLS, "max_tokens": 2, "return_token_ids": True}
    ok = post(url, "/v1/chat/completions", {**body, "messages": messages("")})
    assert ok.status_code == 200, ok.text
    prompt = post(url, "/detokenize", {"tokens": ok.json()["prompt_token_ids"]}).json()["prompt"]
    assert '<tool_call>\n{"name": "get_time", "arguments": {}}' in prompt
    for path in ("/v1/chat/completions", "/tokenize"):
        err = assert_openai_error(post(url, path, {**body, "messages": messages("{bad")}), 400, "messages")
        assert "messages[1]: tool call arguments must be JSON text" in err["message"], path


def test_required_tool_choice_with_schema_definitions(client, url):
    """Tools whose parameters refer to their own $defs (pydantic's schemas) keep working under tool_choice
    required, where every tool's schema sits deep in one array schema."""
    import jsonschema

    place = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}
    tools = [
        {"type": "function", "function": {"name": "weather", "parameters": {
            "type": "object", "properties": {"loc": {"$ref": "#/$defs/Loc"}}, "required": ["loc"],
            "$defs": {"Loc": place}}}},
        {"type": "function", "function": {"name": "trip", "parameters": {
            "type": "object", "properties": {"to": {"$ref": "#/definitions/Loc"}}, "required": ["to"],
            "definitions": {"Loc": place}}}},
    ]  # fmt: skip
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES["messages"], tools=tools, tool_choice="required", temperature=1.0,
        seed=5, max_tokens=300, n=4,
    )  # fmt: skip
    calls = [c for choice in r.choices for c in choice.message.tool_calls]
    assert len(calls) >= 4
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    other = {**place, "properties": {"city": {"type": "integer"}}}
    clash = [tools[0], {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"$ref": "#/$defs/Loc"}}, "$defs": {"Loc": other}}}}]  # fmt: skip
    body = {"model": MODEL_NAME, **MESSAGES, "tools": clash, "tool_choice": "required", "max_tokens": 2}
    err = assert_openai_error(post(url, "/v1/chat/completions", body), 400, "tools")
    assert "two tools define $defs/Loc differently" in err["message"]


def test_required_tool_choice_with_references_into_the_parameters_themselves(client):
    """A tool's "#" and "#/properties/..." references mean its own parameters under tool_choice required too,
    where those parameters sit deep in one array schema (they used to resolve against the array: a tree's
    children were whole calls, and a reference to a sibling property was refused)."""
    import jsonschema

    tree = {"type": "object", "properties": {"v": {"type": "integer"}, "kids": {
        "type": "array", "items": {"$ref": "#"}, "maxItems": 2}}, "required": ["v", "kids"]}  # fmt: skip
    pair = {"type": "object", "properties": {"a": {"type": "integer", "maximum": 5}, "b": {"$ref": "#/properties/a"}},
            "required": ["a", "b"]}  # fmt: skip
    tools = [
        {"type": "function", "function": {"name": n, "parameters": p}} for n, p in (("tree", tree), ("pair", pair))
    ]
    schemas = {"tree": tree, "pair": pair}
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES["messages"], tools=tools, tool_choice="required", temperature=1.0,
        seed=3, max_tokens=300, n=4,
    )  # fmt: skip
    calls = [c for choice in r.choices for c in choice.message.tool_calls or []]
    assert calls
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_required_schema_accepts_a_call_exactly_when_its_arguments_fit_the_tool():
    """The array schema of tool_choice required, judged by jsonschema, takes a call whose arguments the tool's own
    schema takes and no other, for references to the parameters, to a property, from a definition, and beside
    names and data that only look like references (a property called "$ref", an enum value holding one)."""
    import jsonschema

    from miniserve.server.tool_calls import required_schema

    params = {"type": "object", "properties": {
        "$ref": {"type": "string"}, "enum": {"$ref": "#/properties/$ref"}, "c": {"enum": [{"$ref": "#"}, 1]},
        "kid": {"$ref": "#/$defs/Node"}}, "$defs": {"Node": {"anyOf": [{"type": "null"}, {"$ref": "#"}]}},
        "additionalProperties": False}  # fmt: skip
    root = required_schema([{"type": "function", "function": {"name": "f", "parameters": params}}], True)
    samples = [{}, {"$ref": "x"}, {"$ref": 1}, {"enum": "y"}, {"enum": 2}, {"c": {"$ref": "#"}}, {"c": 1}, {"c": 2},
               {"kid": None}, {"kid": {"kid": {"c": 1}}}, {"kid": {"kid": {"c": 3}}}, {"kid": 5}, {"z": 1}]  # fmt: skip
    fits = [jsonschema.Draft202012Validator(params).is_valid(x) for x in samples]
    calls = [jsonschema.Draft202012Validator(root).is_valid([{"name": "f", "parameters": x}]) for x in samples]
    assert calls == fits and True in fits and False in fits


@pytest.mark.parametrize(
    ("fmt", "text", "content", "calls"),
    [
        ("hermes", 'Sure.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n<tool_call>\n'
         '{"name": "g", "arguments": {}}\n</tool_call>', "Sure.\n", [("f", '{"a": 1}'), ("g", "{}")]),
        ("hermes", "no calls <tool_call> broken", "no calls <tool_call> broken", []),
        ("llama3_json", '{"name": "f", "parameters": {"a": [1, 2]}}; {"name": "g", "parameters": {}}', "",
         [("f", '{"a": [1, 2]}'), ("g", "{}")]),
        ("llama3_json", '<|python_tag|>{"name": "f", "parameters": {"x": "y"}}', "", [("f", '{"x": "y"}')]),
        ("llama3_json", '<|python_tag|>\n {"name": "f", "parameters": {}}', "", [("f", "{}")]),
        ("llama3_json", "The {answer} is no call", "The {answer} is no call", []),
        ("llama3_json", '\n {"name": "f", "parameters": {}}', "", [("f", "{}")]),  # the call drops the whitespace
        ("llama3_json", "\n\nNo call", "\n\nNo call", []),
        ("mistral", 'Ok [TOOL_CALLS] [{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {}}]', "Ok ",
         [("f", '{"a": 1}'), ("g", "{}")]),
        ("mistral", '[TOOL_CALLS]f[ARGS]{"a": 1}[TOOL_CALLS]g[ARGS]{}', "", [("f", '{"a": 1}'), ("g", "{}")]),
        # a JSON answer that names something is no call without arguments (as vLLM's parsers)
        ("llama3_json", '{"name": "Alice", "age": 30}', '{"name": "Alice", "age": 30}', []),
        ("hermes", '<tool_call>\n{"name": "", "arguments": {}}\n</tool_call>', '<tool_call>\n{"name": "", '
         '"arguments": {}}\n</tool_call>', []),
        # a last block left open (stop=["</tool_call>"], or the end) is a call if it parses, else all is content
        ("hermes", '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n', "", [("f", '{"a": 1}')]),
        ("hermes", '<tool_call>{"name": "f", "arguments": {}}</tool_call>\n<tool_call>\n{"name": "g", "arguments": '
         '{}}', "", [("f", "{}"), ("g", "{}")]),
        ("hermes", '<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>{"name": "g", "argu',
         '<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>{"name": "g", "argu', []),
        ("mistral", '[TOOL_CALLS]get_weather[CALL_ID]a1b2c3d4e[ARGS]{"city": "Paris"}', "",
         [("get_weather", '{"city": "Paris"}')]),
        ("qwen3_coder", "Sure.\n<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n<parameter=b>\ntwo\nlines\n"
         "</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=g>\n</function>\n</tool_call>", "Sure.\n",
         [("f", '{"a": "1", "b": "two\\nlines"}'), ("g", "{}")]),  # no tools given: every value is text
        ("qwen3_coder", "<tool_call>\n<function=f>\n<parameter=a>\nx\n</parameter>\n</function>\n", "",
         [("f", '{"a": "x"}')]),
        ("qwen3_coder", "<tool_call>\n<function=f>\nstray<parameter=a>\nx\n</parameter>\n</function>\n</tool_call>",
         "<tool_call>\n<function=f>\nstray<parameter=a>\nx\n</parameter>\n</function>\n</tool_call>", []),
        ("qwen3_coder", "<tool_call>\n<function=f>\n<parameter=a>\nx",
         "<tool_call>\n<function=f>\n<parameter=a>\nx", []),
        ("qwen3_coder", "<tool_call>\n<function=f>\n<parameter=a>\nx\n<parameter=b>\ny\n</function>\n</tool_call>", "",
         [("f", '{"a": "x", "b": "y"}')]),  # parameters left open end where the next one or the function does
        ("qwen3_coder", "<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n</function>\n<function=g>\n"
         "</function>\n</tool_call>", "", [("f", '{"a": "1"}'), ("g", "{}")]),  # two functions in one block
        ("qwen3_coder", "<tool_call>\n<function=f>\n</function>\nx<function=g>\n</function>\n</tool_call>",
         "<tool_call>\n<function=f>\n</function>\nx<function=g>\n</function>\n</tool_call>", []),
        # a marker inside an argument's string is text: arguments are read as JSON, not cut at the marker
        ("hermes", '<tool_call>\n{"name": "f", "arguments": {"s": "x </tool_call> y"}}\n</tool_call>', "",
         [("f", '{"s": "x </tool_call> y"}')]),
        ("mistral", 'Ok [TOOL_CALLS] [{"name": "f", "arguments": {"s": "[ARGS] x"}}]', "Ok ",
         [("f", '{"s": "[ARGS] x"}')]),
        ("mistral", '[TOOL_CALLS]f[ARGS]{"s": "[TOOL_CALLS] x"}', "", [("f", '{"s": "[TOOL_CALLS] x"}')]),
        # what follows a call's arguments must be the next call: anything else leaves the text as content
        ("mistral", '[TOOL_CALLS]f[ARGS]{"s": "a"} {"t": 1}', '[TOOL_CALLS]f[ARGS]{"s": "a"} {"t": 1}', []),
        ("mistral", "[TOOL_CALLS]f[ARGS][1, 2]", "[TOOL_CALLS]f[ARGS][1, 2]", []),  # arguments are an object
        ("hermes", '<tool_call>{"name": "f", "arguments": {}} x</tool_call>',
         '<tool_call>{"name": "f", "arguments": {}} x</tool_call>', []),
        # a number past a double's range would come out as Infinity, no JSON a client parses: no call
        ("hermes", '<tool_call>{"name": "f", "arguments": {"a": 1e400}}</tool_call>',
         '<tool_call>{"name": "f", "arguments": {"a": 1e400}}</tool_call>', []),
    ],
)  # fmt: skip
def test_tool_call_formats_parse_whole_and_streamed_alike(fmt, text, content, calls):
    from miniserve.server.tool_calls import PARSERS, StreamingToolParser

    got_content, got_calls = PARSERS[fmt](text)
    assert (got_content, [(c.name, c.arguments) for c in got_calls]) == (content, calls)
    for step in (1, 3, 7):  # fed the cumulative text a few characters at a time
        parser = StreamingToolParser("auto", fmt)
        streamed_content, streamed_calls = "", []
        for end in [*range(step, len(text), step), len(text)]:
            new, new_calls = parser.feed(text[:end], final=end == len(text))
            streamed_content += new
            streamed_calls += new_calls
        assert (streamed_content, [(c.name, c.arguments) for c in streamed_calls]) == (content, calls)


TOOL_TEXT_PIECES = [
    "<tool_call>", "</tool_call>", "[TOOL_CALLS]", "[ARGS]", "<|python_tag|>", "\n", " ", "; ", "text ", "é", "{", "}",
    "<function=f>", "</function>", "<parameter=a>", "</parameter>", "<parameter=", "<function=",
    "[", "]", '"', "\\", "null", '{"name": "f", "arguments": {"a": 1}}', '{"name": "g", "parameters": {}}',
    '[{"name": "f", "arguments": {"x": [1, 2]}}]', '{"name": 1}', '{"name": "f", "arguments": "{\\"b\\": 2}"}',
]  # fmt: skip


@pytest.mark.parametrize("fmt", ["hermes", "llama3_json", "mistral", "qwen3_coder"])
def test_tool_call_parsing_streamed_equals_whole_on_random_texts(fmt):
    """Texts made of markers, JSON and its fragments, cut at random points: the streamed deltas add up to what the
    whole output parses to, and every call's arguments are a JSON object's text."""
    from miniserve.server.tool_calls import PARSERS, StreamingToolParser

    rng = random.Random(fmt)
    for _ in range(2000):
        text = "".join(rng.choice(TOOL_TEXT_PIECES) for _ in range(rng.randrange(8)))
        content, calls = PARSERS[fmt](text)
        assert all(isinstance(json.loads(c.arguments), (dict, list, str, int, float, type(None))) for c in calls)
        parser, streamed, streamed_calls = StreamingToolParser("auto", fmt), "", []
        for end in [*sorted(rng.sample(range(len(text) + 1), min(3, len(text) + 1))), len(text)]:
            new, new_calls = parser.feed(text[:end], final=end == len(text))
            streamed, streamed_calls = streamed + new, streamed_calls + new_calls
        assert (streamed, streamed_calls) == (content, calls), text


def test_qwen3_coder_values_take_their_tools_types():
    """Qwen3-Coder writes every value as text; the tool's parameter schema says what it is (as vLLM's qwen3_coder
    parser reads it): numbers, booleans, objects and arrays as JSON, strings as written (a zip code stays text),
    and text that is no value of its declared type stays text."""
    from miniserve.server.tool_calls import ToolSetup, detect_format

    properties = {"city": {"type": "string"}, "zip": {"type": "string"}, "days": {"type": "integer"},
                  "ratio": {"type": "number"}, "metric": {"type": "boolean"}, "opts": {"type": "object"},
                  "tags": {"type": "array"}, "bad": {"type": "integer"}}  # fmt: skip
    parameters = {"type": "object", "properties": properties}
    tools = [{"type": "function", "function": {"name": "get", "parameters": parameters}}]
    values = {"city": "New York", "zip": "01001", "days": "3", "ratio": "0.5", "metric": "True", "opts": '{"a": [1]}',
              "tags": '["x", "y"]', "bad": "three", "undeclared": "7"}  # fmt: skip
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in values.items())
    text = f"<tool_call>\n<function=get>\n{body}</function>\n</tool_call>"
    setup = ToolSetup("auto", detect_format("{{ '<tool_call>\n<function=' }}"), None, True, tools)
    message, finish = setup.message(text, "stop", "")
    assert setup.format == "qwen3_coder" and finish == "tool_calls" and message["content"] is None
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {
        "city": "New York", "zip": "01001", "days": 3, "ratio": 0.5, "metric": True, "opts": {"a": [1]},
        "tags": ["x", "y"], "bad": "three", "undeclared": "7",
    }  # fmt: skip


def test_qwen3_coder_null_and_lists_of_types():
    """`null` is null whatever the parameter's type (as vLLM reads it); a list of types takes the first that reads
    the text; a number past a double's range stays text (JSON has no Infinity)."""
    from miniserve.server.tool_calls import parse_qwen3_coder

    properties = {"i": {"type": "integer"}, "o": {"type": "object"}, "s": {"type": "string"},
                  "n": {"type": ["integer", "null"]}, "m": {"type": ["null", "number"]}, "b": {"type": ["boolean"]},
                  "x": {"type": "number"}, "t": {"type": ["integer", "string"]}}  # fmt: skip
    tools = [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": properties}}}
    ]
    values = {"i": "null", "o": "NULL", "s": "null", "n": "5", "m": "0.5", "b": "false", "x": "1e400", "t": "a5"}
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in values.items())
    content, calls = parse_qwen3_coder(f"<tool_call>\n<function=f>\n{body}</function>\n</tool_call>", tools)
    assert content == "" and json.loads(calls[0].arguments) == {
        "i": None,
        "o": None,
        "s": None,
        "n": 5,
        "m": 0.5,
        "b": False,
        "x": "1e400",
        "t": "a5",
    }


def test_tool_call_messages_as_vllm_answers_them():
    """Echoed text stays the content of a reply of calls alone; Mistral's call ids are 9 letters and digits (its
    templates refuse others), streamed too; a required array cut right after a complete call keeps it; Mistral
    requests that may call tools keep special tokens ([TOOL_CALLS] is one)."""
    import re
    from types import SimpleNamespace

    from miniserve.server.tool_calls import ToolSetup, parse_required_output

    call = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    assert ToolSetup("auto", "hermes", None, True, []).message(call, "stop", "Calling:")[0]["content"] == "Calling:"
    assert ToolSetup("auto", "hermes", None, True, []).message(call, "stop", "")[0]["content"] is None
    mistral = ToolSetup("auto", "mistral", None, True, [])
    text = '[TOOL_CALLS] [{"name": "f", "arguments": {}}, {"name": "g", "arguments": {}}]'
    message, finish = mistral.message(text, "stop", "")
    streamed = mistral.delta(mistral.parser(), {0: 0}, SimpleNamespace(index=0, text=text, finish_reason="stop"), text)
    ids = [c["id"] for c in message["tool_calls"] + streamed["tool_calls"]]
    assert finish == "tool_calls" and len(ids) == 4 and all(re.fullmatch("[A-Za-z0-9]{9}", i) for i in ids)
    assert re.fullmatch("chatcmpl-tool-[0-9a-f]{32}", ToolSetup("auto", "hermes", None, True, []).message(
        call, "stop", "")[0]["tool_calls"][0]["id"])  # fmt: skip
    cut = '[{"name": "f", "parameters": {"a": 1}}'
    assert [(c.name, c.arguments) for c in parse_required_output(cut)[1]] == [("f", '{"a": 1}')]
    # cut inside the second call: the first is a call, the unfinished rest the content (not the first call again)
    content, calls = parse_required_output(cut + ', {"name": "g", "par')
    assert content == '{"name": "g", "par' and [c.name for c in calls] == ["f"]
    assert parse_required_output('[{"name": "g", "par') == ('[{"name": "g", "par', [])  # none complete: all of it
    assert mistral.reads_special_tokens and not ToolSetup("required", "mistral", None, True, []).reads_special_tokens
    assert not ToolSetup("auto", "hermes", None, True, []).reads_special_tokens


@pytest.mark.parametrize(("mode", "parallel"), [("required", True), ("required", False), ("named", True)])
def test_forced_tool_calls_cut_short_stream_as_they_answer_whole(mode, parallel):
    """tool_choice required / a named function, the output cut at every point (max_tokens): the streamed deltas
    add up to the whole response's message (the calls completed, the text as content or as the arguments)."""
    from types import SimpleNamespace

    from miniserve.server.tool_calls import ToolSetup

    setup = ToolSetup(mode, None, "f" if mode == "named" else None, parallel, [])
    whole = '[{"name": "f", "parameters": {"a": [1, 2]}}, {"name": "g", "parameters": {}}]'
    if mode == "named":
        whole = '{"a": [1, 2], "b": "x"}'
    for cut in range(len(whole) + 1):
        text = whole[:cut]
        message, _ = setup.message(text, "length", "")
        parser, counts, content, calls = setup.parser(), {0: 0}, "", {}
        for end in range(cut + 1):
            o = SimpleNamespace(index=0, text=text[:end], finish_reason="length" if end == cut else None)
            delta = setup.delta(parser, counts, o, text[end - 1 : end] if end else "")
            content += delta.get("content", "")
            for call in delta.get("tool_calls", []):
                got = calls.setdefault(call["index"], {"name": "", "arguments": ""})
                got["name"] += call["function"].get("name", "")
                got["arguments"] += call["function"].get("arguments", "")
        want = [c["function"] for c in message.get("tool_calls", [])]
        assert [calls[i] for i in sorted(calls)] == want, text
        assert content == (message["content"] or ""), text


def test_a_named_calls_header_comes_with_its_first_arguments_or_the_end():
    """Streamed with tool_choice naming a function, the call's header (id, name) goes out with the first text of
    its arguments, not before: a reasoning model's delta for a step of reasoning has no content, and sent then the
    header led the reasoning. A choice that ends without any text still gets its call, as the whole message does."""
    from types import SimpleNamespace

    from miniserve.server.tool_calls import ToolSetup

    named = ToolSetup("named", "hermes", "f", True, [])
    calls = {0: 0}
    step = SimpleNamespace(index=0, text="", finish_reason=None)
    assert named.delta(None, calls, step, "") == {} and calls[0] == 0
    first = named.delta(None, calls, step, '{"a"')["tool_calls"][0]
    assert (first["function"], first["type"], calls[0]) == ({"name": "f", "arguments": '{"a"'}, "function", 1)
    assert named.delta(None, calls, step, ": 1}") == {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}
    calls = {0: 0}
    ended = named.delta(None, calls, SimpleNamespace(index=0, text="", finish_reason="length"), "")
    assert ended["tool_calls"][0]["function"] == {"name": "f", "arguments": ""}
    assert named.message("", "length", "")[0]["tool_calls"][0]["function"] == {"name": "f", "arguments": ""}


# ---------------------------------------------------------------------------------------------- metrics


def test_vllm_request_metrics_and_cache_config(url, client, hf_tok):
    from tests.test_server import metric, scrape

    prompt = "Now is the winter of our discontent"
    num_prompt = len(hf_tok(prompt).input_ids)
    before = scrape(url)
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})  # fmt: skip
    cached = r.usage.prompt_tokens_details.cached_tokens  # an earlier test's prompt may share its start
    after = scrape(url)
    delta = lambda name: metric(after, name) - metric(before, name)  # noqa: E731
    assert delta("request_prompt_tokens_count") == 1 and delta("request_prompt_tokens_sum") == num_prompt
    assert delta("request_generation_tokens_sum") == 5
    # one engine step computes the prompt (what the prefix cache did not hold), four more each feed one sampled token
    # (the fifth is never fed)
    assert delta("iteration_tokens_total_sum") == num_prompt - cached + 4
    assert delta("iteration_tokens_total_count") == 5
    for phase in ("queue", "prefill", "decode", "inference"):
        assert delta(f"request_{phase}_time_seconds_count") == 1
    parts = delta("request_prefill_time_seconds_sum") + delta("request_decode_time_seconds_sum")
    assert delta("request_inference_time_seconds_sum") == pytest.approx(parts, abs=1e-6)
    assert delta("request_decode_time_seconds_sum") > 0
    # vLLM's time per output token: the decode time over the tokens after the first
    assert delta("request_time_per_output_token_seconds_count") == 1
    tpot = delta("request_decode_time_seconds_sum") / 4
    assert delta("request_time_per_output_token_seconds_sum") == pytest.approx(tpot, abs=1e-6)
    assert delta("request_params_n_sum") == 1 and delta("request_params_max_tokens_sum") == 5
    assert delta("request_max_num_generation_tokens_sum") == 5
    info = [(labels, v) for (name, labels), v in after.items() if name == "miniserve:cache_config_info"]
    assert len(info) == 1 and info[0][1] == 1.0
    assert dict(info[0][0])["block_size"] == "16" and int(dict(info[0][0])["num_gpu_blocks"]) > 0


@pytest.mark.parametrize("stream", [False, True])
def test_n_choices_are_timed_and_counted_as_vllms_n_child_requests(url, client, hf_tok, stream):
    """vLLM runs a request of n choices as n child requests: each counts a finish reason, an end-to-end latency,
    a TTFT, its inter-token latencies, its prompt and generated tokens, max_tokens and its phases; the request's n
    and its longest choice count once. Counts from what the test asked; latencies within the time it measured."""
    from tests.test_server import metric, scrape

    prompt, n, max_tokens = "Good morrow, cousin", 3, 4
    num_prompt = len(hf_tok(prompt).input_ids)
    before = scrape(url)
    started = time.monotonic()
    body = dict(model=MODEL_NAME, prompt=prompt, n=n, max_tokens=max_tokens, temperature=1.0, seed=7,
                extra_body={"ignore_eos": True})  # fmt: skip
    if stream:
        assert sum(1 for _ in client.completions.create(**body, stream=True)) > 0
    else:
        assert len(client.completions.create(**body).choices) == n
    wall = time.monotonic() - started
    after = scrape(url)
    delta = lambda name, **labels: metric(after, name, **labels) - metric(before, name, **labels)  # noqa: E731
    assert delta("request_success_total", finished_reason="length") == n
    for name in ("e2e_request_latency_seconds", "time_to_first_token_seconds"):
        assert delta(f"{name}_count") == n
        assert 0 < delta(f"{name}_sum") <= n * wall
    assert delta("inter_token_latency_seconds_count") == n * (max_tokens - 1)
    assert 0 < delta("inter_token_latency_seconds_sum") <= n * wall
    assert delta("request_prompt_tokens_count") == n and delta("request_prompt_tokens_sum") == n * num_prompt
    assert delta("prompt_tokens_total") == n * num_prompt  # each child request's prompt, cached or computed
    assert delta("request_generation_tokens_count") == n and delta("request_generation_tokens_sum") == n * max_tokens
    assert delta("request_params_max_tokens_count") == n
    for phase in ("queue", "prefill", "decode", "inference"):
        assert delta(f"request_{phase}_time_seconds_count") == n
        assert delta(f"request_{phase}_time_seconds_sum") <= n * wall
    assert delta("request_time_per_output_token_seconds_count") == n
    assert delta("request_params_n_count") == 1 and delta("request_params_n_sum") == n
    assert delta("request_max_num_generation_tokens_count") == 1
    assert delta("request_max_num_generation_tokens_sum") == max_tokens


def test_tokenize_renders_messages_like_chat(url):
    messages = [{"role": "user", "content": "Speak."}, {"role": "assistant", "content": "Once upon"}]
    chat = post(url, "/v1/chat/completions", {"model": MODEL_NAME, "messages": messages, "max_tokens": 1,
                                             "add_generation_prompt": False, "continue_final_message": True,
                                             "tools": TOOLS, "chat_template_kwargs": {"mood": "calm"},
                                             "return_token_ids": True}).json()  # fmt: skip
    tok = post(url, "/tokenize", {"messages": messages, "add_generation_prompt": False,
                                  "continue_final_message": True, "tools": TOOLS,
                                  "chat_template_kwargs": {"mood": "calm"}}).json()  # fmt: skip
    assert tok["tokens"] == chat["prompt_token_ids"]
    text = post(url, "/detokenize", {"tokens": tok["tokens"]}).json()["prompt"]
    assert "get_weather" in text and "(calm)" in text and text.endswith("Once upon")
    for body in ({"prompt": "x", "messages": messages}, {}):  # both, or neither
        assert_openai_error(post(url, "/tokenize", body), 400, "prompt")


def test_a_stream_read_line_by_line_keeps_every_event_whole(url):
    """JSON leaves U+0085, U+2028 and U+2029 unescaped, and httpx's iter_lines (str.splitlines) ends a line at each:
    the server escapes them in its events, so such text (here echoed) reaches a line reader in whole events."""
    prompt = "one\u2028two\u2029three\x85four"
    body = {"model": MODEL_NAME, "prompt": prompt, "echo": True, "stream": True, "max_tokens": 2}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as resp:
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: {") for line in lines[:-1]), lines
    events = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    assert "".join(c["text"] for e in events for c in e["choices"]).startswith(prompt)
