"""The real server with a fake engine process: what the API process alone can deliver (benchmarks/serve.py's
`fake` phase), on any machine, with no GPU. Or the real server and engine, each under cProfile (`--real`).

    python benchmarks/fake_engine.py --model DIR --port 8000 --step-ms 6 [--profile api.prof] [serve flags...]
    python benchmarks/fake_engine.py --real --engine-profile engine.prof --profile api.prof --model DIR ...
    python benchmarks/fake_engine.py [--real] --trace DIR --model DIR ...   # timestamps, not a profile

The engine process is replaced by `fake_core`, which speaks the engine process's protocol
(miniserve/server/engine_core.py) and, every `--step-ms` milliseconds, gives every running request one more
token (random ids, in the vocabulary), finishing it at max_tokens; a stream gets a delta per step, a plain request
its final output once. Everything else is the served app (routing, detokenizing in the API process, SSE, HTTP),
so the server's throughput and inter-token latency against this engine are the API process's ceiling at that
step time, and `--profile` writes a cProfile of the API process's event loop.

`--trace DIR` (fake or real engine) records, without a profiler's slowdown, when the engine process sent each
message (engine_trace.json), when the API process's event loop took each batch of them and how many steps it held,
and when each SSE/HTTP body chunk was written (api_trace.json): benchmarks/serve_trace.py tells from these where
a stream's tokens get grouped (engine, pipe hand-over, event loop, or the client).
"""

from __future__ import annotations

import argparse
import functools
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def fake_core(config, commands, outputs, step_ms: float = 6.0) -> None:
    """The engine process's loop with the model replaced by a clock (see the module docstring)."""
    from miniserve.server.pipe import FrameReader, FrameWriter
    from miniserve.tokenizer import Tokenizer

    if len(commands) != 1:
        raise SystemExit("the fake engine serves one API server (no --api-servers)")
    commands, outputs = FrameReader(commands[0]), FrameWriter(outputs[0])
    vocab = Tokenizer.from_pretrained(config.tokenizer or config.model).vocab_size
    info = {"max_model_len": 1 << 16, "vocab_size": vocab, "model_name": "fake", "eos_token_ids": []}
    info["cache_config"], info["sampling_defaults"] = {}, {}
    outputs.send(("ready", info, {}))
    rng = random.Random(0)
    running: dict[str, list] = {}  # request id -> [params, tokens so far]
    next_step = time.monotonic()
    while True:
        idle = not running
        if not _apply(commands, outputs, running, block=idle):
            return
        if idle:  # the first step after a wait starts now
            next_step = time.monotonic()
        next_step += step_ms / 1000
        time.sleep(max(0.0, next_step - time.monotonic()))
        deltas = [_advance(rid, entry, rng, vocab) for rid, entry in list(running.items())]
        for rid, finished, *_ in deltas:
            if finished:
                del running[rid]
        deltas = [d for d in deltas if d[2] or d[1]]
        outputs.send(("step", deltas, {"num_running": len(running)}, len(deltas)))


def profiled_core(config, commands, outputs, path: str) -> None:
    """The real engine process, under cProfile (written to `path` when it stops)."""
    import cProfile

    from miniserve.server import engine_core

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        engine_core.core_main(config, commands, outputs)
    finally:
        profiler.disable()
        profiler.dump_stats(path)


def traced_core(config, commands, outputs, path: str, inner=None) -> None:
    """`inner` (the real engine process, or the fake one) with the time of every message it sends recorded."""
    import json

    from miniserve.server import engine_core, pipe

    sent: list[tuple[float, str, int]] = []
    # (time the send began, request id): the step that first carried its output; stamped before the send, since the
    # client may read the message before the send returns (stamped after, its first-token stage could come out < 0)
    firsts: list[tuple[float, str]] = []
    adds: list[tuple[float, str]] = []  # (time the engine process took the request, request id)
    seen: set[str] = set()
    send, add = pipe.FrameWriter.send, engine_core.CoreLoop._add

    def timed_send(self, msg):
        begun = time.monotonic()
        send(self, msg)
        t = time.monotonic()
        sent.append((t, msg[0], msg[3] if msg[0] == "step" else 0))  # (time, kind, tokens the step computed)
        if msg[0] == "step":
            for delta in msg[1]:
                if delta[0] not in seen:
                    seen.add(delta[0])
                    firsts.append((begun, delta[0]))

    def timed_add(self, request_id, *args):
        adds.append((time.monotonic(), request_id))
        return add(self, request_id, *args)

    pipe.FrameWriter.send = timed_send
    engine_core.CoreLoop._add = timed_add
    steps = _time_real_steps(engine_core) if inner is None else []
    trace = {"sent": sent, "adds": adds, "firsts": firsts, "steps": steps}
    try:
        (inner or engine_core.core_main)(config, commands, outputs)
    finally:
        Path(path).write_text(json.dumps(trace))


def _time_real_steps(engine_core) -> list[list[float]]:
    """In the real engine process: [start, seconds in step_messages, seconds sending its message] of every step
    (is a served step slower in the engine itself, or in what the loop does around it?)."""
    from miniserve.engine.llm_engine import LLMEngine

    steps: list[list[float]] = []
    step_messages, send_step = LLMEngine.step_messages, engine_core.CoreLoop._send_step

    def timed_step(self):
        t = time.monotonic()
        out = step_messages(self)
        steps.append([t, time.monotonic() - t, 0.0])
        return out

    def timed_send_step(self, *args):
        t = time.monotonic()
        send_step(self, *args)
        steps[-1][2] = time.monotonic() - t

    LLMEngine.step_messages, engine_core.CoreLoop._send_step = timed_step, timed_send_step
    return steps


