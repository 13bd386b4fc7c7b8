"""Resumable, verified HTTP downloads and file checksums (stdlib only; no FastAPI, no printing).

`download()` streams a URL into a `.part` file, resuming with an HTTP Range request when the part
already holds bytes, hashing while it writes (and hashing the existing part first on a resume), and
retrying transient failures with backoff. It returns the digests of the complete part; comparing them
with the expected ones and renaming the part is the caller's job (see `check_digests`).
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

CHUNK = 1 << 20
USER_AGENT = "gpt4all-j-server-pull/1"
SIDECAR_SUFFIX = ".verified.json"
SIDECAR_VERSION = 1
_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}
_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)")

Progress = Callable[[int, "int | None"], None]
Notify = Callable[[str], None]


class DownloadError(Exception):
    """The download failed; the message says why and whether the .part was kept."""


class ChecksumMismatch(DownloadError):
    """The bytes do not match the expected size or digests."""

    def __init__(self, what: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"{what} does not match the registry: " + "; ".join(problems))


@dataclass(frozen=True)
class Expected:
    """What a file should be; None = not known."""

    size: int | None = None
    sha256: str | None = None
    md5: str | None = None

    def digests(self) -> dict[str, str]:
        """The known digests by algorithm name."""
        return {k: v for k, v in (("sha256", self.sha256), ("md5", self.md5)) if v}


@dataclass
class DownloadResult:
    """A complete part file: its size, digests and how it got there."""

    size: int
    digests: dict[str, str]
    resumed_from: int = 0
    restarts: int = 0
    attempts: int = 1


class _Hashes:
    def __init__(self, algos: tuple[str, ...]):
        self.algos = algos
        self.reset()

    def reset(self) -> None:
        self.h = {a: hashlib.new(a) for a in self.algos}

    def update(self, data: bytes) -> None:
        for h in self.h.values():
            h.update(data)

    def hexdigests(self) -> dict[str, str]:
        return {a: h.hexdigest() for a, h in self.h.items()}


def hash_file(path: Path, algos: tuple[str, ...] = ("sha256",),
              progress: Progress | None = None) -> dict[str, str]:
    """Digests of a file, reading it in chunks."""
    hashes = _Hashes(algos)
    with open(path, "rb") as f:
        _feed(f, hashes, os.fstat(f.fileno()).st_size, progress)
    return hashes.hexdigests()


def _feed(f, hashes: _Hashes, total: int, progress: Progress | None) -> None:
    """Hash the next `total` bytes of an open file."""
    done = 0
    if progress:
        progress(0, total)
    while done < total:
        chunk = f.read(min(CHUNK, total - done))
        if not chunk:
            raise DownloadError(f"{f.name}: the file shrank while it was being read")
        hashes.update(chunk)
        done += len(chunk)
        if progress:
            progress(done, total)


def check_digests(what: str, expected: Expected, size: int, digests: dict[str, str]) -> None:
    """Raise ChecksumMismatch naming expected and actual values when anything differs."""
    problems = []
    if expected.size is not None and size != expected.size:
        problems.append(f"size: expected {expected.size:,} bytes, got {size:,}")
    for algo, want in expected.digests().items():
        got = digests.get(algo)
        if got is not None and got != want:
            problems.append(f"{algo}: expected {want}, got {got}")
    if problems:
        raise ChecksumMismatch(what, problems)


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code in _TRANSIENT_STATUS
    if _unresolved(exc):  # no network or no DNS: waiting 30 s will not bring them back
        return False
    return isinstance(exc, (urllib.error.URLError, http.client.HTTPException, ConnectionError,
                            TimeoutError, socket.timeout, _ShortRead))


class _Busy(DownloadError):
    """Another process holds the part file's lock."""


class _ShortRead(Exception):
    pass


class _Restart(Exception):
    """The part cannot be resumed: start again from byte 0."""


def _unresolved(exc: BaseException) -> bool:
    """The host name could not be resolved (urllib wraps socket.gaierror in URLError)."""
    return isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, socket.gaierror)


