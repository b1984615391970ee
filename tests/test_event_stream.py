"""Streams written by the engine step's callback (server/body_writer.py, server/event_stream.py) against the same
streams sent through the ASGI send, on a real uvicorn in this process (so the test can count which way each
event went): whichever way they went, over both HTTP parsers, a client must end up with the same stream (the
same text, logprobs, token ids, finish reasons and usage; only how tokens group into events may differ, as the
ASGI way joins a step's tokens with the next one's when its task wakes late), and a client that stops reading
for a while must get every event once, in order, when it reads on."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import build_model_dir
from tests.test_server_hardening import in_process_server

# seeded sampling for one engine request at a time; greedy where one HTTP request makes two engine requests (how
# the engine batches them varies with timing, and the CPU's float32 logits with the batch: see `close`)
SEEDED = {"temperature": 1.0, "seed": 3}
STREAMS = [  # (path, body): the stream features each way must carry alike
    ("/v1/completions", {"prompt": "ROMEO:", "max_tokens": 12, "n": 2, "logprobs": 2, **SEEDED}),
    (
        "/v1/completions",
        {
            "prompt": ["ROMEO:", "My lord"],
            "max_tokens": 6,
            "echo": True,
            "logprobs": 1,
            "return_token_ids": True,
            "temperature": 0.0,
        },
    ),
    ("/v1/completions", {"prompt": "My lord", "max_tokens": 30, "stop": ["e"], "temperature": 0.0}),
    (
        "/v1/completions",
        {
            "prompt": "Good morrow",
            "max_tokens": 8,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            **SEEDED,
        },
    ),
    (
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "Speak, friend"}],
            "max_tokens": 10,
            "n": 2,
            "logprobs": True,
            "top_logprobs": 2,
            "stream_options": {"include_usage": True},
            **SEEDED,
        },
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Hail"}], "max_tokens": 4, "prompt_logprobs": 1, **SEEDED},
    ),
    # long enough that the loop reads some of its steps before the last, however late it reads (a short stream's
    # steps may all come in one read, with the last one, which is always the task's): the writer's share
    ("/v1/completions", {"prompt": "Thou", "max_tokens": 200, "ignore_eos": True, "logprobs": 1, **SEEDED}),
]


@contextmanager
def serving(model_dir: Path, parser: str | None, small_buffers: bool = False) -> Iterator[str]:
    """The app on a real uvicorn in a thread of this process: with the server's protocol for `parser` (which gives
    each request a body writer), or with uvicorn's own (None: every event through the ASGI send). `small_buffers`:
    each connection's socket and transport buffer a few KiB of the response (a client that stops reading soon
    leaves the server's socket full, however large the system lets buffers grow)."""

    from miniserve.config import EngineConfig, ServerConfig
    from miniserve.server.app import create_app
    from miniserve.server.connection import ConnectionLimits, guarded_protocol

    app = create_app(EngineConfig(model=str(model_dir), device="cpu", dtype="float32"), ServerConfig())
    http = guarded_protocol(ConnectionLimits(), parser) if parser else "auto"
    if small_buffers:
        http = type("SmallBuffers", (http,), {"connection_made": _small_buffers(http.connection_made)})
    with in_process_server(app, http) as url:
        yield url


def _small_buffers(connection_made):
    def made(self, transport):
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        transport.set_write_buffer_limits(high=8192)
        connection_made(self, transport)

    return made


@pytest.fixture
def counted(monkeypatch) -> dict[str, int]:
    """How many body pieces went out through a body writer, and how many through the ASGI send mid-stream."""
    from uvicorn.protocols.http import h11_impl, httptools_impl

    from miniserve.server import body_writer

    counts = {"writer": 0, "send": 0}
    for cls in (body_writer.HttpToolsBodyWriter, body_writer.H11BodyWriter):

        def write(self, body, _write=cls.write):
            counts["writer"] += 1
            _write(self, body)

        monkeypatch.setattr(cls, "write", write)
    for impl in (h11_impl, httptools_impl):

        async def send(self, message, _send=impl.RequestResponseCycle.send):
            if message["type"] == "http.response.body" and message.get("more_body") and message.get("body"):
                counts["send"] += 1
            await _send(self, message)

        monkeypatch.setattr(impl.RequestResponseCycle, "send", send)
    return counts


