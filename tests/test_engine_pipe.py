"""The engine process's transport to the API process (server/pipe.py) and the API side's joining of steps that
arrived together (engine_process.merge_steps): frames survive any split into reads, a message larger than the
pipe arrives whole, end of file is reported once every frame is read; a run of steps applied as one gives every
request the same output as the steps applied one by one."""

from __future__ import annotations

import asyncio
import copy
import multiprocessing as mp
import os
import random
import threading
import time
from types import SimpleNamespace

import pytest

from miniserve.engine.outputs import RequestOutput
from miniserve.sampling_params import SamplingParams
from miniserve.server.engine_process import EngineProcess, RequestStream, merge_steps
from miniserve.server.pipe import FrameReader, FrameWriter
from miniserve.server.protocol import APIError


def _pipe() -> tuple[FrameReader, FrameWriter]:
    recv, send = mp.Pipe(duplex=False)
    return FrameReader(recv), FrameWriter(send)


def test_frames_round_trip_in_order_and_all_at_once():
    reader, writer = _pipe()
    messages = [("step", [("r1", False, [(0, [i], "", None, None, None, None)], None, None)], {}, i) for i in range(50)]
    for msg in messages:
        writer.send(msg)
    got = reader.read_ready()  # everything written so far, in one read
    assert got == messages
    writer.send(("acks", [], {}))
    assert reader.recv() == ("acks", [], {})


def test_a_message_larger_than_the_pipe_arrives_whole():
    reader, writer = _pipe()
    big = ("step", list(range(600_000)), {}, 1)  # ~3 MB pickled: many reads, and a writer that blocks meanwhile
    sender = threading.Thread(target=lambda: [writer.send(big), writer.send(("small",))])
    sender.start()
    assert reader.recv() == big
    assert reader.recv() == ("small",)
    sender.join()


def test_the_event_loop_writer_never_blocks_and_keeps_frames_whole_and_in_order():
    """LoopFrameWriter (the API process's command end): messages larger than the pipe return at once, the loop goes
    on running while the rest is written as the reader makes room, and the reader gets every frame whole, in order;
    the API end of the engine's pipe read from the loop (add_reader + read_ready) gets them all too."""
    import asyncio

    from miniserve.server.pipe import LoopFrameWriter

    recv, send = mp.Pipe(duplex=False)
    reader = FrameReader(recv)
    big = [("add", i, list(range(300_000))) for i in range(3)]  # ~1.5 MB each: more than the 1 MiB pipe
    got: list = []

    async def main() -> float:
        writer = LoopFrameWriter(send, asyncio.get_running_loop())
        t = time.monotonic()
        for msg in [*big, ("stop",)]:
            writer.send(msg)
        returned = time.monotonic() - t
        assert writer.pending  # what the pipe did not take waits for room
        ticks, deadline = 0, time.monotonic() + 20
        while len(got) < 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.001)  # the loop keeps running meanwhile
            ticks += 1
        assert ticks > 0 and not writer.pending and not writer.watching
        return returned

    def read() -> None:
        os.set_blocking(reader.fd, False)
        deadline = time.monotonic() + 20
        while len(got) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)  # a slow reader: the writer must wait for room
            got.extend(reader.read_ready())

    thread = threading.Thread(target=read)
    thread.start()
    returned = asyncio.run(main())
    thread.join(timeout=30)
    assert got == [*big, ("stop",)] and returned < 0.5


def test_read_ready_returns_what_one_read_completed():
    reader, writer = _pipe()
    os.set_blocking(reader.fd, False)
    assert reader.read_ready() == []  # nothing there: no wait, no message
    writer.send(("a", 1))
    writer.send(("b", 2))
    assert reader.read_ready() == [("a", 1), ("b", 2)]
    writer.conn.close()
    with pytest.raises(EOFError):
        reader.read_ready()


def test_frames_split_at_every_byte_are_reassembled():
    """The reader parses whatever a read returns: here each read returns one byte."""
    reader, writer = _pipe()
    messages = [("a", 1), ("b", "x" * 300), ("c", None)]
    for msg in messages:
        writer.send(msg)
    real_read = os.read
    try:
        os.read = lambda fd, n: real_read(fd, 1)
        got = [reader.recv() for _ in messages]
    finally:
        os.read = real_read
    assert got == messages


def test_end_of_file_comes_after_the_last_frame():
    reader, writer = _pipe()
    writer.send(("last",))
    writer.conn.close()
    assert reader.recv() == ("last",)
    with pytest.raises(EOFError):
        reader.recv()


# ---------------------------------------------------------------------------------------------- merge_steps


class _Params:
    def __init__(self, n: int, logprobs: int | None):
        self.n, self.logprobs, self.prompt_logprobs = n, logprobs, 0
        self.output_kind, self.detokenize, self.skip_special_tokens = "delta", True, True


