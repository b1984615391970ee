"""Reasoning outputs (server setting `reasoning_parser`, vLLM's --reasoning-parser): a thinking model's chat output
split into `reasoning` and `content`, whole and streamed alike, tool calls parsed from the content, a grammar
started after the reasoning, and nothing changed without the setting.

The model is a tiny Llama built to follow chains of tokens: its layers add nothing to the residual stream, so each
position's logits depend on its own token alone, and the head maps every token to its successor. The prompt's last
token (the generation prompt, chosen through chat_template_kwargs) picks the chain greedy decoding then writes:
`<think>` and `</think>` as single tokens (as Qwen3's and DeepSeek-R1's vocabularies have them), or split over
several tokens, so several streamed deltas. The parser itself is checked on text cut at every place.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from miniserve.sampling_params import StructuredOutputsParams
from miniserve.server.protocol import APIError, ChatCompletionRequest
from miniserve.server.reasoning import ReasoningSetup, StreamingReasoningSplitter, reasoning_setup, split_reasoning
from tests.conftest import hf_config
from tests.test_server import assert_openai_error, uvicorn_server

MODEL_NAME = "tiny-thinker"
CALL = '{"name": "f", "arguments": {}}'
# each token's successor under greedy decoding; tokens not listed end the output (</s>)
CHAINS = {
    "A:": "<think>", "<think>": " hmm", " hmm": "</think>", "</think>": " yes",  # one-token markers
    "B:": "<thi", "<thi": "nk>", "nk>": " ponder", " ponder": "</", "</": "think", "think": ">",  # split markers,
    ">": "<tool_call>", "<tool_call>": CALL, CALL: "</tool_call>",  # then a tool call
}  # fmt: skip
VOCAB = ["<unk>", "<s>", "</s>", "U", "Speak.", " no", "</tool_call>", *dict.fromkeys([*CHAINS, *CHAINS.values()])]
# the generation prompt is `start` (default "A:"); thinking switched off closes the reasoning in the prompt, as
# Qwen3's template does; the comment shows the model's tool-call format (hermes) to the server
TEMPLATE = (
    "{# <tool_call> #}{{ bos_token }}{% for m in messages %}U {{ m.content }} {% endfor %}"
    "{% if add_generation_prompt %}{{ start | default('A:') }}"
    "{% if enable_thinking is defined and not enable_thinking %} <think> </think>{% endif %}{% endif %}"
)
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]


def build_thinker(out: Path) -> Path:
    """The chain-following Llama and its word-level tokenizer (tokens decode to themselves, joined as they are)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    ids = {t: i for i, t in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(ids, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.Fuse()
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "chat_template": TEMPLATE, "model_max_length": 256,
    }  # fmt: skip
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    model = transformers.LlamaForCausalLM(
        hf_config("LlamaForCausalLM", vocab_size=len(VOCAB), bos_token_id=1, eos_token_id=2)
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0 if "norm" in name else 0.0)  # o_proj and down_proj zero: the layers add nothing
        model.model.embed_tokens.weight[:, : len(VOCAB)].copy_(torch.eye(len(VOCAB)))
        for token, i in ids.items():
            model.lm_head.weight[ids[CHAINS.get(token, "</s>")], i] = 1.0
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_thinker(tmp_path_factory.mktemp("thinker"))


@pytest.fixture(scope="module")
def url(model_dir, tmp_path_factory) -> Iterator[str]:
    with open(tmp_path_factory.mktemp("thinker-log") / "server.log", "w+b") as log:
        env = {"MINISERVE_SERVED_MODEL_NAME": MODEL_NAME, "MINISERVE_REASONING_PARSER": "qwen3"}
        with uvicorn_server(model_dir, log, **env) as (base, _):
            yield base


def chat(url: str, start: str = "A:", **fields) -> httpx.Response:
    body = {
        "model": MODEL_NAME, "messages": [{"role": "user", "content": "Speak."}], "max_tokens": 16,
        "temperature": 0, "chat_template_kwargs": {"start": start, **fields.pop("template_kwargs", {})}, **fields,
    }  # fmt: skip
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


def stream_events(url: str, start: str = "A:", **fields) -> list[dict]:
    lines = chat(url, start, stream=True, **fields).text.splitlines()
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


def streamed(url: str, start: str = "A:", **fields) -> tuple[list[dict], str | None]:
    """Every delta of a streamed chat (the role's first), and the finish reason."""
    events = stream_events(url, start, **fields)
    return [e["choices"][0]["delta"] for e in events], events[-1]["choices"][0]["finish_reason"]


def joined(deltas: list[dict], key: str) -> str | None:
    pieces = [d[key] for d in deltas if d.get(key)]
    return "".join(pieces) if pieces else None


def message(resp: httpx.Response) -> dict:
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["message"]


# ---------------------------------------------------------------------------------------------- the parser


@pytest.mark.parametrize(
    "text, thinking, reasoning, content",
    [
        ("<think>\nhmm\n</think>\n\nyes", True, "\nhmm\n", "\n\nyes"),  # Qwen3's older templates: the model opens it
        ("hmm</think>yes", True, "hmm", "yes"),  # DeepSeek-R1: the prompt opened it
        ("hmm, still thinking", True, "hmm, still thinking", ""),  # cut short: all reasoning
        ("<think></think>yes", True, None, "yes"),
        ("hmm</think>", True, "hmm", ""),
        ("a</think>b</think>c", True, "a", "b</think>c"),  # the first end counts
        (" <think>x</think>y", True, " <think>x", "y"),  # an opening tag only at the very start
        ("<think>x</think>y", False, None, "<think>x</think>y"),  # thinking off: all content
    ],
)
def test_split_reasoning_of_whole_outputs(text, thinking, reasoning, content):
    assert split_reasoning(text, thinking) == (reasoning, content)


@pytest.mark.parametrize(
    "text", ["<think>\nhmm\n</think>\n\nyes", "hmm</think>yes", "<think>a</thin", "</think>", "<thi", "a<</think>>"]
)
def test_streamed_pieces_cut_anywhere_add_up_to_the_whole_split_and_never_show_a_marker(text):
    reasoning, content = split_reasoning(text)
    for cuts in [range(1, len(text)), *([c] for c in range(1, len(text)))]:  # one character a delta, or two deltas
        splitter, got_r, got_c = StreamingReasoningSplitter(True), "", ""
        for end in [*cuts, len(text)]:
            r, c = splitter.feed(text[:end], final=end == len(text))
            got_r, got_c = got_r + r, got_c + c
            assert (reasoning or "").startswith(got_r) and content.startswith(got_c), (text, end)
        assert (got_r, got_c) == (reasoning or "", content)


def test_which_requests_think():
    class Tok:
        def __init__(self, prompt: str):
            self.prompt = prompt

        def decode(self, ids, skip_special_tokens=False):
            return self.prompt

        def token_to_id(self, token):
            return 7

    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}])
    off = ChatCompletionRequest(
        model="m", messages=[{"role": "user", "content": "x"}], chat_template_kwargs={"enable_thinking": False}
    )
    assert reasoning_setup(req, None, Tok("<think>\n"), [1]) is None
    assert reasoning_setup(req, "deepseek_r1", Tok("<think>\n"), [1]).thinking
    assert not reasoning_setup(req, "qwen3", Tok("<think>\n\n</think>\n\n"), [1]).thinking  # the template closed it
    assert not reasoning_setup(off, "qwen3", Tok("assistant\n"), [1]).thinking
    assert reasoning_setup(off, "deepseek_r1", Tok("assistant\n"), [1]).thinking  # (qwen3's switch only)
    # a template that opens the reasoning whatever the switch says (Qwen3 *-Thinking-2507): the model is in it
    assert reasoning_setup(off, "qwen3", Tok("assistant\n<think>\n"), [1]).thinking
    # continue_final_message: the final message's last marker decides, else what the template put before it
    for final, prompt, thinking in [
        ("Sure,", "assistant\n<think>\n\n</think>\n\nSure,", False),  # an answer continued after the reasoning
        ("Sure,", "assistant\n<think>\nSure,", True),
        ("<think>\nfirst,", "assistant\n<think>\nfirst,", True),
        ("<think>\nplan\n</think>\n\nSure,", "assistant\n<think>\nplan\n</think>\n\nSure,", False),
        ("Sure, </think> is a tag", "user\n<think>\nassistant\nSure, </think> is a tag", False),
    ]:
        messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": final}]
        cont = ChatCompletionRequest(
            model="m", messages=messages, continue_final_message=True, add_generation_prompt=False
        )
        for parser in ("qwen3", "deepseek_r1"):
            assert reasoning_setup(cont, parser, Tok(prompt), [1]).thinking is thinking, (final, parser)


