"""Online serving benchmark (in the style of vLLM's benchmark_serving): the server against the offline engine.

    python benchmarks/serve.py --shape llama-3.2-1b [--num-prompts 256 --input-len 512 --output-len 256]
        [--request-rate inf | R] [--phases stream,plain,offline,stub] [--client-procs 4] [--out FILE.json]
    python benchmarks/serve.py --model DIR ...                                   # an existing checkpoint
    python benchmarks/serve.py --url http://127.0.0.1:8000 --phases stream      # a server already running

--shape builds (once, under --ckpt-root) the random-weight checkpoint of a real model's shape
(benchmarks/checkpoints.py). The script starts `miniserve serve` on the model (or targets --url) and sends the
workload to /v1/completions (random token ids of --input-len, `ignore_eos` so every request makes --output-len
tokens) or, with --workload chat, to /v1/chat/completions (real text: held-out Shakespeare passages), all at
once or with Poisson arrivals at --request-rate. Phases:

- stream:  `"stream": true`; TTFT, TPOT ((e2e - TTFT) / (tokens - 1)), ITL (gap between content events) and
           end-to-end latency (mean, p50/p90/p99), output tokens/s.
- plain:   the same requests without streaming: output tokens/s and end-to-end latency.
- offline: the same prompts through the offline `LLM.generate` in this process (after the server stopped), for
           the server/offline ratio, plus a single-request prefill time and the full-batch decode step time (the
           references for TTFT and ITL).
- fake:    the API process's ceiling: the served app with benchmarks/fake_engine.py's engine, which gives every
           running request a token every --fake-step-ms (no model, no GPU); streamed, like `stream`.
- stub:    the client's own ceiling: the same workload against a stub server that streams pre-made events
           (--stub-step-ms apart, 0 = as fast as it can), so a client bottleneck shows.

Each online phase sends prompts of its own (an earlier phase's would be in the prefix cache). `--repeats N` runs
the online phases N times, alternated, and offline N times, with new prompts each time; each phase reports its
median run (and every run's tokens/s), and the ratios are between medians. Requests are spread over
--client-procs client processes (asyncio + aiohttp each). Results go to --out as JSON with the command, versions
and settings.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import multiprocessing as mp
import os
import platform
import random
import shlex
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PASSAGES = json.loads((Path(__file__).parent / "prompts_val.json").read_text())
MODEL_NAME = "bench"


# ---------------------------------------------------------------------------------------------- workload


@dataclass
class BenchRequest:
    path: str  # /v1/completions or /v1/chat/completions
    body: dict
    prompt: list[int] | list[dict]  # token ids, or chat messages (for the offline run)


def build_workload(args: argparse.Namespace, vocab_size: int, seed_offset: int = 0) -> list[BenchRequest]:
    """--num-prompts requests: random token ids (seeded: `seed_offset` gives another set) or chat conversations of
    real text (the passages repeat within a set; each set's system prompt names its seed, so no two sets share a
    cached prefix)."""
    rng = random.Random(args.seed + seed_offset)
    common = {"max_tokens": args.output_len, "temperature": 0.0, "ignore_eos": True}
    if args.url is None:  # the server this script starts serves MODEL_NAME; a --url server takes no name
        common["model"] = MODEL_NAME
    out = []
    for i in range(args.num_prompts):
        if args.workload == "random":
            ids = [rng.randrange(vocab_size) for _ in range(args.input_len)]
            out.append(BenchRequest("/v1/completions", {**common, "prompt": ids}, ids))
        else:
            text = PASSAGES[i % len(PASSAGES)]
            messages = [
                {"role": "system", "content": f"Continue the play. (Set {args.seed + seed_offset}.)"},
                {"role": "user", "content": text[: args.input_len * 4]},
            ]
            out.append(BenchRequest("/v1/chat/completions", {**common, "messages": messages}, messages))
    return out


def arrival_times(n: int, rate: float, seed: int) -> list[float]:
    """Offsets in seconds: all 0 for rate=inf, else a Poisson process (exponential gaps) of `rate` per second."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed + 1)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


# ---------------------------------------------------------------------------------------------- client


@dataclass
class Record:
    """What one request saw, client side; times are time.monotonic() (one clock for every process)."""

    index: int
    start: float = 0.0
    first: float | None = None  # first content event
    end: float = 0.0
    tokens: int = 0  # completion_tokens from usage
    events: list[float] = field(default_factory=list)  # arrival of each content event
    error: str | None = None


