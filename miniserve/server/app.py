"""The OpenAI-compatible HTTP server: the app factory (routes, auth, errors, the engine's lifespan) and the small
routes (`miniserve serve` runs it: launcher.py). The large routes have their own modules: completions.py, chat.py,
responses_api.py, tokens.py; what they share is in state.py (ServerState) and request_group.py (reading the
engine's outputs back).

A request flows: parse + validate the JSON body (OpenAI error shape on failure) -> check the prompt's size ->
tokenize (in a worker thread, off the event loop) -> check the context budget -> post one engine request per
prompt to the engine process (engine_process.py) -> read the cumulative outputs back as they grow. A plain
request collects them (its handler woken as each prompt's request finishes) and answers with one JSON body. A
stream (stream=true) turns each step's new output into SSE chunks, written by the callback that applied the step,
else by the woken task (then several steps' tokens go in one chunk: the client fell behind).
A client that goes away has its engine requests aborted, which frees their KV blocks before the next step; a
client that stops reading is aborted after MINISERVE_STREAM_STALL_TIMEOUT. On SIGTERM/SIGINT the server stops
accepting, lets requests finish for at most MINISERVE_DRAIN_TIMEOUT seconds, then ends the rest (finish_reason
"abort" on streams, 503 otherwise); a second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from miniserve.config import EngineConfig, ServerConfig
from miniserve.server.chat import create_chat_completion
from miniserve.server.completions import create_completion
from miniserve.server.connection import ConnectionLimits, guarded_protocol
from miniserve.server.engine_process import EngineLink, EngineProcess
from miniserve.server.gc_heap import freeze_startup_heap, thaw_heap
from miniserve.server.invocations import invocations
from miniserve.server.metrics import check_shared_dir
from miniserve.server.middleware import CatchAll, DirectRoutes, RequestIdHeader, RequireAPIKey, RootPath
from miniserve.server.protocol import (
    APIError,
)
from miniserve.server.responses_api import create_response
from miniserve.server.state import ClientDisconnected, ServerState, load_tokenizer, max_token_chars, state_of
from miniserve.server.stats_log import log_stats
from miniserve.server.tokens import detokenize, tokenize
from miniserve.settings import from_sources, variable_warnings

logger = logging.getLogger("miniserve.server")


def _model_card(state: ServerState, name: str) -> dict:
    """The served model's card under one of its names, with vLLM's fields (parent, max_model_len, permission)
    beside OpenAI's."""
    created = int(time.time())
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "miniserve",
        "root": state.model_name,  # the served name: where the weights sit on the server is not the client's business
        "parent": None,  # (vLLM's LoRA adapters name their base model here; there are none)
        "max_model_len": state.max_model_len,
        "permission": [_model_permission(created)],
    }


def _model_permission(created: int) -> dict:
    """The one permission entry vLLM's cards carry (OpenAI's former schema): sampling and logprobs allowed, no
    fine-tuning."""
    return {
        "id": f"modelperm-{uuid.uuid4().hex}",
        "object": "model_permission",
        "created": created,
        "allow_create_engine": False,
        "allow_sampling": True,
        "allow_logprobs": True,
        "allow_search_indices": False,
        "allow_view": True,
        "allow_fine_tuning": False,
        "organization": "*",
        "group": None,
        "is_blocking": False,
    }


async def list_models(request: Request) -> JSONResponse:
    state = state_of(request)
    return JSONResponse({"object": "list", "data": [_model_card(state, name) for name in state.model_names]})


async def retrieve_model(request: Request, model: str) -> JSONResponse:
    """OpenAI's GET /v1/models/{model} (the client's `models.retrieve`): the served model's card, else a 404."""
    state = state_of(request)
    state.check_model(model)
    return JSONResponse(_model_card(state, model if model in state.model_names else state.model_name))


async def version(request: Request) -> JSONResponse:
    from miniserve import __version__

    return JSONResponse({"version": __version__})


async def health(request: Request) -> JSONResponse:
    state = getattr(request.app.state, "server", None)
    if state is None or not state.engine.is_alive():
        return JSONResponse({"status": "unavailable"}, status_code=503)
    return JSONResponse({"status": "ok"})


async def metrics(request: Request) -> Response:
    state = state_of(request)
    await state.engine.fresh_stats()  # (the engine's counts as of now, also where several API servers share it)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


ENGINE_LOST = 1  # the exit status of a server its engine's end stopped: a failure, for its supervisor to restart


class StartupError(Exception):
    """What stopped the server starting, already logged in one line."""


def _without_startup_traceback(record: logging.LogRecord) -> bool:
    """uvicorn logs the lifespan's failure as a traceback through the framework's frames: a StartupError's says
    nothing its logged line did not."""
    return StartupError.__name__ not in record.getMessage()