def trace_api(path: str) -> None:
    """Record, in this (the API) process, each batch of engine messages the event loop read (time, steps in it)
    and each response body chunk written (time, bytes); written to `path` at exit."""
    import atexit
    import json

    from uvicorn.protocols.http import h11_impl, httptools_impl

    from miniserve.server import body_writer
    from miniserve.server.engine_process import EngineProcess

    handovers: list[tuple[float, int, int, float]] = []  # (time, messages, steps among them, seconds to route)
    writes: list[tuple[float, int]] = []
    lags: list[tuple[float, float]] = []  # (time, how late a 1 ms timer fired): the event loop's responsiveness
    posts: list[tuple[float, str]] = []  # (time the API process posted a request to the engine, request id)
    on_messages, attach = EngineProcess._on_messages, EngineProcess.attach
    add_requests = EngineProcess.add_requests

    async def timed_add_requests(self, requests):
        posts.extend((time.monotonic(), request_id) for request_id, *_ in requests)
        return await add_requests(self, requests)

    async def watch_loop() -> None:
        import asyncio

        while True:
            t = time.monotonic()
            await asyncio.sleep(0.001)
            lags.append((t, time.monotonic() - t - 0.001))

    def traced_attach(self, loop):
        attach(self, loop)
        loop.call_soon_threadsafe(lambda: loop.create_task(watch_loop()))

    def timed_on_messages(self, messages):
        steps = sum(1 for m in messages if m[0] == "step")
        t = time.monotonic()
        on_messages(self, messages)
        handovers.append((t, len(messages), steps, time.monotonic() - t))

    def timed(send):  # each HTTP parser's (ServerConfig.http_parser) response cycle
        async def timed_send(self, message):
            await send(self, message)
            if message.get("type") == "http.response.body" and message.get("body"):
                writes.append((time.monotonic(), len(message["body"])))

        return timed_send

    def timed_write(write):  # a stream's events written by the step's callback (server/body_writer.py)
        def timed(self, body):
            write(self, body)
            writes.append((time.monotonic(), len(body)))

        return timed

    EngineProcess._on_messages = timed_on_messages
    EngineProcess.attach = traced_attach
    EngineProcess.add_requests = timed_add_requests
    for impl in (h11_impl, httptools_impl):
        impl.RequestResponseCycle.send = timed(impl.RequestResponseCycle.send)
    for writer in (body_writer.HttpToolsBodyWriter, body_writer.H11BodyWriter):
        writer.write = timed_write(writer.write)
    trace = {"handovers": handovers, "writes": writes, "lags": lags, "posts": posts}
    atexit.register(lambda: Path(path).write_text(json.dumps(trace)))


def _apply(commands, outputs, running: dict, block: bool) -> bool:
    acks = []
    while block or commands.poll():
        block = False
        for cmd in commands.recv():
            if cmd[0] == "stop":
                return False
            if cmd[0] == "add":
                rid, params = cmd[1], cmd[3]
                running[rid] = [params, []]
                acks.append((rid, None, True))
            elif cmd[0] == "abort":
                for rid in cmd[1]:
                    running.pop(rid, None)
    if acks:
        outputs.send(("acks", acks, {"num_running": len(running)}))
    return True


def _advance(rid: str, entry: list, rng: random.Random, vocab: int) -> tuple:
    params, tokens = entry
    token = rng.randrange(100, vocab)
    tokens.append(token)
    finished = len(tokens) >= params.max_tokens
    now = time.monotonic()
    metrics = {"arrival_time": now, "first_scheduled_time": now, "first_token_time": now, "finished_time": now}
    if params.output_kind == "final_only":
        if not finished:
            return rid, False, [], None, None
        choice = (0, tokens, "", None, "length", None, None)
        return rid, True, [choice], None, {**metrics, "num_cached_tokens": 0}
    choice = (0, [token], "", None, "length" if finished else None, None, None)
    return rid, finished, [choice], None, {**metrics, "num_cached_tokens": 0} if finished else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--step-ms", type=float, default=6.0)
    ap.add_argument("--profile", default=None, help="write a cProfile of the API process here at shutdown")
    ap.add_argument("--real", action="store_true", help="the real engine instead of the fake one")
    ap.add_argument("--engine-profile", default=None, help="--real: write a cProfile of the engine process here")
    ap.add_argument("--trace", default=None, help="write engine_trace.json and api_trace.json (timestamps) here")
    args, serve_args = ap.parse_known_args()
    import miniserve.server.engine_core as engine_core
    from miniserve.cli import main as cli_main

    if not args.real:
        engine_core.core_main = functools.partial(fake_core, step_ms=args.step_ms)
    elif args.engine_profile:
        engine_core.core_main = functools.partial(profiled_core, path=args.engine_profile)
    if args.trace:
        import signal

        Path(args.trace).mkdir(parents=True, exist_ok=True)
        inner = None if args.real else engine_core.core_main
        engine_core.core_main = functools.partial(traced_core, path=f"{args.trace}/engine_trace.json", inner=inner)
        trace_api(f"{args.trace}/api_trace.json")
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # exit through Python: atexit writes the trace
    if args.profile is None:
        sys.exit(cli_main(["serve", *serve_args]))
    import cProfile
    import signal

    # uvicorn re-raises the SIGTERM it drained on: exit through Python, so that the profile is written
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    profiler = cProfile.Profile()  # the main thread: the event loop (the pipe reader thread is not in it)
    profiler.enable()
    try:
        cli_main(["serve", *serve_args])
    finally:
        profiler.disable()
        profiler.dump_stats(args.profile)


if __name__ == "__main__":
    main()
