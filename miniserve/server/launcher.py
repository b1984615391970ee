"""How `miniserve serve` starts: `run_server` with one API server (the app starts its engine), `run_api_servers`
with `--api-servers N` (N > 1): one engine process shared by N API server processes. Both bind the port before
anything loads.

One Python event loop writes a few tens of thousands of SSE events a second; 256 streams at a few milliseconds a
step need more (benchmarks/results/serve_trace_h200.json), so, as vLLM's --api-server-count does, several
processes share the HTTP work. This process only launches and supervises:

1. binds the socket (every API server listens and accepts on it: a busy one accepts less, an idle one more);
2. starts the engine process with a pipe pair for each API server (engine_process.spawn_engine), which routes
   each request's output to the API server that posted it;
3. starts the API servers: each is the same app as with one (create_app), joined to the engine by its pipes
   (EngineLink) instead of starting one, serving the socket with uvicorn;
4. on SIGTERM/SIGINT, passes one SIGTERM to each API server, which drains as a single server does (MINISERVE_
   DRAIN_TIMEOUT); the engine ends when the last one stopped (it gets one too, which ends it only while it is
   still loading the model). A second signal, or an API server that dies, ends them all.

The API servers run in their own process group, so a terminal's Ctrl-C reaches this process only and each server
gets one signal. Metrics: the CLI points prometheus_client at a shared directory first (server/metrics.py).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import Iterator
from typing import Any

from miniserve.config import EngineConfig, ServerConfig

logger = logging.getLogger("miniserve.server")


STARTUP_FAILED = 3  # the exit status of a server that could not start (uvicorn.run's), with one API server or several
FOREVER_S = 1e6  # a wait this long (11 days) is no bound: the engine is joined without a timeout


def run_server(config: EngineConfig, server: ServerConfig) -> int:
    """`miniserve serve` with one API server: the app starts the engine itself; the exit status."""
    from miniserve.server.app import create_app

    _check_before_start(config, server)
    if server.api_servers > 1:
        raise ValueError("several API servers are started by run_api_servers")
    sock = bind(server.host, server.port)  # a busy port is one line now, not after the model loaded
    started = _serve(create_app(config, server), server, sock, announce=True, sigterm_is_clean=True)
    return 0 if started else STARTUP_FAILED


def run_api_servers(config: EngineConfig, server: ServerConfig) -> int:
    """Serve with server.api_servers API server processes until told to stop; the exit status."""
    from miniserve.server.engine_process import spawn_engine

    _check_before_start(config, server)
    sock = bind(server.host, server.port)
    engine, links = spawn_engine(config, server.api_servers)
    ctx = mp.get_context("spawn")
    apis = [
        ctx.Process(target=_api_main, args=(config, server, sock, link), name=f"miniserve-api-{link.index}")
        for link in links
    ]
    for api, link in zip(apis, links):
        api.start()
        link.commands.close()  # the API server holds its ends now
        link.outputs.close()
    sock.close()
    stopping: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        stopping.append(signum)
        if len(stopping) == 1:
            logger.info("shutting down %d API servers", len(apis))
            _signal_all(apis, signal.SIGTERM)
            _signal_all([engine], signal.SIGTERM)  # it dies of it while it loads, and ignores it once loaded
        else:
            logger.warning("second signal: exiting now")
            _kill_all([*apis, engine])
            os._exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    status = _supervise(apis, stopping)
    wait = server.drain_timeout + 10.0
    engine.join(wait if wait < FOREVER_S else None)  # (select() takes no infinity, nor 1e308)
    _kill_all([engine])
    return status


def _check_before_start(config: EngineConfig, server: ServerConfig) -> None:
    """The model directories, the HTTPS certificate and the metrics directory, before anything starts: the CLI
    prints one clear line (uvicorn would fail on a bad certificate with a traceback, after the model loaded)."""
    from miniserve.server.metrics import check_shared_dir

    config.check_dirs()
    if server.ssl_certfile is not None:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(server.ssl_certfile, server.ssl_keyfile)
        except OSError as e:  # (ssl.SSLError is one)
            files = " and ".join(repr(f) for f in (server.ssl_certfile, server.ssl_keyfile) if f)
            raise ValueError(f"cannot serve HTTPS with {files}: {e}") from None
    if warning := check_shared_dir():
        print(f"miniserve: warning: {warning}", file=sys.stderr)


def bind(host: str, port: int) -> socket.socket:
    """The server's socket, bound before any model loads (a busy port fails at once); uvicorn listens on it once
    the app started, so a client connecting meanwhile is refused rather than left waiting."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:  # in use, or not an address of this machine: one line, as uvicorn says it
        sock.close()
        raise SystemExit(f"miniserve: error: cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _supervise(apis: list[Any], stopping: list[int]) -> int:
    """Wait for the API servers; if one exits without being told to (its startup failed, or it died), stop the
    rest. The exit status: 0 after a shutdown that was asked for (also one asked for while the model loads, where
    one API server, uvicorn's way, says STARTUP_FAILED); STARTUP_FAILED when an API server found dead first could
    not start (its engine failed to load, as with one API server), else 1."""
    failed = 0
    while True:
        alive = [p for p in apis if p.is_alive()]
        died = [p for p in apis if not p.is_alive() and p.exitcode != 0]
        if died and not stopping:
            logger.error("%s exited with %s: stopping the others", died[0].name, died[0].exitcode)
            failed = STARTUP_FAILED if died[0].exitcode == STARTUP_FAILED else 1
            stopping.append(signal.SIGTERM)
            _signal_all(alive, signal.SIGTERM)
        if not alive:
            return failed or (0 if stopping else 1)
        time.sleep(0.2)


def _signal_all(procs: list[Any], signum: int) -> None:
    for p in procs:
        if p.is_alive() and p.pid is not None:
            try:
                os.kill(p.pid, signum)
            except ProcessLookupError:
                pass


def _kill_all(procs: list[Any]) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)


