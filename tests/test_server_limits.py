"""A second server instance: API key (401 in OpenAI's shape), the waiting-queue limit (503), speculative
decoding statistics in `usage` and /metrics, and the startup error for a missing model directory.

The instance runs one sequence at a time (MINISERVE_MAX_NUM_SEQS=1) with room for one waiting request
(MINISERVE_MAX_WAITING=1), so a long running request plus one queued behind it make the third one a 503.
Its draft model is a copy of the target, so greedy decoding accepts every drafted token.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.test_server import (
    MODEL_NAME,
    REPO,
    assert_openai_error,
    build_server_model,
    metric,
    run_server,
    scrape,
    uvicorn_server,
    wait_for_metric,
)

API_KEY = "sk-miniserve-test"
SECOND_KEY = "sk-second"  # several keys (vLLM's --api-key K1 K2), and several names
ALIAS = "another-name"
LONG_MAX_MODEL_LEN = 16384


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir):
    # a long context: the running request below must outlast the checks made meanwhile on any machine (on a
    # loaded 2-core one, 1000 tokens took about 2 s and the checks up to 0.7 s: a slower client would see it end)
    return build_server_model(tmp_path_factory.mktemp("limits-model"), tokenizer_dir, LONG_MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def url(model_dir):
    env = {
        "MINISERVE_API_KEY": f'["{API_KEY}", "{SECOND_KEY}"]',
        "MINISERVE_SERVED_MODEL_NAME": f'["{MODEL_NAME}", "{ALIAS}"]',
        "MINISERVE_MAX_NUM_SEQS": "1",
        "MINISERVE_MAX_WAITING": "1",
        "MINISERVE_SPECULATIVE_MODEL": str(model_dir),
        "MINISERVE_NUM_SPECULATIVE_TOKENS": "3",
    }
    with run_server(model_dir, **env) as base:
        yield base


def test_api_key_guards_every_v1_route(url):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": MODEL_NAME, "prompt": "ROMEO:", "max_tokens": 2}
    chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with httpx.Client(base_url=url, timeout=30) as http:
        for method, path, payload in (
            ("POST", "/v1/completions", body),
            ("POST", "/v1/chat/completions", chat),
            ("GET", "/v1/models", None),
        ):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
                err = assert_openai_error(http.request(method, path, json=payload, headers=headers), 401, None)
                assert err["code"] == "invalid_api_key"
            assert http.request(method, path, json=payload, headers=auth).status_code == 200
        for path in ("/health", "/metrics", "/version"):  # probes, scrapers and tooling need no key
            assert http.get(path).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=30)
    assert good.completions.create(model=MODEL_NAME, prompt="ROMEO:", max_tokens=3).usage.completion_tokens >= 1
    # either key; the model under each of its names, answering with the first (as vLLM)
    second = openai.OpenAI(base_url=url + "/v1", api_key=SECOND_KEY, max_retries=0, timeout=30)
    assert [m.id for m in second.models.list().data] == [MODEL_NAME, ALIAS]
    assert second.models.retrieve(ALIAS).id == ALIAS
    assert second.completions.create(model=ALIAS, prompt="ROMEO:", max_tokens=2).model == MODEL_NAME
    with pytest.raises(openai.NotFoundError, match=f"This server serves `{MODEL_NAME}`, `{ALIAS}`"):
        second.completions.create(model="nope", prompt="ROMEO:", max_tokens=2)


def test_a_requests_own_chat_template_is_refused_unless_the_server_trusts_them(url):
    """vLLM's default (--trust-request-chat-template off): a template is code that the server would run."""
    chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    auth = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=url, timeout=30, headers=auth) as http:
        for path in ("/v1/chat/completions", "/tokenize"):
            r = http.post(path, json={**chat, "chat_template": "{{ messages[0].content }}"})
            message = assert_openai_error(r, 400, "chat_template")["message"]
            assert "--trust-request-chat-template or MINISERVE_TRUST_REQUEST_CHAT_TEMPLATE=1" in message
        assert http.post("/v1/chat/completions", json=chat).status_code == 200


