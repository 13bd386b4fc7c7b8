"""The worker's compact token messages and its time-based token batching."""

from __future__ import annotations

import pickle

from hypothesis import given
from hypothesis import strategies as st

from backends import worker
from backends.worker import TokenBatcher, pack_tokens, unpack_tokens


class FakeConn:
    """Collects what a worker sends."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send_bytes(self, data: bytes) -> None:
        self.sent.append(data)


@given(st.integers(0, 2**31 - 1), st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=64))
def test_token_messages_round_trip(job_id, ids):
    assert unpack_tokens(pack_tokens(job_id, ids)) == (job_id, ids)


def test_pickled_messages_are_not_token_messages():
    assert unpack_tokens(pickle.dumps(("ready", None))) is None


def test_single_token_message_is_nine_bytes():
    assert len(pack_tokens(3, [17])) == 9


def test_zero_interval_sends_every_token(monkeypatch):
    conn = FakeConn()
    batch = TokenBatcher(conn, 7, 0.0)
    for t in (1, 2, 3):
        batch.add(t)
    assert [unpack_tokens(m) for m in conn.sent] == [(7, [1]), (7, [2]), (7, [3])]


def test_tokens_within_the_interval_wait_for_the_next_send(monkeypatch):
    clock = iter([0.0, 0.0005, 0.0011, 0.0030, 0.0031])
    monkeypatch.setattr(worker.time, "perf_counter", lambda: next(clock))
    conn = FakeConn()
    batch = TokenBatcher(conn, 1, 0.001)
    for t in range(5):
        batch.add(t)
    # first token at once; the next one waits; the third is past the interval and takes it along
    assert [unpack_tokens(m)[1] for m in conn.sent] == [[0], [1, 2], [3]]
    batch.flush()
    assert unpack_tokens(conn.sent[-1])[1] == [4]
    batch.flush()  # nothing held: nothing sent
    assert len(conn.sent) == 4
