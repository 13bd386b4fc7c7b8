"""backends.download without a network: a host that does not resolve fails at once, and messages
mention the .part file only when it holds bytes."""

from __future__ import annotations

import socket

import pytest

import backends.download as dl
from backends.download import DownloadError, download


@pytest.fixture
def no_dns(monkeypatch):
    """Name resolution fails as it does offline (EAI_AGAIN); sleeping is recorded, not done."""

    def fail(*args, **kwargs):
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    sleeps: list[float] = []
    monkeypatch.setattr(socket, "getaddrinfo", fail)
    monkeypatch.setattr(dl.time, "sleep", sleeps.append)
    return sleeps


def _refused_url() -> str:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/m.bin"


def test_unresolvable_host_fails_at_once_naming_it(tmp_path, no_dns):
    notes: list[str] = []
    with pytest.raises(DownloadError) as err:
        download("http://models.example.invalid/m.bin", tmp_path / "m.bin.part", retries=4, retry_wait=2,
                 notify=notes.append)
    msg = str(err.value)
    assert "cannot resolve host models.example.invalid (no network or DNS?)" in msg, msg
    assert no_dns == [] and notes == []  # not retried: waiting does not bring a network back
    assert ".part" not in msg and "nothing was downloaded" in msg
    assert list(tmp_path.iterdir()) == []


def test_gave_up_message_names_no_part_when_nothing_was_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(dl.time, "sleep", lambda s: None)
    with pytest.raises(DownloadError, match="gave up after 2 attempts") as err:
        download(_refused_url(), tmp_path / "m.bin.part", retries=1, timeout=5)
    assert ".part" not in str(err.value) and "nothing was downloaded" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_gave_up_message_names_the_part_that_holds_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(dl.time, "sleep", lambda s: None)
    part = tmp_path / "m.bin.part"
    part.write_bytes(b"x" * 1000)  # an earlier, interrupted download
    with pytest.raises(DownloadError, match="gave up after 2 attempts") as err:
        download(_refused_url(), part, retries=1, timeout=5)
    assert f"1,000 bytes kept in {part} for a later resume" in str(err.value)
    assert part.read_bytes() == b"x" * 1000