async def _one(session, url: str, i: int, req: BenchRequest, stream: bool) -> Record:
    import aiohttp

    rec = Record(i)
    body = {**req.body, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    rec.start = time.monotonic()
    try:
        async with session.post(url + req.path, json=body) as resp:
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return rec
            if not stream:
                data = await resp.json()
                rec.end = time.monotonic()
                rec.tokens = data["usage"]["completion_tokens"]
                return rec
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                now = time.monotonic()
                payload = line[6:].strip()
                if payload == b"[DONE]":
                    break
                event = json.loads(payload)
                if event.get("usage"):
                    rec.tokens = event["usage"]["completion_tokens"]
                if "error" in event:
                    rec.error = str(event["error"])[:200]
                for c in event.get("choices", ()):
                    if c.get("text") or (c.get("delta") or {}).get("content"):
                        rec.events.append(now)
                        if rec.first is None:
                            rec.first = now
            rec.end = time.monotonic()
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
    return rec


async def _client_main(url: str, jobs: list, stream: bool, start_at: float) -> list[Record]:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def at(offset: float, i: int, req: BenchRequest) -> Record:
            delay = start_at + offset - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            return await _one(session, url, i, req, stream)

        return await asyncio.gather(*(at(off, i, req) for i, off, req in jobs))


def _client_process(url: str, jobs: list, stream: bool, ready, go, results) -> None:
    ready.put(os.getpid())
    start_at = go.get()
    records = asyncio.run(_client_main(url, jobs, stream, start_at))
    results.put([asdict(r) for r in records])


def run_clients(
    url: str, reqs: list[BenchRequest], arrivals: list[float], stream: bool, procs: int, trace: str | None = None
) -> dict:
    """Send every request from `procs` client processes (request i goes to process i % procs); returns metrics."""
    ctx = mp.get_context("spawn")
    procs = max(1, min(procs, len(reqs)))
    ready, results = ctx.Queue(), ctx.Queue()
    gos = [ctx.Queue() for _ in range(procs)]
    workers = []
    for p in range(procs):
        jobs = [(i, arrivals[i], reqs[i]) for i in range(p, len(reqs), procs)]
        w = ctx.Process(target=_client_process, args=(url, jobs, stream, ready, gos[p], results), daemon=True)
        w.start()
        workers.append(w)
    for _ in workers:
        ready.get(timeout=120)
    start_at = time.monotonic() + 0.5  # every process is up and imported: start together
    for q in gos:
        q.put(start_at)
    records = [Record(**r) for _ in workers for r in results.get()]
    for w in workers:
        w.join(timeout=30)
    if trace:  # every request's start, content events and end (benchmarks/serve_trace.py reads it)
        Path(trace).parent.mkdir(parents=True, exist_ok=True)
        Path(trace).write_text(json.dumps([[r.start, r.events, r.end] for r in records if r.error is None]))
    return summarize(records, start_at, stream)


def percentiles(values: list[float], scale: float = 1000.0) -> dict:
    """mean/p50/p90/p99 (in ms by default), nearest-rank on the sorted values."""
    if not values:
        return {}
    v = sorted(values)
    pick = lambda q: v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))] * scale
    return {"mean": sum(v) / len(v) * scale, "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}


def summarize(records: list[Record], start_at: float, stream: bool) -> dict:
    ok = [r for r in records if r.error is None]
    errors = [r.error for r in records if r.error is not None]
    end = max((r.end for r in ok), default=start_at)
    duration = max(end - start_at, 1e-9)
    tokens = sum(r.tokens for r in ok)
    out = {
        "completed": len(ok),
        "failed": len(errors),
        "errors": errors[:5],
        "duration_s": duration,
        "output_tokens": tokens,
        "output_tok_s": tokens / duration,
        "requests_s": len(ok) / duration,
        "e2e_ms": percentiles([r.end - r.start for r in ok]),
    }
    if stream:
        out["ttft_ms"] = percentiles([r.first - r.start for r in ok if r.first is not None])
        out["tpot_ms"] = percentiles([(r.end - r.first) / (r.tokens - 1) for r in ok if r.first and r.tokens > 1])
        out["itl_ms"] = percentiles([b - a for r in ok for a, b in zip(r.events, r.events[1:])])
        out["content_events"] = sum(len(r.events) for r in ok)
    return out


# ---------------------------------------------------------------------------------------------- stub server


async def _stub_connection(reader, writer, step_s: float) -> None:
    """HTTP/1.1 keep-alive: answer each request with a chunked SSE stream of max_tokens pre-made events."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            body = json.loads(await reader.readexactly(length))
            n = int(body.get("max_tokens", 16))
            chat = "messages" in body
            choice = {"index": 0, "delta": {"content": " tok"}} if chat else {"index": 0, "text": " tok"}
            head_obj = {"id": "stub", "object": "chunk", "created": 0, "model": MODEL_NAME}
            event = _chunked(b"data: " + json.dumps({**head_obj, "choices": [choice]}).encode() + b"\n\n")
            usage = {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}
            tail = _chunked(b"data: " + json.dumps({**head_obj, "choices": [], "usage": usage}).encode() + b"\n\n")
            if not body.get("stream"):
                payload = json.dumps({**head_obj, "choices": [{"index": 0, "text": " tok" * n}], "usage": usage})
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                    + str(len(payload)).encode()
                    + b"\r\n\r\n"
                    + payload.encode()
                )
                await writer.drain()
                continue
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            for _ in range(n):
                writer.write(event)
                if step_s > 0:
                    await writer.drain()
                    await asyncio.sleep(step_s)
            writer.write(tail + _chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def _chunked(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _stub_process(port: int, step_s: float) -> None:
    async def main() -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
        server = await asyncio.start_server(lambda r, w: _stub_connection(r, w, step_s), sock=sock, backlog=4096)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def start_stub(procs: int, step_s: float) -> tuple[str, list]:
    port = free_port()
    ctx = mp.get_context("spawn")
    workers = [ctx.Process(target=_stub_process, args=(port, step_s), daemon=True) for _ in range(procs)]
    for w in workers:
        w.start()
    url = f"http://127.0.0.1:{port}"
    wait_port(port, 60)
    return url, workers


# ---------------------------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")


def start_server(args: argparse.Namespace, fake: bool = False) -> tuple[str, subprocess.Popen]:
    """`miniserve serve` on --model with --engine-args (`fake`: with benchmarks/fake_engine.py's engine instead);
    returns (url, process) once /health answers."""
    import urllib.request

    port = free_port()
    cmd = [sys.executable, "-m", "miniserve.cli", "serve", "--model", args.model, "--port", str(port)]
    if fake:
        cmd[1:4] = ["benchmarks/fake_engine.py", "--step-ms", str(args.fake_step_ms)]
        cmd[4:4] = ["--profile", args.fake_profile] if args.fake_profile else []
        cmd[4:4] = ["--trace", f"{args.trace_dir}/fake"] if args.trace_dir else []
    elif args.trace_dir:  # the real engine, with timestamps (not a profiler)
        cmd[1:4] = ["benchmarks/fake_engine.py", "--real", "--trace", f"{args.trace_dir}/real"]
    elif args.profile_dir:  # the real engine, both processes under cProfile
        Path(args.profile_dir).mkdir(parents=True, exist_ok=True)
        cmd[1:4] = ["benchmarks/fake_engine.py", "--real", "--profile", f"{args.profile_dir}/api.prof"]
        cmd[5:5] = ["--engine-profile", f"{args.profile_dir}/engine.prof"]
    cmd += ["--served-model-name", MODEL_NAME, "--log-level", "warning", *shlex.split(args.engine_args)]
    proc = subprocess.Popen(cmd, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {shlex.join(cmd)}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return url, proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the server did not start within {args.startup_timeout}s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------------------------- offline


def engine_kwargs(engine_args: str) -> dict:
    """EngineConfig keyword arguments from the --engine-args the server got (--max-num-seqs 256 -> max_num_seqs);
    the server's own flags there (--api-servers 4) do not concern the offline engine."""
    from miniserve.config import EngineConfig, ServerConfig
    from miniserve.settings import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser, EngineConfig)
    add_arguments(parser, ServerConfig)
    ns = vars(parser.parse_args(shlex.split(engine_args)))
    ns = {k: v for k, v in ns.items() if k in {f.name for f in dataclasses.fields(EngineConfig)}}
    return {k: v for k, v in ns.items() if v is not None and k not in ("model", "served_model_name")}


def run_offline(args: argparse.Namespace, workloads: list[list[BenchRequest]], warm: list[BenchRequest]) -> dict:
    """The same prompts through LLM.generate (after `warm`'s, which are not measured), each workload in turn on
    one engine (new prompts each: nothing is cached): the median run's tokens/s, plus a single-request prefill and
    a full-batch decode step."""
    import torch

    from miniserve import LLM, SamplingParams

    llm = LLM(args.model, **engine_kwargs(args.engine_args))
    tok = llm.get_tokenizer()

    def as_prompts(reqs: list[BenchRequest]) -> list:
        return [r.prompt if r.body.get("prompt") else tok.chat_prompt(r.prompt)[1] for r in reqs]

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    prompts = as_prompts(workloads[0])
    llm.generate(as_prompts(warm) or prompts[:1], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    sync()
    runs, steps = [], []
    batch = min(len(prompts), llm.engine.config.max_num_seqs)
    for i, reqs in enumerate(workloads):
        run, timeline, start = timed_generate(llm, as_prompts(reqs), args.output_len, sync)
        runs.append(run)
        steps.append(decode_step_time(timeline, batch))
        if args.trace_dir and i == 0:
            from benchmarks.serve_trace import ramp

            Path(args.trace_dir).mkdir(parents=True, exist_ok=True)
            Path(f"{args.trace_dir}/offline_ramp.json").write_text(json.dumps(ramp(timeline, start)))
    prefill, after_idle = single_prefills(llm, [len(p) for p in prompts[:5]], args.seed, sync)
    step = statistics.median(steps)
    return median_run(runs) | {
        "single_request_prefill_ms": prefill * 1000,
        "single_request_prefill_after_idle_ms": after_idle * 1000,
        "decode_step_ms": step * 1000,
    }


def timed_generate(llm, prompts: list, output_len: int, sync) -> tuple[dict, list[tuple[float, int]], float]:
    """One offline run of `prompts`: its result, each step's (end time, tokens computed), and its start time."""
    from miniserve import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    steps, engine_step = [0], llm.engine.step
    timeline: list[tuple[float, int]] = []

    def counted_step():
        steps[0] += 1
        out = engine_step()
        timeline.append((time.perf_counter(), llm.engine.last_step_num_tokens))
        return out

    llm.engine.step = counted_step
    start = time.perf_counter()
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)
        sync()
    finally:
        llm.engine.step = engine_step
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    run = {
        "duration_s": seconds,
        "output_tokens": tokens,
        "output_tok_s": tokens / seconds,
        "engine_steps": steps[0],
        "ms_per_step": seconds / max(steps[0], 1) * 1000,
    }
    return run, timeline, start


def median_run(runs: list[dict]) -> dict:
    """The run with the median throughput (the lower of the middle two for an even count), with every run's
    throughput in order (`repeats_tok_s`), and of a streamed phase every run's ITL, TTFT and TPOT p50
    (`repeats_itl_p50_ms`, ...: their medians are what the latency ratios use, not the one run's)."""
    ranked = sorted(runs, key=lambda r: r["output_tok_s"])
    out = ranked[(len(ranked) - 1) // 2] | {"repeats_tok_s": [r["output_tok_s"] for r in runs]}
    for key in ("itl", "ttft", "tpot"):
        if all(r.get(f"{key}_ms") for r in runs):
            out[f"repeats_{key}_p50_ms"] = [r[f"{key}_ms"]["p50"] for r in runs]
    return out


IDLE_S = 0.25  # the gap between arrivals at 4 requests/s
PHASE_SEEDS = {"stream": 0, "plain": 10}  # added to --seed: each online phase's prompts (lone requests: +2)
WARM_SEED = 20
REPEAT_SEED = 100  # and this times the repeat: new prompts for each repeat
LONE_REQUESTS = 8


def median_p50(phase: dict, key: str) -> float:
    """A streamed phase's `key` ("itl", "ttft", "tpot") p50: the median of its runs' (median_run keeps each), or the one
    run's. The latency ratios use it, not the p50 of the run with the median throughput."""
    return statistics.median(phase.get(f"repeats_{key}_p50_ms") or [phase[f"{key}_ms"]["p50"]])


def lone_requests(url: str, args: argparse.Namespace) -> dict:
    """TTFT of a request alone on the server (streamed, IDLE_S after the one before finished): the prefill plus
    everything around it (HTTP, the API process, the hops between processes), with nothing else running. New
    random prompts of the workload's length (the workload's own may be cached); only random workloads."""
    if args.workload != "random":
        return {}
    lone = argparse.Namespace(**{**vars(args), "num_prompts": LONE_REQUESTS, "seed": args.seed + 2})
    reqs = build_workload(lone, vocab_of(args))
    for r in reqs:
        r.body["max_tokens"] = 2
    gap = IDLE_S + 0.05  # each finishes (2 tokens) well before the next arrives
    res = run_clients(url, reqs, [i * gap for i in range(len(reqs))], True, 1)
    print(f"[lone requests, {IDLE_S:g} s apart] ttft p50 {res['ttft_ms']['p50']:.2f} ms", flush=True)
    return res


def single_prefills(llm, lengths: list[int], seed: int, sync) -> tuple[float, float]:
    """Median seconds of one request alone making one token (the prefill: TTFT's floor), back to back and after
    IDLE_S of an idle engine (as a request arriving below saturation finds it). Each prompt is new random token ids
    of a workload prompt's length: a prompt the engine has run is in its prefix cache, and would measure a
    16-token extend instead."""
    from miniserve import SamplingParams

    rng = random.Random(seed + 1)
    vocab = llm.engine.vocab_size
    one = SamplingParams(max_tokens=1, ignore_eos=True)
    times: dict[bool, list[float]] = {False: [], True: []}
    for idle in (False, True):
        for n in lengths:
            prompt = [rng.randrange(vocab) for _ in range(n)]
            sync()
            if idle:
                time.sleep(IDLE_S)
            t = time.perf_counter()
            llm.generate([prompt], one, use_tqdm=False)
            sync()
            times[idle].append(time.perf_counter() - t)
    return statistics.median(times[False]), statistics.median(times[True])


def decode_step_time(timeline: list[tuple[float, int]], batch: int) -> float:
    """Median seconds between the ends of consecutive engine steps of an offline run in which all `batch` requests
    decoded (one token each): the decode step at the full batch, as the run itself ran it (overlapped: a step
    returns once the next is launched, so in a steady state each lasts one step of the GPU or of the host,
    whichever is slower). It used to be timed in a run of its own after the measured ones; that read up to 8.3 ms
    where the measured runs averaged 5.4 ms a step, prompt passes included."""
    gaps = [t - t0 for (t0, _), (t, n) in zip(timeline, timeline[1:]) if n == batch]
    return statistics.median(gaps) if gaps else float("nan")


# ---------------------------------------------------------------------------------------------- main


def engine_steps(url: str) -> tuple[float, float] | None:
    """(steps, tokens computed) so far, from the server's iteration-tokens histogram in /metrics (None: absent)."""
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return None
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        for key in ("_count", "_sum"):
            if name.startswith("miniserve:iteration_tokens_total" + key):
                found[key] = float(value)
    return (found["_count"], found["_sum"]) if len(found) == 2 else None


def step_summary(before: tuple | None, after: tuple | None, duration_s: float) -> dict:
    """Engine steps during a phase, tokens computed per step and wall time per step: a server that takes more
    steps than offline for the same work (prompts arriving over time) differs from one whose steps are slower."""
    if before is None or after is None or after[0] <= before[0]:
        return {}
    steps, tokens = after[0] - before[0], after[1] - before[1]
    return {"engine_steps": int(steps), "tokens_per_step": tokens / steps, "ms_per_step": duration_s / steps * 1000}


def versions() -> dict:
    """The provenance throughput.py records (commit, date, torch, triton, GPU), plus the serving stack's packages
    (uvicorn picks uvloop and httptools when they are installed)."""
    from benchmarks.throughput import provenance

    out = {"platform": platform.platform(), **provenance()}
    out.pop("command", None)
    for name in ("fastapi", "uvicorn", "starlette", "pydantic", "orjson", "uvloop", "httptools", "aiohttp"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            out[name] = None
    return out


def vocab_of(args: argparse.Namespace) -> int:
    """The ids prompts are drawn below: the model's embedding rows (a tokenizer's vocab_size also counts its added
    tokens, which may lie past them, and the engine refuses such ids)."""
    if args.model is None:
        return args.vocab_size
    from miniserve.models.config import ModelConfig
    from miniserve.tokenizer import Tokenizer

    return min(Tokenizer.from_pretrained(args.model).vocab_size, ModelConfig.from_dir(args.model).vocab_size)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default=None, help="build the random-weight checkpoint of this shape and serve it")
    p.add_argument("--ckpt-root", default="/tmp/miniserve-ckpts", help="where --shape checkpoints are kept")
    p.add_argument("--overrides", default=None, help="JSON config overrides for --shape (tiny CPU tests)")
    p.add_argument("--model", default=None, help="model directory: start `miniserve serve` on it")
    p.add_argument("--url", default=None, help="target a running server instead (its model serves any name)")
    p.add_argument("--engine-args", default="", help="extra `miniserve serve` engine flags, also used offline")
    p.add_argument("--workload", choices=("random", "chat"), default="random")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=512, help="prompt tokens (random); ~4x chars of text (chat)")
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals per second (inf: at once)")
    p.add_argument("--phases", default="stream,plain,offline", help="comma list of stream, plain, offline, stub, fake")
    p.add_argument("--client-procs", type=int, default=4)
    p.add_argument("--stub-procs", type=int, default=4)
    p.add_argument("--stub-step-ms", type=float, default=0.0, help="stub: pause between events (0: flat out)")
    p.add_argument("--fake-step-ms", type=float, default=6.0, help="fake: the fake engine's step time")
    p.add_argument("--fake-profile", default=None, help="fake: write a cProfile of the API process here")
    p.add_argument("--profile-dir", default=None, help="stream/plain: cProfile both server processes into this dir")
    p.add_argument(
        "--trace-dir", default=None, help="record engine, API and client timestamps here (benchmarks/serve_trace.py)"
    )
    p.add_argument("--warmup", type=int, default=8, help="requests sent (and not measured) before each phase")
    p.add_argument(
        "--repeats", type=int, default=1, help="run the online phases (alternated) and offline this many times, "
        "with new prompts each time; each reports its median run"
    )  # fmt: skip
    p.add_argument("--vocab-size", type=int, default=1000, help="random ids below this with --url and no --model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("--out", default=None, help="write the JSON results here")
    args = p.parse_args(argv)
    if args.shape is not None:
        from benchmarks.checkpoints import SHAPES, build_checkpoint

        if args.shape not in SHAPES:
            p.error(f"--shape must be one of {sorted(SHAPES)}")
        overrides = json.loads(args.overrides) if args.overrides else None
        args.model = str(build_checkpoint(args.shape, args.ckpt_root, overrides=overrides))
    phases = [x for x in args.phases.split(",") if x]
    bad = set(phases) - {"stream", "plain", "offline", "stub", "fake"}
    if bad:
        p.error(f"unknown phases {sorted(bad)}")
    if args.trace_dir and "--api-servers" in args.engine_args:
        p.error("--trace-dir traces one API server process (no --api-servers in --engine-args)")
    if args.repeats < 1 or (args.trace_dir and args.repeats > 1):
        p.error("--repeats must be >= 1, and 1 with --trace-dir (a trace follows one run of each phase)")
    if args.model is None and (args.url is None or "offline" in phases):
        p.error("--shape or --model is needed (to start the server, and for the offline phase)")
    args.phase_list = phases
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    vocab = vocab_of(args)
    # every phase (and repeat) on the server gets prompts of its own, and the warm-up others again: a phase whose
    # prompts an earlier one left in the prefix cache would skip their prefill (offline runs the streamed phase's)
    phase_reqs = {
        (ph, r): build_workload(args, vocab, PHASE_SEEDS[ph] + REPEAT_SEED * r)
        for ph in ("stream", "plain")
        for r in range(args.repeats)
    }
    reqs = phase_reqs["stream", 0]
    arrivals = arrival_times(len(reqs), args.request_rate, args.seed)
    warm = build_workload(args, vocab, WARM_SEED)[: args.warmup]
    results: dict = {
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["serve.py", *argv]),
        "versions": versions(),
        "settings": {k: v for k, v in vars(args).items() if k != "phase_list"},
        "phases": {},
    }
    online = [ph for ph in args.phase_list if ph in ("stream", "plain")]
    if online:
        proc = None
        url = args.url
        if url is None:
            url, proc = start_server(args)
        try:
            if warm:
                run_clients(url, warm, [0.0] * len(warm), True, 1)
            if "stream" in online:
                results["phases"]["lone"] = lone_requests(url, args)
            runs: dict[str, list[dict]] = {ph: [] for ph in online}
            for r in range(args.repeats):  # the phases alternated
                for ph in online:
                    before = engine_steps(url)
                    trace = f"{args.trace_dir}/real/{ph}_client.json" if args.trace_dir else None
                    res = run_clients(url, phase_reqs[ph, r], arrivals, ph == "stream", args.client_procs, trace)
                    res |= step_summary(before, engine_steps(url), res["duration_s"])
                    runs[ph].append(res)
                    print(f"[{ph}{f' {r + 1}/{args.repeats}' if args.repeats > 1 else ''}] {fmt(res)}", flush=True)
            for ph in online:
                results["phases"][ph] = median_run(runs[ph])
        finally:
            if proc is not None:
                stop(proc)
    if "fake" in args.phase_list:
        url, proc = start_server(args, fake=True)
        try:
            run_clients(url, warm, [0.0] * len(warm), True, 1)
            trace = f"{args.trace_dir}/fake/stream_client.json" if args.trace_dir else None
            res = run_clients(url, reqs, arrivals, True, args.client_procs, trace)
            res["engine_time_s"] = args.output_len * args.fake_step_ms / 1000  # what a client could see at best
            results["phases"]["fake"] = res
            print(f"[fake engine, {args.fake_step_ms} ms steps: API ceiling] {fmt(res)}", flush=True)
        finally:
            stop(proc)
    if "stub" in args.phase_list:
        url, workers = start_stub(args.stub_procs, args.stub_step_ms / 1000)
        try:
            res = run_clients(url, reqs, arrivals, True, args.client_procs)
            results["phases"]["stub"] = res
            print(f"[stub: client ceiling] {fmt(res)}", flush=True)
        finally:
            for w in workers:
                w.terminate()
    if "offline" in args.phase_list:
        res = run_offline(args, [phase_reqs["stream", r] for r in range(args.repeats)], warm)
        results["phases"]["offline"] = res
        print(
            f"[offline] {res['output_tok_s']:.0f} output tok/s, single-request prefill "
            f"{res['single_request_prefill_ms']:.2f} ms ({res['single_request_prefill_after_idle_ms']:.2f} after "
            f"{IDLE_S:g} s idle), decode step {res['decode_step_ms']:.2f} ms",
            flush=True,
        )
        for ph in online:
            ratio = results["phases"][ph]["output_tok_s"] / res["output_tok_s"]
            results["phases"][ph]["vs_offline"] = ratio
            print(f"[{ph}] {ratio:.3f}x offline", flush=True)
        if "stream" in results["phases"]:
            s = results["phases"]["stream"]
            if s.get("itl_ms"):
                s["itl_p50_vs_decode_step"] = median_p50(s, "itl") / res["decode_step_ms"]
            if s.get("ttft_ms"):
                s["ttft_p50_vs_prefill"] = median_p50(s, "ttft") / res["single_request_prefill_ms"]
    lone, stream = results["phases"].get("lone"), results["phases"].get("stream")
    if lone and stream and lone.get("ttft_ms") and stream.get("ttft_ms"):
        stream["ttft_p50_vs_lone"] = median_p50(stream, "ttft") / lone["ttft_ms"]["p50"]
    if args.trace_dir:
        results["trace"] = trace_summaries(Path(args.trace_dir))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return results


def trace_summaries(trace_dir: Path) -> dict:
    """benchmarks/serve_trace.py's analysis of each streamed phase traced under `trace_dir`, and the ramp of every
    phase."""
    from benchmarks.serve_trace import analyse, phase_ramp

    out = {
        f"{server}/{path.stem.removesuffix('_client')}": analyse(trace_dir / server, path.stem.removesuffix("_client"))
        for server in ("real", "fake")
        for path in sorted((trace_dir / server).glob("stream_client.json"))
    }
    # how each phase's engine work was spread out (admission ramp, step times), beside the offline run's
    for path in sorted((trace_dir / "real").glob("*_client.json")):
        phase = path.stem.removesuffix("_client")
        out[f"ramp/{phase}"] = phase_ramp(trace_dir / "real", phase)
    if (trace_dir / "offline_ramp.json").exists():
        out["ramp/offline"] = json.loads((trace_dir / "offline_ramp.json").read_text())
    return out


def fmt(res: dict) -> str:
    line = f"{res['completed']} ok, {res['failed']} failed, {res['output_tok_s']:.0f} output tok/s"
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        if res.get(key):
            v = res[key]
            line += f"; {key[:-3]} p50 {v['p50']:.1f} p90 {v['p90']:.1f} p99 {v['p99']:.1f} ms"
    return line


if __name__ == "__main__":
    main()
