"""Hostile and careless clients against a real `uvicorn server:app`: bodies that used to crash a handler (deep
nesting, lone surrogates), the catch-all for errors nobody foresaw, and the validation details of issue 15.

Every bad input must get a 4xx in OpenAI's error shape, and the keep-alive connection it came on must still
serve the next request (or the answer must say `Connection: close`). Raw bodies go through `http.client`, which
reuses one socket and does not retry, so a connection the server dropped shows up as an error here.
"""

from __future__ import annotations

import collections
import gc
import http.client
import itertools
import json
import logging
import math
import random
import select
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import corpus_text
from tests.test_server import (
    MODEL_NAME,
    REPO,
    _wait_healthy,
    assert_openai_error,
    free_port,
    metric,
    run_server,
    scrape,
    uvicorn_server,
    wait_for_metric,
)

API_KEY = "sk-harden"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_PROMPTS = 4
MAX_STOPS, MAX_STOP_LENGTH = 4, 8
MAX_JSON_DEPTH = 64  # the documented limit (miniserve/server/json_body.py), restated: the test is its oracle


@pytest.fixture(scope="module")
def url(llama_dir) -> Iterator[str]:
    env = {
        "MINISERVE_API_KEY": API_KEY,
        "MINISERVE_SERVED_MODEL_NAME": MODEL_NAME,
        "MINISERVE_MAX_PROMPTS_PER_REQUEST": str(MAX_PROMPTS),
        "MINISERVE_MAX_STOP_STRINGS": str(MAX_STOPS),
        "MINISERVE_MAX_STOP_STRING_LENGTH": str(MAX_STOP_LENGTH),
    }
    with run_server(llama_dir, **env) as base:
        yield base