def _describe(exc: BaseException, url: str = "") -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if _unresolved(exc):
        host = urllib.parse.urlsplit(url).hostname or url
        why = exc.reason.strerror or exc.reason
        return f"cannot resolve host {host} (no network or DNS?): {why}"
    if isinstance(exc, urllib.error.URLError):
        return f"cannot connect: {exc.reason}"
    if isinstance(exc, _ShortRead):
        return str(exc)
    if isinstance(exc, http.client.IncompleteRead):
        return "connection closed before the end of the response"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def download(url: str, part: Path, *, expected: Expected = Expected(), algos: tuple[str, ...] = ("sha256",),
             progress: Progress | None = None, notify: Notify | None = None, retries: int = 4,
             retry_wait: float = 1.0, timeout: float = 30.0) -> DownloadResult:
    """Fetch `url` into `part` (resuming it if it exists); return the complete part's size and digests.

    Transient failures (connection errors, timeouts, HTTP 408/429/5xx) are retried `retries` times,
    waiting `retry_wait` seconds and doubling; an attempt that made progress starts a new count.
    On failure the part is kept for a later resume (DownloadError); a size the server reports that
    contradicts `expected.size` deletes it (ChecksumMismatch).
    """
    part = Path(part)
    try:
        return _download(url, part, expected, algos, progress, notify or (lambda msg: None), retries,
                         retry_wait, timeout)
    except _Busy:
        raise
    except BaseException:
        if part.is_file() and part.stat().st_size == 0:
            _unlink(part)  # nothing worth resuming
        raise


def _download(url: str, part: Path, expected: Expected, algos: tuple[str, ...], progress: Progress | None,
              say: Notify, retries: int, retry_wait: float, timeout: float) -> DownloadResult:
    hashes = _Hashes(tuple(dict.fromkeys((*algos, *expected.digests()))))
    result = DownloadResult(0, {})
    with open(part, "a+b") as f:
        _lock(f, part)
        offset = os.fstat(f.fileno()).st_size
        if offset and expected.size is not None and offset > expected.size:
            say(f"{part.name} holds {offset:,} bytes, more than the expected {expected.size:,}; starting over")
            f.truncate(0)
            offset = 0
        if offset:
            say(f"resuming {part.name} at {offset:,} bytes (hashing what is already there)")
            f.seek(0)
            _feed(f, hashes, offset, None)
            result.resumed_from = offset
        failures = 0
        while True:
            before = offset
            try:
                offset = _attempt(url, f, hashes, offset, expected, timeout, progress, say)
                break
            except _Restart as why:
                say(f"{why}; starting over from byte 0")
                f.truncate(0)
                hashes.reset()
                offset, result.restarts = 0, result.restarts + 1
                if result.restarts > 2:
                    raise DownloadError(f"{url}: gave up after restarting {result.restarts - 1} times ({why})")
                continue
            except ChecksumMismatch:
                f.truncate(0)
                _unlink(part)
                raise
            except DownloadError:
                raise
            except Exception as exc:  # noqa: BLE001 - sorted into transient and fatal below
                if isinstance(exc, urllib.error.HTTPError):
                    exc.close()
                f.flush()
                offset = os.fstat(f.fileno()).st_size
                if not _transient(exc):
                    raise DownloadError(f"{url}: {_describe(exc, url)}{_kept(offset, part)}") from None
                failures = 1 if offset > before else failures + 1  # progress starts a new streak
                if failures > retries:
                    raise DownloadError(f"{url}: {_describe(exc, url)}; gave up after {retries + 1} attempts"
                                        f"{_kept(offset, part)}") from None
                wait = max(retry_wait * 2 ** max(0, failures - 1), _retry_after(exc))
                say(f"{_describe(exc, url)} ({offset:,} bytes so far); retrying in {wait:g}s "
                    f"(attempt {failures + 1} of {retries + 1})")
                time.sleep(wait)
                result.attempts += 1
        f.flush()
        os.fsync(f.fileno())
    result.size = offset
    result.digests = hashes.hexdigests()
    return result


