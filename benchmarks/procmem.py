"""Resident memory of the server under test and its engine processes, sampled from /proc during a phase."""

from __future__ import annotations

import threading
from pathlib import Path

from benchmarks import common as c

MIB = 2**20


def status_bytes(pid: int, field: str = "VmRSS") -> int | None:
    """A memory field of /proc/<pid>/status (VmRSS, VmHWM, RssAnon, RssFile ...) in bytes; None if gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class ProcSampler:
    """Samples RSS of a server and its children in a thread; on exit, which children were busy and the peaks.

    The children that ran the phase are told apart by CPU time: every child that used at least `active`
    of the busiest child's CPU seconds counts as an engine process of the model under load (one process
    for the batched engine, every worker of a ctransformers pool).
    """

    def __init__(self, server_pid: int, interval: float = 0.05, active: float = 0.2) -> None:
        self.pid, self.interval, self.active = server_pid, interval, active
        self.samples: list[dict[int, int]] = []
        self._stop = threading.Event()
        self.result: dict = {}

    def __enter__(self) -> ProcSampler:
        self.kids = c.children(self.pid)
        self.cpu0 = {k: _cpu(k) for k in self.kids}
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                return

    def sample(self) -> None:
        """One sample: RSS of the server and of each child."""
        row = {p: status_bytes(p) for p in [self.pid, *self.kids]}
        self.samples.append({p: v for p, v in row.items() if v is not None})

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
        used = {k: (_cpu(k) or 0.0) - (self.cpu0.get(k) or 0.0) for k in self.kids}
        self.result = summarize(self.pid, self.samples, used, self.active)


def _cpu(pid: int) -> float | None:
    try:
        return c.cpu_seconds(pid)
    except OSError:
        return None


def summarize(server_pid: int, samples: list[dict[int, int]], used: dict[int, float], active: float = 0.2) -> dict:
    """Peaks (MiB) of the server, of the busy children and of their sum at one instant, from RSS samples."""
    top = max(used.values(), default=0.0)
    engines = sorted(p for p, s in used.items() if top > 0 and s >= active * top)
    server = [s.get(server_pid, 0) for s in samples]
    engine = [sum(s.get(p, 0) for p in engines) for s in samples]
    both = [a + b for a, b in zip(server, engine)]
    hwm = [status_bytes(p, "VmHWM") for p in engines]
    return {"engine_pids": engines, "engine_cpu_s": {str(p): round(used[p], 2) for p in engines},
            "samples": len(samples), "server_peak_mib": _mib(max(server, default=0)),
            "engine_peak_mib": _mib(max(engine, default=0)), "total_peak_mib": _mib(max(both, default=0)),
            "engine_hwm_mib": _mib(sum(h for h in hwm if h)) if any(hwm) else None}


def _mib(x: int) -> float:
    return round(x / MIB, 1)
