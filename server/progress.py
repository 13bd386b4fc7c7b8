"""Command-line progress and errors: a redrawn bar on a terminal, plain periodic lines otherwise."""

from __future__ import annotations

import sys
import time

class CliError(Exception):
    """A failure to report as `error: ...` with an exit code."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


# --- progress output ----------------------------------------------------------------------------------


def human_bytes(n: float) -> str:
    """1234567 -> '1.23 MB' (decimal units)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"  # pragma: no cover


def _duration(s: float) -> str:
    s = int(s)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Reporter:
    """Progress callback (done, total): a redrawn bar on a TTY, a line every 10% or few seconds otherwise."""

    def __init__(self, label: str, *, byte_units: bool = True, counting: str = "", stream=None,
                 tty: bool | None = None, interval: float = 5.0, quiet_for: float = 0.0):
        self.label, self.byte_units, self.counting, self.interval = label, byte_units, counting, interval
        self.quiet_for = quiet_for  # no plain lines before this many seconds (short jobs stay silent)
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) if tty is None else tty
        self.start: float | None = None
        self.base = self.done = 0
        self.total: int | None = None
        self.last = 0.0
        self.next_pct = 10
        self.drawn = False

    def __call__(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        if self.start is None or done < self.done:  # first call, or the transfer restarted
            self.start, self.base, self.last = now, done, 0.0 if self.tty else now
            self.next_pct = (int(100 * done / total) // 10 + 1) * 10 if total else 10
        self.done, self.total = done, total
        pct = 100 * done / total if total else None
        if self.tty:
            if now - self.last >= 0.1 or (total and done >= total):
                self.last = now
                self.stream.write("\r" + self._text(now, bar=True).ljust(100)[:120])
                self.stream.flush()
                self.drawn = True
        elif now - self.start < self.quiet_for:
            return
        elif (pct is not None and pct >= self.next_pct) or now - self.last >= self.interval:
            self.last = now
            if pct is not None:
                self.next_pct = (int(pct) // 10 + 1) * 10
            print(self._text(now, bar=False), file=self.stream, flush=True)

    def _text(self, now: float, bar: bool) -> str:
        done, total = self.done, self.total
        amount = (f"{human_bytes(done)}" + (f" of {human_bytes(total)}" if total else "")) if self.byte_units \
            else (f"{done} of {total}" if total else str(done)) + (f" {self.counting}" if self.counting else "")
        elapsed = now - (self.start or now)
        rate = (done - self.base) / elapsed if elapsed > 0 else 0.0
        extra = [amount]
        if self.byte_units and rate:
            extra.append(f"{human_bytes(rate)}/s")
        if total and rate and done < total:
            extra.append(f"ETA {_duration((total - done) / rate)}")
        if not total:
            return f"{self.label}: {', '.join(extra)}"
        pct = 100 * done / total
        if bar:
            filled = int(24 * min(done, total) / total)
            return f"{self.label} [{'#' * filled}{'.' * (24 - filled)}] {pct:5.1f}%  " + "  ".join(extra)
        return f"{self.label}: {pct:.0f}% ({', '.join(extra)})"

    def finish(self) -> None:
        """End the bar's line."""
        if self.tty and self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


def note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