def events(url: str, path: str, body: dict) -> list:
    """The stream's events, decoded, without what differs between two runs of one request (ids, times)."""
    out = []
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=60) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                event = data if data == "[DONE]" else json.loads(data)
                if isinstance(event, dict):
                    event.pop("id", None), event.pop("created", None)
                out.append(event)
    return out


def assemble(events: list) -> tuple[dict, list]:
    """What a client ends up with: per choice index its text (or the message its deltas build), logprobs, token
    ids, finish and last usage; and the events that carry no choice (prompt logprobs, usage, [DONE]), in order."""
    choices: dict[int, dict] = {}
    others = []
    for event in events:
        if event == "[DONE]" or not event["choices"]:
            others.append(event)
            continue
        (choice,) = event["choices"]
        got = choices.setdefault(choice.pop("index"), {})
        if "usage" in event:
            got["usage"] = event["usage"]
        for key, value in {**choice.pop("delta", {}), **choice}.items():
            if key == "logprobs" and value is not None:
                for part, items in value.items():
                    got.setdefault("logprobs." + part, []).extend(items)
            elif key == "token_ids":
                got.setdefault(key, []).extend(value)
            elif isinstance(value, str) and key not in ("role", "finish_reason"):
                got[key] = got.get(key, "") + value
            elif value is not None:
                got[key] = value
    return choices, others


def close(a, b) -> bool:
    """Equal, but for floats within 1e-4 relative: two requests batched together or apart get logprobs a few
    float32 ulps apart on the CPU (the same tokens, here: the prompts were picked far from any near-tie)."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-4 * max(1.0, abs(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_written_streams_equal_the_asgi_sends_streams(llama_dir, parser, counted):
    with serving(llama_dir, None) as url:
        sent = [events(url, path, body) for path, body in STREAMS]
    assert counted["writer"] == 0 and counted["send"] > 0
    counted["send"] = 0
    with serving(llama_dir, parser) as url:
        written = [events(url, path, body) for path, body in STREAMS]
    for (path, body), a, b in zip(STREAMS, sent, written):
        assert close(assemble(a), assemble(b)), (path, body)
        assert a[-1] == b[-1] == "[DONE]"
    # both ways carried events: the writer some steps', the send at least each response's last step (its finish
    # reason ends the response). How many each took depends on when the loop read the steps: 10 ms late a read, it
    # got each short stream's steps at once, and the writer took none of them (nor did any stream have 3 events)
    assert counted["writer"] > 0 and counted["send"] > 0, counted


def test_a_client_that_stops_reading_gets_every_event_once_in_order(tmp_path, tokenizer_dir, counted):
    """The socket fills while the client sleeps (the writer is then not ready, and the request's task sends and
    waits for the socket to drain); the stream read afterwards is the plain request's output, token for token."""
    model = build_model_dir(tmp_path / "m", "LlamaForCausalLM", tokenizer_dir, seed=5, max_position_embeddings=2048)
    body = {"prompt": "ROMEO:", "max_tokens": 600, "n": 2, "logprobs": 5, "temperature": 0.0, "ignore_eos": True}
    with serving(model, "httptools", small_buffers=True) as url:
        plain = httpx.post(url + "/v1/completions", json=body, timeout=120).json()
        counted["writer"] = counted["send"] = 0
        host, port = url.removeprefix("http://").split(":")
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (before connecting: the window it offers)
            s.connect((host, int(port)))
            request = json.dumps({**body, "stream": True}).encode()
            head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            s.sendall(head.encode() + f"Content-Length: {len(request)}\r\n\r\n".encode() + request)
            time.sleep(3.0)  # the engine produces the whole stream meanwhile; the server's buffers fill
            raw = b""
            while not raw.endswith(b"0\r\n\r\n"):
                chunk = s.recv(1 << 16)
                assert chunk, "the server closed the stream"
                raw += chunk
    texts, token_logprobs = [""] * 2, [[] for _ in range(2)]
    for line in raw.split(b"\n"):
        if line.startswith(b"data: {"):
            for choice in json.loads(line[len(b"data: ") :])["choices"]:
                texts[choice["index"]] += choice["text"]
                token_logprobs[choice["index"]] += choice["logprobs"]["token_logprobs"]
    for c in plain["choices"]:
        assert texts[c["index"]] == c["text"]
        assert token_logprobs[c["index"]] == c["logprobs"]["token_logprobs"]
    assert counted["send"] > 1 and counted["writer"] > 0, counted  # both ways took part


