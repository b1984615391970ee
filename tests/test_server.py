"""The OpenAI-compatible server end to end: a real `uvicorn server:app` process on a tiny random Llama,
driven with the official openai client (raw httpx where the wire format itself is under test), checked
against transformers (greedy text, logprobs, token counts) and against itself (stream == non-stream,
batched == alone).

The helpers at the top are shared with tests/test_server_limits.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import build_model_dir, hf_greedy

REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 90
MAX_MODEL_LEN = 1024
MODEL_NAME = "tiny-llama"
PROMPTS = ["ROMEO:", "To be, or not to be", "My lord, the king", "What light through yonder window breaks?"]

# ---------------------------------------------------------------------------------------------- helpers


def patch_on_import(module: str, patch: str, when: str = "True") -> str:
    """Source of a sitecustomize.py that, in the processes where the expression `when` holds, runs the function
    `patch(module)` defined by the code `patch` on `module` as soon as it is imported (a server whose parts a test
    slows down or holds, started as users start it)."""
    return f"""
import importlib.machinery, sys
{patch}

class _PatchOnImport(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != {module!r}:
            return None
        spec = super().find_spec(name, path, target)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec

if {when}:
    sys.meta_path.insert(0, _PatchOnImport)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def run_server(model_dir: Path, uvicorn_args: tuple[str, ...] = (), **env: str) -> Iterator[str]:
    """Start `python -m uvicorn server:app` on a free local port; yield its base URL; always stop it."""
    with tempfile.TemporaryFile() as log, uvicorn_server(model_dir, log, uvicorn_args, **env) as (url, _):
        yield url


@contextmanager
def uvicorn_server(
    model_dir: Path, log: BinaryIO, uvicorn_args: tuple[str, ...] = (), log_level: str = "warning", **env: str
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python -m uvicorn server:app` on the CPU on a free local port, its output into `log` (a file open for
    reading and writing); yields (base URL, process) once /health answers, and always stops it."""
    port = free_port()
    full_env = {
        **os.environ,
        "MINISERVE_MODEL": str(model_dir),
        "MINISERVE_DEVICE": "cpu",
        "MINISERVE_DTYPE": "float32",
    }
    cmd = [sys.executable, "-m", "uvicorn", "server:app", "--host", "127.0.0.1", "--port", str(port), *uvicorn_args]
    # in its own process group, which a test may signal whole (as a service manager's stop does)
    proc = subprocess.Popen(
        cmd + ["--log-level", log_level], cwd=REPO, env={**full_env, **env}, stdout=log, stderr=log,
        start_new_session=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, proc, log)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def _wait_healthy(url: str, proc: subprocess.Popen, log) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read().decode(errors='replace')}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server did not become healthy within {STARTUP_TIMEOUT_S}s")


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """All /metrics samples as {(name, labels except model_name and engine): value}. Every series of the server's
    own carries vLLM's engine label (one engine: "0")."""
    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            assert not s.name.startswith("miniserve:") or s.labels.get("engine") == "0", s
            labels = frozenset((k, v) for k, v in s.labels.items() if k not in ("model_name", "engine"))
            out[(s.name, labels)] = s.value
    return out


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples.get(("miniserve:" + name, frozenset(labels.items())), 0.0)


def wait_for_metric(url: str, name: str, predicate, timeout: float) -> dict:
    """Poll /metrics until predicate(value of `name`) holds; returns the last scrape either way."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        if predicate(metric(samples, name)) or time.monotonic() > deadline:
            return samples
        time.sleep(0.02)


def assert_openai_error(resp: httpx.Response, status: int, param: str | None = "any") -> dict:
    """`resp` has `status` and OpenAI's error body; returns the error object."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param != "any":
        assert err["param"] == param, err
    return err


def hf_logprobs(model, prompt_ids: list[int], new_ids: list[int]) -> torch.Tensor:
    """log_softmax of the rows that predicted each of `new_ids`: [len(new_ids), vocab]."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + new_ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)[len(prompt_ids) - 1 : -1]


def chat_ids(hf_tokenizer, messages: list[dict]) -> list[int]:
    out = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def build_server_model(out: Path, tokenizer_dir: Path, max_model_len: int = MAX_MODEL_LEN) -> Path:
    """The tiny Llama of conftest with a 1024-token context (room for a long request to abort)."""
    return build_model_dir(out, "LlamaForCausalLM", tokenizer_dir, seed=7, max_position_embeddings=max_model_len)


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return build_server_model(tmp_path_factory.mktemp("server-model"), tokenizer_dir)


@pytest.fixture(scope="module")
def url(model_dir) -> Iterator[str]:
    # as the README starts it: with the server's HTTP protocol, which writes streams from the engine's steps
    env = {"MINISERVE_SERVED_MODEL_NAME": MODEL_NAME, "MINISERVE_MAX_BODY_BYTES": str(64 * 1024)}
    with run_server(model_dir, uvicorn_args=("--http", "server:http"), **env) as base:
        yield base


def greedy(client: openai.OpenAI, prompt, max_tokens: int = 8) -> str:
    r = client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True}
    )
    return r.choices[0].text


# ---------------------------------------------------------------------------------------------- tests


def test_sagemaker_invocations_answer_as_the_route_the_body_is_for(url, client):
    """POST /invocations (SageMaker's, as vLLM's): a body with messages is a chat completion, one with prompt a
    completion, each answered as its own route answers it (greedy: the same text; streams too); a body with both, or
    neither, is a 400, and the body limit holds."""
    chat = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    text = {"prompt": "Now is the winter", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    r = httpx.post(url + "/invocations", json=chat).json()
    assert r["object"] == "chat.completion"
    plain = httpx.post(url + "/v1/chat/completions", json=chat).json()
    assert r["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    r = httpx.post(url + "/invocations", json=text).json()
    assert r["object"] == "text_completion" and r["choices"][0]["text"] == greedy(client, text["prompt"], 6)
    r = httpx.post(url + "/invocations", json={**chat, "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream"), r.text
    assert r.text.rstrip().endswith("data: [DONE]")
    assert "chat.completion.chunk" in r.text
    r = httpx.post(url + "/invocations", json={**text, "max_tokens": -1})
    assert_openai_error(r, 400, param="max_tokens")  # the completions route's own check
    for body in ({"input": "Hi"}, ["Hi"]):
        assert_openai_error(httpx.post(url + "/invocations", json=body), 400, param="messages")
    for both in ({**chat, "prompt": text["prompt"]}, {**text, "messages": chat["messages"]}):  # neither is dropped
        err = assert_openai_error(httpx.post(url + "/invocations", json=both), 400, param="prompt")
        assert "not both" in err["message"], err
    r = httpx.post(url + "/invocations", content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 400
    big = {"prompt": "x" * (64 * 1024), "max_tokens": 1}
    assert httpx.post(url + "/invocations", json=big).status_code == 413


def test_beam_search_takes_what_asks_for_nothing_and_any_finite_length_penalty(url):
    """use_beam_search: a field the search does not honour, set to a value that asks for nothing (top_k -1 or 0,
    chat's tool_choice none, ...), answers as without it, while other values are still refused by name; any finite
    length_penalty answers, however far the power of the length is past the floats; NaN and infinities are 400s."""
    beam = {"prompt": "Hello", "max_tokens": 2, "use_beam_search": True, "n": 2, "ignore_eos": True}
    plain = httpx.post(url + "/v1/completions", json=beam).json()["choices"]
    neutral = {"top_k": [-1, 0], "top_p": [1.0], "min_p": [0.0], "repetition_penalty": [1.0], "best_of": [2],
               "stop": [[]], "stop_token_ids": [[]], "bad_words": [[]], "logit_bias": [{}]}  # fmt: skip
    asking = {"top_k": [5, 1], "top_p": [0.9], "min_p": [0.1], "repetition_penalty": [1.1], "best_of": [3],
              "stop": [["x"]], "stop_token_ids": [[7]], "bad_words": [["the"]], "logit_bias": [{"5": 1}]}  # fmt: skip
    for field, values in neutral.items():
        for value in values:
            r = httpx.post(url + "/v1/completions", json={**beam, field: value})
            assert r.status_code == 200 and r.json()["choices"] == plain, (field, value, r.text)
    for field, values in asking.items():
        for value in values:
            err = assert_openai_error(httpx.post(url + "/v1/completions", json={**beam, field: value}), 400, field)
            assert "use_beam_search" in err["message"], err
    chat = {**beam, "messages": [{"role": "user", "content": "Hello"}]}
    del chat["prompt"]
    want = httpx.post(url + "/v1/chat/completions", json=chat).json()["choices"]
    r = httpx.post(url + "/v1/chat/completions", json={**chat, "tool_choice": "none"})
    assert r.status_code == 200 and r.json()["choices"] == want, r.text
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    for extra, field in (({"tools": tools, "tool_choice": "none"}, "tools"), ({"tools": tools}, "tools"),
                         ({"tools": tools, "tool_choice": "auto"}, "tool_choice")):  # fmt: skip
        assert_openai_error(httpx.post(url + "/v1/chat/completions", json={**chat, **extra}), 400, field)
    for penalty in (1000, -1000, 1e308, -1e308, 2.0**-1074):
        r = httpx.post(url + "/v1/completions", json={**beam, "length_penalty": penalty})
        assert r.status_code == 200, (penalty, r.text)
        answer = r.json()
        assert [c["finish_reason"] for c in answer["choices"]] == ["length"] * 2, answer
        assert answer["usage"]["completion_tokens"] == 4, answer
    for text in ("NaN", "Infinity", "-Infinity", "1e999"):
        body = json.dumps(beam)[:-1] + f', "length_penalty": {text}}}'
        r = httpx.post(url + "/v1/completions", content=body, headers={"content-type": "application/json"})
        assert_openai_error(r, 400, "length_penalty")


def test_models_health_tokenize_detokenize(url, client, hf_tok):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_NAME]
    assert models[0].model_extra["max_model_len"] == MAX_MODEL_LEN
    card = client.models.retrieve(MODEL_NAME)
    assert (card.id, card.model_extra["max_model_len"]) == (MODEL_NAME, MAX_MODEL_LEN)
    # vLLM's card fields: no parent (a base model), one permission entry allowing sampling and logprobs
    (permission,) = card.model_extra["permission"]
    assert card.model_extra["parent"] is None and card.model_extra["root"] == MODEL_NAME
    assert permission["object"] == "model_permission" and permission["id"].startswith("modelperm-")
    assert permission["allow_sampling"] and permission["allow_logprobs"] and not permission["allow_fine_tuning"]
    with pytest.raises(openai.NotFoundError) as exc:
        client.models.retrieve(MODEL_NAME + "-other")
    assert exc.value.body["code"] == "model_not_found"
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    assert httpx.get(url + "/ping").json() == httpx.post(url + "/ping").json() == {"status": "ok"}
    prompt = "Now is the winter of our discontent"
    r = httpx.post(url + "/tokenize", json={"prompt": prompt}).json()
    assert r == {
        "tokens": hf_tok(prompt).input_ids,
        "count": len(hf_tok(prompt).input_ids),
        "max_model_len": 1024,
    }
    messages = [{"role": "system", "content": "Speak verse."}, {"role": "user", "content": "Hello"}]
    r = httpx.post(url + "/tokenize", json={"messages": messages}).json()
    assert r["tokens"] == chat_ids(hf_tok, messages) and r["count"] == len(r["tokens"])
    # special tokens are text too, as vLLM's /detokenize (tokenizer.decode) gives them
    for ids in (hf_tok(prompt).input_ids, chat_ids(hf_tok, messages)):
        r = httpx.post(url + "/detokenize", json={"tokens": ids}).json()
        assert r == {"prompt": hf_tok.decode(ids)} and r["prompt"] != hf_tok.decode(ids, skip_special_tokens=True)


def test_completion_greedy_text_logprobs_and_usage_match_transformers(client, hf_model, hf_tok):
    for prompt in PROMPTS[:2]:
        ids = hf_tok(prompt).input_ids
        expected_ids = hf_greedy(hf_model, ids, 10)
        r = client.completions.create(
            model=MODEL_NAME,
            prompt=prompt,
            max_tokens=10,
            temperature=0,
            logprobs=3,
            extra_body={"ignore_eos": True},
        )
        choice = r.choices[0]
        assert choice.text == hf_tok.decode(expected_ids, skip_special_tokens=True)
        assert choice.finish_reason == "length"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
            len(ids),
            10,
            len(ids) + 10,
        )
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 10
        assert "".join(lp.tokens) == choice.text
        assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(10)]
        ref = hf_logprobs(hf_model, ids, expected_ids)
        for i, tid in enumerate(expected_ids):
            assert lp.token_logprobs[i] == pytest.approx(ref[i, tid].item(), abs=1e-3)
            # {token text: logprob} of the 3 best (texts of partial UTF-8 byte tokens may collide on "\ufffd")
            top, best3 = lp.top_logprobs[i], ref[i].topk(3).values.tolist()
            assert 1 <= len(top) <= 3 and max(top.values()) == pytest.approx(lp.token_logprobs[i], abs=1e-6)
            assert all(any(v == pytest.approx(b, abs=1e-3) for b in best3) for v in top.values())


def test_multiple_prompts_times_n_get_openai_indexes(client, hf_tok):
    token_prompt = hf_tok(PROMPTS[2]).input_ids
    prompts = [PROMPTS[0], PROMPTS[1]]
    alone = [greedy(client, p) for p in prompts] + [greedy(client, token_prompt)]
    r = client.completions.create(
        model=MODEL_NAME, prompt=prompts, n=2, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [alone[0], alone[0], alone[1], alone[1]]
    prompt_lens = sum(len(hf_tok(p).input_ids) for p in prompts)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt_lens, 4 * 8)
    r = client.completions.create(
        model=MODEL_NAME, prompt=[token_prompt], max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].text == alone[2] and r.usage.prompt_tokens == len(token_prompt)
    r = client.completions.create(
        model=MODEL_NAME,
        prompt=PROMPTS[0],
        max_tokens=8,
        temperature=0,
        echo=True,
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].text == PROMPTS[0] + alone[0]


def test_echo_with_logprobs_scores_the_prompt(client, hf_model, hf_tok):
    """echo + logprobs (how evaluation harnesses score text): every prompt token after the first gets its
    logprob under the model, equal to transformers'; streaming sends the same lists."""
    ids = hf_tok(PROMPTS[1]).input_ids
    kwargs = dict(
        model=MODEL_NAME,
        prompt=PROMPTS[1],
        max_tokens=3,
        temperature=0,
        echo=True,
        logprobs=2,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    r = client.completions.create(**kwargs)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(PROMPTS[1])
    assert len(lp.tokens) == len(ids) + 3 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), dim=-1)
    for i in range(1, len(ids)):
        assert abs(lp.token_logprobs[i] - ref[i - 1, ids[i]].item()) < 1e-3
        assert len(lp.top_logprobs[i]) >= 2
    # each token's offset is where its text starts in the response's text, which leaves the BOS out (transformers'
    # decode of the tokens before it); the first generated token starts where the prompt's text ends
    every = ids + r.choices[0].model_extra["token_ids"]
    assert ids[0] in hf_tok.all_special_ids and lp.text_offset[:2] == [0, 0]
    assert lp.text_offset == [len(hf_tok.decode(every[:i], skip_special_tokens=True)) for i in range(len(every))]
    by_id = {"ignore_eos": True, "return_tokens_as_token_ids": True}
    as_ids = client.completions.create(**kwargs | {"extra_body": by_id})
    assert as_ids.choices[0].logprobs.text_offset == lp.text_offset  # offsets of the text, not of "token_id:N"
    # a special token typed into a prompt sent as text is in the echoed text: its characters count there
    typed = client.completions.create(**kwargs | {"prompt": "ROMEO:<s>I am"}).choices[0]
    tokens, offsets = typed.logprobs.tokens, typed.logprobs.text_offset
    assert typed.text.startswith("ROMEO:<s>I am") and tokens.count("<s>") == 2 and offsets == sorted(offsets)
    for token, offset, after in zip(tokens, offsets, offsets[1:] + [len(typed.text)]):
        assert typed.text.startswith(token, offset) if after > offset else token == "<s>"
    streamed = {"tokens": [], "token_logprobs": [], "text_offset": []}
    for chunk in client.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            if c.logprobs is not None:
                streamed["tokens"] += c.logprobs.tokens
                streamed["token_logprobs"] += c.logprobs.token_logprobs
                streamed["text_offset"] += c.logprobs.text_offset
    assert streamed == {"tokens": lp.tokens, "token_logprobs": lp.token_logprobs, "text_offset": lp.text_offset}


def test_echo_without_generation_scores_the_prompt_alone(client, hf_model, hf_tok):
    """max_tokens=0 with echo (OpenAI's legacy scoring call, which vLLM takes and eval scripts send): the prompt's
    logprobs equal transformers', nothing is generated (text, logprobs, usage), and the stream says the same;
    without echo, 0 is a 400 naming max_tokens."""
    ids = hf_tok(PROMPTS[2]).input_ids
    kwargs = dict(model=MODEL_NAME, prompt=PROMPTS[2], max_tokens=0, echo=True, logprobs=1, temperature=1.0)
    r = client.completions.create(**kwargs)
    choice, lp = r.choices[0], r.choices[0].logprobs
    assert (choice.text, choice.finish_reason) == (PROMPTS[2], "length")
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), dim=-1)
    assert all(abs(lp.token_logprobs[i] - ref[i - 1, ids[i]].item()) < 1e-3 for i in range(1, len(ids)))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 0)
    text, tokens, finishes, usage = "", [], [], None
    for chunk in client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for c in chunk.choices:
            text += c.text
            tokens += c.logprobs.tokens if c.logprobs is not None else []
            finishes += [c.finish_reason] if c.finish_reason else []
    assert (text, tokens, finishes) == (PROMPTS[2], lp.tokens, ["length"])
    assert usage is not None and usage.completion_tokens == 0
    r = client.completions.create(model=MODEL_NAME, prompt=[ids], max_tokens=0, echo=True, n=2)
    assert [c.text for c in r.choices] == [hf_tok.decode(ids, skip_special_tokens=True)] * 2
    assert r.usage.completion_tokens == 0
    for bad, param in (({}, "max_tokens"), ({"echo": True, "extra_body": {"min_tokens": 1}}, "min_tokens")):
        with pytest.raises(openai.BadRequestError) as exc:
            client.completions.create(model=MODEL_NAME, prompt=PROMPTS[2], max_tokens=0, **bad)
        assert exc.value.body["param"] == param


def test_a_batch_of_prompts_is_scored_in_one_engine_step(url, client, hf_model, hf_tok):
    """lm-evaluation-harness's loglikelihood call (local-completions): many token-id prompts in one request, echo,
    max_tokens 1, logprobs 1. Each continuation's summed logprobs equal transformers', and the engine takes the
    prompts in one step, as it does the same prompts sent as separate requests (each prompt was posted only once
    the one before was accepted, a step later: N prompts took N steps, and a client that left mid-batch had every
    prompt computed). A batch with a prompt the engine refuses is a 400 that leaves nothing queued."""
    pairs = [(PROMPTS[i], cont) for i, cont in enumerate([" my love", " that is", " is dead", " It is the"])]
    inputs = [hf_tok(ctx + cont).input_ids for ctx, cont in pairs]
    ctxlens = [len(hf_tok(ctx).input_ids) for ctx, _ in pairs]
    before = scrape(url)
    body = dict(model=MODEL_NAME, prompt=inputs, temperature=0, max_tokens=1, logprobs=1, echo=True, seed=1234)
    r = client.completions.create(**body)
    steps = metric(scrape(url), "iteration_tokens_total_count") - metric(before, "iteration_tokens_total_count")
    assert steps == 1  # (the prompts' pass samples the one token max_tokens=1 asks for)
    for choice, ids, ctxlen in zip(sorted(r.choices, key=lambda c: c.index), inputs, ctxlens):
        with torch.no_grad():
            ref = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), dim=-1)
        expected = sum(ref[i - 1, ids[i]].item() for i in range(ctxlen, len(ids)))
        assert len(choice.logprobs.token_logprobs) == len(ids) + 1
        assert abs(sum(choice.logprobs.token_logprobs[ctxlen:-1]) - expected) < 1e-3
    bad = {**body, "prompt": [inputs[0], [1, 10**6], inputs[1]]}
    assert_openai_error(httpx.post(url + "/v1/completions", json=bad, timeout=30), 400, "prompt")
    after = wait_for_metric(url, "num_requests_waiting", lambda v: v == 0, timeout=2.0)
    assert metric(after, "num_requests_waiting") == metric(after, "num_requests_running") == 0


def test_completion_stream_equals_non_stream_with_seed(client):
    kwargs = dict(model=MODEL_NAME, prompt=PROMPTS[3], n=2, max_tokens=12, temperature=1.0, seed=1234)
    full = client.completions.create(**kwargs)
    again = client.completions.create(**kwargs)
    assert [c.text for c in full.choices] == [c.text for c in again.choices]  # seed reproducibility
    texts, finishes, usage = {0: "", 1: ""}, {}, None
    for chunk in client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason is not None:
                assert c.index not in finishes
                finishes[c.index] = c.finish_reason
    assert texts == {c.index: c.text for c in full.choices}
    assert finishes == {c.index: c.finish_reason for c in full.choices}
    # `again` and the stream both find the prompt's blocks that `full` cached: the same usage, cached_tokens too
    assert usage is not None and usage.model_dump() == again.usage.model_dump()
    other = [client.completions.create(**{**kwargs, "seed": s}).choices[0].text for s in (1, 2, 3)]
    assert len({full.choices[0].text, *other}) > 1  # the seed matters


def test_chat_matches_transformers_and_streams_identically(client, hf_model, hf_tok):
    messages = [
        {"role": "system", "content": "You are a bard."},
        {"role": "user", "content": "Sing of spring."},
    ]
    ids = chat_ids(hf_tok, messages)
    expected = hf_tok.decode(hf_greedy(hf_model, ids, 10), skip_special_tokens=True)
    r = client.chat.completions.create(
        model=MODEL_NAME,
        messages=messages,
        max_completion_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected
    assert r.choices[0].message.reasoning is None  # vLLM's field, null without a reasoning parser (not left out)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 10)
    parts = [{"type": "text", "text": "Sing of"}, {"type": "text", "text": "spring."}]
    r2 = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": parts}], max_tokens=4, temperature=0
    )
    assert r2.usage.prompt_tokens == len(chat_ids(hf_tok, [{"role": "user", "content": "Sing of\nspring."}]))

    kwargs = dict(model=MODEL_NAME, messages=messages, n=3, max_tokens=12, temperature=0.9, seed=99)
    full = client.chat.completions.create(**kwargs)
    contents, roles, finishes, usage = {}, {}, {}, None
    for chunk in client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.role is not None:
                assert c.index not in roles and c.index not in contents  # the role comes first, once
                roles[c.index] = c.delta.role
            contents[c.index] = contents.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason is not None:
                finishes[c.index] = c.finish_reason
    assert roles == {0: "assistant", 1: "assistant", 2: "assistant"}
    assert contents == {c.index: c.message.content for c in full.choices}
    assert finishes == {c.index: c.finish_reason for c in full.choices}
    assert usage.model_dump() == full.usage.model_dump()


def test_chat_logprobs_match_transformers(client, hf_model, hf_tok):
    messages = [{"role": "user", "content": "Speak, friend."}]
    ids = chat_ids(hf_tok, messages)
    expected_ids = hf_greedy(hf_model, ids, 6)
    ref = hf_logprobs(hf_model, ids, expected_ids)
    kwargs = dict(
        model=MODEL_NAME,
        messages=messages,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    r = client.chat.completions.create(**kwargs)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for i, t in enumerate(content):
        assert t.logprob == pytest.approx(ref[i, expected_ids[i]].item(), abs=1e-3)
        assert bytes(t.bytes).decode("utf-8", errors="replace") == t.token
        assert [x.logprob for x in t.top_logprobs] == pytest.approx(ref[i].topk(2).values.tolist(), abs=1e-3)
        assert t.top_logprobs[0].token == t.token  # greedy picks the best
    streamed = []
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            streamed += c.logprobs.content if c.logprobs else []
    # the streamed request finds its prompt in the prefix cache: the same tokens, logprobs equal up to rounding
    assert [t.token for t in streamed] == [t.token for t in content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=1e-5)


def test_stop_strings_truncate_and_stream_identically(client):
    text = greedy(client, PROMPTS[1], 24)
    start = next(k for k in range(len(text) // 2, len(text) - 2) if text.find(text[k : k + 2]) == k and k > 0)
    stop = text[start : start + 2]
    kwargs = dict(
        model=MODEL_NAME,
        prompt=PROMPTS[1],
        max_tokens=24,
        temperature=0,
        stop=[stop, "@@@@"],
        extra_body={"ignore_eos": True},
    )
    r = client.completions.create(**kwargs)
    assert r.choices[0].text == text[:start]
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == stop
    streamed = "".join(c.text for chunk in client.completions.create(**kwargs, stream=True) for c in chunk.choices)
    assert streamed == text[:start]


def test_64_concurrent_streams_match_solo_runs_and_move_metrics(url, client, hf_tok):
    prompts = [f"{PROMPTS[i % 4]} {'and ' * (i // 4)}".strip() for i in range(16)]
    alone = {p: greedy(client, p) for p in prompts}
    before = scrape(url)

    async def one(aclient: openai.AsyncOpenAI, prompt: str) -> tuple[str, str | None]:
        stream = await aclient.completions.create(
            model=MODEL_NAME,
            prompt=prompt,
            max_tokens=8,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        text, finish = "", None
        async for chunk in stream:
            for c in chunk.choices:
                text += c.text
                finish = c.finish_reason or finish
        return text, finish

    async def all_of_them() -> list[tuple[str, str | None]]:
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", timeout=60, max_retries=0) as aclient:
            return await asyncio.gather(*(one(aclient, prompts[i % 16]) for i in range(64)))

    results = asyncio.run(asyncio.wait_for(all_of_them(), timeout=120))
    assert [text for text, _ in results] == [alone[prompts[i % 16]] for i in range(64)]
    assert all(finish == "length" for _, finish in results)
    after = scrape(url)
    delta = lambda name, **labels: metric(after, name, **labels) - metric(before, name, **labels)
    assert delta("generation_tokens_total") == 64 * 8
    assert delta("prompt_tokens_total") == sum(len(hf_tok(prompts[i % 16]).input_ids) for i in range(64))
    assert delta("request_success_total", finished_reason="length") == 64
    assert delta("time_to_first_token_seconds_count") == 64
    assert delta("e2e_request_latency_seconds_count") == 64
    assert delta("inter_token_latency_seconds_count") == 64 * 7
    assert metric(after, "num_requests_running") == 0 and metric(after, "kv_blocks_used") == 0
    assert metric(after, "kv_blocks_total") > 0


def test_prefix_cache_reports_cached_tokens_and_counts_hits(url, client, hf_tok):
    """The second request with the same prompt reuses its full blocks (16 tokens each, the last token always
    recomputed): usage.prompt_tokens_details.cached_tokens says how many, /metrics counts queries and hits."""
    prompt = "Prefix cache probe. Now is the winter of our discontent made glorious summer by this sun of York."
    ids = hf_tok(prompt).input_ids
    cached = (len(ids) - 1) // 16 * 16
    assert cached >= 16
    kwargs = dict(model=MODEL_NAME, prompt=prompt, max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    before = scrape(url)
    first = client.completions.create(**kwargs)
    second = client.completions.create(**kwargs)
    after = scrape(url)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == cached
    assert second.choices[0].text == first.choices[0].text
    delta = lambda name: metric(after, name) - metric(before, name)
    assert delta("prefix_cache_queries_total") == 2 * len(ids)
    assert delta("prefix_cache_hits_total") == cached
    messages = [{"role": "user", "content": prompt}]
    chunks = list(
        client.chat.completions.create(
            model=MODEL_NAME, messages=messages, max_tokens=2, stream=True, stream_options={"include_usage": True}
        )
    )
    again = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=2)
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == (again.usage.prompt_tokens - 1) // 16 * 16 > 0


def test_client_disconnect_aborts_and_frees_blocks_within_a_second(url):
    before = scrape(url)
    body = {"model": MODEL_NAME, "prompt": PROMPTS[0], "max_tokens": 1000, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", url + "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()  # read 3 events; breaking out of a for loop would close the stream
            events = [line for line in (next(lines) for _ in range(6)) if line.startswith("data: ")]
            assert len(events) == 3
            during = scrape(url)
            assert metric(during, "kv_blocks_used") > 0 and metric(during, "num_requests_running") == 1
        closed_at = time.monotonic()  # leaving the block closes the connection mid-stream
    after = wait_for_metric(url, "kv_blocks_used", lambda v: v == 0, timeout=1.0)
    assert metric(after, "kv_blocks_used") == 0, "blocks were not freed within a second"
    assert time.monotonic() - closed_at < 1.5
    assert metric(after, "num_requests_running") == 0
    aborted = metric(after, "request_success_total", finished_reason="abort")
    assert aborted - metric(before, "request_success_total", finished_reason="abort") == 1
    generated = metric(after, "generation_tokens_total") - metric(before, "generation_tokens_total")
    assert 3 <= generated < 1000  # it stopped early, and it stays stopped:
    # as in vLLM, the per-request histograms are of finished requests: the aborted one is in the latency only
    delta = lambda name: metric(after, name) - metric(before, name)  # noqa: E731
    assert delta("e2e_request_latency_seconds_count") == 1 and delta("request_prompt_tokens_count") == 0
    time.sleep(0.2)
    assert metric(scrape(url), "generation_tokens_total") == metric(after, "generation_tokens_total")

    # a non-streaming client that gives up is noticed too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json={**body, "stream": False}, timeout=0.3)
    after2 = wait_for_metric(url, "kv_blocks_used", lambda v: v == 0, timeout=1.0)
    assert metric(after2, "kv_blocks_used") == 0
    assert metric(after2, "request_success_total", finished_reason="abort") == aborted + 1


BAD_COMPLETIONS = [  # (body, status, param)
    ({"model": MODEL_NAME, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"model": MODEL_NAME, "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"model": MODEL_NAME, "prompt": "x", "n": 0}, 400, "n"),
    ({"model": MODEL_NAME, "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": MODEL_NAME, "prompt": "x", "top_k": -5}, 400, "top_k"),  # SamplingParams' ValueError
    ({"model": MODEL_NAME, "prompt": "x", "min_p": 3.0}, 400, "min_p"),
    ({"model": MODEL_NAME, "prompt": "x", "max_tokens": 2, "min_tokens": 5}, 400, "min_tokens"),
    ({"model": MODEL_NAME, "prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ({"model": MODEL_NAME, "prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"model": MODEL_NAME, "prompt": []}, 400, "prompt"),
    ({"model": MODEL_NAME, "prompt": ""}, 400, "prompt"),
    ({"model": MODEL_NAME, "prompt": ["ROMEO:", ""]}, 400, "prompt"),  # one empty prompt of a batch, last
    ({"model": MODEL_NAME, "prompt": [[5, 6], []]}, 400, "prompt"),
    ({"model": MODEL_NAME, "prompt": [5, "x"]}, 400, "prompt"),  # ids and text mixed
    ({"model": MODEL_NAME, "prompt": [1, 2, 10**6]}, 400, "prompt"),  # token id outside the vocab
    ({"model": MODEL_NAME}, 400, "prompt"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ({"model": MODEL_NAME, "prompt": "x " * 30, "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens"),
    ({"model": MODEL_NAME, "prompt": [5] * (MAX_MODEL_LEN + 10)}, 400, "prompt"),
]
BAD_CHATS = [
    ({"model": MODEL_NAME, "messages": []}, 400, "messages"),
    ({"model": MODEL_NAME, "messages": [{"role": "", "content": "hi"}]}, 400, "messages"),  # (any other role is taken)
    ({"model": MODEL_NAME, "messages": [{"role": 5, "content": "hi"}]}, 400, "messages"),
    (
        {"model": MODEL_NAME, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        "messages",
    ),
    (
        {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
        400,
        "top_logprobs",
    ),
    (
        {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 5000},
        400,
        "max_completion_tokens",
    ),
]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(url, client):
    def still_serving() -> None:
        assert greedy(client, PROMPTS[0], 2)

    with httpx.Client(base_url=url, timeout=30) as http:
        for path, cases in (("/v1/completions", BAD_COMPLETIONS), ("/v1/chat/completions", BAD_CHATS)):
            for body, status, param in cases:
                err = assert_openai_error(http.post(path, json=body), status, param)
                assert err["type"] == "invalid_request_error"
                still_serving()
        err = assert_openai_error(http.post("/v1/completions", content=b'{"prompt": "x",'), 400, None)
        assert "JSON" in err["message"]
        assert_openai_error(http.post("/v1/completions", json=["not", "an", "object"]), 400, None)
        big = {"model": MODEL_NAME, "prompt": "x" * (100 * 1024)}
        assert_openai_error(http.post("/v1/completions", json=big), 413, None)
        still_serving()
        assert_openai_error(http.get("/v1/does-not-exist"), 404, None)
        assert_openai_error(http.post("/detokenize", json={"tokens": [10**6]}), 400, "tokens")
        err = assert_openai_error(http.post("/v1/completions", json=BAD_COMPLETIONS[-2][0]), 400, "max_tokens")
        assert err["code"] == "context_length_exceeded" and str(MAX_MODEL_LEN) in err["message"]
    with pytest.raises(openai.BadRequestError) as exc:  # what an openai-client user sees
        client.completions.create(model=MODEL_NAME, prompt="x", temperature=-0.5)
    assert exc.value.status_code == 400 and exc.value.body["param"] == "temperature"
    # above OpenAI's 2.0 is vLLM's range: a flatter distribution, not an error
    hot = client.completions.create(model=MODEL_NAME, prompt="x", temperature=7.0, max_tokens=2, seed=1)
    assert hot.usage.completion_tokens == 2
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    still_serving()


# The README's own examples, read from README.md; the test swaps in its URL and model name for the defaults.
README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


README_CURL = [b.strip() for b in _readme_blocks("bash") if b.lstrip().startswith("curl http://127.0.0.1:8000")]
README_PYTHON = next(b for b in _readme_blocks("python") if "from openai import OpenAI" in b)


def _readme(text: str, url: str) -> str:
    return text.replace("http://127.0.0.1:8000", url).replace("shakespeare-target", MODEL_NAME)


def test_readme_examples_work(url):
    assert len(README_CURL) >= 4  # completions (quick start and server section), chat stream, models, tokenize
    for cmd in README_CURL:
        proc = subprocess.run(
            ["bash", "-c", _readme(cmd, url) + " --silent --show-error --fail"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout
        if "/chat/completions" in cmd:
            events = [line[len("data: ") :] for line in out.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]" and json.loads(events[0])["choices"][0]["delta"]["role"] == "assistant"
        elif "/v1/completions" in cmd:  # a sampled first token may be EOS: then the text is empty, and says why
            body = json.loads(out)
            choice, generated = body["choices"][0], body["usage"]["completion_tokens"]
            assert generated >= 1 and (choice["text"] or choice["finish_reason"] == "stop"), out
        elif "/v1/models" in cmd:
            assert json.loads(out)["data"][0]["id"] == MODEL_NAME
        elif "/tokenize" in cmd:
            assert json.loads(out)["count"] == len(json.loads(out)["tokens"]) > 0
    proc = subprocess.run(
        [sys.executable, "-c", _readme(README_PYTHON, url)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) >= 1
