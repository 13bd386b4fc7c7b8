"""The model-management CLI (models list, pull, verify, convert) against a real HTTP server on loopback."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from backends.download import sidecar_path
from backends.ggml.reader import LegacyModelFileError, inspect_model
from server.cli import main
from server.progress import Reporter
from tests.models import write_random


@dataclass
class Knobs:
    """Fault injection for the file server; `log` records (range header, status, body bytes sent)."""

    files: dict[str, bytes]
    ignore_range: bool = False
    statuses: list[int] = field(default_factory=list)  # answered (in order) before any real response
    always: int | None = None  # answer every request with this status
    cut_after: int | None = None  # close the connection after this many body bytes ...
    cuts: int = 0  # ... for this many responses
    log: list[tuple[str | None, int, int]] = field(default_factory=list)

    @property
    def sent(self) -> int:
        return sum(n for _, _, n in self.log)


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        k: Knobs = self.server.knobs
        rng = self.headers.get("Range")
        status = k.always or (k.statuses.pop(0) if k.statuses else None)
        data = k.files.get(self.path)
        if status is None and data is None:
            status = 404
        if status is not None:
            k.log.append((rng, status, 0))
            self.send_error(status)
            return
        start, code = 0, 200
        if rng and not k.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if start >= len(data):
                k.log.append((rng, 416, 0))
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            code = 206
        body = data[start:]
        self.send_response(code)
        if code == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if k.cut_after is not None and k.cuts > 0:
            k.cuts -= 1
            body = body[: k.cut_after]
            self.close_connection = True
        k.log.append((rng, code, len(body)))  # before sending: the client may finish before this thread resumes
        self.wfile.write(body)
        self.wfile.flush()


@pytest.fixture
def http_files():
    knobs = Knobs(files={})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.knobs = knobs
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    knobs.base = f"http://127.0.0.1:{srv.server_address[1]}"
    yield knobs
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory) -> bytes:
    path = write_random(tmp_path_factory.mktemp("m") / "m.bin", n_embd=128, n_layer=2)
    return path.read_bytes()


@pytest.fixture(scope="module")
def legacy_bytes(tmp_path_factory) -> bytes:
    from backends.ggml.writer import GPTJConfig, default_vocab, write_model

    path = tmp_path_factory.mktemp("l") / "legacy.bin"
    config = GPTJConfig(n_vocab=512, n_ctx=128, n_embd=64, n_head=4, n_layer=2, n_rot=8, ftype="q4_0")
    write_model(path, config, vocab=default_vocab(512), seed=3, legacy=True)
    return path.read_bytes()


def registry(tmp_path: Path, knobs: Knobs, data: bytes, *, name: str = "m.bin", size: bool = True,
             sha256: str | None = "auto", md5: str | None = None, needs_conversion: bool = False,
             path: str = "models/m.bin") -> Path:
    knobs.files["/" + name] = data
    entry = {"id": "tiny", "aliases": ["tiny-alias"], "path": path, "url": f"{knobs.base}/{name}",
             "needs_conversion": needs_conversion}
    if size:
        entry["size"] = len(data)
    if sha256:
        entry["sha256"] = hashlib.sha256(data).hexdigest() if sha256 == "auto" else sha256
    if md5:
        entry["md5"] = hashlib.md5(data).hexdigest() if md5 == "auto" else md5
    reg = tmp_path / "reg.yaml"
    reg.write_text(json.dumps({"models": [entry, {"id": "local", "path": "models/local.bin"}]}))
    return reg


def run(*argv: str) -> int:
    return main(list(argv))


def listing(reg: Path, capsys) -> dict[str, dict]:
    capsys.readouterr()
    assert run("models", "list", "--json", "--registry", str(reg)) == 0
    return {row["id"]: row for row in json.loads(capsys.readouterr().out)}


FAST = ("--retry-wait", "0.01")


def test_pull_downloads_verifies_and_list_shows_it(tmp_path, http_files, model_bytes, capsys):
    reg = registry(tmp_path, http_files, model_bytes, md5="auto")
    rows = listing(reg, capsys)
    assert rows["tiny"]["present"] is False and rows["local"]["checksum"] == "-"
    assert run("pull", "tiny-alias", "--registry", str(reg)) == 0
    out = capsys.readouterr()
    target = tmp_path / "models/m.bin"
    assert target.read_bytes() == model_bytes and "sha256" in out.out and "md5" in out.out
    assert not (tmp_path / "models/m.bin.part").exists()
    # non-TTY progress: plain lines, ending at 100%
    assert re.search(r"^tiny: 100% \(", out.err, re.M) and "\r" not in out.err
    record = json.loads(sidecar_path(target).read_text())
    assert record["sha256"] == hashlib.sha256(model_bytes).hexdigest() and record["size"] == len(model_bytes)
    row = listing(reg, capsys)["tiny"]
    assert row["present"] and row["checksum"] == "verified" and row["size"] == len(model_bytes)
    assert row["layout"] == "standard"
    assert run("models", "--registry", str(reg), "list") == 0  # the option before the subcommand too
    table = capsys.readouterr().out
    assert re.search(r"^tiny\s+tiny-alias\s+present\s.*verified\s+standard\s+", table, re.M)
    # a second pull does nothing (the sidecar says the file verified), without touching the network
    requests = len(http_files.log)
    assert run("pull", "tiny", "--registry", str(reg)) == 0
    assert "already present (verified)" in capsys.readouterr().out and len(http_files.log) == requests
    # a changed mtime makes the cached result stale; verify re-hashes and refreshes it
    os.utime(target, ns=(1, 1))
    assert listing(reg, capsys)["tiny"]["checksum"] == "unverified"
    assert run("verify", "--registry", str(reg)) == 0
    assert "tiny: OK" in capsys.readouterr().out
    assert listing(reg, capsys)["tiny"]["checksum"] == "verified"
    # corrupting a byte is caught by verify, and list reports the mismatch from the refreshed cache
    blob = bytearray(model_bytes)
    blob[-1] ^= 0xFF
    target.write_bytes(bytes(blob))
    assert run("verify", "tiny", "--registry", str(reg)) == 1
    out = capsys.readouterr().out
    assert "tiny: FAIL" in out and f"expected {hashlib.sha256(model_bytes).hexdigest()}" in out
    assert listing(reg, capsys)["tiny"]["checksum"] == "mismatch"


def test_resume_after_the_connection_is_cut(tmp_path, http_files, model_bytes, capsys):
    reg = registry(tmp_path, http_files, model_bytes)
    half = len(model_bytes) // 2
    http_files.cut_after, http_files.cuts = half, 1
    assert run("pull", "tiny", "--registry", str(reg), "--retries", "0") == 1
    err = capsys.readouterr().err
    part = tmp_path / "models/m.bin.part"
    assert "download failed" in err and "resume" in err and part.stat().st_size == half
    assert not (tmp_path / "models/m.bin").exists()
    assert listing(reg, capsys)["tiny"]["partial_bytes"] == half
    assert run("pull", "tiny", "--registry", str(reg)) == 0
    assert "resuming" in capsys.readouterr().err
    assert (tmp_path / "models/m.bin").read_bytes() == model_bytes and not part.exists()
    assert [r for r, _, _ in http_files.log] == [None, f"bytes={half}-"]
    assert http_files.sent == len(model_bytes)  # not 1.5x


def test_a_cut_is_retried_and_resumed_within_one_pull(tmp_path, http_files, model_bytes, capsys):
    reg = registry(tmp_path, http_files, model_bytes)
    http_files.cut_after, http_files.cuts = 1000, 2
    assert run("pull", "tiny", "--registry", str(reg), *FAST) == 0
    assert (tmp_path / "models/m.bin").read_bytes() == model_bytes
    assert [r for r, _, _ in http_files.log] == [None, "bytes=1000-", "bytes=2000-"]
    assert "retrying" in capsys.readouterr().err


def test_server_ignoring_range_restarts_cleanly(tmp_path, http_files, model_bytes, capsys):
    reg = registry(tmp_path, http_files, model_bytes)
    (tmp_path / "models").mkdir()
    (tmp_path / "models/m.bin.part").write_bytes(model_bytes[:5000])
    http_files.ignore_range = True
    assert run("pull", "tiny", "--registry", str(reg)) == 0
    assert "ignored the Range" in capsys.readouterr().err
    assert (tmp_path / "models/m.bin").read_bytes() == model_bytes
    assert http_files.log == [("bytes=5000-", 200, len(model_bytes))]


@pytest.mark.parametrize("extra", [b"", b"trailing junk"])
def test_416_means_complete_or_restart(tmp_path, http_files, model_bytes, capsys, extra):
    reg = registry(tmp_path, http_files, model_bytes, size=False)  # no size: the part may be too long
    (tmp_path / "models").mkdir()
    (tmp_path / "models/m.bin.part").write_bytes(model_bytes + extra)
    assert run("pull", "tiny", "--registry", str(reg)) == 0
    assert (tmp_path / "models/m.bin").read_bytes() == model_bytes
    statuses = [s for _, s, _ in http_files.log]
    assert statuses == ([416] if not extra else [416, 200])


@pytest.mark.parametrize("case", ["sha256", "size"])
def test_checksum_mismatch_installs_nothing(tmp_path, http_files, model_bytes, capsys, case):
    wrong = hashlib.sha256(b"something else").hexdigest()
    if case == "sha256":
        reg = registry(tmp_path, http_files, model_bytes, sha256=wrong)
    else:
        reg = registry(tmp_path, http_files, model_bytes)
        reg.write_text(reg.read_text().replace(f'"size": {len(model_bytes)}', '"size": 12345'))
    assert run("pull", "tiny", "--registry", str(reg)) == 1
    err = capsys.readouterr().err
    actual = hashlib.sha256(model_bytes).hexdigest()
    if case == "sha256":
        assert f"expected {wrong}" in err and f"got {actual}" in err
    else:
        assert "expected 12,345 bytes" in err and f"{len(model_bytes):,}" in err
    assert "nothing was installed" in err
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == []


def test_transient_errors_are_retried(tmp_path, http_files, model_bytes, capsys):
    reg = registry(tmp_path, http_files, model_bytes)
    http_files.statuses = [500, 503]
    assert run("pull", "tiny", "--registry", str(reg), *FAST) == 0
    assert [s for _, s, _ in http_files.log] == [500, 503, 200]
    assert "HTTP 500" in capsys.readouterr().err


@pytest.mark.parametrize("status,requests", [(500, 3), (404, 1)])
def test_persistent_errors_fail_clearly(tmp_path, http_files, model_bytes, capsys, status, requests):
    reg = registry(tmp_path, http_files, model_bytes)
    http_files.always = status
    assert run("pull", "tiny", "--registry", str(reg), "--retries", "2", *FAST) == 1
    err = capsys.readouterr().err
    assert f"HTTP {status}" in err and "download failed" in err and len(http_files.log) == requests
    if status == 500:
        assert "gave up after 3 attempts" in err
    assert not (tmp_path / "models/m.bin").exists()


def test_destination_under_a_regular_file_fails_early(tmp_path, http_files, model_bytes, capsys):
    (tmp_path / "blocker").write_text("not a folder")
    reg = registry(tmp_path, http_files, model_bytes, path="blocker/models/m.bin")
    assert run("pull", "tiny", "--registry", str(reg)) == 1
    assert "cannot create the model folder" in capsys.readouterr().err and http_files.log == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="running as root: directory permissions do not block writes")
def test_read_only_destination_fails_early(tmp_path, http_files, model_bytes, capsys):
    reg = registry(tmp_path, http_files, model_bytes)
    (tmp_path / "models").mkdir(mode=0o500)
    try:
        assert run("pull", "tiny", "--registry", str(reg)) == 1
        assert "not writable" in capsys.readouterr().err and http_files.log == []
    finally:
        (tmp_path / "models").chmod(0o700)


def test_unknown_id_and_entry_without_url(tmp_path, http_files, model_bytes, capsys):
    reg = registry(tmp_path, http_files, model_bytes)
    assert run("pull", "nope", "--registry", str(reg)) == 2
    assert "no model 'nope'" in capsys.readouterr().err
    assert run("pull", "local", "--registry", str(reg)) == 1
    assert "has no url" in capsys.readouterr().err


def test_needs_conversion_entry_is_downloaded_verified_and_converted(tmp_path, http_files, legacy_bytes,
                                                                     capsys):
    reg = registry(tmp_path, http_files, legacy_bytes, name="legacy.bin", md5="auto", needs_conversion=True)
    target = tmp_path / "models/m.bin"
    assert run("pull", "tiny", "--registry", str(reg)) == 0
    out = capsys.readouterr()
    assert "converted q4_0 -> q4_0" in out.out and "converting tiny" in out.err
    assert sorted(p.name for p in target.parent.iterdir()) == ["m.bin", "m.bin.verified.json"]
    info = inspect_model(target)
    assert info.ftype == "q4_0" and info.n_embd == 64
    record = json.loads(sidecar_path(target).read_text())
    assert record["converted_from"]["sha256"] == hashlib.sha256(legacy_bytes).hexdigest()
    assert record["converted_from"]["md5"] == hashlib.md5(legacy_bytes).hexdigest()
    assert record["sha256"] == hashlib.sha256(target.read_bytes()).hexdigest()
    row = listing(reg, capsys)["tiny"]
    assert row["converted"] is True and row["checksum"] == "verified" and row["layout"] == "standard"
    assert run("verify", "tiny", "--registry", str(reg)) == 0
    assert "converted from a verified download" in capsys.readouterr().out
    requests = len(http_files.log)
    assert run("pull", "tiny", "--registry", str(reg)) == 0
    assert "already present (verified)" in capsys.readouterr().out and len(http_files.log) == requests
    # the converted file is checked against its own recorded hash
    blob = bytearray(target.read_bytes())
    blob[-1] ^= 0xFF
    target.write_bytes(bytes(blob))
    assert run("verify", "tiny", "--registry", str(reg)) == 1
    assert "recorded at conversion" in capsys.readouterr().out


def test_keep_original_and_in_place_conversion_of_a_legacy_file(tmp_path, http_files, legacy_bytes, capsys):
    reg = registry(tmp_path, http_files, legacy_bytes, name="legacy.bin", needs_conversion=True)
    target = tmp_path / "models/m.bin"
    target.parent.mkdir()
    target.write_bytes(legacy_bytes)  # e.g. fetched by hand with curl
    assert listing(reg, capsys)["tiny"]["layout"] == "legacy"
    assert run("verify", "tiny", "--registry", str(reg)) == 1
    assert "pull tiny` converts it in place" in capsys.readouterr().out
    assert run("pull", "tiny", "--registry", str(reg), "--keep-original") == 0
    assert http_files.log == []  # the verified original was converted without downloading again
    assert (tmp_path / "models/m.bin.legacy").read_bytes() == legacy_bytes
    inspect_model(target)
    assert run("verify", "--registry", str(reg)) == 0


def test_convert_command(tmp_path, legacy_bytes, capsys):
    src, dst = tmp_path / "old.bin", tmp_path / "new.bin"
    src.write_bytes(legacy_bytes)
    with pytest.raises(LegacyModelFileError):
        inspect_model(src)
    assert run("convert", str(src), str(dst)) == 0
    assert "converted" in capsys.readouterr().out and inspect_model(dst).ftype == "q4_0"
    assert run("convert", str(src), str(dst)) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert run("convert", str(src), str(dst), "--overwrite") == 0
    assert run("convert", str(dst), str(tmp_path / "again.bin")) == 1  # already standard
    assert "error:" in capsys.readouterr().err and not (tmp_path / "again.bin").exists()


def test_tty_progress_is_one_redrawn_line():
    stream = io.StringIO()
    rep = Reporter("x", stream=stream, tty=True)
    for done in range(0, 10_000_001, 1_000_000):
        rep.last = 0.0  # defeat the redraw throttle
        rep(done, 10_000_000)
    rep.finish()
    text = stream.getvalue()
    assert text.count("\n") == 1 and text.count("\r") == 11 and "100.0%" in text and "10.00 MB" in text


def test_console_script_pull_and_list(tmp_path, http_files, model_bytes):
    reg = registry(tmp_path, http_files, model_bytes)
    script = shutil.which("gpt4all-j-server") or str(Path(sys.executable).with_name("gpt4all-j-server"))
    env = {**os.environ, "GPT4ALL_J_REGISTRY": str(reg)}
    out = subprocess.run([script, "pull", "tiny"], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "models/m.bin").read_bytes() == model_bytes
    out = subprocess.run([script, "models", "list"], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0 and re.search(r"^tiny .* verified ", out.stdout, re.M), out.stdout


def test_unwritable_destination_message(tmp_path, http_files, model_bytes, capsys, monkeypatch):
    """The access check itself (the chmod test above cannot run as root)."""
    reg = registry(tmp_path, http_files, model_bytes)
    monkeypatch.setattr("server.model_pull.os.access", lambda *a, **k: False)
    assert run("pull", "tiny", "--registry", str(reg)) == 1
    assert "is not writable" in capsys.readouterr().err and http_files.log == []