def create_app(config: EngineConfig, server: ServerConfig, link: EngineLink | None = None) -> FastAPI:
    """A FastAPI app that loads the engine on startup and stops its loop on shutdown (with `link`: joins the
    engine the launcher started, server/launcher.py)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        config.check_dirs()
        _log_like_uvicorn()
        engine, tokenizer, token_chars = await _start(config, server, link)
        # here, not uvicorn's flag: MINISERVE_ACCESS_LOG and --no-access-log then work however uvicorn was started
        logging.getLogger("uvicorn.access").disabled = not server.access_log
        stats_log = None
        try:
            engine.attach(asyncio.get_running_loop())
            state = ServerState(config, server, engine, tokenizer, token_chars)
            app.state.server = state
            _install_signal_handlers(state)
            stats_log = _start_stats_log(engine, server, link)
            frozen = freeze_startup_heap()  # last: what start-up made stays out of every later collection
            logger.info(
                "miniserve: serving %s (max_model_len %d; start-up objects kept from the garbage collector: %d in "
                "this API server, %d in the engine)",
                state.model_name,
                state.max_model_len,
                frozen,
                engine.info.get("gc_frozen", 0),
            )
            yield
        finally:
            if stats_log is not None:
                stats_log.cancel()
            await asyncio.to_thread(engine.shutdown)
            engine.end_all()
            thaw_heap()
            if engine.lost:  # stopped as by SIGTERM, whose death systemd's Restart=on-failure takes for a clean stop
                logger.error("miniserve: exiting with status %d: the engine process was lost", ENGINE_LOST)
                logging.shutdown()
                os._exit(ENGINE_LOST)

    docs = {"docs_url": None, "redoc_url": None, "openapi_url": None} if server.disable_fastapi_docs else {}
    app = FastAPI(title="miniserve", lifespan=lifespan, **docs)
    v1 = APIRouter(prefix="/v1")  # RequireAPIKey guards every /v1 path, routed or not
    v1.add_api_route("/completions", create_completion, methods=["POST"])
    v1.add_api_route("/chat/completions", create_chat_completion, methods=["POST"])
    v1.add_api_route("/responses", create_response, methods=["POST"])  # stateless: no GET /responses/{id}
    v1.add_api_route("/models", list_models, methods=["GET"])
    v1.add_api_route("/models/{model:path}", retrieve_model, methods=["GET"])  # (served names may hold a "/")
    app.include_router(v1)
    app.add_api_route("/tokenize", tokenize, methods=["POST"])
    app.add_api_route("/detokenize", detokenize, methods=["POST"])
    app.add_api_route("/health", health, methods=["GET"])
    for method in ("GET", "POST"):  # vLLM's (SageMaker's) name for it; a route each, so each has its own OpenAPI id
        app.add_api_route("/ping", health, methods=[method])
    app.add_api_route("/version", version, methods=["GET"])
    app.add_api_route("/invocations", invocations, methods=["POST"])  # SageMaker's, as vLLM's (keyed as /v1)
    app.add_api_route("/metrics", metrics, methods=["GET"])
    for error, handler in ERROR_HANDLERS.items():
        app.add_exception_handler(error, handler)
    _add_layers(app, server)
    return app


def _start_stats_log(engine: EngineProcess, server: ServerConfig, link: EngineLink | None) -> asyncio.Task | None:
    """The log's periodic engine lines (server/stats_log.py), from one API server of those sharing the engine."""
    if server.disable_log_stats or (link is not None and link.index != 0):
        return None
    return asyncio.create_task(log_stats(engine, server.log_stats_interval), name="miniserve-stats-log")


def _add_layers(app: FastAPI, server: ServerConfig) -> None:
    """The ASGI layers around the app (server/middleware.py), each added outside those before it."""
    generation = {
        "/v1/completions": create_completion,
        "/v1/chat/completions": create_chat_completion,
        "/v1/responses": create_response,
        "/invocations": invocations,
    }
    app.add_middleware(DirectRoutes, routes=generation, errors=ERROR_HANDLERS)  # added first: inside the key check
    app.add_middleware(RequireAPIKey, api_keys=server.api_keys())
    cors = server.cors()
    if cors is not None:  # outside the key check: a browser's preflight carries no key
        app.add_middleware(CORSMiddleware, **cors)
    app.add_middleware(CatchAll)  # the outermost layer but one: the id header goes on its 500s too
    if server.enable_request_id_headers:
        app.add_middleware(RequestIdHeader)
    if server.root_path:
        app.add_middleware(RootPath, root_path=server.root_path)


async def _start(config: EngineConfig, server: ServerConfig, link: EngineLink | None) -> tuple[EngineProcess, Any, int]:
    """The tokenizer, its longest token in characters, and the engine, loaded (a SIGTERM or SIGINT meanwhile stops
    the load); a failure is one line and a StartupError."""
    try:
        tokenizer = await asyncio.to_thread(load_tokenizer, config)
        token_chars = await asyncio.to_thread(max_token_chars, tokenizer)
        engine = EngineProcess(config, max_waiting=server.max_waiting, link=link)
        with _signals_stop_loading(engine):
            await asyncio.to_thread(engine.start)
    except Exception as exc:  # one line (the engine process logged its own traceback of a failed load)
        logger.error("miniserve: the server cannot start: %s", exc)
        logger.debug("what stopped the start", exc_info=True)
        logging.getLogger("uvicorn.error").addFilter(_without_startup_traceback)
        raise StartupError(str(exc)) from None
    return engine, tokenizer, token_chars