class Conn:
    """One keep-alive HTTP/1.1 connection; `request` fails if the server dropped it without saying so."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.http = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        self.sock = None

    def request(self, method: str, path: str, body: bytes | None = None, auth: bool = True) -> tuple[int, dict, bytes]:
        headers = {"Content-Type": "application/json", **(AUTH if auth else {})}
        self.http.request(method, path, body=body, headers=headers)
        resp = self.http.getresponse()
        data = resp.read()
        if self.sock is not None:  # the same socket as before: the connection was kept
            assert self.http.sock is self.sock or resp.getheader("connection") == "close"
        self.sock = self.http.sock
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data

    def json_error(self, path: str, body: bytes, status: int = 400) -> dict:
        code, headers, data = self.request("POST", path, body)
        assert code == status, data[:300]
        err = json.loads(data)["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err
        assert err["type"] == "invalid_request_error"
        assert headers.get("connection") != "close"  # it keeps serving on this connection ...
        assert self.request("GET", "/health")[0] == 200  # ... as the next request shows
        return err

    def close(self) -> None:
        self.http.close()


@pytest.fixture
def conn(url) -> Iterator[Conn]:
    c = Conn(url)
    yield c
    c.close()


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


M = json.dumps(MODEL_NAME)
ENDPOINTS = {  # path -> the start of a valid body that one more field (and "}") completes
    "/v1/completions": '{"model": ' + M + ', "prompt": "ROMEO:", "max_tokens": 2, ',
    "/v1/chat/completions": '{"model": ' + M + ', "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, ',
    "/tokenize": '{"prompt": "ROMEO:", ',
}


def test_deeply_nested_json_is_a_400_on_a_connection_that_stays_usable(conn):
    for path, start in ENDPOINTS.items():
        err = conn.json_error(path, nested(100_000).encode())  # the parser's own recursion limit
        assert "nest" in err["message"]
        for field in ("stop", "prompt", "not_a_field"):  # a field that is read, and one that is ignored
            err = conn.json_error(path, (start + f'"{field}": {nested(5000)}}}').encode())
            assert "nest" in err["message"] and err["code"] == "invalid_json"
        # the exact limit: MAX_JSON_DEPTH levels in all (the body object is one) pass, one more does not
        body = start + f'"not_a_field": {nested(MAX_JSON_DEPTH - 1)}}}'
        status, _, data = conn.request("POST", path, body.encode())
        assert status == 200, data[:300]
        err = conn.json_error(path, (start + f'"not_a_field": {nested(MAX_JSON_DEPTH)}}}').encode())
        assert str(MAX_JSON_DEPTH) in err["message"]


def test_lone_surrogates_are_a_400_naming_the_field(conn):
    cases = [  # (path, JSON text with a lone surrogate escape, param)
        ("/v1/completions", '{"model": ' + M + ', "prompt": "ROMEO \\ud800"}', "prompt"),
        ("/v1/completions", '{"model": ' + M + ', "prompt": ["ok", "x\\udc00y"]}', "prompt"),
        ("/v1/completions", '{"model": "tiny\\ud800", "prompt": "ROMEO"}', "model"),
        ("/v1/completions", '{"model": ' + M + ', "prompt": "a", "stop": ["\\udfff"]}', "stop"),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud83d"}]}', "messages"),
        ("/v1/chat/completions", '{"model": "\\udbff", "messages": []}', "model"),
        ("/tokenize", '{"prompt": "ROMEO \\ud800"}', "prompt"),
        ("/tokenize", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}', "messages"),
        ("/tokenize", '{"prompt": "x", "\\ud800": 1}', "\ufffd"),  # even in the key of an ignored field
    ]
    for path, body, param in cases:
        err = conn.json_error(path, body.encode())
        assert err["param"] == param and "surrogate" in err["message"], (body, err)
    # unescaped, a surrogate is not UTF-8 (the bytes of U+D800), nor is a UTF-16 body, which json.loads would take
    not_utf8 = [b'{"prompt": "ROMEO \xed\xa0\x80"}', '{"prompt": "ROMEO \\ud800"}'.encode("utf-16")]
    not_utf8 += [b'{"prompt": "ok", "bad_words": ["a\xed\xa0\x80"]}', b'{"prompt": "\xff"}']
    for body in not_utf8:
        err = conn.json_error("/v1/completions", body)
        assert err["code"] == "invalid_json" and "not UTF-8" in err["message"], (body, err)
    # python's json takes the constants, and reads numbers past a float's range as infinity; JSON has no such numbers
    too_large = ("1e999", "-1E+0309", "1" + "0" * 309 + ".5", "1" + "0" * 300 + ".0e10", "0.1e310")
    for constant in ("NaN", "Infinity", "-Infinity") + too_large:
        body = '{"prompt": "a", "tools": [{"type": "function", "function": {"name": "f", "x": ' + constant + "}}]}"
        err = conn.json_error("/v1/completions", body.encode())
        assert err["param"] == "tools" and "tools.0.function.x" in err["message"] and "finite" in err["message"]
    for largest in ("1e308", "-1.7976931348623157e308", "1" + "0" * 308 + ".5"):  # the edge itself is a number
        body = ENDPOINTS["/v1/chat/completions"] + '"chat_template_kwargs": {"x": ' + largest + "}}"
        status, _, data = conn.request("POST", "/v1/chat/completions", body.encode())
        assert status == 200, data
    # a valid surrogate pair is one character (U+1F600), escaped or not
    for body in ('{"prompt": "smile \\ud83d\\ude00"}', '{"prompt": "smile \U0001f600"}'):
        status, _, data = conn.request("POST", "/tokenize", body.encode())
        assert status == 200, data
    escaped = json.loads(conn.request("POST", "/tokenize", b'{"prompt": "smile \\ud83d\\ude00"}')[2])
    raw = json.loads(conn.request("POST", "/tokenize", '{"prompt": "smile \U0001f600"}'.encode())[2])
    assert escaped == raw


def test_validation_details(url, conn):
    def completion(extra: str) -> bytes:
        return (ENDPOINTS["/v1/completions"] + extra + "}").encode()

    for seed in (2**63, -(2**63) - 1, 10**30):  # outside int64
        err = conn.json_error("/v1/completions", completion(f'"seed": {seed}'))
        assert err["param"] == "seed", err
    for seed in (2**63 - 1, -(2**63)):  # the int64 edges are fine, n=2 seeds seed and seed + 1
        status, _, data = conn.request("POST", "/v1/completions", completion(f'"seed": {seed}, "n": 2'))
        assert status == 200, data
    for value in ("NaN", "Infinity", "-Infinity"):
        for field in ("temperature", "top_p", "presence_penalty"):
            err = conn.json_error("/v1/completions", completion(f'"{field}": {value}'))
            assert err["param"] == field and "finite" in err["message"], err
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, image]}]}
    err = conn.json_error("/v1/chat/completions", json.dumps(chat).encode())
    assert err["param"] == "messages" and "images are not supported" in err["message"], err
    # the batch limit: MAX_PROMPTS prompts are served, one more is refused before anything is tokenized
    ok = json.loads(
        conn.request("POST", "/v1/completions", completion('"prompt": ' + json.dumps(["a"] * MAX_PROMPTS)))[2]
    )
    assert len(ok["choices"]) == MAX_PROMPTS
    for prompts in (["a"] * (MAX_PROMPTS + 1), [[5, 6]] * (MAX_PROMPTS + 1), ["a"] * 10_000):
        err = conn.json_error("/v1/completions", completion('"prompt": ' + json.dumps(prompts)))
        assert err["param"] == "prompt" and f"limit of {MAX_PROMPTS}" in err["message"], err
    # the stop list's bounds, on both endpoints, before any prompt is tokenized
    bases = {
        "/v1/completions": {"model": MODEL_NAME, "prompt": "ROMEO:", "max_tokens": 2},
        "/v1/chat/completions": {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    }
    for path, base in bases.items():

        def body(stop, base=base) -> bytes:
            return json.dumps({**base, "stop": stop}).encode()

        at_limit = ["a" * MAX_STOP_LENGTH] + ["b"] * (MAX_STOPS - 1)
        assert conn.request("POST", path, body(at_limit))[0] == 200
        err = conn.json_error(path, body(at_limit + ["c"]))
        assert err["param"] == "stop" and f"{MAX_STOPS + 1} stop strings" in err["message"], err
        err = conn.json_error(path, body("a" * (MAX_STOP_LENGTH + 1)))
        assert err["param"] == "stop" and f"{MAX_STOP_LENGTH + 1} characters" in err["message"], err
        err = conn.json_error(path, body(["x"] * 300_000))  # the list that took seconds per request, refused at once
        assert err["param"] == "stop"
    models = httpx.get(url + "/v1/models", headers=AUTH).json()
    assert models["data"][0]["id"] == models["data"][0]["root"] == MODEL_NAME
    assert "/" not in httpx.get(url + "/v1/models", headers=AUTH).text.replace("\\/", "")  # no filesystem path


def test_a_union_fields_error_names_its_place_in_the_request_and_what_the_field_takes(conn):
    """A field of several types fails once per type, each failure tagged with its branch ("prompt.str",
    "logit_bias.5.float", "input.0.message"): the 400 names only the request's own path, and where the value (or
    an item of it) fit no branch, what the field takes rather than only what one branch wanted."""
    prompt = " (prompt takes str, list[str], list[int] or list[list[int]])"
    user = {"role": "user", "content": "hi"}
    cases = [  # (path, body, message); param: the path's first part
        ("/v1/completions", {"prompt": None}, "prompt: Input should be a valid string" + prompt),
        ("/v1/completions", {"prompt": [True, False]}, "prompt.0: Input should be a valid string" + prompt),
        ("/v1/completions", {"prompt": [[1, "a"]]}, "prompt.0.1: Input should be a valid integer"),  # deep: one branch
        (
            "/v1/completions",
            {"prompt": "a", "logit_bias": {"5": "x"}},
            "logit_bias.5: Input should be a valid number (logit_bias.5 takes float or int)",
        ),  # fmt: skip
        (
            "/v1/completions",
            {"prompt": "a", "stop": ["a", 5]},
            "stop.1: Input should be a valid string (stop takes str or list[str])",
        ),  # fmt: skip
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
            "messages.0.content.0.text: Input should be a valid string (messages.0.content.0 takes TextPart or "
            "ChatRefusalPart)",
        ),  # fmt: skip
        (
            "/v1/chat/completions",
            {"messages": [user], "tool_choice": 5},
            "tool_choice: Input should be 'none', "
            "'auto' or 'required' (tool_choice takes literal['none','auto','required'] or NamedToolChoice)",
        ),  # fmt: skip
        (
            "/v1/responses",
            {"input": [{"role": "user", "content": 5}]},
            "input.0.content: Input should be a valid "
            "string (input.0.content takes str or list[union[InputTextPart,RefusalPart]])",
        ),  # fmt: skip
        (
            "/v1/responses",
            {"input": [{"type": "function_call", "call_id": "c1", "name": "f"}]},
            "input.0.arguments: Field required",
        ),  # fmt: skip
    ]
    for path, body, message in cases:
        err = conn.json_error(path, json.dumps({"model": MODEL_NAME, **body}).encode())
        assert (err["param"], err["message"]) == (message.split(".")[0].split(":")[0], message), (body, err)


def test_401_says_bearer_and_comes_before_404(url):
    with httpx.Client(base_url=url, timeout=30) as http:
        for method, path in (
            ("GET", "/v1/models"),
            ("POST", "/v1/completions"),
            ("GET", "/v1/no-such-route"),
            ("POST", "/v1/engines/x/completions"),
            ("GET", "/v1"),
        ):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic " + API_KEY}):
                resp = http.request(method, path, headers=headers)
                err = assert_openai_error(resp, 401, None)
                assert err["code"] == "invalid_api_key" and resp.headers["www-authenticate"] == "Bearer"
        assert_openai_error(http.get("/v1/no-such-route", headers=AUTH), 404, None)  # with the key: not found
        assert_openai_error(http.get("/no-such-route"), 404, None)  # outside /v1 no key is asked for
        assert http.get("/health").status_code == 200


# ---------------------------------------------------------------------------------------------- browsers (CORS)

PAGE = "http://page.example"  # a web page's origin, as a browser sends it


def preflight(http, path: str, origin: str, method: str = "POST", headers: str = "authorization, content-type"):
    """What a browser sends before a cross-origin POST with JSON and a key: OPTIONS, no key, no body."""
    return http.options(
        path,
        headers={"Origin": origin, "Access-Control-Request-Method": method, "Access-Control-Request-Headers": headers},
    )


def test_any_origin_may_call_the_server_by_default_as_in_vllm(url):
    """vLLM's defaults (allowed origins, methods and headers *, no credentials): a browser's preflight is answered
    without the key it cannot carry, and every answer to a cross-origin request (a 401, a stream) lets the page
    read it. A request without an Origin header is no CORS request and gets no CORS header."""
    with httpx.Client(base_url=url, timeout=60) as http:
        r = preflight(http, "/v1/chat/completions", PAGE)
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == "*"
        assert "POST" in r.headers["access-control-allow-methods"]
        assert {"authorization", "content-type"} <= set(r.headers["access-control-allow-headers"].lower().split(", "))
        assert "access-control-allow-credentials" not in r.headers
        r = http.get("/v1/models", headers={"Origin": PAGE, **AUTH})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
        r = http.post("/v1/completions", json={"prompt": "Hi"}, headers={"Origin": PAGE})
        assert_openai_error(r, 401, None)
        assert r.headers["access-control-allow-origin"] == "*"  # the page can read why
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}
        with http.stream("POST", "/v1/chat/completions", json=body, headers={"Origin": PAGE, **AUTH}) as r:
            data = r.read().decode()
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["access-control-allow-origin"] == "*" and data.rstrip().endswith("data: [DONE]")
        r = http.get("/v1/models", headers=AUTH)
        assert r.status_code == 200 and not any(k.startswith("access-control-") for k in r.headers)


def test_cors_settings_restrict_origins_methods_and_credentials_or_turn_it_off(llama_dir):
    """allowed_origins as a JSON list (vLLM's form) or comma-separated: other origins' preflights are refused
    (400) and their answers carry no CORS header; allowed_methods limits the preflight's method; credentials
    echo the origin. An empty list adds no CORS layer: a preflight is then an unkeyed /v1 request (401)."""
    from starlette.testclient import TestClient

    from miniserve.config import EngineConfig, ServerConfig, SettingError
    from miniserve.server.app import create_app

    engine = EngineConfig(model=str(llama_dir), device="cpu", dtype="float32")

    def client(**cors) -> TestClient:  # (no lifespan: these answers come before the engine is asked anything)
        return TestClient(create_app(engine, ServerConfig(api_key=API_KEY, **cors)), base_url="http://testserver")

    other = "http://other.example"
    for origins in (f'["{PAGE}", "http://second.example"]', f"{PAGE}, http://second.example"):
        http = client(allowed_origins=origins, allowed_methods="POST", allow_credentials=True)
        r = preflight(http, "/v1/completions", PAGE)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == PAGE
        assert r.headers["access-control-allow-credentials"] == "true"
        assert preflight(http, "/v1/completions", "http://second.example").status_code == 200
        r = preflight(http, "/v1/completions", other)
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
        assert preflight(http, "/v1/completions", PAGE, method="DELETE").status_code == 400
        r = http.post("/v1/completions", json={"prompt": "Hi"}, headers={"Origin": PAGE})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == PAGE
        r = http.post("/v1/completions", json={"prompt": "Hi"}, headers={"Origin": other})
        assert r.status_code == 401 and "access-control-allow-origin" not in r.headers
    for off in ("", "[]", " , "):
        r = preflight(client(allowed_origins=off), "/v1/completions", PAGE)
        assert r.status_code == 401 and not any(k.startswith("access-control-") for k in r.headers), off
    for bad, says in (
        ('["http://a.example", 1]', "must be a JSON list of strings"),
        ('["unclosed', "must be a JSON list of strings"),
        ("http://localhost:3000/", "is not an origin"),  # a path: no browser's Origin header would match it
        ('{"a": 1}', "is not an origin"),
    ):
        with pytest.raises(SettingError, match=says) as exc:
            ServerConfig(allowed_origins=bad)
        assert exc.value.name == "allowed_origins"
    assert ServerConfig(allowed_origins="http://localhost:3000, https://chat.example:8443").cors()["allow_origins"] == [
        "http://localhost:3000",
        "https://chat.example:8443",
    ]


def test_a_root_path_prefix_is_routed_and_keyed_as_the_bare_path(llama_dir):
    """A proxy's prefix: /api/v1/... is routed as /v1/... and needs the key as it does, both under root_path
    (vLLM's --root-path) and under uvicorn's own --root-path (the scope's root_path, the path prefixed), where the
    key check once judged the raw path and let /api/v1/... through unkeyed. Without lifespan no engine runs, so a
    keyed request's 503 shows it was routed to its handler. The OpenAPI schema names the prefix as its server."""
    from starlette.testclient import TestClient

    from miniserve.config import EngineConfig, ServerConfig, SettingError
    from miniserve.server.app import create_app

    engine = EngineConfig(model=str(llama_dir), device="cpu", dtype="float32")
    ours = TestClient(create_app(engine, ServerConfig(api_key=API_KEY, root_path="/api")), base_url="http://t")
    uvicorns = TestClient(create_app(engine, ServerConfig(api_key=API_KEY)), base_url="http://t", root_path="/api")
    for client in (ours, uvicorns):
        for path in ("/v1/models", "/api/v1/models", "/api/v1/nowhere", "/api/v1", "/api/invocations"):
            r = client.request("POST" if path.endswith("invocations") else "GET", path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, r.text)
        for path in ("/api/v1/models", "/api/v1/completions", "/api/v1/chat/completions"):
            r = client.request("GET" if path.endswith("models") else "POST", path, json={"prompt": "Hi"})
            assert r.status_code == 401, (path, r.text)
            r = client.request("GET" if path.endswith("models") else "POST", path, json={"prompt": "Hi"}, headers=AUTH)
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable", (path, r.text)
        assert client.get("/api/v1/nowhere", headers=AUTH).status_code == 404
        assert client.get("/apiv1/models", headers=AUTH).status_code == 404  # a prefix ends at a "/"
        assert client.get("/api/openapi.json").json()["servers"] == [{"url": "/api"}]
    assert TestClient(create_app(engine, ServerConfig())).get("/openapi.json").status_code == 200
    closed = TestClient(create_app(engine, ServerConfig(disable_fastapi_docs=True)))
    assert [closed.get(p).status_code for p in ("/openapi.json", "/docs", "/redoc")] == [404] * 3
    for bad in ("api", "/api/", "/"):
        with pytest.raises(SettingError, match="root_path must start with '/' and not end with one"):
            ServerConfig(root_path=bad)


def test_serve_flags_that_default_request_fields(llama_dir, monkeypatch):
    """--return-tokens-as-token-ids names logprobs' tokens by id unless a request says false;
    --enable-force-include-usage ends every stream with a usage chunk, asked for or not, and a request's
    continuous_usage_stats then needs no include_usage of its own (as vLLM's). Answers that list logprobs are
    formatted off the event loop (a worker thread), which keeps serving other requests meanwhile."""
    from miniserve.config import EngineConfig, ServerConfig
    from miniserve.server import responses
    from miniserve.server.app import create_app

    threads = []
    for name in ("completion_logprobs", "chat_logprobs"):
        real = getattr(responses, name)

        def spy(*args, real=real, **kwargs):
            threads.append(threading.current_thread().name)
            return real(*args, **kwargs)

        monkeypatch.setattr(responses, name, spy)

    server = ServerConfig(return_tokens_as_token_ids=True, enable_force_include_usage=True)
    app = create_app(EngineConfig(model=str(llama_dir), device="cpu", dtype="float32"), server)
    body = {"prompt": "Hi", "max_tokens": 3, "logprobs": 1}
    with in_process_server(app) as url:
        tokens = httpx.post(url + "/v1/completions", json=body).json()["choices"][0]["logprobs"]["tokens"]
        assert len(tokens) == 3 and all(t.startswith("token_id:") for t in tokens), tokens
        own = {**body, "return_tokens_as_token_ids": False}
        tokens = httpx.post(url + "/v1/completions", json=own).json()["choices"][0]["logprobs"]["tokens"]
        assert not any(t.startswith("token_id:") for t in tokens), tokens
        chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "logprobs": True}
        assert len(httpx.post(url + "/v1/chat/completions", json=chat).json()["choices"][0]["logprobs"]["content"]) == 3
        assert len(threads) == 3 and all(t.startswith("miniserve-cpu") for t in threads), threads
        for path, req in (
            ("/v1/completions", body),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}),
        ):
            for options in (None, {"include_usage": False}, {"continuous_usage_stats": True}):
                stream = {**req, "stream": True, **({"stream_options": options} if options else {})}
                lines = httpx.post(url + path, json=stream).text.split("\n\n")
                chunks = [json.loads(x[len("data: ") :]) for x in lines if x.startswith("data: {")]
                assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3, (path, options)
                per_chunk = [c.get("usage") is not None for c in chunks[:-1]]
                assert per_chunk == [bool(options and options.get("continuous_usage_stats"))] * len(per_chunk)


