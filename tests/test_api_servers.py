"""`miniserve serve --api-servers N`: several API server processes share one engine (server/launcher.py).

- the engine process's loop, over real pipes to two API ends: each request's output goes only to the API server
  that posted it, the per-step token count only to server 0, a server that stops has its requests aborted while
  the other is still served, and the loop ends when the last one stops;
- `miniserve serve --api-servers 2` on the CPU: concurrent requests, streamed and plain, get the offline engine's
  greedy text; /metrics counts every request of both servers at every scrape; SIGTERM ends every process;
- `uvicorn server:app` refuses MINISERVE_API_SERVERS > 1 with a message naming what to run instead.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import openai
import pytest

from tests.test_server import MODEL_NAME, REPO, _wait_healthy, build_server_model, free_port, metric, scrape


def _recv_until_finished(reader, request_id: str, into: list) -> None:
    """Messages from one API end until `request_id` finishes (each kept in `into`)."""
    while True:
        msg = reader.recv()
        into.append(msg)
        if msg[0] == "step" and any(d[0] == request_id and d[1] for d in msg[1]):
            return


def _tokens(messages: list, request_id: str) -> list[int]:
    return [t for m in messages if m[0] == "step" for d in m[1] if d[0] == request_id for c in d[2] for t in c[1]]


def test_the_engine_loop_routes_each_output_to_the_api_server_that_posted_it():
    from miniserve import LLM, SamplingParams
    from miniserve.server.engine_core import CoreLoop
    from miniserve.server.pipe import FrameReader, FrameWriter

    engine = LLM(device="cpu").engine
    commands = [mp.Pipe(duplex=False) for _ in range(2)]  # (engine's end, API's end)
    outputs = [mp.Pipe(duplex=False) for _ in range(2)]  # (API's end, engine's end)
    loop = CoreLoop(engine, [FrameReader(c[0]) for c in commands], [FrameWriter(o[1]) for o in outputs])
    send = [FrameWriter(c[1]) for c in commands]
    recv = [FrameReader(o[0]) for o in outputs]
    greedy = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    endless = SamplingParams(max_tokens=1000, temperature=0, ignore_eos=True)  # (the demo: 1024 positions)
    oracle = LLM(device="cpu")  # a separate engine, before the loop runs ("c" must still be running at the abort)
    expected = {
        rid: list(oracle.generate({"prompt_token_ids": prompt}, greedy)[0].outputs[0].token_ids)
        for rid, prompt in (("a", [5, 6, 7]), ("b", [8, 9]))
    }  # what each prompt alone gives
    send[0].send([("add", "a", [5, 6, 7], greedy, None, 0)])
    send[1].send([("add", "b", [8, 9], greedy, None, 0), ("add", "c", [5, 6], endless, None, 0)])
    runner = threading.Thread(target=loop.run)
    runner.start()
    got: list[list] = [[], []]
    readers = [threading.Thread(target=_recv_until_finished, args=(recv[i], rid, got[i])) for i, rid in enumerate("ab")]
    for r in readers:
        r.start()
    for r in readers:
        r.join(timeout=60)
    steps = [[m for m in got[i] if m[0] == "step"] for i in range(2)]
    assert {d[0] for m in steps[0] for d in m[1]} == {"a"}  # server 0 hears only of its own request
    assert {d[0] for m in steps[1] for d in m[1]} <= {"b", "c"} and _tokens(got[1], "b")
    assert all(m[3] == 0 for m in steps[1]) and sum(m[3] for m in steps[0]) > 0  # the step metric: server 0 only
    for rid, i in (("a", 0), ("b", 1)):
        assert _tokens(got[i], rid) == expected[rid]

    aborted: list[str] = []
    abort = engine.abort_request
    engine.abort_request = lambda rid: (aborted.append(rid), abort(rid))[1]
    send[1].send([("stop",)])  # server 1 leaves with "c" still running: the engine aborts it, server 0 goes on
    deadline = time.monotonic() + 30
    while "c" in engine.outputs.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    assert aborted == ["c"] and runner.is_alive()  # (a thousand tokens: "c" cannot have finished by itself)
    send[0].send([("add", "d", [5, 6, 7], greedy, None, 0)])
    later: list = []
    _recv_until_finished(recv[0], "d", later)
    assert _tokens(later, "d") == _tokens(got[0], "a")
    send[0].send([("add", "e", [5, 6], endless, None, 0)])  # one aborted by its server is forgotten too
    while "e" not in loop.owner:
        time.sleep(0.01)
    send[0].send([("abort", ["e"])])
    deadline = time.monotonic() + 30
    while "e" in engine.outputs.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    send[0].send([("stop",)])
    runner.join(timeout=30)
    assert not runner.is_alive()  # the last API server stopped: the loop ended
    assert loop.owner == {}  # every request finished, aborted or dropped left the routing table


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return build_server_model(tmp_path_factory.mktemp("api-servers-model"), tokenizer_dir)


def _children(pid: int) -> set[int]:
    """Every process below `pid` (Linux /proc)."""
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            kids = {int(k) for k in (task / "children").read_text().split()}
            todo += sorted(kids - found)
            found |= kids
    return found


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_text()


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"  # exited, not yet reaped by a parent that is itself gone


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_two_api_servers_answer_like_one_and_count_every_request(model_dir):
    port = free_port()
    cmd = [sys.executable, "-m", "miniserve.cli", "serve", "--model", str(model_dir), "--device", "cpu"]
    cmd += ["--dtype", "float32", "--port", str(port), "--api-servers", "2", "--served-model-name", MODEL_NAME]
    cmd += ["--drain-timeout", "inf"]  # (no bound: the launcher's wait for the engine once failed on it)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([*cmd, "--log-level", "warning"], cwd=REPO, env=env, stdout=log, stderr=log)
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_healthy(url, proc, log)
            children = _children(proc.pid)
            assert len(children) >= 3  # the engine and two API servers (and multiprocessing's resource tracker)
            client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
            prompts = [f"ROMEO {i}:" for i in range(12)]

            def ask(i: int) -> str:
                args = dict(model=MODEL_NAME, prompt=prompts[i], max_tokens=8, temperature=0)
                if i % 2:
                    return client.completions.create(**args, extra_body={"ignore_eos": True}).choices[0].text
                chunks = client.completions.create(**args, stream=True, extra_body={"ignore_eos": True})
                return "".join(c.choices[0].text for c in chunks if c.choices)

            with cf.ThreadPoolExecutor(12) as pool:
                served = list(pool.map(ask, range(12)))
            from miniserve import LLM, SamplingParams

            offline = LLM(model=str(model_dir), device="cpu", dtype="float32")
            expected = offline.generate(prompts, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
            assert served == [o.outputs[0].text for o in expected]
            for _ in range(6):  # whichever server answers the scrape, it counts both servers' requests
                samples = scrape(url)
                assert metric(samples, "request_success_total", finished_reason="length") == 12
                assert metric(samples, "inter_token_latency_seconds_count") == 12 * 7  # a gap after each first token
            # and the engine's own series are its counts as of the scrape, whichever server answers it: after a
            # short request on one server, the other one used to keep the stats of the request's first step (its
            # counters behind, a request still running) until the next request came
            client.completions.create(model=MODEL_NAME, prompt="ROMEO:", max_tokens=2, extra_body={"ignore_eos": True})
            seen = []
            for _ in range(16):  # each on a new connection: either server may answer
                samples = scrape(url)
                seen.append((metric(samples, "generation_tokens_total"), metric(samples, "num_requests_running")))
            assert seen == [(12 * 8 + 2, 0.0)] * 16, seen
            # a stalled engine (stopped here) leaves /metrics answering with the last stats it sent, at once
            (engine,) = [c for c in children if "spawn_main" in _cmdline(c) and os.getpgid(c) != c]  # (APIs: own)
            os.kill(engine, signal.SIGSTOP)
            try:
                for _ in range(4):
                    begun = time.monotonic()
                    assert metric(scrape(url), "generation_tokens_total") == 12 * 8 + 2
                    assert time.monotonic() - begun < 3
            finally:
                os.kill(engine, signal.SIGCONT)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
            deadline = time.monotonic() + 10
            while not all(_gone(c) for c in children) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert all(_gone(c) for c in children), (children, log.seek(0), log.read())
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=15)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_an_api_server_stopped_by_someone_else_stops_the_launcher(model_dir):
    """An API server that ends without the launcher asking (here a SIGTERM from outside, which it drains and
    dies of) is noticed: the launcher stops the rest and exits 1, not serving on with one server fewer."""
    port = free_port()
    cmd = [sys.executable, "-m", "miniserve.cli", "serve", "--model", str(model_dir), "--device", "cpu"]
    cmd += ["--dtype", "float32", "--port", str(port), "--api-servers", "2", "--log-level", "warning"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=log)
        try:
            _wait_healthy(f"http://127.0.0.1:{port}", proc, log)
            apis = [c for c in _children(proc.pid) if not _gone(c) and os.getpgid(c) == c]  # (their own groups)
            assert len(apis) == 2
            os.kill(apis[0], signal.SIGTERM)
            assert proc.wait(timeout=60) == 1
            log.seek(0)
            assert "exited with -15: stopping the others" in log.read().decode(errors="replace")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=15)


@pytest.mark.parametrize(("api_servers", "weights"), [(2, "none"), (1, "truncated")])
def test_an_engine_that_cannot_load_fails_the_launcher(model_dir, tmp_path, api_servers, weights):
    """Every API server's startup fails on the engine's error, in one line each; the launcher exits with uvicorn's
    status for a failed start (3) with one API server or several, nothing left running. Missing weights and a
    damaged file (a cut download) are the user's to fix: the line says all, the file named, no traceback."""
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in model_dir.iterdir():
        if not f.name.endswith(".safetensors"):
            (broken / f.name).write_bytes(f.read_bytes())
        elif weights == "truncated":
            (broken / f.name).write_bytes(f.read_bytes()[:200])
    cmd = [sys.executable, "-m", "miniserve.cli", "serve", "--model", str(broken), "--device", "cpu"]
    cmd += ["--port", str(free_port()), "--api-servers", str(api_servers), "--log-level", "warning"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert "the engine failed to load" in proc.stderr and "safetensors" in proc.stderr
    said = [line for line in proc.stderr.splitlines() if "miniserve: the server cannot start: " in line]
    # (with several, the launcher stops the rest once one exited: some may not have said it yet)
    assert 1 <= len(said) <= api_servers and all("the engine failed to load" in line for line in said), proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    if weights == "truncated":
        assert f"{broken / 'model.safetensors'}: cannot be read as a safetensors checkpoint" in said[0], said


@pytest.mark.parametrize("api_servers", [1, 2])
def test_a_port_in_use_is_one_line_and_starts_nothing(model_dir, api_servers):
    """The port is bound before the model loads (a large model would load for minutes, then fail)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        cmd = [sys.executable, "-m", "miniserve.cli", "serve", "--model", str(model_dir), "--device", "cpu"]
        cmd += ["--port", str(port), "--api-servers", str(api_servers)]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    message = proc.stderr.strip()
    assert message.startswith(f"miniserve: error: cannot listen on 127.0.0.1:{port}: ") and "\n" not in message


def test_uvicorn_refuses_several_api_servers_with_what_to_run_instead(model_dir):
    from miniserve.server.app import settings_from_env

    with pytest.raises(ValueError, match="miniserve serve --api-servers 2"):
        settings_from_env({"MINISERVE_MODEL": str(model_dir), "MINISERVE_API_SERVERS": "2"})
    assert settings_from_env({"MINISERVE_MODEL": str(model_dir)})[1].api_servers == 1


def test_uvicorn_says_which_settings_it_does_not_read(model_dir):
    """Under `uvicorn server:app` the address and log level are uvicorn's flags: a MINISERVE_ variable for them is
    not silently dropped."""
    import logging

    from miniserve.server.app import settings_from_env

    said: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(record.getMessage())
    logger = logging.getLogger("uvicorn.error")  # (uvicorn's config may stop it propagating: listen right there)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        settings_from_env({"MINISERVE_MODEL": str(model_dir), "MINISERVE_PORT": "9001", "MINISERVE_LOG_LEVEL": "debug"})
        assert said == [
            "MINISERVE_PORT is not read by uvicorn: pass uvicorn's --port (or run `miniserve serve`)",
            "MINISERVE_LOG_LEVEL is not read by uvicorn: pass uvicorn's --log-level (or run `miniserve serve`)",
        ]
        said.clear()
        settings_from_env({"MINISERVE_MODEL": str(model_dir)})
        assert said == []
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.mark.parametrize("api_servers", [1, 2])
def test_connections_are_refused_until_the_app_is_up(model_dir, api_servers, tmp_path):
    """The port is bound before the model loads but listened on only once the app started (as vLLM's): a client
    (or a TCP readiness probe) that connects meanwhile is refused, not accepted and left waiting for the load.
    One line says where it listens, once it does."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "miniserve.cli", "serve", "--model", str(model_dir), "--device", "cpu"]
    cmd += ["--port", str(port), "--api-servers", str(api_servers)]
    log = open(tmp_path / "log", "w+")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the first connect that is accepted
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=2.0).status_code == 200
        line, said = f"miniserve: listening on http://127.0.0.1:{port}\n", ""
        deadline = time.monotonic() + 30  # (with several, API server 0 says it; another may answer first)
        while line not in said and time.monotonic() < deadline:
            time.sleep(0.1)
            log.seek(0)
            said = log.read()
        assert said.count(line) == 1, said
        assert said.index(line) > said.index("Application startup complete"), said  # said once it listens
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        log.close()