def test_a_grammar_waits_for_the_end_token_or_is_refused_where_there_is_none():
    spec = StructuredOutputsParams(choice=["a"])
    assert ReasoningSetup(True, True, 7).defer(spec, "structured_outputs").start_after_token == 7
    assert ReasoningSetup(False, True, 7).defer(spec, "structured_outputs") is spec  # no reasoning: from the start
    with pytest.raises(APIError) as refused:
        ReasoningSetup(True, True, None).defer(spec, "response_format")
    assert refused.value.param == "response_format"


# ---------------------------------------------------------------------------------------------- the server


@pytest.mark.parametrize(
    "start, reasoning, content",
    [
        ("A:", " hmm", " yes"),  # the model writes <think> itself
        ("A: <think>", " hmm", " yes"),  # the prompt opened the reasoning: no opening tag in the output
        ("B:", " ponder", "<tool_call>" + CALL + "</tool_call>"),  # markers over several tokens and deltas
    ],
)
def test_whole_and_streamed_responses_split_alike(url, start, reasoning, content):
    assert message(chat(url, start)) == {"role": "assistant", "content": content, "reasoning": reasoning}
    deltas, finish = streamed(url, start)
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert (joined(deltas, "reasoning"), joined(deltas, "content")) == (reasoning, content)
    assert finish == "stop"