# ---------------------------------------------------------------------------------------------- the catch-all


@contextmanager
def in_process_server(app, protocol: str | type = "auto") -> Iterator[str]:
    """A real uvicorn serving `app` from a thread of this process (so a test can add routes that fail, or count
    what the server does), with `protocol` as uvicorn's HTTP protocol."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", http=protocol))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the in-process server did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def test_unexpected_errors_answer_500_in_openai_shape_and_log_the_traceback(llama_dir, caplog):
    from fastapi.responses import StreamingResponse

    from miniserve.config import EngineConfig, ServerConfig
    from miniserve.server.app import create_app

    app = create_app(EngineConfig(model=str(llama_dir), device="cpu", dtype="float32"), ServerConfig())

    async def boom():
        raise KeyError("an unforeseen bug")

    async def boom_midstream():
        async def events():
            yield 'data: {"ok": true}\n\n'
            raise ZeroDivisionError("a bug halfway through a stream")

        return StreamingResponse(events(), media_type="text/event-stream")

    app.add_api_route("/v1/boom", boom, methods=["POST"])
    app.add_api_route("/v1/boom-stream", boom_midstream, methods=["POST"])
    caplog.set_level(logging.ERROR, logger="miniserve.server")
    with in_process_server(app) as url:
        c = Conn(url)
        status, headers, data = c.request("POST", "/v1/boom", b"{}")
        assert status == 500 and headers.get("connection") != "close"
        err = json.loads(data)["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "server_error"
        assert "KeyError" in err["message"]
        assert c.request("GET", "/health")[0] == 200  # the same connection serves on
        status, _, data = c.request("POST", "/v1/boom-stream", b"{}")
        events = [line[len("data: ") :] for line in data.decode().splitlines() if line.startswith("data: ")]
        assert status == 200 and events[0] == '{"ok": true}' and events[-1] == "[DONE]"
        assert json.loads(events[1])["error"]["type"] == "server_error"
        assert c.request("GET", "/health")[0] == 200
        c.close()
        # a client that leaves halfway through its body is its own business: no error, no traceback
        before = len(caplog.records)
        with socket.create_connection((urlsplit(url).hostname, urlsplit(url).port)) as s:
            s.sendall(b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
            time.sleep(0.2)
        assert httpx.post(url + "/tokenize", json={"prompt": "still here"}).status_code == 200
        assert len(caplog.records) == before, [r.getMessage() for r in caplog.records[before:]]
    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert "Traceback" in logged or any(r.exc_info for r in caplog.records)
    assert {r.exc_info[0] for r in caplog.records if r.exc_info} >= {KeyError, ZeroDivisionError}
    assert gc.get_freeze_count() == 0  # the app froze this process's heap while serving and thawed it at shutdown


def test_generation_requests_skip_the_router_and_get_the_apps_answers(llama_dir, monkeypatch):
    """DirectRoutes: POST /v1/completions and /v1/chat/completions reach their handlers without FastAPI's router
    (which still routes everything else), behind the API-key check, and their errors are answered as the app's
    exception handlers answer them (OpenAI's shape, the field named)."""
    from starlette.routing import Router

    from miniserve.config import EngineConfig, ServerConfig
    from miniserve.server.app import create_app

    routed, real = [], Router.__call__

    async def spy(self, scope, receive, send):
        if scope["type"] == "http":
            routed.append((scope["method"], scope["path"]))
        return await real(self, scope, receive, send)

    monkeypatch.setattr(Router, "__call__", spy)
    app = create_app(EngineConfig(model=str(llama_dir), device="cpu", dtype="float32"), ServerConfig(api_key="k"))
    key = {"Authorization": "Bearer k"}
    with in_process_server(app) as url:
        r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, headers=key)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": -1}, headers=key)
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
        r = httpx.post(url + "/v1/chat/completions", json={"messages": "not a list"}, headers=key)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
        assert httpx.post(url + "/v1/completions", json={"prompt": "Hi"}).status_code == 401
        assert httpx.get(url + "/v1/models", headers=key).status_code == 200
        assert httpx.get(url + "/v1/completions", headers=key).status_code == 405  # not POST: the router answers
    assert routed == [("GET", "/v1/models"), ("GET", "/v1/completions")]