def _api_main(config: EngineConfig, server: ServerConfig, sock: socket.socket, link: Any) -> None:
    """One API server process: the app joined to the launcher's engine, served on the shared socket."""
    os.setpgrp()  # the terminal's Ctrl-C goes to the launcher, which passes on one SIGTERM
    _end_with_parent()
    from miniserve.server.app import create_app

    if not _serve(create_app(config, server, link), server, sock, announce=link.index == 0):  # (one says where)
        sys.exit(STARTUP_FAILED)


def _serve(
    app: Any, server: ServerConfig, sock: socket.socket, announce: bool = False, sigterm_is_clean: bool = False
) -> bool:
    """Serve `app` with uvicorn on the bound `sock` until stopped; whether it started. `announce`: log the
    address once it listens (after the model loaded: until then a connection is refused). `sigterm_is_clean`: a
    SIGTERM that stopped it ends the process normally (the one API server of `miniserve serve`; several API servers
    die of it, so that their launcher tells its own stop from another's)."""
    import uvicorn

    from miniserve.server.app import connection_protocol

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            """uvicorn re-raises the signal it stopped on once it is done: a drained SIGTERM killed the process
            (status 143) where several API servers' launcher exits 0 (sigterm_is_clean)."""
            with super().capture_signals():
                yield
                if sigterm_is_clean:
                    captured = getattr(self, "_captured_signals", [])
                    captured[:] = [s for s in captured if s != signal.SIGTERM]

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)  # the model loaded, then the socket listens
            if announce and self.started:  # (uvicorn names only the sockets it bound itself)
                host, port = sock.getsockname()[:2]
                scheme = "http" if server.ssl_certfile is None else "https"
                logging.getLogger("uvicorn.error").info(
                    "miniserve: listening on %s://%s:%d", scheme, _url_host(host), port
                )

    uvicorn_server = Server(
        uvicorn.Config(
            app,
            log_level=server.log_level,
            http=connection_protocol(server),
            # past the drain, uvicorn stops waiting for connections (a client that never reads holds its send)
            timeout_graceful_shutdown=server.drain_timeout + 2.0,
            ssl_certfile=server.ssl_certfile,
            ssl_keyfile=server.ssl_keyfile,
        )
    )
    try:
        uvicorn_server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it stopped on (as uvicorn.run, end quietly)
        pass
    return uvicorn_server.started


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _end_with_parent() -> None:
    """Linux: a SIGTERM (a drain) for this process when the launcher dies, even by SIGKILL, so no API server is left
    serving on its own. Elsewhere nothing."""
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