def test_too_many_waiting_requests_get_503_and_the_server_recovers(url):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    long = {"model": MODEL_NAME, "prompt": "ROMEO:", "max_tokens": 16000, "ignore_eos": True, "stream": True}
    with (
        httpx.Client(base_url=url, timeout=30, headers=auth) as a,
        httpx.Client(base_url=url, timeout=30, headers=auth) as b,
    ):
        with a.stream("POST", "/v1/completions", json=long) as running:
            lines = running.iter_lines()  # keep the iterator: dropping it would close the stream
            next(lines)  # its first token is out: it holds the only running slot
            with b.stream("POST", "/v1/completions", json=long) as waiting:
                assert waiting.status_code == 200
                samples = wait_for_metric(url, "num_requests_waiting", lambda v: v == 1, timeout=5)
                assert metric(samples, "num_requests_waiting") == 1
                assert metric(samples, "num_requests_running") == 1
                resp = httpx.post(url + "/v1/completions", json={**long, "stream": False}, headers=auth)
                err = assert_openai_error(resp, 503, None)
                assert err["code"] == "overloaded" and err["type"] == "server_error"
                with pytest.raises(openai.InternalServerError) as exc:
                    openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0).chat.completions.create(
                        model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=2
                    )
                assert exc.value.status_code == 503
    # both streams were closed: their requests are aborted and new ones are served again
    samples = wait_for_metric(url, "kv_blocks_used", lambda v: v == 0, timeout=2)
    assert metric(samples, "num_requests_running") == 0 and metric(samples, "num_requests_waiting") == 0
    resp = httpx.post(url + "/v1/completions", json={**long, "stream": False, "max_tokens": 4}, headers=auth)
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 4
    assert metric(scrape(url), "request_success_total", finished_reason="abort") == 2


def test_speculative_decoding_stats_in_usage_and_metrics(url):
    before = scrape(url)
    client = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=30)
    r = client.completions.create(
        model=MODEL_NAME, prompt="ROMEO:", max_tokens=21, temperature=0, extra_body={"ignore_eos": True}
    )
    spec = r.usage.model_extra["spec_decode"]
    # one token from the prefill, then rounds of 3 drafted tokens that all pass, plus the bonus token
    assert spec["num_drafts"] == 5 and spec["num_draft_tokens"] == 15 and spec["num_accepted_tokens"] == 15
    assert spec["mean_acceptance_length"] == 4.0
    after = scrape(url)
    delta = lambda name, **labels: metric(after, name, **labels) - metric(before, name, **labels)
    assert delta("spec_decode_num_drafts_total") == 5
    assert delta("spec_decode_num_draft_tokens_total") == 15
    assert delta("spec_decode_num_accepted_tokens_total") == 15
    assert [delta("spec_decode_num_accepted_tokens_per_pos_total", position=str(p)) for p in range(3)] == [
        5,
        5,
        5,
    ]
    drafts, accepted = (metric(after, f"spec_decode_num_{n}_total") for n in ("drafts", "accepted_tokens"))
    assert metric(after, "spec_decode_mean_acceptance_length") == pytest.approx(1 + accepted / drafts)