# ---------------------------------------------------------------------------------------------- slow clients

HEADER_TIMEOUT, BODY_TIMEOUT, KEEP_ALIVE_TIMEOUT, WRITE_TIMEOUT, MAX_CONNECTIONS = 2.0, 2.0, 1.0, 1.0, 4
SLACK = 10.0  # how much later than its deadline a close may come on a loaded 2-core machine


@pytest.fixture(scope="module", params=["httptools", "h11"])
def guarded_url(llama_dir, request) -> Iterator[str]:
    """A server launched as the README says (`--http server:http`), with deadlines short enough to wait for, on
    each of the two HTTP parsers (server/connection.py: one set of rules over either)."""
    env = {
        "MINISERVE_HTTP_PARSER": request.param,
        "MINISERVE_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
        "MINISERVE_BODY_TIMEOUT": str(BODY_TIMEOUT),
        "MINISERVE_KEEP_ALIVE_TIMEOUT": str(KEEP_ALIVE_TIMEOUT),
        "MINISERVE_WRITE_TIMEOUT": str(WRITE_TIMEOUT),
        "MINISERVE_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
        "MINISERVE_ROOT_PATH": "/api",
    }
    with run_server(llama_dir, uvicorn_args=("--http", "server:http"), **env) as base:
        yield base


def connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=30)


def trickle_until_closed(sock: socket.socket, data: bytes, every: float = 0.05) -> tuple[bytes, float]:
    """Send `data` a byte every `every` seconds (then nothing) until the server closes the connection; returns
    what it sent back and how long after the start it closed."""
    start = time.monotonic()
    received, sent = b"", 0
    while time.monotonic() - start < HEADER_TIMEOUT + BODY_TIMEOUT + SLACK:
        readable, _, _ = select.select([sock], [], [], every)
        if readable:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return received, time.monotonic() - start
            received += chunk
        elif sent < len(data):
            try:
                sock.sendall(data[sent : sent + 1])
            except (BrokenPipeError, ConnectionResetError):
                pass
            sent += 1
    raise AssertionError(f"the server kept the connection open (it sent {received[:200]!r})")


def parse_response(raw: bytes) -> tuple[int, dict, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def assert_timeout_answer(raw: bytes, what: str) -> None:
    status, headers, body = parse_response(raw)
    assert status == 408 and headers["connection"] == "close", raw
    err = json.loads(body)["error"]
    assert err["code"] == "request_timeout" and what in err["message"] and err["type"] == "invalid_request_error"


def test_an_idle_connection_closes_at_the_header_timeout(guarded_url):
    with connect(guarded_url) as s:
        received, after = trickle_until_closed(s, b"")
    assert received == b"" and HEADER_TIMEOUT * 0.9 <= after < HEADER_TIMEOUT + SLACK


def test_trickled_headers_get_408_at_the_header_timeout(guarded_url):
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000
    with connect(guarded_url) as s:
        received, after = trickle_until_closed(s, head)
    assert HEADER_TIMEOUT * 0.9 <= after < HEADER_TIMEOUT + SLACK
    assert_timeout_answer(received, "head")


def test_a_stalled_body_gets_408_at_the_body_timeout(guarded_url):
    body = json.dumps({"prompt": "ROMEO:", "padding": "x" * 200}).encode()
    head = b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += b"Content-Length: %d\r\n\r\n" % len(body)
    with connect(guarded_url) as s:
        s.sendall(head + body[:10])
        received, after = trickle_until_closed(s, body[10:], every=0.1)  # 200 bytes at 10 bytes/s: too slow
    assert BODY_TIMEOUT * 0.9 <= after < BODY_TIMEOUT + SLACK
    assert_timeout_answer(received, "body")
    assert httpx.post(guarded_url + "/tokenize", json={"prompt": "ROMEO:"}).status_code == 200  # unharmed


def test_a_client_that_reads_none_of_its_answer_is_dropped_at_the_write_timeout(guarded_url):
    """Pipelined requests whose answers (a long prompt's tokens) together pass the socket buffers, never read:
    once nothing more could be written for write_timeout, the server drops the connection, and what is read
    afterwards is cut short. (Without the deadline it held every answer until the client went; reading then got
    them all.)"""
    body = json.dumps({"prompt": corpus_text(100_000), "return_token_strs": True}).encode()
    one = b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    one += b"Content-Length: %d\r\n\r\n" % len(body) + body
    start = time.monotonic()
    answer_bytes = len(httpx.post(guarded_url + "/tokenize", content=body).content)
    count = (6 << 20) // answer_bytes + 1  # past the kernel's send buffer (at most 4 MiB) and the protocol's
    answered_within = count * 2 * (time.monotonic() - start)  # every answer made, with room to spare
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (before connecting: it sets the window)
        s.connect((urlsplit(guarded_url).hostname, urlsplit(guarded_url).port))
        s.sendall(one * count)
        time.sleep(answered_within + WRITE_TIMEOUT + 1)
        received = b""
        try:
            while chunk := s.recv(1 << 20):
                received += chunk
        except ConnectionResetError:
            pass
    assert received.startswith(b"HTTP/1.1 200") and len(received) < count * answer_bytes, (len(received), count)
    assert httpx.post(guarded_url + "/tokenize", json={"prompt": "ROMEO:"}).status_code == 200  # unharmed


def test_malformed_http_gets_an_openai_400(guarded_url):
    for garbage in (b"NOT HTTP AT ALL\r\n\r\n", b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n"):
        with connect(guarded_url) as s:
            s.sendall(garbage)
            received, _ = trickle_until_closed(s, b"")
        status, headers, body = parse_response(received)
        assert status == 400 and headers["connection"] == "close", received[:300]
        err = json.loads(body)["error"]
        assert err["type"] == "invalid_request_error" and err["code"] == "invalid_http_request"


def test_pipelined_requests_are_all_answered_before_the_connection_idles(guarded_url):
    """Two requests in one write: the second waits for the first's response, and no deadline cuts it off."""
    with connect(guarded_url) as s:
        one = b'POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n{"prompt": "ROMEO:"}'
        s.sendall(one + one)
        received, after = trickle_until_closed(s, b"")
    assert received.count(b"HTTP/1.1 200") == 2 and received.count(b'"count"') == 2, received
    assert after >= KEEP_ALIVE_TIMEOUT * 0.9  # then closed as an idle keep-alive connection


def test_a_client_gone_with_pipelined_requests_aborts_the_one_running(guarded_url):
    """Two streamed completions in one write, then the client leaves while the first streams: the first is
    aborted (uvicorn's httptools protocol told only the queued second one, and the first generated to its end
    for nobody); the second never starts."""
    before = scrape(guarded_url)
    body = json.dumps({"prompt": "ROMEO:", "max_tokens": 200, "ignore_eos": True, "stream": True})
    one = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    one += b"Content-Length: %d\r\n\r\n%b" % (len(body), body.encode())
    with connect(guarded_url) as s:
        s.sendall(one + one)
        assert s.recv(65536).startswith(b"HTTP/1.1 200")  # the first is streaming
    after = wait_for_metric(guarded_url, "num_requests_running", lambda v: v == 0, timeout=2.0)
    for reason, more in (("abort", 1), ("length", 0)):
        finished = metric(after, "request_success_total", finished_reason=reason)
        assert finished == metric(before, "request_success_total", finished_reason=reason) + more, reason


def test_keep_alive_connection_closes_after_its_timeout(guarded_url):
    c = Conn(guarded_url)
    assert c.request("GET", "/health")[0] == 200
    assert c.request("POST", "/tokenize", b'{"prompt": "ROMEO:"}')[0] == 200  # the same connection, kept alive
    received, after = trickle_until_closed(c.http.sock, b"")
    assert received == b"" and KEEP_ALIVE_TIMEOUT * 0.9 <= after < min(HEADER_TIMEOUT, KEEP_ALIVE_TIMEOUT + SLACK)
    c.close()


def test_connections_beyond_the_limit_get_503_and_close(guarded_url):
    held = [connect(guarded_url) for _ in range(MAX_CONNECTIONS)]
    try:
        with connect(guarded_url) as extra:
            extra.sendall(b'POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Length: 18\r\n\r\n{"prompt": "hi"}  ')
            received, _ = trickle_until_closed(extra, b"")
        status, headers, body = parse_response(received)
        assert status == 503 and headers["connection"] == "close", received
        err = json.loads(body)["error"]
        assert err["code"] == "overloaded" and f"limit is {MAX_CONNECTIONS}" in err["message"]
        # a liveness probe and a metrics scrape are answered all the same (a busy server is not a dead one)
        probes = (("/health", b""), ("/api/health", b""), ("/ping", b""), ("/metrics", b"miniserve:num_requests"))
        for path, expect in probes:  # (/api: the server's root path, which a proxy may keep)
            with connect(guarded_url) as probe:
                probe.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
                received, _ = trickle_until_closed(probe, b"")  # answered, then closed
            status, headers, body = parse_response(received)
            assert status == 200 and headers["connection"] == "close" and expect in body, received[:300]
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + SLACK  # once they are gone, new connections are served
    while httpx.post(guarded_url + "/tokenize", json={"prompt": "hi"}).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.parametrize("guarded", [False, True])
def test_connection_settings_without_their_protocol_are_a_warning(llama_dir, guarded):
    """`uvicorn server:app` without `--http server:http` runs uvicorn's own protocol, which ignores them."""
    args = ("--http", "server:http") if guarded else ()
    with tempfile.TemporaryFile() as log:
        env = {"MINISERVE_HEADER_TIMEOUT": "7", "MINISERVE_MAX_CONNECTIONS": "9"}
        with uvicorn_server(llama_dir, log, args, **env) as (url, _):
            assert httpx.get(url + "/health").status_code == 200
            assert httpx.get(url + "/health").status_code == 200
        log.seek(0)
        logged = log.read().decode(errors="replace")
    warning = "MINISERVE_HEADER_TIMEOUT, MINISERVE_MAX_CONNECTIONS set, but uvicorn runs without `--http server:http`"
    assert logged.count(warning) == (0 if guarded else 1), logged


def test_miniserve_serve_takes_the_connection_flags(llama_dir):
    """The CLI path (flags, not environment variables) reaches the same protocol."""
    port = free_port()
    cmd = [sys.executable, "-m", "miniserve.cli", "serve", "--model", str(llama_dir), "--device", "cpu"]
    cmd += ["--dtype", "float32", "--port", str(port), "--log-level", "warning"]
    cmd += ["--header-timeout", "1.5", "--keep-alive-timeout", "7", "--max-connections", "1"]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=log)
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_healthy(url, proc, log)
            with connect(url) as idle:
                opened = time.monotonic()
                with connect(url) as extra:  # the second connection is one too many
                    extra.sendall(b'POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Length: 16\r\n\r\n{"prompt": "hi"}')
                    assert parse_response(trickle_until_closed(extra, b"")[0])[0] == 503
                received, _ = trickle_until_closed(idle, b"")
                after = time.monotonic() - opened
            assert received == b"" and 1.5 * 0.9 <= after < 1.5 + SLACK
        finally:
            proc.terminate()
            proc.wait(timeout=30)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_miniserve_serve_serves_https_with_vllms_ssl_flags(llama_dir, tmp_path):
    """--ssl-certfile and --ssl-keyfile (vLLM's flags): the API over HTTPS, checked against the certificate, and
    the address logged as https; plain HTTP on that port gets no answer. A certificate that cannot be loaded is
    one line before the model loads; a key without a certificate too."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    trusted = ssl.create_default_context(cafile=str(cert))
    port = free_port()
    cmd = [sys.executable, "-m", "miniserve.cli", "serve", "--model", str(llama_dir), "--device", "cpu"]
    cmd += ["--dtype", "float32", "--port", str(port), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=log)
        try:
            url = f"https://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None and time.monotonic() < deadline, "the HTTPS server did not come up"
                try:
                    if httpx.get(url + "/health", verify=trusted, timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            body = {"model": str(llama_dir), "prompt": "To be", "max_tokens": 2}
            r = httpx.post(url + "/v1/completions", json=body, verify=trusted, timeout=60)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text
            with pytest.raises(httpx.TransportError):  # (TLS's handshake is all this port speaks)
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
            log.seek(0)
            assert f"miniserve: listening on https://127.0.0.1:{port}" in log.read().decode(errors="replace")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    base = [sys.executable, "-m", "miniserve.cli", "serve", "--model", str(llama_dir), "--device", "cpu"]
    for extra, says in (
        (["--ssl-certfile", str(key)], f"cannot serve HTTPS with '{key}': "),  # (a key, no certificate)
        (["--ssl-certfile", str(cert), "--ssl-keyfile", str(tmp_path / "none.pem")], "cannot serve HTTPS with"),
        (["--ssl-keyfile", str(key)], "--ssl-keyfile: does nothing without --ssl-certfile"),
    ):
        run = subprocess.run(base + extra, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and run.stderr.startswith("miniserve: error: ") and says in run.stderr, run.stderr
        assert run.stderr.count("\n") == 1, run.stderr


# ---------------------------------------------------------------------------------------------- fuzz

FUZZ_CASES = 2500
FUZZ_BUDGET_S = 60.0  # stop early on a slow machine; the seed fixes which cases come first
FUZZ_MIN_CASES = 400

MESSAGES = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    [{"role": "assistant", "content": None}, {"role": "user", "content": "again", "name": "x"}],
    [{"role": "developer", "content": "d"}, {"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
]
SAMPLING = {  # field -> plausible values (the fuzzer mixes in arbitrary JSON as well)
    "model": [MODEL_NAME, "gpt-4", ""],
    "max_tokens": [1, 2, 3, 0],
    "temperature": [0, 0.7, 1.0, 2.0],
    "top_p": [1.0, 0.5, 0.01],
    "n": [1, 2, 3],
    "stream": [True, False],
    "stream_options": [
        {"include_usage": True},
        {"include_usage": False},
        {"include_usage": True, "continuous_usage_stats": True},
    ],
    "stop": ["\n", ["a", "e"], ["."], [], "ROMEO"],
    "seed": [0, 1, 2**63 - 1],
    "presence_penalty": [0, 1.5, -2],
    "frequency_penalty": [0, 0.5],
    "logit_bias": [{}, {"5": 1.0}, {"5": 100}, {"99999": 1}, {"x": 1}],
    "top_k": [-1, 0, 1, 5],
    "min_p": [0, 0.1, 1.0],
    "repetition_penalty": [1.0, 1.3],
    "min_tokens": [0, 1, 2],
    "stop_token_ids": [[], [1], [5, 6]],
    "ignore_eos": [True, False],
    "include_stop_str_in_output": [True, False],
    "skip_special_tokens": [True, False],
    "user": ["someone"],
    "allowed_token_ids": [[5, 6], [], [10**6]],
    "bad_words": [["the"], [""], ["a b"]],
    "best_of": [1, 2, 3],
    "use_beam_search": [True, False],
    "length_penalty": [1.0, 0.5],
    "prompt_logprobs": [0, 1, 20],
    "truncate_prompt_tokens": [-1, 1, 3, 0],
    "cache_salt": ["s", ""],
    "request_id": ["r1", ""],
    "return_token_ids": [True],
    "return_tokens_as_token_ids": [True],
    "response_format": [
        {"type": "json_object"},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
        {"type": "json_schema"},
        {"type": "text"},
    ],
    "structured_outputs": [{"regex": "[a-z]+"}, {"choice": ["a", "b"]}, {"grammar": "root ::= x"}, {"json": "{"}],
    "guided_json": [{"type": "object"}, {"type": "nope"}],
    "guided_regex": ["a|b", "("],
    "guided_choice": [["x"], []],
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
        },
    }
]
SCHEMAS = {  # path -> (field -> plausible values), required fields first
    "/v1/completions": {
        "prompt": ["ROMEO:", ["a", "b"], [5, 6, 7], [[5, 6], [7]], "", [], ["x"] * 5],
        **SAMPLING,
        "logprobs": [0, 1, 5, 20],
        "echo": [True, False],
        "suffix": ["x"],
    },
    "/v1/chat/completions": {
        "messages": MESSAGES,
        **SAMPLING,
        "max_completion_tokens": [1, 2],
        "logprobs": [True, False],
        "top_logprobs": [0, 2, 20],
        "add_generation_prompt": [True, False],
        "tools": [TOOLS, []],
        "tool_choice": ["auto", "none", "required", {"type": "function", "function": {"name": "f"}}],
        "echo": [True, False],
        "continue_final_message": [True, False],
        "chat_template_kwargs": [{"x": 1}, {"truncate": 1, "add_special_tokens": 1}, {"tools": 1}],
    },
    "/tokenize": {
        "prompt": ["ROMEO:", "", "é🙂"],
        "messages": MESSAGES,
        "model": [MODEL_NAME, "x"],
        "add_special_tokens": [True, False],
        "add_generation_prompt": [True, False],
    },
    "/detokenize": {"tokens": [[5, 6], [], [0, 1, 2]], "model": [MODEL_NAME]},
}
TEXTS = [
    "",
    "ROMEO:",
    "é",
    "日本語",
    "🙂",
    "\x00",
    "\ufffd",
    "\u202e",
    "\ud800",
    "\udfff",
    "\\",
    '"',
    "\n\t",
    "a" * 300,
]


def fuzz_text(rng) -> str:
    if rng.random() < 0.5:
        return rng.choice(TEXTS)
    return "".join(chr(rng.randrange(0x110000)) if rng.random() < 0.3 else rng.choice("ab .\n") for _ in range(5))


def fuzz_value(rng, depth: int = 0):
    """Any JSON value, drawn towards the edges: int64 and float limits, NaN, lone surrogates, nesting."""
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, 1, 2, 3, -1, 20, 21, 128, 129, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 10**30])
    if kind == 3:
        return rng.choice([0.0, 0.5, 1.0, 2.0, 2.5, -0.1, 1e-9, 1e308, -1e308, 5e-324])
    if kind == 4:
        return rng.choice([math.nan, math.inf, -math.inf])
    if kind == 5:
        return fuzz_text(rng)
    if kind == 6:
        return [fuzz_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 7:
        return {fuzz_text(rng): fuzz_value(rng, depth + 1) for _ in range(rng.randrange(3))}
    return [rng.randrange(-2, 400) for _ in range(rng.randrange(6))]  # token ids, some out of range


def request_fields(path: str) -> dict[str, list]:
    """SCHEMAS[path], plus every field the server's request model has that SCHEMAS does not list yet (a field
    added later is fuzzed with arbitrary values from the start)."""
    from miniserve.server import protocol

    model = {
        "/v1/completions": protocol.CompletionRequest,
        "/v1/chat/completions": protocol.ChatCompletionRequest,
        "/tokenize": protocol.TokenizeRequest,
        "/detokenize": protocol.DetokenizeRequest,
    }[path]
    return {**SCHEMAS[path], **{name: [] for name in model.model_fields if name not in SCHEMAS[path]}}


def fuzz_body(rng, path: str) -> bytes:
    body = {}
    arbitrary = rng.choice([0.0, 0.03, 0.1, 0.3])  # how often a field gets any JSON value instead of a plausible one
    for i, (field, plausible) in enumerate(request_fields(path).items()):
        if rng.random() < (0.9 if i == 0 else 0.4):
            body[field] = fuzz_value(rng) if not plausible or rng.random() < arbitrary else rng.choice(plausible)
    if path.startswith("/v1/") and not any(
        isinstance(body.get(k), int) for k in ("max_tokens", "max_completion_tokens")
    ):
        body["max_tokens"] = rng.choice([1, 2, 3])  # else a chat runs to the end of the context: slow, not harder
    form = rng.random()
    if form < 0.05:  # JSON, but not an object
        body = fuzz_value(rng)
    ascii_only = rng.random() < 0.5
    text = json.dumps(body, ensure_ascii=ascii_only).encode("utf-8", errors="surrogatepass")
    if form < 0.85:
        return text
    if form < 0.90:
        return text[: rng.randrange(len(text) + 1)]  # cut short
    if form < 0.95:
        at = rng.randrange(len(text))
        return text[:at] + bytes([rng.randrange(256)]) + text[at + 1 :]  # one byte flipped
    return bytes(rng.randrange(256) for _ in range(rng.randrange(40)))


def check_answer(status: int, headers: dict, data: bytes, case: str) -> None:
    assert status < 500, case
    if status >= 400:
        err = json.loads(data)["error"]
        assert set(err) == {"message", "type", "param", "code"}, case
        assert isinstance(err["message"], str) and err["message"] and err["type"] == "invalid_request_error", case
    elif headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[len("data: ") :] for line in data.decode().splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", case
        for event in events[:-1]:
            chunk = json.loads(event)
            assert "error" not in chunk or chunk["error"]["type"] == "invalid_request_error", case
    else:
        json.loads(data)


def test_fuzz_no_500s_openai_errors_and_a_healthy_server_after(url):
    rng = random.Random(20240615)
    conn = Conn(url)
    start, done, statuses = time.monotonic(), 0, collections.Counter()
    for i in range(FUZZ_CASES):
        if time.monotonic() - start > FUZZ_BUDGET_S:
            break
        path = rng.choice(list(SCHEMAS))
        raw = fuzz_body(rng, path)
        method = "POST" if rng.random() < 0.97 else rng.choice(["GET", "PUT", "DELETE"])
        auth = rng.random() < 0.97
        case = f"case {i}: {method} {path} auth={auth} body={raw[:400]!r}"
        try:
            status, headers, data = conn.request(method, path, raw, auth=auth)
        except (http.client.HTTPException, OSError) as exc:
            raise AssertionError(f"{case}: the connection failed: {exc!r}") from None
        check_answer(status, headers, data, f"{case} -> {status} {data[:400]!r}")
        statuses[status] += 1
        done += 1
    conn.close()
    print(f"fuzz: {done} cases, statuses {dict(statuses)}")
    assert done >= FUZZ_MIN_CASES, f"only {done} cases in {FUZZ_BUDGET_S}s"
    assert statuses[200] > done // 10 and statuses[400] > done // 4, statuses  # both kinds were exercised
    # healthy afterwards: nothing left running or holding KV blocks, and a plain request is served
    samples = wait_for_metric(url, "kv_blocks_used", lambda v: v == 0, timeout=10)
    assert metric(samples, "kv_blocks_used") == 0 and metric(samples, "num_requests_running") == 0
    assert metric(samples, "num_requests_waiting") == 0
    body = {"model": MODEL_NAME, "prompt": "ROMEO:", "max_tokens": 3, "ignore_eos": True}
    resp = httpx.post(url + "/v1/completions", json=body, headers=AUTH, timeout=60)
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 3


# Options valid alone (a field's value, with what it needs beside it): every pair of them is sent, so the test
# reaches combinations of features (best_of with logprobs=0 answered 500 until a test like this one found it).
STREAMS = [{"stream": False}, {"stream": True}, {"stream": True, "stream_options": {"include_usage": True}}]
VALID_SAMPLING = {
    "temperature": [0, 1.0], "top_p": [0.5], "top_k": [5], "n": [1, 2, 3], "best_of": [1, 2, 3], "stream": STREAMS,
    "stop": ["e", ["e", "th"]], "seed": [7], "presence_penalty": [1.5], "repetition_penalty": [1.3],
    "min_tokens": [1], "ignore_eos": [True], "prompt_logprobs": [0, 2], "logit_bias": [{"5": 100}],
    "allowed_token_ids": [[5, 6, 7]], "bad_words": [["the"]], "guided_choice": [["yes", "no"]],
    "response_format": [{"type": "json_object"}], "include_stop_str_in_output": [True],
    "truncate_prompt_tokens": [1, 3], "return_token_ids": [True], "frequency_penalty": [-2],
    "max_tokens": [1, 4], "use_beam_search": [True, {"use_beam_search": True, "length_penalty": 0.5}],
}  # fmt: skip
VALID = {
    "/v1/completions": {
        **VALID_SAMPLING, "prompt": ["ROMEO:", ["a", "b"], [5, 6, 7], [[5, 6], [7]]], "logprobs": [0, 2],
        "echo": [True],
    },
    "/v1/chat/completions": {
        **VALID_SAMPLING, "messages": MESSAGES[:2], "logprobs": [True, {"logprobs": True, "top_logprobs": 2}],
        "echo": [True], "add_generation_prompt": [False], "tools": [{"tools": TOOLS, "tool_choice": "required"}],
    },
}  # fmt: skip


def valid_pairs(path: str) -> Iterator[dict]:
    """Every pair of two fields' options on top of a minimal body: n with best_of, logprobs with echo, ..."""
    fields = VALID[path]
    first = "prompt" if path == "/v1/completions" else "messages"
    names = sorted(set(fields) - {first})
    for i, (a, b) in enumerate(itertools.combinations(names, 2)):
        for j, (va, vb) in enumerate(itertools.product(fields[a], fields[b])):
            body = {"model": MODEL_NAME, first: fields[first][(i + j) % len(fields[first])], "max_tokens": 2}
            for name, value in ((a, va), (b, vb)):
                body.update(value if isinstance(value, dict) and name in value else {name: value})
            yield body