TEXTS = ["", " word", 'a "quoted" \\ back', "line\nbreak\ttab", "é ü 中文 🙂", "\x00\x1f\x7f", "</script>", "\u2028"]


@pytest.mark.parametrize("key", ["text", "content"])
def test_text_chunks_are_the_events_choice_chunk_makes(key):
    """responses.py:TextChunks, the streams' short path for a plain text piece: the same bytes as choice_chunk,
    and the JSON a client expects (written out here)."""
    from miniserve.server.responses import TextChunks, choice_chunk

    head = {"id": "cmpl-1", "object": "text_completion", "created": 7, "model": 'modèle "m" 🙂'}
    for index in (0, 3):
        chunks = TextChunks(head, index, key)
        for text in TEXTS:
            content = {"text": text} if key == "text" else {"delta": {"content": text}}
            event = chunks.event(text)
            assert event == choice_chunk(head, index, content, None, None, None)
            choice = {"index": index, **content, "logprobs": None, "finish_reason": None, "stop_reason": None}
            assert event.startswith(b"data: ") and event.endswith(b"\n\n")
            assert json.loads(event[len(b"data: ") :]) == {**head, "choices": [choice]}
    # a head that holds the marker (a request id is the client's) still gets choice_chunk's events
    marked = {**head, "id": TextChunks.MARK}
    content = {"text": " x"} if key == "text" else {"delta": {"content": " x"}}
    assert TextChunks(marked, 0, key).event(" x") == choice_chunk(marked, 0, content, None, None, None)


@pytest.mark.parametrize("error", ["api", "bug"])
def test_an_error_formatting_a_pushed_step_ends_the_stream_as_the_task_would(llama_dir, monkeypatch, error):
    """Events that fail to format in the step's callback (EventStream.push) must not break the callback (every
    stream's step runs in it): the request's task raises the error instead, and the client gets what a failure in
    the task gives: an API error's event (or, for a bug, the catch-all's server_error event), then [DONE]."""
    from miniserve.server.completions import CompletionEvents
    from miniserve.server.event_stream import EventStream
    from miniserve.server.protocol import APIError

    calls, choice, push = [], CompletionEvents.choice, EventStream.push
    in_push, raised = [], []

    def pushing(self, changed):
        in_push.append(1)
        try:
            return push(self, changed)
        finally:
            in_push.pop()

    def failing(self, i, o, d):
        calls.append(bool(in_push))
        # the first formatting done by a push after the first step's (which went out through either path)
        if in_push and len(calls) >= 2 and not raised:
            raised.append(len(calls) - 1)
            raise APIError("cannot format this") if error == "api" else ZeroDivisionError("a bug")
        return choice(self, i, o, d)

    monkeypatch.setattr(EventStream, "push", pushing)
    monkeypatch.setattr(CompletionEvents, "choice", failing)
    # long: a loop that reads late gets a short stream's steps at once, up to its last, and no push formats them
    body = {"prompt": "ROMEO:", "max_tokens": 200, "temperature": 0.0, "ignore_eos": True}
    with serving(llama_dir, "httptools") as url:
        got = events(url, "/v1/completions", body)
        assert raised, calls  # the failure came in a push
        # the events of the steps before the failing one, then the error; a formatting whose text is held back (a
        # partial character) sends none, so there may be none before it (the first formatting may cover one step)
        assert got[-1] == "[DONE]" and len(got) - 2 <= raised[0] and all(e["choices"] for e in got[:-2]), got
        err = got[-2]["error"]
        if error == "api":
            assert err["message"] == "cannot format this" and err["type"] == "invalid_request_error"
        else:
            assert err["type"] == "server_error" and "ZeroDivisionError" in err["message"]
        monkeypatch.setattr(CompletionEvents, "choice", choice)
        assert events(url, "/v1/completions", body)[-1] == "[DONE]"  # the server streams on