def _log_like_uvicorn() -> None:
    """miniserve's log lines through uvicorn's handler, at its level, unless logging was set up otherwise:
    without a handler they reach only Python's last-resort one (warnings and errors, unformatted; the startup
    line never shows)."""
    ours, theirs = logging.getLogger("miniserve"), logging.getLogger("uvicorn")
    if not ours.handlers and not logging.getLogger().handlers and theirs.handlers:
        for handler in theirs.handlers:
            ours.addHandler(handler)
        ours.setLevel(logging.getLogger("uvicorn.error").getEffectiveLevel())


@contextmanager
def _signals_stop_loading(engine: EngineProcess) -> Iterator[None]:
    """While the engine loads, SIGTERM and SIGINT also stop the load (uvicorn's own handlers, chained to, only stop
    the serving that would follow it: a Ctrl-C or a service manager's stop waited for the whole load)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum: int, frame: Any) -> None:
        engine.stop_loading(signum)
        if callable(previous[signum]):
            previous[signum](signum, frame)

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _install_signal_handlers(state: ServerState) -> None:
    """Chain onto the server's SIGTERM/SIGINT handlers (uvicorn's: stop accepting, wait for responses): the first
    signal also starts the bounded drain, a second one exits at once."""
    if threading.current_thread() is not threading.main_thread():
        return
    # a lost engine (killed, crashed) stops the server as SIGTERM does (as vLLM's), so that its supervisor restarts
    # it rather than it answering 503 for ever; while it drains anyway, the drain goes on (not a second signal)
    state.engine.on_lost = lambda: None if state.draining else signal.raise_signal(signal.SIGTERM)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)

        def handler(signum: int, frame: Any, previous: Any = previous) -> None:
            if state.draining:
                logger.warning("second signal: exiting now")
                state.engine.kill()
                os._exit(128 + signum)
            state.draining = True
            loop.call_soon_threadsafe(state.begin_drain)
            if callable(previous):
                previous(signum, frame)

        signal.signal(sig, handler)


async def api_error(_: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    err = APIError(str(exc.detail), status=exc.status_code, code=f"http_{exc.status_code}")
    return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(APIError(str(exc)).body(), status_code=400)


async def client_gone(_: Request, exc: ClientDisconnected) -> Response:
    return Response(status_code=499)  # nobody reads it: the client left while sending its request


# the app's answers to errors by class (DirectRoutes gives the generation handlers' errors the same answers)
ERROR_HANDLERS = {
    APIError: api_error,
    StarletteHTTPException: http_error,
    RequestValidationError: validation_error,
    ClientDisconnected: client_gone,
}


def settings_from_env(env: Mapping[str, str] = os.environ) -> tuple[EngineConfig, ServerConfig]:
    """What `uvicorn server:app` is configured with: the MINISERVE_* variables (checked here, so that a bad value
    or a missing model directory is one line at startup; the model itself loads in the lifespan)."""
    for line in variable_warnings(env):
        logging.getLogger("uvicorn.error").warning("%s", line)
    config = from_sources(EngineConfig, env=env)
    config.check_dirs()
    if warning := check_shared_dir(env):
        logging.getLogger("uvicorn.error").warning("%s", warning)
    server = from_sources(ServerConfig, env=env)
    uvicorns = ("host", "port", "log_level", "ssl_certfile", "ssl_keyfile")
    for name, flag in ((name, "--" + name.replace("_", "-")) for name in uvicorns):
        if f"MINISERVE_{name.upper()}" in env:  # read by `miniserve serve`; uvicorn has its own flag
            logging.getLogger("uvicorn.error").warning(
                "MINISERVE_%s is not read by uvicorn: pass uvicorn's %s (or run `miniserve serve`)", name.upper(), flag
            )
    if server.api_servers > 1:
        raise ValueError(
            f"MINISERVE_API_SERVERS={server.api_servers}: several API servers need `miniserve serve --api-servers "
            f"{server.api_servers}` (uvicorn runs one app in one process)"
        )
    return config, server


CONNECTION_SETTINGS = (
    "header_timeout",
    "body_timeout",
    "keep_alive_timeout",
    "write_timeout",
    "max_connections",
    "http_parser",
)


def connection_variables(env: Mapping[str, str] = os.environ) -> list[str]:
    """The MINISERVE_* connection settings given in `env`: only the protocol `server:http` applies them."""
    return [name for s in CONNECTION_SETTINGS if (name := f"MINISERVE_{s.upper()}") in env]


def connection_protocol(server: ServerConfig) -> type:
    """The uvicorn `http` protocol class that enforces the connection settings (server/connection.py)."""
    limits = ConnectionLimits(
        server.header_timeout,
        server.body_timeout,
        server.keep_alive_timeout,
        server.max_connections,
        server.write_timeout,
        server.root_path or "",
    )
    return guarded_protocol(limits, server.http_parser)
