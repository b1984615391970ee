"""Launching an overlapped decode step late enough that a request arriving meanwhile goes first (served engine).

Overlapped decoding launches step N+1 before it reads step N, so a prompt that arrives while step N runs waits for
N and then for N+1 before its prompt pass starts: one and a half decode steps on average, most of the time to
first token the engine adds below saturation (`benchmarks/results/serve_trace_h200.json`, 4 requests/s). With a
hold the engine waits for requests (on its command pipes) until step N is about to end: N's GPU time less a lead
that covers the host's launch of N+1's forward pass (measured too) and a margin. It then launches N+1 as before,
and the GPU does not wait as long as the lead covers the launch. A request that arrives during the wait is applied
at once; the batch is then no longer one that nothing changes, so the scheduler places the new prompt beside the
running batch right after step N instead (decoder.py: PlainDecoder.continue_in_flight).

The wait must end on time to the microsecond: a decode step of a small batch takes about a millisecond, and a
launch that comes late leaves the GPU idle. The server's wait spins on its pipes (server/engine_core.py:
CoreLoop.wait_for_commands); the first version (2653f9d, reverted) slept in multiprocessing's wait(), whose
timeout is rounded up to whole milliseconds, and cost the running streams 18% of their time per token
(`benchmarks/results/serve_rate4_launch_hold_h200.json` as of db9f88f).

A step's GPU time is measured with events between its predecessor's end and its own, and only when it was
launched before its predecessor ended. Timed from any earlier point, a late launch's idle gap counts as GPU time,
pushes the next deadline later and feeds on itself: at 9d1c005, timed from an event recorded before the launch,
the running streams' time per token rose from 1.30 to 1.54-1.64 ms.

Only the server's engine process holds (offline `LLM` has nobody to wait for), only for batches of at most
`max_batch` sequences (below saturation, where a new request's first token is the latency users see), and only
once a step of the batch's size has been timed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

LEAD_MARGIN_S = 100e-6  # launched this much earlier than the measured launch needs: covers its jitter
SLICE_S = 200e-6  # the wait asks this often whether the step in flight ended (then it stops waiting at once)
EMA = 0.25  # weight of the newest measurement
MAX_BATCH = 16  # decode steps of at most this many sequences are held until due


@dataclass
class LaunchHold:
    """`wait(seconds)` waits up to that long for commands, applies what came and says whether anything did."""

    wait: Callable[[float], bool]
    max_batch: int = MAX_BATCH
    gpu_s: float | None = None  # a decode step's GPU time at `batch` sequences (moving average)
    batch: int = 0
    launch_s: float = 0.0  # the host's time from the end of a hold to the next forward pass launched (moving average)

    def observe_step(self, batch: int, gpu_s: float) -> None:
        """A step of `batch` sequences was read: it ran `gpu_s` on the device."""
        if batch != self.batch or self.gpu_s is None:
            self.batch, self.gpu_s = batch, gpu_s
        else:
            self.gpu_s += EMA * (gpu_s - self.gpu_s)

    def launched(self, launch_s: float, in_time: bool) -> None:
        """A forward pass took `launch_s` to launch on the host, `in_time` (before the step in flight ended) or
        late: the GPU waited, so the next one is launched earlier. A late step is not timed: without this, a step
        time measured too long would never be corrected."""
        self.launch_s += EMA * (launch_s - self.launch_s)
        if not in_time and self.gpu_s is not None:
            self.gpu_s -= LEAD_MARGIN_S

    def holds(self, batch: int) -> bool:
        """Steps of `batch` sequences are held, so they are timed (larger ones are neither)."""
        return batch <= self.max_batch

    def deadline(self, batch: int, started_at: float) -> float | None:
        """When to launch the step after one of `batch` sequences that started on the GPU at `started_at`
        (perf_counter seconds); None when this batch is not held."""
        if not self.holds(batch) or batch != self.batch or self.gpu_s is None:
            return None
        return started_at + self.gpu_s - self.launch_s - LEAD_MARGIN_S

    def until_due(self, batch: int, started_at: float, done: Callable[[], bool] | None) -> bool:
        """Before launching the next step of `batch` sequences (the one in flight started at `started_at`): wait
        for requests until the launch is due, or just look when it is not held or the step in flight is `done`
        (None: no way to tell, on the CPU). True when commands came (and were applied). The wait goes in slices
        that each end by asking `done`: a step time measured too long (an outlier in the average) then costs one
        slice past the step's end, not the whole error at every step until late launches have worked it off."""
        done = done or (lambda: False)
        deadline = self.deadline(batch, started_at)
        if deadline is None or done():
            return self.wait(0.0)
        while True:
            remaining = deadline - time.perf_counter()
            if self.wait(min(max(0.0, remaining), SLICE_S)):
                return True
            if remaining <= SLICE_S or done():
                return False
