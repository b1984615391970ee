"""The served engine's launch hold (engine/launch_hold.py): its arithmetic with a recording wait (how long it waits
for requests before launching the next overlapped decode step, and when it only looks), and the engine process's
wait (server/engine_core.py: CoreLoop.wait_for_commands) over a real pipe: a command ends it at once and is
applied, and without one it ends at its deadline, not before."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

import pytest

from miniserve.engine.launch_hold import EMA, LEAD_MARGIN_S, SLICE_S, LaunchHold


def recording():
    """A wait that sleeps as long as it is asked to (nothing comes) and records each timeout."""
    seen: list[float] = []

    def wait(timeout: float) -> bool:
        seen.append(timeout)
        time.sleep(timeout)
        return False

    return wait, seen


def test_waits_until_the_step_in_flight_is_due_to_end_less_the_launch_and_a_margin():
    wait, seen = recording()
    hold = LaunchHold(wait, max_batch=4)
    # a step long enough that a thread preempted before the wait's first look (ms on a loaded machine) still
    # finds more than a slice to wait, in slices
    hold.observe_step(2, gpu_s=0.100)
    hold.launched(0.002, in_time=True)
    assert hold.launch_s == pytest.approx(EMA * 0.002)  # (the launch time's average starts from 0)
    started = time.perf_counter()
    assert hold.until_due(2, started, lambda: False) is False
    due = 0.100 - hold.launch_s - LEAD_MARGIN_S
    assert time.perf_counter() - started >= due  # not before the deadline (the time before the call counts)
    assert time.perf_counter() - started < due + 1.0  # nor much after it (bounded loosely: a busy CI machine)
    assert len(seen) > 1 and max(seen) <= SLICE_S  # in slices, each asking whether the step ended


def test_the_wait_stops_when_the_step_in_flight_ends_before_its_deadline():
    """A step time measured too long costs one slice past the step's end, not the whole error."""
    wait, seen = recording()
    hold = LaunchHold(wait)
    hold.observe_step(1, gpu_s=1.0)  # an outlier: the step really ends after three slices
    begun = time.perf_counter()
    assert hold.until_due(1, begun, lambda: len(seen) >= 3) is False
    assert seen == [SLICE_S] * 3 and time.perf_counter() - begun < 0.5


@pytest.mark.parametrize(
    ("batch", "done", "why"),
    [(5, False, "a batch above max_batch"), (3, False, "a batch never timed"), (2, True, "the step already ended")],
)
def test_only_looks_when_not_held(batch, done, why):
    wait, seen = recording()
    hold = LaunchHold(wait, max_batch=4)
    hold.observe_step(2, gpu_s=0.010)
    if batch == 5:
        hold.observe_step(5, gpu_s=0.010)
    hold.until_due(batch, time.perf_counter(), lambda: done)
    assert seen == [0.0], why


def test_only_held_batches_are_timed():
    """Exactly max_batch sequences are held (and their steps timed by the decoder); one more are neither, so a
    saturated engine records no timing events."""
    hold = LaunchHold(lambda s: False, max_batch=4)
    assert hold.holds(4) and not hold.holds(5)


def test_no_wait_before_any_step_was_timed_nor_past_the_deadline():
    wait, seen = recording()
    hold = LaunchHold(wait)
    hold.until_due(1, time.perf_counter(), lambda: False)
    hold.observe_step(1, gpu_s=0.001)
    hold.until_due(1, time.perf_counter() - 0.005, lambda: False)  # started 5 ms ago: the 1 ms step is overdue
    assert seen == [0.0, 0.0]


def test_the_step_time_is_a_moving_average_per_batch_size():
    hold = LaunchHold(recording()[0])
    hold.observe_step(8, gpu_s=0.004)
    hold.observe_step(8, gpu_s=0.008)
    assert hold.gpu_s == pytest.approx(0.004 + EMA * 0.004)
    hold.observe_step(9, gpu_s=0.002)  # another batch size: its own time from its first step
    assert (hold.batch, hold.gpu_s) == (9, 0.002)
    assert hold.deadline(8, 0.0) is None and hold.deadline(9, 1.0) == pytest.approx(1.002 - LEAD_MARGIN_S)


def test_a_late_launch_moves_the_next_deadline_earlier():
    hold = LaunchHold(recording()[0])
    hold.launched(0.0, in_time=False)  # nothing timed yet: nothing to move
    assert hold.gpu_s is None
    hold.observe_step(4, gpu_s=0.002)
    hold.launched(0.0, in_time=True)
    assert hold.deadline(4, 1.0) == pytest.approx(1.002 - LEAD_MARGIN_S)
    hold.launched(0.0, in_time=False)
    assert hold.deadline(4, 1.0) == pytest.approx(1.002 - 2 * LEAD_MARGIN_S)


def test_until_due_says_whether_commands_came():
    hold = LaunchHold(lambda timeout: True)
    assert hold.until_due(1, time.perf_counter(), lambda: False) is True


def test_a_step_that_cannot_tell_whether_it_ended_is_held_all_the_same():
    wait, seen = recording()
    hold = LaunchHold(wait)
    hold.observe_step(1, gpu_s=0.050)  # (long: see the first test)
    begun = time.perf_counter()
    hold.until_due(1, begun, None)  # (the CPU's steps have no event)
    assert time.perf_counter() - begun >= 0.050 - LEAD_MARGIN_S and len(seen) > 1


@pytest.fixture()
def core_loop():
    """An engine process's loop over the demo engine, one API server's pipes: (loop, command writer, reader)."""
    from miniserve import LLM
    from miniserve.server.engine_core import CoreLoop
    from miniserve.server.pipe import FrameReader, FrameWriter

    cmd_recv, cmd_send = mp.Pipe(duplex=False)
    out_recv, out_send = mp.Pipe(duplex=False)
    loop = CoreLoop(LLM(device="cpu").engine, [FrameReader(cmd_recv)], [FrameWriter(out_send)])
    return loop, FrameWriter(cmd_send), FrameReader(out_recv)


def test_the_wait_ends_at_its_deadline_without_a_command(core_loop):
    loop, _, _ = core_loop
    begun = time.perf_counter()
    assert loop.wait_for_commands(0.02) is False
    assert time.perf_counter() - begun >= 0.02
    assert loop.wait_for_commands(0.0) is False and not loop.engine.has_unfinished_requests()


def test_a_command_ends_the_wait_and_is_applied(core_loop):
    from miniserve import SamplingParams

    loop, commands, replies = core_loop
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    sender = threading.Timer(0.05, lambda: commands.send([("add", "a", [5, 6, 7], params, None, 0)]))
    sender.start()
    begun = time.perf_counter()
    assert loop.wait_for_commands(60.0) is True  # ends when the command comes, long before the minute is up
    assert time.perf_counter() - begun < 30
    assert replies.recv()[:2] == ("acks", [("a", None, True)])
    assert loop.engine.has_unfinished_requests()
    commands.send([("add", "b", [8, 9], params, None, 0)])  # already waiting: taken without waiting at all
    assert loop.wait_for_commands(0.0) is True and replies.recv()[:2] == ("acks", [("b", None, True)])
