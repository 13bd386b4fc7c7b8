"""backends.download: checksums, the verification sidecar (no network here; see tests/test_model_cli.py)."""

import hashlib
import os

import pytest

from backends.download import (
    ChecksumMismatch,
    DownloadError,
    Expected,
    check_digests,
    download,
    hash_file,
    read_sidecar,
    sidecar_path,
    write_sidecar,
)


def test_hash_file_reports_progress_and_matches_hashlib(tmp_path):
    data = os.urandom(3 * (1 << 20) + 17)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    seen = []
    digests = hash_file(path, ("sha256", "md5"), lambda done, total: seen.append((done, total)))
    assert digests == {"sha256": hashlib.sha256(data).hexdigest(), "md5": hashlib.md5(data).hexdigest()}
    assert seen[0] == (0, len(data)) and seen[-1] == (len(data), len(data))


def test_check_digests_names_expected_and_actual():
    exp = Expected(size=10, sha256="a" * 64, md5="b" * 32)
    check_digests("f", exp, 10, {"sha256": "a" * 64, "md5": "b" * 32})
    with pytest.raises(ChecksumMismatch) as err:
        check_digests("f", exp, 11, {"sha256": "c" * 64, "md5": "b" * 32})
    msg = str(err.value)
    assert "expected 10 bytes, got 11" in msg and f"expected {'a' * 64}, got {'c' * 64}" in msg
    assert "md5" not in msg


def test_sidecar_is_stale_once_the_file_changes(tmp_path):
    path = tmp_path / "m.bin"
    path.write_bytes(b"x" * 100)
    write_sidecar(path, {"sha256": "d" * 64}, converted_from={"sha256": "e" * 64})
    assert sidecar_path(path).name == "m.bin.verified.json"
    record = read_sidecar(path)
    assert record["sha256"] == "d" * 64 and record["converted_from"] == {"sha256": "e" * 64}
    os.utime(path, ns=(5, 5))
    assert read_sidecar(path) is None and read_sidecar(path, fresh_only=False)["size"] == 100
    sidecar_path(path).write_text("{not json")
    assert read_sidecar(path, fresh_only=False) is None


def test_unreachable_server_fails_after_retries_leaving_no_empty_part(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    notes = []
    with pytest.raises(DownloadError, match="gave up after 2 attempts"):
        download(f"http://127.0.0.1:{port}/m.bin", tmp_path / "m.part", retries=1, retry_wait=0.01,
                 notify=notes.append, timeout=2)
    assert len(notes) == 1 and "retrying" in notes[0] and list(tmp_path.iterdir()) == []