def _random_steps(rng: random.Random, num_steps: int) -> list[tuple]:
    """Step messages for requests r0 (n=2, logprobs) and r1 (n=1), each choice ending at a random step; r1's
    final metrics and prompt logprobs ride with its last and first deltas."""
    ends = {("r0", 0): rng.randrange(1, num_steps), ("r0", 1): num_steps - 1, ("r1", 0): rng.randrange(1, num_steps)}
    steps = []
    for t in range(num_steps):
        deltas = []
        for rid, n in (("r0", 2), ("r1", 1)):
            choices = []
            for index in range(n):
                end = ends[(rid, index)]
                if t > end:
                    continue
                token = rng.randrange(1000)
                logprobs = [{token: -rng.random()}] if rid == "r0" else None
                finish = "length" if t == end else None
                text = f"<{token}>" if rng.random() < 0.8 else ""
                choices.append((index, [token], text, logprobs, finish, None, -float(t) if logprobs else None))
            if not choices:
                continue
            finished = all(t >= ends[(rid, i)] for i in range(n))
            prompt_logprobs = ([None, {2: -1.0}], [None, 7]) if rid == "r1" and t == 0 else None  # (entries, ranks)
            metrics = {"finished_time": float(t), "num_cached_tokens": 3} if finished else None
            deltas.append((rid, finished, choices, prompt_logprobs, metrics))
        steps.append(("step", deltas, {"step": t}, 7 + t))
    return steps


def _apply(messages: list[tuple]) -> tuple[dict, list]:
    messages = copy.deepcopy(messages)  # (a stream takes its metrics dict over)
    streams = {
        "r0": RequestStream("r0", [1, 2], _Params(2, 1), lambda s: None),
        "r1": RequestStream("r1", [1, 2], _Params(1, None), lambda s: None),
    }
    stats, counts = [], []
    for msg in messages:
        if msg[0] != "step":
            stats.append(msg)
            continue
        _, deltas, stat, num_tokens = msg
        stats.append(stat)
        counts.append(num_tokens if isinstance(num_tokens, list) else [num_tokens])
        for rid, finished, choices, prompt_logprobs, metrics in deltas:
            if not streams[rid].done:
                streams[rid].apply(finished, choices, prompt_logprobs, metrics)
    outs = {rid: s.output for rid, s in streams.items()}
    return outs, [stats[-1], sum(counts, [])]


@pytest.mark.parametrize("seed", range(6))
def test_steps_joined_give_every_request_the_output_of_the_steps_one_by_one(seed):
    rng = random.Random(seed)
    steps = _random_steps(rng, 9)
    want, (want_stats, want_counts) = _apply(steps)
    assert all(isinstance(o, RequestOutput) and o.finished for o in want.values())
    got, (got_stats, got_counts) = _apply(merge_steps(steps))
    assert got == want
    assert got_stats == want_stats and got_counts == want_counts  # the latest stats; every step's token count
    assert [len(m[1]) for m in merge_steps(steps)] == [2]  # one joined message, one delta per request


def test_other_messages_split_the_runs_they_fall_between():
    steps = _random_steps(random.Random(0), 5)
    acks = ("acks", [("r9", None, True)], {"acks": 1})
    merged = merge_steps([*steps[:2], acks, *steps[2:]])
    assert [m[0] for m in merged] == ["step", "acks", "step"]
    assert merged[0][3] == [7, 8] and merged[2][3] == [9, 10, 11]
    assert merge_steps([steps[0]]) == [("step", steps[0][1], steps[0][2], [7])]  # one step: its deltas as they were


def test_a_failing_step_fails_every_request_in_flight_and_the_loop_serves_on():
    """CoreLoop (the engine process's loop) over real pipes with the demo engine: the first step raises, so both
    requests in flight are failed in one message and leave the engine; a request sent after it is served."""
    from miniserve import LLM, SamplingParams
    from miniserve.server.engine_core import CoreLoop

    engine = LLM(device="cpu").engine
    cmd_recv, cmd_send = mp.Pipe(duplex=False)
    out_recv, out_send = mp.Pipe(duplex=False)
    reader, loop = FrameReader(out_recv), CoreLoop(engine, [FrameReader(cmd_recv)], [FrameWriter(out_send)])
    commands = FrameWriter(cmd_send)
    real_step, calls = engine.step_messages, []

    def step_messages():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real_step()

    engine.step_messages = step_messages
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    commands.send([("add", "a", [5, 6, 7], params, None, 0), ("add", "b", [8, 9], params, None, 0)])
    runner = threading.Thread(target=loop.run)
    runner.start()
    assert reader.recv()[:2] == ("acks", [("a", None, True), ("b", None, True)])
    kind, failed, message, _ = reader.recv()
    assert (kind, sorted(failed), message) == ("failed", ["a", "b"], "RuntimeError: boom")
    assert not engine.has_unfinished_requests()
    commands.send([("add", "c", [5, 6], params, None, 0)])
    tokens = []
    while True:
        msg = reader.recv()
        if msg[0] == "step":
            assert all(delta[0] == "c" for delta in msg[1])
            tokens += [t for delta in msg[1] for choice in delta[2] for t in choice[1]]
            if any(delta[1] for delta in msg[1]):
                break
    assert len(tokens) == 3
    commands.send([("stop",)])
    runner.join(timeout=30)
    assert not runner.is_alive()


