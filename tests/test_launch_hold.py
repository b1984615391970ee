"""The launch hold's arithmetic (engine/launch_hold.py) with a recording wait: how long it waits for requests
before launching the next overlapped decode step, and when it does not wait at all."""

from __future__ import annotations

import time

import pytest

from miniserve.engine.launch_hold import EMA, LEAD_MARGIN_S, LaunchHold


def recording():
    seen: list[float] = []
    return seen.append, seen


def test_waits_until_the_step_in_flight_is_due_to_end_less_the_launch_lead():
    wait, seen = recording()
    hold = LaunchHold(wait, max_batch=4)
    hold.observe(2, gpu_s=0.010, launch_s=0.001)
    started = time.perf_counter()
    hold.until_due(2, started, lambda: False)
    due = 0.010 - 2 * hold.launch_s - LEAD_MARGIN_S
    assert hold.launch_s == pytest.approx(EMA * 0.001)  # (the launch time's average starts from 0)
    assert due - 0.002 < seen[0] <= due  # the time spent between `started` and the wait comes off


@pytest.mark.parametrize(
    ("batch", "done", "why"),
    [(5, False, "a batch above max_batch"), (3, False, "a batch never timed"), (2, True, "the step already ended")],
)
def test_only_looks_when_not_held(batch, done, why):
    wait, seen = recording()
    hold = LaunchHold(wait, max_batch=4)
    hold.observe(2, gpu_s=0.010, launch_s=0.001)
    if batch == 5:
        hold.observe(5, gpu_s=0.010, launch_s=0.001)
    hold.until_due(batch, time.perf_counter(), lambda: done)
    assert seen == [0.0], why


def test_no_wait_before_any_step_was_timed_nor_past_the_deadline():
    wait, seen = recording()
    hold = LaunchHold(wait)
    hold.until_due(1, time.perf_counter(), lambda: False)
    hold.observe(1, gpu_s=0.001, launch_s=0.0)
    hold.until_due(1, time.perf_counter() - 0.005, lambda: False)  # started 5 ms ago: the 1 ms step is overdue
    assert seen == [0.0, 0.0]


def test_the_step_time_is_a_moving_average_per_batch_size():
    hold = LaunchHold(lambda t: None)
    hold.observe(8, gpu_s=0.004, launch_s=0.0)
    hold.observe(8, gpu_s=0.008, launch_s=0.0)
    assert hold.gpu_s == pytest.approx(0.004 + EMA * 0.004)
    hold.observe(9, gpu_s=0.002, launch_s=0.0)  # another batch size: its own time from its first step
    assert (hold.batch, hold.gpu_s) == (9, 0.002)
    assert hold.deadline(8, 0.0) is None and hold.deadline(9, 1.0) == pytest.approx(1.002 - LEAD_MARGIN_S)
