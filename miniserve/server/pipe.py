"""The engine process's messages to the API process: pickled, length-prefixed frames on a pipe, read in bulk.

Why not `Connection.send`/`recv`: the API process reads on a thread that must take the GIL back from a busy event
loop after every blocking read (up to the 5 ms switch interval each time), and `recv` reads one message in two
reads. At one message per engine step the reader then fell behind, the pipe's 64 KiB filled and the engine's
`send` blocked: with 256 streams, an engine step took 10 ms instead of 7 (H200, benchmarks/results/serve_h200.json
history). Here one read takes everything waiting (up to 4 MiB), so the reader keeps up whatever the number of
messages per wake-up, and the pipe is made 1 MiB deep (Linux) so that a slow wake-up does not block the engine.
"""

from __future__ import annotations

import os
import pickle
import struct
from collections import deque
from typing import Any

_HEADER = struct.Struct("<Q")  # the frame's length in bytes
_READ_SIZE = 4 << 20
PIPE_SIZE = 1 << 20  # what unprivileged processes may ask for by default (/proc/sys/fs/pipe-max-size)


def deepen(fd: int, size: int = PIPE_SIZE) -> None:
    """Ask for a pipe buffer of `size` bytes (Linux; elsewhere, or when refused, the default stays)."""
    try:
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    except (ImportError, AttributeError, OSError):
        pass


class FrameWriter:
    """The engine's end: `send(msg)` writes one frame (blocking only when the pipe is full)."""

    def __init__(self, conn: Any):
        self.conn = conn  # the multiprocessing Connection that owns the descriptor (kept open while we write)
        self.fd = conn.fileno()
        deepen(self.fd)

    def send(self, msg: Any) -> None:
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        view = memoryview(_HEADER.pack(len(data)) + data)
        while view:
            view = view[os.write(self.fd, view) :]


class FrameReader:
    """The API process's end: `recv()` one message, or `recv_all()` every message that has arrived (at least one,
    waiting for it). Raises EOFError once the writer is gone and every frame was read."""

    def __init__(self, conn: Any):
        self.conn = conn
        self.fd = conn.fileno()
        self.buffer = bytearray()
        self.ready: deque = deque()

    def recv(self) -> Any:
        while not self.ready:
            self._read()
        return self.ready.popleft()

    def recv_all(self) -> list[Any]:
        if not self.ready:
            self._read()
        messages = list(self.ready)
        self.ready.clear()
        return messages

    def _read(self) -> None:
        """One blocking read (whatever is waiting, up to 4 MiB), then every complete frame it finished."""
        data = os.read(self.fd, _READ_SIZE)
        if not data:
            raise EOFError("the engine process closed its pipe")
        self.buffer += data
        start = 0
        while len(self.buffer) - start >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self.buffer, start)
            end = start + _HEADER.size + length
            if end > len(self.buffer):
                break
            self.ready.append(pickle.loads(self.buffer[start + _HEADER.size : end]))
            start = end
        del self.buffer[:start]