def test_the_log_has_vllms_request_and_engine_lines_and_speculative_decodings(model_dir, tmp_path):
    """Every log_stats_interval the server logs vLLM's engine line, and with speculative decoding its acceptance
    line: over the lines of a greedy request whose draft is the target itself, every drafted token is accepted,
    and they add up to the request's rounds (201 tokens: the prompt pass's, then 50 rounds of 3 drafted + 1).
    With enable_log_requests, each request's line as it is posted."""
    env = {"MINISERVE_SERVED_MODEL_NAME": MODEL_NAME, "MINISERVE_SPECULATIVE_MODEL": str(model_dir),
           "MINISERVE_NUM_SPECULATIVE_TOKENS": "3", "MINISERVE_LOG_STATS_INTERVAL": "0.2",
           "MINISERVE_ENABLE_LOG_REQUESTS": "1", "MINISERVE_MAX_LOG_LEN": "4"}  # fmt: skip
    body = {"model": MODEL_NAME, "prompt": "ROMEO: a long prompt", "max_tokens": 201, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    with open(tmp_path / "server.log", "w+b") as log:
        with uvicorn_server(model_dir, log, log_level="info", **env) as (url, _):
            r = httpx.post(url + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 200
            ids = httpx.post(url + "/tokenize", json={"prompt": body["prompt"]}).json()["tokens"]
            time.sleep(0.6)  # the interval in which it ended is logged
            log.seek(0)
            text = log.read().decode(errors="replace")
    # --enable-log-requests: the request's line, its prompt's text and ids cut at max_log_len (4)
    (logged,) = re.findall(r"Received request (\S+)-0: prompt: '(.*)', params: (SamplingParams\(.*\)), "
                           r"prompt_token_ids: \[(.*)\]\n", text)  # fmt: skip
    assert logged[0] == r.json()["id"] and len(logged[1]) == 4 and "max_tokens=201" in logged[2], logged
    assert [int(i) for i in logged[3].split(", ")] == ids[:4] and len(ids) > 4, (logged, ids)
    engine = re.findall(r"Engine 000: Avg prompt throughput: [\d.]+ tokens/s, Avg generation throughput: ([\d.]+) "
                        r"tokens/s, Running: (\d+) reqs, Waiting: 0 reqs, KV cache usage: [\d.]+%, Prefix cache hit "
                        r"rate: [\d.]+%", text)  # fmt: skip
    assert any(float(rate) > 0 for rate, _ in engine) and engine[-1][1] == "0", text
    spec = re.findall(r"SpecDecoding metrics: Mean acceptance length: ([\d.]+), Accepted throughput: [\d.]+ "
                      r"tokens/s, Drafted throughput: [\d.]+ tokens/s, Accepted: (\d+) tokens, Drafted: (\d+) "
                      r"tokens, Per-position acceptance rate: ([\d., ]+), Avg Draft acceptance rate: ([\d.]+)%",
                      text)  # fmt: skip
    assert sum(int(accepted) for _, accepted, *_ in spec) == 150, text
    assert all(s[0] == "4.00" and s[1] == s[2] and s[3] == "1.000, 1.000, 1.000" and s[4] == "100.0" for s in spec)


def test_missing_model_directory_is_a_clear_startup_error(tmp_path):
    env = {**os.environ, "MINISERVE_MODEL": str(tmp_path / "no-such-model")}
    cmd = [sys.executable, "-m", "uvicorn", "server:app", "--port", "0"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert f"model directory '{tmp_path / 'no-such-model'}' does not exist" in proc.stderr


def test_a_large_body_is_decoded_and_validated_off_the_event_loop_with_the_same_answers(url):
    """A body past LARGE_BODY_BYTES is decoded and validated on a worker thread (a few MB of chat messages took a
    second on the event loop, stalling every stream): the same 200 with an unknown field ignored, and the same
    400 naming the field, as a small body gets."""
    from miniserve.server.state import LARGE_BODY_BYTES

    auth = {"Authorization": f"Bearer {API_KEY}"}
    padding = "x" * (LARGE_BODY_BYTES + 1)
    with httpx.Client(base_url=url, timeout=60, headers=auth) as http:
        body = {"model": MODEL_NAME, "prompt": "ROMEO:", "max_tokens": 2, "unknown_padding": padding}
        assert http.post("/v1/completions", json=body).json()["usage"]["completion_tokens"] == 2
        messages = [{"role": "user", "content": "hi"}] * (LARGE_BODY_BYTES // 30) + [{"role": "user", "content": 5}]
        chat = {"model": MODEL_NAME, "messages": messages, "max_tokens": 2}
        assert len(httpx.Request("POST", url, json=chat).content) > LARGE_BODY_BYTES
        for sent in (chat, {**chat, "messages": messages[-2:]}):  # large, then small: one answer
            assert assert_openai_error(http.post("/v1/chat/completions", json=sent), 400, "messages")