def test_split_markers_are_several_tokens_of_the_stream(url):
    """(How the engine's steps group into deltas depends on timing: the cuts themselves are the test above's.)"""
    choices = [e["choices"][0] for e in stream_events(url, "B:", logprobs=True)]
    tokens = [t["token"] for c in choices for t in (c["logprobs"] or {}).get("content", [])]
    assert tokens[:6] == ["<thi", "nk>", " ponder", "</", "think", ">"]
    deltas = [c["delta"] for c in choices]
    assert (joined(deltas, "reasoning"), joined(deltas, "content")) == (
        " ponder",
        "<tool_call>" + CALL + "</tool_call>",
    )


def test_thinking_switched_off_is_all_content(url):
    off = message(chat(url, template_kwargs={"enable_thinking": False}))
    assert off == {"role": "assistant", "content": " yes", "reasoning": None}
    deltas, _ = streamed(url, template_kwargs={"enable_thinking": False})
    assert (joined(deltas, "reasoning"), joined(deltas, "content")) == (None, " yes")


def test_include_reasoning_false_leaves_the_reasoning_out(url):
    assert message(chat(url, include_reasoning=False)) == {"role": "assistant", "content": " yes", "reasoning": None}
    deltas, _ = streamed(url, include_reasoning=False)
    assert (joined(deltas, "reasoning"), joined(deltas, "content")) == (None, " yes")
    assert_openai_error(chat(url, include_reasoning=False, logprobs=True), 400, "logprobs")
    assert_openai_error(chat(url, reasoning_effort="low"), 400, "reasoning_effort")