def expected_choices(path: str, body: dict) -> int:
    """n per prompt: a completions prompt is one string or one list of ids, or a list of several."""
    prompt = body.get("prompt")
    many = isinstance(prompt, list) and not isinstance(prompt[0], int)
    return body.get("n", 1) * (len(prompt) if path == "/v1/completions" and many else 1)


def check_served(path: str, body: dict, data: bytes, case: str) -> None:
    """A 200 answers what was asked: n choices a prompt, numbered in order, logprobs exactly when asked."""
    if body.get("stream"):
        events = [line[len("data: ") :] for line in data.decode().splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", case
        chunks = [json.loads(e) for e in events[:-1]]
        assert not any("error" in c for c in chunks), case
        indices = {ch["index"] for c in chunks for ch in c["choices"]}
        assert indices == set(range(expected_choices(path, body))), case
        return
    choices = json.loads(data)["choices"]
    assert [c["index"] for c in choices] == list(range(expected_choices(path, body))), case
    asked = body.get("logprobs") is not None if path == "/v1/completions" else bool(body.get("logprobs"))
    for c in choices:
        assert (c["logprobs"] is not None) == asked, case
        if asked and path == "/v1/completions":
            lp = c["logprobs"]
            assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) > 0, case


def test_every_pair_of_valid_fields_is_served_as_asked_or_refused_naming_a_field(url):
    conn, statuses = Conn(url), collections.Counter()
    for path in VALID:
        for i, body in enumerate(valid_pairs(path)):
            status, _, data = conn.request("POST", path, json.dumps(body).encode())
            case = f"case {i}: {path} {body} -> {status} {data[:400]!r}"
            statuses["beam" if "use_beam_search" in body else "other", status] += 1
            if status == 200:
                check_served(path, body, data, case)
            else:  # two fields that do not go together (best_of with stream, n above best_of, ...)
                assert status == 400 and json.loads(data)["error"]["param"] in body, case
    conn.close()
    # (beam search refuses most other fields: its pairs are checked as the rest, the share counted apart)
    assert statuses["other", 200] > 0.95 * (statuses["other", 200] + statuses["other", 400]), statuses
    assert statuses["beam", 200] > 0.2 * (statuses["beam", 200] + statuses["beam", 400]), statuses
