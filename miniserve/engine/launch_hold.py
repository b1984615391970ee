"""Launching an overlapped decode step late enough that a request arriving meanwhile goes first (served engine).

Overlapped decoding launches step N+1 before it reads step N, so a prompt that arrives while step N runs waits
for N and then for N+1 before its prompt pass starts: one and a half decode steps on average, most of the time to
first token the engine adds below saturation (`benchmarks/results/serve_trace_h200.json`, 4 requests/s). With a
hold the engine waits for requests (on its command pipes) until step N is about to end: N's expected GPU time,
measured on the device with events, less a lead that covers launching N+1 on the host. It then launches N+1 as
before, and the GPU never waits as long as the lead covers the launch. A request that arrives during the wait is
applied at once; the batch is then no longer one that nothing changes, so the scheduler places the new prompt
beside the running batch right after step N instead (decoder.py: PlainDecoder._continuing).

Only the server's engine process holds (offline `LLM` has nobody to wait for), only for batches of at most
`max_batch` sequences (below saturation, where a new request's first token is the latency users see; a large
batch's arrivals queue behind its own prompt work anyway), and only once a step's GPU time has been measured.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

LEAD_MARGIN_S = 100e-6  # launched this much earlier than the measured host launch time needs: no bubble
EMA = 0.25  # weight of the newest measurement


@dataclass
class LaunchHold:
    """`wait(seconds)` waits up to that long for commands (returning when one comes) and applies what came."""

    wait: Callable[[float], None]
    max_batch: int = 16
    gpu_s: float | None = None  # a decode step's GPU time at `batch` sequences (moving average)
    launch_s: float = 0.0  # the host's time to launch one (moving average)
    batch: int = 0

    def observe(self, batch: int, gpu_s: float, launch_s: float) -> None:
        """A step of `batch` sequences was read: it ran `gpu_s` on the device and took `launch_s` to launch."""
        if batch != self.batch or self.gpu_s is None:
            self.batch, self.gpu_s = batch, gpu_s
        else:
            self.gpu_s += EMA * (gpu_s - self.gpu_s)
        self.launch_s += EMA * (launch_s - self.launch_s)

    def deadline(self, batch: int, started_at: float) -> float | None:
        """When to launch the step after one of `batch` sequences that started on the GPU at `started_at`
        (perf_counter seconds); None when this batch is not held."""
        if batch > self.max_batch or batch != self.batch or self.gpu_s is None:
            return None
        return started_at + self.gpu_s - 2 * self.launch_s - LEAD_MARGIN_S

    def until_due(self, batch: int, started_at: float, done: Callable[[], bool]) -> None:
        """Before launching the next step of `batch` sequences (the one in flight started at `started_at`): wait
        for requests until the launch is due, or just look when it is not held or the step in flight is `done`.
        (What came is applied; the decoder's check of its batch then leaves a new request to the scheduler.)"""
        deadline = self.deadline(batch, started_at)
        timeout = 0.0 if deadline is None or done() else deadline - time.perf_counter()
        self.wait(max(0.0, timeout))
