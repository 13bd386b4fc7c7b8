"""backends.pipe_io: whole messages over a worker's non-blocking pipe (a review found recv_bytes on the
event loop's non-blocking end raising BlockingIOError half-way through a >16 KiB message, after which
the pipe was out of step and the model hung)."""

from __future__ import annotations

import asyncio
import os
import pickle
import socket
import threading
from multiprocessing.connection import Connection

import pytest

from backends.pipe_io import FrameReader, FrameWriter, frame


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    return a, b


def test_a_message_arriving_in_parts_is_returned_once_whole():
    ours, theirs = pair()
    reader = FrameReader(ours.fileno())
    big = pickle.dumps(("error", "x" * 100_000))
    data = frame(big) + frame(b"small")
    theirs.sendall(data[:70_000])
    first = reader.read()
    assert first == []  # half a message: nothing yet, and no error
    theirs.sendall(data[70_000:])
    got = []
    while len(got) < 2:
        got += reader.read()
    assert got == [big, b"small"]
    theirs.close()
    with pytest.raises(EOFError):
        while True:
            reader.read()


def test_the_old_reader_loses_its_place_on_a_partial_message():
    """What went wrong: Connection.recv_bytes on a non-blocking end with half a message in the pipe."""
    ours, theirs = pair()
    theirs.sendall(frame(b"y" * 100_000)[:50_000])
    with pytest.raises(BlockingIOError):
        Connection(os.dup(ours.fileno())).recv_bytes()


def test_the_writer_keeps_what_a_full_pipe_cannot_take_and_finishes_it_in_order():
    ours, theirs = pair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    messages = [("job", i, "z" * 300_000) for i in range(3)]
    received: list = []

    def read_all() -> None:
        conn = Connection(os.dup(theirs.fileno()))
        for _ in messages:
            received.append(conn.recv())

    async def scenario() -> int:
        writer = FrameWriter(ours.fileno())
        for m in messages:
            writer.send(m)
        waiting = len(writer.pending)  # the pipe took only part: the rest waits for the loop
        reader = threading.Thread(target=read_all)
        reader.start()
        while writer.pending:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(reader.join, 30)
        return waiting

    assert asyncio.run(scenario()) > 0
    assert received == messages


def test_a_writer_to_a_closed_pipe_stops_and_reports():
    ours, theirs = pair()
    theirs.close()
    errors: list = []

    async def scenario() -> None:
        writer = FrameWriter(ours.fileno(), errors.append)
        writer.send(("job", 1))
        writer.send(("job", 2))  # after the failure: dropped, no second report

    asyncio.run(scenario())
    assert len(errors) == 1 and isinstance(errors[0], OSError)
