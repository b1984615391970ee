"""Hostile and careless clients against a real `uvicorn server:app`: bodies that used to crash a handler (deep
nesting, lone surrogates), the catch-all for errors nobody foresaw, and the validation details of issue 15.

Every bad input must get a 4xx in OpenAI's error shape, and the keep-alive connection it came on must still
serve the next request (or the answer must say `Connection: close`). Raw bodies go through `http.client`, which
reuses one socket and does not retry, so a connection the server dropped shows up as an error here.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import httpx
import pytest

from tests.test_server import MODEL_NAME, assert_openai_error, free_port, run_server

API_KEY = "sk-harden"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_PROMPTS = 4
MAX_JSON_DEPTH = 64  # the documented limit (miniserve/server/json_body.py), restated: the test is its oracle


@pytest.fixture(scope="module")
def url(llama_dir) -> Iterator[str]:
    env = {
        "MINISERVE_API_KEY": API_KEY,
        "MINISERVE_SERVED_MODEL_NAME": MODEL_NAME,
        "MINISERVE_MAX_PROMPTS_PER_REQUEST": str(MAX_PROMPTS),
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
        for field in ("stop", "prompt", "user"):  # a field that is read, and one that is ignored
            err = conn.json_error(path, (start + f'"{field}": {nested(5000)}}}').encode())
            assert "nest" in err["message"] and err["code"] == "invalid_json"
        # the exact limit: MAX_JSON_DEPTH levels in all (the body object is one) pass, one more does not
        body = start + f'"user": {nested(MAX_JSON_DEPTH - 1)}}}'
        status, _, data = conn.request("POST", path, body.encode())
        assert status == 200, data[:300]
        err = conn.json_error(path, (start + f'"user": {nested(MAX_JSON_DEPTH)}}}').encode())
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
    models = httpx.get(url + "/v1/models", headers=AUTH).json()
    assert models["data"][0]["id"] == models["data"][0]["root"] == MODEL_NAME
    assert "/" not in httpx.get(url + "/v1/models", headers=AUTH).text.replace("\\/", "")  # no filesystem path


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


# ---------------------------------------------------------------------------------------------- the catch-all


@contextmanager
def in_process_server(app) -> Iterator[str]:
    """A real uvicorn serving `app` from a thread of this process (so a test can add routes that fail)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
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

    from miniserve.server.app import ServerSettings, create_app, make_engine_config

    settings = ServerSettings(engine=make_engine_config(model=str(llama_dir), device="cpu", dtype="float32"))
    app = create_app(settings)

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
