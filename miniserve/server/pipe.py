"""The two pipes between the API process and the engine process: pickled, length-prefixed frames, read in bulk.

Why not `Connection.send`/`recv`: `recv` reads one message in two reads, and a reader that falls behind fills the
pipe's 64 KiB until the engine's `send` blocks (with 256 streams an engine step took 10 ms instead of 7: H200,
benchmarks/results/serve_h200.json history). Here one read takes everything waiting (up to 4 MiB), so the reader
keeps up whatever the number of messages per wake-up, and each pipe is made 1 MiB deep (Linux) so that a reader
busy for a while does not block the writer.

The engine process blocks on its ends (FrameWriter, FrameReader). The API process works both of its ends from
the event loop without blocking it: it reads when the loop sees the pipe readable (`FrameReader.read_ready`,
with `loop.add_reader`) and writes what the pipe takes at once, the rest when it has room (`LoopFrameWriter`).
No thread sits between the loop and the engine, so no message waits for a thread to get the GIL back from a busy
loop (up to the 5 ms switch interval at each hop).
"""

from __future__ import annotations

import asyncio
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
        view = memoryview(_frame(msg))
        while view:
            view = view[os.write(self.fd, view) :]


def _frame(msg: Any) -> bytes:
    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


class LoopFrameWriter:
    """The API process's end of the command pipe, written on the event loop and never blocking it: `send(msg)`
    writes what the pipe takes now and keeps the rest, which the loop writes as the engine reads (add_writer).
    Frames go out whole and in order. Once the engine is gone, sends are dropped (its exit is reported by the
    reader)."""

    def __init__(self, conn: Any, loop: asyncio.AbstractEventLoop):
        self.conn = conn
        self.fd = conn.fileno()
        self.loop = loop
        self.pending = bytearray()
        self.watching = False
        self.closed = False
        deepen(self.fd)
        os.set_blocking(self.fd, False)

    def send(self, msg: Any) -> None:
        if self.closed:
            return
        self.pending += _frame(msg)
        if not self.watching:
            self._write()

    def _write(self) -> None:
        try:
            written = os.write(self.fd, self.pending)
        except BlockingIOError:
            written = 0
        except OSError:  # the engine process is gone
            self.close()
            return
        del self.pending[:written]
        if self.pending and not self.watching:
            self.loop.add_writer(self.fd, self._write)
            self.watching = True
        elif not self.pending and self.watching:
            self.loop.remove_writer(self.fd)
            self.watching = False

    def close(self) -> None:
        if self.watching:
            self.loop.remove_writer(self.fd)
            self.watching = False
        self.pending.clear()
        self.closed = True


class FrameReader:
    """A reading end: `recv()` one message (waiting for it); `poll()` whether one is there; `read_ready()` every
    message one read completes (the API process's non-blocking end, when the loop saw it readable). Raises
    EOFError once the writer is gone and every frame was read."""

    def __init__(self, conn: Any):
        self.conn = conn
        self.fd = conn.fileno()
        self.buffer = bytearray()
        self.ready: deque = deque()

    def recv(self) -> Any:
        while not self.ready:
            self._read()
        return self.ready.popleft()

    def poll(self) -> bool:
        """Whether a message (or the end of file) can be read without waiting."""
        return bool(self.ready) or self.conn.poll()

    def read_ready(self) -> list[Any]:
        """For a descriptor the event loop saw readable (made non-blocking): one read, and every message it
        completed (possibly none)."""
        try:
            self._read()
        except BlockingIOError:
            pass
        messages = list(self.ready)
        self.ready.clear()
        return messages

    def _read(self) -> None:
        """One read (whatever is waiting, up to 4 MiB), then every complete frame it finished."""
        data = os.read(self.fd, _READ_SIZE)
        if not data:
            raise EOFError("the other process closed its pipe")
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
