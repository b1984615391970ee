"""The engine in a process of its own: its loop, and the messages it exchanges with the API processes
(server/engine_process.py is the API process's side).

Why a process: the engine's step loop and the HTTP event loop are both Python. In one process they share one GIL,
so every SSE chunk the server writes delays the next step, and every step delays the chunks. In its own process
the engine steps while the API process writes. The two talk over two pipes:

    API -> engine   lists of commands (all that were queued): ("add", request_id, prompt_ids, params, grammar,
                    priority) |
                    ("abort", [request_id, ...]) | ("warm",) | ("stats",) | ("stop",)
    engine -> API   ("ready", info, stats) or ("error", ...) once; then ("acks", [(request_id, error, is_value_error)],
                    stats) after applying
                    commands, and one ("step", deltas, stats, num_tokens) per step: every streamed request's new
                    tokens, text, logprobs and finish state since the step before (SamplingParams.output_kind
                    "delta", never cumulative snapshots), and the final output of every other request that
                    finished ("final_only"), so a step is one message whatever the number of requests (the tuples
                    of OutputProcessor.collect_messages).
                    `num_tokens` is what the step computed (prompt and decode tokens: the iteration histogram).
                    Also ("stats", stats) answering "stats", and ("failed", request_ids, message, stats) after a
                    step raised.

With several API server processes (`miniserve serve --api-servers N`, server/launcher.py) the engine has a pipe
pair per API server: a request's acks and deltas go to the one that posted it, the step's stats to all (at least
every STATS_EVERY_S), and `num_tokens` to server 0 only (the others get 0: /metrics sums every process). "stop"
(or a closed pipe) ends one API server's part, aborting what it still had in flight; the loop ends when none is
left.

A request with structured outputs carries its grammar compiled by the API process (`grammar`: xgrammar's
serialized CompiledGrammar, else None; see engine/structured_output.py), so the engine mostly only deserializes one
(it compiles a grammar too large to send, or one its cache has evicted).
("warm",) comes before the first one: the engine then imports xgrammar and reads the vocabulary on a thread
(seconds for a large vocabulary) while it goes on stepping, instead of stalling every stream when the first
grammar arrives. A finished request's metrics carry the engine's timestamps (arrival, first scheduled, first
token, finished) and its prefix-cache hit (num_cached_tokens), from which the API process observes the
per-request histograms.

The engine's step loop does what the offline `LLM` does and little more: a non-streaming request costs it nothing
until it finishes, and a streamed request without stop strings is not detokenized there at all (detokenize=False):
the API process turns its token ids into text with the same IncrementalDetokenizer, so the text is the same. Stop
strings are matched in the text, so streams with stop strings are detokenized by the engine, as offline.
"""

from __future__ import annotations

import logging
import multiprocessing.connection as mp_connection
import os
import select
import signal
import threading
import time
import traceback
from typing import Any

from miniserve.server.gc_heap import freeze_startup_heap, thaw_heap
from miniserve.server.pipe import FrameReader, FrameWriter

logger = logging.getLogger("miniserve.server")
USER_ERRORS = (ValueError, FileNotFoundError)  # a bad setting, a broken model directory: one line says it