def _attempt(url: str, f, hashes: _Hashes, offset: int, expected: Expected, timeout: float,
             progress: Progress | None, say: Notify) -> int:
    """One HTTP request from `offset`; returns the final size, raises on any interruption."""
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 - URLs come from the registry
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            exc.close()
            total = _range_total(exc.headers.get("Content-Range"))
            if total == offset or (total is None and expected.size == offset):
                return offset  # the part was already complete
            raise _Restart(f"the server answered 416 to a resume at byte {offset:,}") from None
        raise
    with resp:
        total = None
        if resp.status == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if not m or m.group(1) is None or int(m.group(1)) != offset:
                raise _Restart(f"the server sent an unexpected Content-Range "
                               f"{resp.headers.get('Content-Range')!r} for a resume at byte {offset:,}")
            total = None if m.group(3) == "*" else int(m.group(3))
        elif resp.status == 200:
            if offset:
                say("the server ignored the Range request (HTTP 200)")
                f.truncate(0)
                hashes.reset()
                offset = 0
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        else:
            raise DownloadError(f"{url}: unexpected HTTP {resp.status} {resp.reason}")
        if total is not None and expected.size is not None and total != expected.size:
            raise ChecksumMismatch(f"{url}", [f"size: expected {expected.size:,} bytes, "
                                              f"the server reports {total:,}"])
        total = total if total is not None else expected.size
        if progress:
            progress(offset, total)
        while True:
            try:
                chunk = resp.read(CHUNK)
            except http.client.IncompleteRead as exc:
                chunk = exc.partial  # keep what did arrive, then let the caller retry/resume
                f.write(chunk)
                hashes.update(chunk)
                raise
            if not chunk:
                break
            f.write(chunk)
            hashes.update(chunk)
            offset += len(chunk)
            if progress:
                progress(offset, total)
        f.flush()
    if total is not None and offset < total:
        raise _ShortRead(f"the connection closed early (expected {total:,} bytes)")
    return offset


def _kept(offset: int, part: Path) -> str:
    """What is left for a resume: the part only when it holds bytes (an empty one is deleted)."""
    return f" ({offset:,} bytes kept in {part} for a later resume)" if offset else " (nothing was downloaded)"


def _retry_after(exc: BaseException) -> float:
    """Seconds a 429/503 asked us to wait (Retry-After in seconds, at most a minute), else 0."""
    value = exc.headers.get("Retry-After", "") if isinstance(exc, urllib.error.HTTPError) else ""
    return min(float(value), 60.0) if value.strip().isdigit() else 0.0


def _range_total(header: str | None) -> int | None:
    m = _CONTENT_RANGE.match(header or "")
    return int(m.group(3)) if m and m.group(3) != "*" else None


def _lock(f, part: Path) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise _Busy(f"{part} is being written by another download; wait for it to finish") from None
        raise


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# --- the verification sidecar: <file>.verified.json ------------------------------------------------


def sidecar_path(path: Path) -> Path:
    """Where the verification record of `path` lives."""
    return path.with_name(path.name + SIDECAR_SUFFIX)


def write_sidecar(path: Path, digests: dict[str, str], converted_from: dict | None = None) -> None:
    """Record the file's current size, mtime and digests (and, if converted, its verified source)."""
    st = path.stat()
    record = {"version": SIDECAR_VERSION, "file": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
              **digests, "verified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if converted_from is not None:
        record["converted_from"] = converted_from
    dest = sidecar_path(path)
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, dest)


def read_sidecar(path: Path, *, fresh_only: bool = True) -> dict | None:
    """The record for `path`, or None if absent, unreadable or (fresh_only) the file changed since."""
    try:
        record = json.loads(sidecar_path(path).read_text(encoding="utf-8"))
        if not isinstance(record, dict) or record.get("version") != SIDECAR_VERSION:
            return None
        if fresh_only:
            st = path.stat()
            if record.get("size") != st.st_size or record.get("mtime_ns") != st.st_mtime_ns:
                return None
    except (OSError, ValueError):
        return None
    return record


def remove_sidecar(path: Path) -> None:
    """Forget any verification record of `path`."""
    _unlink(sidecar_path(path))