def test_tool_calls_are_parsed_from_the_content_after_the_reasoning(url):
    resp = chat(url, "B:", tools=TOOLS, tool_choice="auto")
    assert resp.json()["choices"][0]["finish_reason"] == "tool_calls"
    msg = message(resp)
    assert (msg["reasoning"], msg["content"]) == (" ponder", None)
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in msg["tool_calls"]] == [("f", "{}")]
    deltas, finish = streamed(url, "B:", tools=TOOLS, tool_choice="auto")
    calls = [c["function"] for d in deltas for c in d.get("tool_calls", [])]
    assert (joined(deltas, "reasoning"), joined(deltas, "content"), finish) == (" ponder", None, "tool_calls")
    assert calls == [{"name": "f", "arguments": "{}"}]


def test_a_grammar_starts_after_the_reasoning(url):
    pytest.importorskip("xgrammar")
    only_no = {"structured_outputs": {"choice": [" no"]}}
    assert message(chat(url, **only_no)) == {"role": "assistant", "content": " no", "reasoning": " hmm"}
    deltas, _ = streamed(url, **only_no)
    assert (joined(deltas, "reasoning"), joined(deltas, "content")) == (" hmm", " no")
    off = message(chat(url, template_kwargs={"enable_thinking": False}, **only_no))  # no reasoning: from the start
    assert off == {"role": "assistant", "content": " no", "reasoning": None}


@pytest.mark.parametrize(
    ("start", "tool_choice", "kinds", "reasoning_tokens"),
    [
        ("A:", "none", ["reasoning", "message"], 1),  # " hmm" between the one-token markers
        ("B:", "auto", ["reasoning", "function_call"], 1),  # " ponder": markers in pieces, the text encoded
    ],
)
def test_responses_return_the_reasoning_as_an_item_whole_and_streamed(url, start, tool_choice, kinds, reasoning_tokens):
    """/v1/responses (server/responses_api.py) on the chat path: chat's split, as output items and their events."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=60, max_retries=0)
    tools = [{"type": "function", **t["function"]} for t in TOOLS]
    kwargs = dict(model=MODEL_NAME, input="Speak.", max_output_tokens=16, temperature=0, tools=tools,
                  tool_choice=tool_choice, extra_body={"chat_template_kwargs": {"start": start}})  # fmt: skip
    want = message(chat(url, start, tools=TOOLS, tool_choice=tool_choice))
    r = client.responses.create(**kwargs)
    assert [item.type for item in r.output] == kinds and r.output[0].content[0].text == want["reasoning"]
    if want["content"]:
        assert r.output_text == want["content"]
    calls = [(c.name, c.arguments) for c in r.output if c.type == "function_call"]
    assert calls == [(c["function"]["name"], c["function"]["arguments"]) for c in want.get("tool_calls", [])]
    assert r.usage.output_tokens_details.reasoning_tokens == reasoning_tokens
    events = list(client.responses.create(stream=True, **kwargs))
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == want["reasoning"]
    final = events[-1].response
    ids = {"id", "call_id"}
    assert [i.model_dump(exclude=ids) for i in final.output] == [i.model_dump(exclude=ids) for i in r.output]
    assert final.usage.output_tokens_details.reasoning_tokens == reasoning_tokens
    # effort "none" switches thinking off in the template (vLLM's enable_thinking), so the output is all content
    off = client.responses.create(**{**kwargs, "tool_choice": "none", "reasoning": {"effort": "none"}})
    assert [item.type for item in off.output] == ["message"]


def test_without_the_setting_the_output_is_content_as_before(model_dir, tmp_path):
    with open(tmp_path / "server.log", "w+b") as log:
        with uvicorn_server(model_dir, log, MINISERVE_SERVED_MODEL_NAME=MODEL_NAME) as (base, _):
            # (`reasoning` null, as vLLM's messages have it without a parser)
            assert message(chat(base)) == {"role": "assistant", "content": "<think> hmm</think> yes", "reasoning": None}
            deltas, _ = streamed(base)
            assert all(set(d) <= {"role", "content"} for d in deltas)
            assert joined(deltas, "content") == "<think> hmm</think> yes"
            assert_openai_error(chat(base, include_reasoning=False), 400, "include_reasoning")