def core_main(config: Any, commands: list[Any], outputs: list[Any]) -> None:
    """The engine process: load the engine, then alternate applying commands and stepping until every API server
    is done. `commands`/`outputs`: one pipe end each per API server process (ServerConfig.api_servers)."""
    # Ctrl-C reaches the terminal's whole process group, and a service manager's stop (systemd, `timeout`, a
    # container's init) may signal the group too. While the model loads there is nothing to drain: either signal
    # ends this process at once (the API process, waiting for "ready", says so). Once loaded it ignores both: the
    # API process drains first, then stops this one (its pipes).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    readers, writers = [FrameReader(c) for c in commands], [FrameWriter(o) for o in outputs]
    try:
        from miniserve.engine.llm_engine import LLMEngine

        engine = LLMEngine(config)
    except BaseException as exc:  # the API process re-raises this at startup
        # a setting or a model file the user can fix is said in one line (its traceback at debug level)
        for w in writers:
            w.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc(), isinstance(exc, USER_ERRORS)))
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    engine.on_fatal_error(_exit_engine)
    frozen = freeze_startup_heap()  # the model, graphs and imports: nothing a collection should walk again
    info = {
        "gc_frozen": frozen,
        "max_model_len": engine.max_model_len,
        "vocab_size": engine.vocab_size,
        "model_name": engine.model_name,
        "eos_token_ids": sorted(engine.outputs.eos_token_ids),  # the grammars' stop tokens (API-side compiles)
        "sampling_defaults": engine.sampling_defaults,  # the model's generation_config.json (request_params.py)
        "cache_config": _cache_config(engine),
    }
    for w in writers:
        w.send(("ready", info, engine.stats()))
    try:
        CoreLoop(engine, readers, writers).run()
    finally:
        engine.shutdown()  # the other tensor-parallel ranks, if any
        thaw_heap()


def _cache_config(engine: Any) -> dict[str, str]:
    """The KV cache settings, for vLLM's cache_config_info metric (labels of a constant 1)."""
    config = engine.config
    info = {
        "block_size": config.block_size,
        "num_gpu_blocks": engine.block_manager.num_blocks,
        "cache_dtype": config.kv_cache_dtype,
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "enable_prefix_caching": config.enable_prefix_caching,
    }
    return {key: str(value) for key, value in info.items()}


def _exit_engine(error: BaseException) -> None:
    """A tensor-parallel rank died (the error, naming it, is logged): the engine cannot step any more, so its
    process ends; the API process then fails what is in flight and stops (EngineProcess.on_lost)."""
    logger.error("miniserve: the engine stops: %s", error)
    os._exit(1)


STATS_EVERY_S = 0.1  # an API server with no output in a step still gets the engine's stats this often


