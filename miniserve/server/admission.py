"""Admission against max_waiting: the sequences posted to the engine and not finished, counted across every API
server that shares it.

A request whose sequences would wait beyond max_waiting (past the max_num_seqs the engine runs at once) is a 503
before anything is posted. With several API server processes (`miniserve serve --api-servers N`) the count is one
integer in shared memory, checked and raised under its lock: the processes accept connections unevenly, so a
share of the limits each would turn requests away while the engine had room.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
from typing import Any

from miniserve.server.protocol import APIError


def shared_count() -> Any:
    """The count the API servers of one engine share (handed to each as it is spawned)."""
    return mp.get_context("spawn").Value("q", 0)


class LocalCount:
    """One API server's own count, in the shape of the shared one (`value`, `get_lock()`): a multiprocessing Value
    nothing shares would hold a named semaphore, which a server dying of SIGTERM (as uvicorn's does) leaves for
    the resource tracker to report as leaked."""

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def get_lock(self) -> threading.Lock:
        return self._lock


class Admission:
    """Sequences outstanding, in the `shared` count of all API servers, or in one of this process's own (its lock
    then uncontended)."""

    def __init__(self, capacity: int, max_waiting: int | None, shared: Any = None):
        self.capacity = capacity  # sequences the engine runs at once (max_num_seqs)
        self.max_waiting = max_waiting  # None: no limit
        self._count = shared if shared is not None else LocalCount()

    @property
    def outstanding(self) -> int:
        return self._count.value

    def admit(self, ns: list[int]) -> None:
        """Count the sequences of a request's prompts (`ns` each), or raise before counting any (`check_room`)."""
        with self._count.get_lock():  # checked and raised together: no other API server admits in between
            if self.max_waiting is not None:
                check_room(ns, self.capacity, self.max_waiting, self._count.value)
            self._count.value += sum(ns)

    def release(self, n: int) -> None:
        """`n` sequences finished (or were withdrawn)."""
        with self._count.get_lock():
            self._count.value -= n


def check_room(ns: list[int], capacity: int, max_waiting: int, outstanding: int) -> None:
    """max_waiting: a request whose prompts run `ns` sequences each, all of them together, that would wait beyond
    it (with `outstanding` posted before it) is refused before any is posted: 503 (retry later) while others fill
    the queue, 400 when it could not fit even on an idle server."""
    n = sum(ns)
    if n > capacity + max_waiting:
        per_prompt = f" ({len(ns)} prompts)" if len(ns) > 1 else ""
        raise APIError(
            f"this request runs {n} sequences{per_prompt} (n, best_of), more than this server ever takes at once "
            f"({capacity} running + {max_waiting} waiting)",
            param="n",
            code="too_many_sequences",
        )
    if outstanding + n - capacity > max_waiting:
        raise APIError(
            f"server overloaded: {max(0, outstanding - capacity)} sequences already wait beyond the {capacity} the "
            f"engine runs at once (limit {max_waiting}); retry later",
            status=503,
            code="overloaded",
        )
