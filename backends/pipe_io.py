"""Whole messages over a worker's pipe from the event loop, whose end of it is non-blocking.

A `multiprocessing.Connection` reads and writes a message in several system calls; on a non-blocking
descriptor (the event loop sets it so) `recv_bytes` can raise BlockingIOError half-way through a message
the worker is still writing (one over 16 KiB is written in two calls), and `send` can stop half-way when
the socket's buffer is full. Either leaves the stream out of step for good. These helpers speak the same
framing (a 4-byte big-endian signed length, or -1 then an 8-byte length, then the bytes) and never lose
a partial message: the reader keeps what has arrived until a message is whole, the writer keeps what
could not be written and finishes it when the pipe is writable again.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import struct
from collections.abc import Callable

READ_SIZE = 1 << 16


def frame(payload: bytes) -> bytes:
    """One message as multiprocessing.Connection frames it."""
    n = len(payload)
    head = struct.pack("!i", n) if n <= 0x7FFFFFFF else struct.pack("!i", -1) + struct.pack("!Q", n)
    return head + payload


class FrameReader:
    """Complete messages from a non-blocking descriptor, as they arrive."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = bytearray()
        self.closed = False

    def read(self) -> list[bytes]:
        """Every message that is complete now (none if the rest has not arrived); EOFError once the pipe has
        closed and nothing complete is left."""
        while not self.closed:
            try:
                chunk = os.read(self.fd, READ_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            if not chunk:
                self.closed = True
                break
            self.buffer += chunk
        out = list(self._messages())
        if self.closed and not out:
            raise EOFError
        return out

    def _messages(self):
        buf = self.buffer
        while len(buf) >= 4:
            (n,) = struct.unpack_from("!i", buf)
            start = 4
            if n == -1:
                if len(buf) < 12:
                    return
                (n,) = struct.unpack_from("!Q", buf, 4)
                start = 12
            if len(buf) < start + n:
                return
            yield bytes(buf[start:start + n])
            del buf[:start + n]


class FrameWriter:
    """Messages to a non-blocking descriptor, in order; what the pipe cannot take now is written when it
    can (the loop's writer callback), so a full buffer never splits a message."""

    def __init__(self, fd: int, on_error: Callable[[OSError], None] | None = None) -> None:
        self.fd = fd
        self.pending = bytearray()
        self.on_error = on_error
        self.failed = False

    def send(self, obj: object) -> None:
        """Queue one pickled message and write as much as the pipe takes now."""
        if self.failed:
            return
        self.pending += frame(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
        self._flush()

    def close(self) -> None:
        """Stop writing (the worker is gone)."""
        self.failed = True
        self.pending.clear()
        self._stop_waiting()

    def _flush(self) -> None:
        while self.pending and not self.failed:
            try:
                n = os.write(self.fd, self.pending)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # the worker is gone: its exit is handled by the sentinel watcher
                self.close()
                if self.on_error is not None:
                    self.on_error(exc)
                return
            del self.pending[:n]
        if self.pending and not self.failed:
            asyncio.get_running_loop().add_writer(self.fd, self._flush)
        else:
            self._stop_waiting()

    def _stop_waiting(self) -> None:
        try:
            asyncio.get_running_loop().remove_writer(self.fd)
        except (RuntimeError, ValueError, OSError):
            pass