class CoreLoop:
    """The engine process's loop over one engine and its API servers (one pipe pair each): each request's output
    goes to the API server that posted it; every step's stats go to all (API server 0 at every step, with the
    step's token count for the iteration metric; the others at least every STATS_EVERY_S). It ends when every API
    server has said stop or gone away."""

    def __init__(self, engine: Any, commands: list[FrameReader], outputs: list[FrameWriter]):
        self.engine = engine
        self.commands = commands
        self.outputs = outputs
        self.live = set(range(len(commands)))  # API servers still connected
        self.owner: dict[str, int] = {}  # request id -> the API server that posted it
        self.last_sent = [0.0] * len(outputs)
        self.warmed = False

    def run(self) -> None:
        self.engine.hold_launches(self.wait_for_commands)  # (engine/launch_hold.py)
        while self._apply_commands(block=not self.engine.has_unfinished_requests()):
            if not self.engine.has_unfinished_requests():
                continue
            try:
                deltas = self.engine.step_messages()
            except Exception as exc:  # keep serving: fail the requests in flight, not the server
                logger.exception("engine step failed")
                self._fail_all(f"{type(exc).__name__}: {exc}")
                continue
            self._send_step(deltas, self.engine.last_step_num_tokens)

    def _send_step(self, deltas: list[tuple], num_tokens: int) -> None:
        stats = self.engine.stats()
        split: list[list[tuple]] = [[] for _ in self.outputs]
        for delta in deltas:
            split[self.owner.get(delta[0], 0)].append(delta)
            if delta[1]:  # finished: its API server hears no more of it
                self.owner.pop(delta[0], None)
        now = time.monotonic()
        for i in sorted(self.live):
            if split[i] or i == 0 or now - self.last_sent[i] >= STATS_EVERY_S:
                self._send(i, ("step", split[i], stats, num_tokens if i == 0 else 0))

    def _send(self, client: int, msg: tuple) -> None:
        try:
            self.outputs[client].send(msg)
            self.last_sent[client] = time.monotonic()
        except OSError:  # that API server is gone
            self._drop(client)

    def wait_for_commands(self, timeout: float) -> bool:
        """The engine's launch hold (engine/launch_hold.py): wait up to `timeout` seconds for a command from any
        API server and apply what came; True if something did. It spins on a zero-timeout select: the hold must
        end within microseconds of its deadline, and a sleeping wait ends late (multiprocessing's wait() rounds its
        timeout up to whole milliseconds, and a sleeping process takes time to wake) and leaves the GPU idle."""
        readers = [self.commands[i] for i in sorted(self.live)]
        conns = [r.conn for r in readers]
        end = time.perf_counter() + timeout
        while not any(r.ready for r in readers) and not select.select(conns, [], [], 0)[0]:
            if time.perf_counter() >= end:
                return False
        self._apply_commands(block=False)
        return True

    def _apply_commands(self, block: bool) -> bool:
        """Apply every queued command (waiting for one when idle); False once every API server stopped or left."""
        readers = [self.commands[i] for i in sorted(self.live)]
        if not readers:
            return False
        if any(r.ready for r in readers):
            block = False
        waiting = set(mp_connection.wait([r.conn for r in readers], None if block else 0))
        for i in sorted(self.live):
            reader = self.commands[i]
            if reader.ready or reader.conn in waiting:
                self._apply_from(i)
        return bool(self.live)

    def _apply_from(self, client: int) -> None:
        """Every command API server `client` has queued; its acks (and stats after aborts) go back to it."""
        acks, aborted, asked, reader = [], False, False, self.commands[client]
        try:
            while True:
                for cmd in reader.recv():  # every command the API process had queued
                    if cmd[0] == "stop":
                        self._drop(client)
                        return
                    if cmd[0] == "add":
                        self.owner[cmd[1]] = client
                        acks.append(self._add(*cmd[1:]))
                    elif cmd[0] == "warm":
                        self._warm()
                    elif cmd[0] == "stats":
                        asked = True
                    elif cmd[0] == "abort":
                        aborted = True
                        for request_id in cmd[1]:
                            self.owner.pop(request_id, None)
                            self._abort(request_id)
                if not reader.poll():
                    break
        except (EOFError, OSError):  # the API process is gone
            self._drop(client)
            return
        if acks or aborted:  # (aborts free KV blocks at once: /metrics shows it even when idle)
            self._send(client, ("acks", acks, self.engine.stats()))
        if asked:  # a scrape of a shared engine's API server (EngineProcess.fresh_stats)
            self._send(client, ("stats", self.engine.stats()))

    def _drop(self, client: int) -> None:
        """API server `client` stopped or left: abort what it still had in flight."""
        if client not in self.live:
            return
        self.live.discard(client)
        for request_id in [r for r, owner in self.owner.items() if owner == client]:
            self.owner.pop(request_id)
            self._abort(request_id)

    def _warm(self) -> None:
        if not self.warmed:  # (every API server asks before its first grammar)
            self.warmed = True
            threading.Thread(target=self.engine.grammar.warm, name="miniserve-xgrammar", daemon=True).start()

    def _add(
        self, request_id: str, prompt: list[int], params: Any, grammar: str | None, priority: int
    ) -> tuple[str, str | None, bool]:
        try:
            if grammar is not None:  # compiled by the API process: add_request finds it in the engine's cache
                self.engine.grammar.load(params.structured_outputs, grammar)
            self.engine.add_request(request_id, prompt, params, priority=priority)
        except Exception as exc:
            self.owner.pop(request_id, None)
            return request_id, str(exc), isinstance(exc, ValueError)
        return request_id, None, True

    def _abort(self, request_id: str) -> None:
        try:
            self.engine.abort_request(request_id)
        except Exception:
            logger.exception("abort of %s failed", request_id)

    def _fail_all(self, message: str) -> None:
        failed = list(self.engine.outputs.requests)  # every request neither finished nor aborted
        for request_id in failed:
            self._abort(request_id)
        stats = self.engine.stats()
        for i in sorted(self.live):
            self._send(i, ("failed", [r for r in failed if self.owner.get(r, 0) == i], message, stats))
        for request_id in failed:
            self.owner.pop(request_id, None)