class _Posted(EngineProcess):
    """The API side with no engine process: what it posts is kept, and finished requests are counted."""

    def __init__(self, max_waiting: int | None = None):
        super().__init__(SimpleNamespace(max_num_seqs=1), max_waiting)
        self._alive, self.posted, self.counted = True, [], []
        self.metrics = SimpleNamespace(observe_finished=lambda reasons, _: self.counted.extend(reasons))

    def _post(self, cmd: tuple) -> None:
        self.posted.append(cmd)


def _requests(n: int) -> list[tuple]:
    params = SamplingParams(max_tokens=1)
    return [
        (f"r-{i}", [1, 2], params, RequestStream(f"r-{i}", [1, 2], params, lambda s: None), None, 0) for i in range(n)
    ]


def test_a_refused_prompt_withdraws_the_requests_others_uncounted():
    """A request of 3 prompts, the middle one refused by the engine: a 400 that ran nothing, so the other two are
    withdrawn (aborted in the engine, nothing outstanding) and, when the caller aborts them, not counted as finished
    requests in the metrics (they were, as aborts)."""

    async def run() -> _Posted:
        proc, requests = _Posted(), _requests(3)
        adding = asyncio.ensure_future(proc.add_requests(requests))
        await asyncio.sleep(0)
        proc._on_message(("acks", [("r-0", None, True), ("r-1", "too long", True), ("r-2", None, True)], {}))
        with pytest.raises(ValueError, match="too long"):
            await adding
        for request_id, *_ in requests:  # what RequestGroup.start does with the error
            proc.abort(request_id)
        return proc

    proc = asyncio.run(run())
    assert (proc.counted, proc.admission.outstanding, proc._streams, proc._acks) == ([], 0, {}, {})
    assert [c for c in proc.posted if c[0] == "abort"] == [("abort", ["r-0", "r-2"])]


def test_an_overloaded_request_posts_none_of_its_prompts():
    """max_waiting is checked for all of a request's prompts before any is posted (the first one was posted, then
    aborted, when the second did not fit): while others wait, a 503; prompts that together could never fit, even
    each alone would, the client's error (400), not "retry later" (it said 503, queue empty or not)."""

    async def run(outstanding: int, prompts: int, code: str) -> _Posted:
        proc = _Posted(max_waiting=1)  # 1 running + 1 waiting
        proc.admission._count.value = outstanding
        with pytest.raises(APIError) as refused:
            await proc.add_requests(_requests(prompts))
        assert (refused.value.code, refused.value.status) == (code, 400 if code == "too_many_sequences" else 503)
        return proc

    for outstanding, prompts, code in (
        (1, 2, "overloaded"),
        (0, 3, "too_many_sequences"),
        (5, 3, "too_many_sequences"),
    ):
        proc = asyncio.run(run(outstanding, prompts, code))
        assert (proc.posted, proc.admission.outstanding, proc._streams) == ([], outstanding, {})

    async def exact_fit() -> _Posted:  # 2 prompts on an idle server: both posted
        proc = _Posted(max_waiting=1)
        adding = asyncio.ensure_future(proc.add_requests(_requests(2)))
        await asyncio.sleep(0)
        proc._on_message(("acks", [("r-0", None, True), ("r-1", None, True)], {}))
        await adding
        return proc

    assert [c[0] for c in asyncio.run(exact_fit()).posted] == ["add", "add"]


def test_api_servers_admit_against_one_shared_count():
    """Several API servers (`--api-servers N`) check max_waiting against one count in shared memory: one server
    may admit what another leaves free (each took 1/N of the limits: a request was a 503 on a busy server while
    the engine had room), and none admits past the limits all together."""
    from miniserve.server.admission import Admission, shared_count

    shared = shared_count()
    first, second = Admission(4, 4, shared), Admission(4, 4, shared)  # max_num_seqs 4, max_waiting 4
    first.admit([3, 3])  # six sequences: more than half of the eight
    second.admit([2])  # the last two fit, on the other server
    assert first.outstanding == second.outstanding == 8
    for admission in (first, second):
        with pytest.raises(APIError) as refused:
            admission.admit([1])
        assert (refused.value.status, refused.value.code) == (503, "overloaded")
    second.release(1)
    first.admit([1])  # a sequence finished on one server frees room on the other
    with pytest.raises(APIError) as refused:
        second.admit([9])
    assert (refused.value.status, refused.value.code) == (400, "too_many_sequences")
    assert shared.value == 8
