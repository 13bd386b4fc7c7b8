"""The model-management commands: `models list`, `pull`, `verify` and `convert`.

Results go to stdout, progress and notes to stderr. Verification results are cached next to each model
in `<file>.verified.json` (size, mtime, digests and, for converted files, the verified download they
came from), so `models list` never hashes multi-GB files.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from backends.download import (
    ChecksumMismatch,
    DownloadError,
    Expected,
    check_digests,
    download,
    hash_file,
    read_sidecar,
    remove_sidecar,
    write_sidecar,
)
from backends.registry import ModelSpec, RegistryError, entry_file, load_registry_file


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


def _note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- registry access ----------------------------------------------------------------------------------


def registry_path(arg: Path | None) -> Path:
    """--registry, else $GPT4ALL_J_REGISTRY, else serve's default."""
    from server.settings import ENV_PREFIX, Settings

    if arg is not None:
        return arg
    env = os.environ.get(ENV_PREFIX + "REGISTRY")
    return Path(env) if env else Settings.model_fields["registry"].default


def load_entries(path: Path) -> list[tuple[ModelSpec, Path]]:
    """Every registry entry with its absolute file path (files need not exist)."""
    try:
        parsed = load_registry_file(path)
    except RegistryError as exc:
        raise CliError(str(exc), 2) from None
    return [(spec, entry_file(path, spec)) for spec in parsed.models]


def find_entry(entries: list[tuple[ModelSpec, Path]], name: str, path: Path) -> tuple[ModelSpec, Path]:
    """The entry whose id or alias is `name`."""
    for spec, file in entries:
        if name == spec.id or name in spec.aliases:
            return spec, file
    known = ", ".join(spec.id for spec, _ in entries)
    raise CliError(f"no model {name!r} in {path} (known: {known})", 2)


def _show(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _expected(spec: ModelSpec) -> Expected:
    return Expected(spec.size, spec.sha256, spec.md5)


def _layout(file: Path) -> tuple[str, str]:
    """('standard' | 'legacy' | 'invalid', detail) from the header-only inspector."""
    from backends.ggml.reader import LegacyModelFileError, ModelFileError, inspect_model

    try:
        info = inspect_model(file)
    except LegacyModelFileError:
        return "legacy", "GPT4All's legacy pre-May-2023 GGML layout"
    except ModelFileError as exc:
        return "invalid", exc.problem
    return "standard", f"valid GGML GPT-J file: {info.ftype}, {info.n_params:,} parameters, n_ctx {info.n_ctx}"


def _source_matches(source: dict, expected: Expected) -> bool | None:
    """Do a conversion source's recorded digests match the registry? None = nothing to compare."""
    pairs = [(source.get(a), v) for a, v in expected.digests().items() if source.get(a)]
    if not pairs:
        return None
    return all(a == b for a, b in pairs) and (expected.size is None or source.get("size") == expected.size)


# --- models list --------------------------------------------------------------------------------------


def entry_status(spec: ModelSpec, file: Path) -> dict:
    """Everything `models list` shows for one entry, without hashing the file."""
    exp = _expected(spec)
    row = {"id": spec.id, "aliases": list(spec.aliases), "path": str(file), "present": file.is_file(),
           "size": None, "expected_size": spec.size, "checksum": "-", "layout": None,
           "needs_conversion": spec.needs_conversion, "converted": None, "partial_bytes": None,
           "url": spec.url, "problem": None}
    for part in (file.with_name(file.name + ".part"), file.with_name(file.name + ".legacy.part")):
        if part.is_file():
            row["partial_bytes"] = part.stat().st_size
    if not row["present"]:
        return row
    row["size"] = file.stat().st_size
    layout, detail = _layout(file)
    row["layout"] = layout
    if layout != "standard":
        row["problem"] = detail
    converted = spec.needs_conversion and layout == "standard"
    if spec.needs_conversion:
        row["converted"] = converted
    record = read_sidecar(file)
    if converted:
        source = (record or {}).get("converted_from")
        match = _source_matches(source, exp) if source else False
        row["checksum"] = {True: "verified", False: "unverified" if not source else "mismatch",
                           None: "no checksum"}[match]
        return row
    if exp.size is not None and row["size"] != exp.size:
        row["checksum"] = "mismatch"
    elif not exp.digests():
        row["checksum"] = "no checksum"
    else:
        pairs = [(record.get(a), v) for a, v in exp.digests().items() if record and record.get(a)]
        row["checksum"] = "unverified" if not pairs else "verified" if all(a == b for a, b in pairs) \
            else "mismatch"
    return row


def cmd_list(path: Path, as_json: bool) -> int:
    """`models list`."""
    rows = [entry_status(spec, file) for spec, file in load_entries(path)]
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    table = [("ID", "ALIASES", "STATE", "SIZE", "EXPECTED", "CHECKSUM", "LAYOUT", "PATH")]
    for r in rows:
        state = "present" if r["present"] else "missing"
        if r["partial_bytes"] is not None:
            state += f" (+{human_bytes(r['partial_bytes'])} partial)"
        layout = r["layout"] or "-"
        if r["needs_conversion"]:
            layout = {None: "needs conversion", "legacy": "legacy: needs conversion"}.get(
                r["layout"], "converted" if r["converted"] else layout)
        expected = human_bytes(r["expected_size"]) if r["expected_size"] is not None else "-"
        if r["converted"] and r["expected_size"] is not None:
            expected += " (download)"
        table.append((r["id"], ",".join(r["aliases"]) or "-", state,
                      human_bytes(r["size"]) if r["size"] is not None else "-", expected, r["checksum"],
                      layout, _show(Path(r["path"]))))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


# --- verify -------------------------------------------------------------------------------------------


@dataclass
class Check:
    """The outcome of verifying one entry's file."""

    ok: bool = True
    verified: bool = False  # a checksum confirmed it
    notes: list[str] = field(default_factory=list)
    layout: str = ""
    legacy_matches: bool = False  # a legacy-layout file whose checksum matches the registry's download

    def fail(self, msg: str) -> None:
        self.ok = False
        self.notes.append(msg)


def check_entry(spec: ModelSpec, file: Path, *, use_cache: bool = False) -> Check:
    """Checksum (registry, or the conversion record) and inspector for one present file."""
    res = Check()
    if not file.is_file():
        res.fail(f"file {file} is missing" + (f"; run `gpt4all-j-server pull {spec.id}`" if spec.url else ""))
        return res
    exp = _expected(spec)
    res.layout, detail = _layout(file)
    converted = spec.needs_conversion and res.layout == "standard"
    record = read_sidecar(file, fresh_only=False)
    fresh = read_sidecar(file)
    if converted:
        source = (record or {}).get("converted_from")
        if not source or not record.get("sha256"):
            res.notes.append("unverified: no record of a verified download it was converted from "
                             f"(`gpt4all-j-server pull {spec.id} --force` re-downloads and converts it)")
        elif _source_matches(source, exp) is False:
            res.fail("it was converted from a download whose checksum does not match the registry")
        else:
            got = record["sha256"] if use_cache and fresh else _hash(file, ("sha256",))["sha256"]
            if got != record["sha256"]:
                res.fail(f"sha256: expected {record['sha256']} (recorded at conversion), got {got}")
            else:
                res.verified = True
                res.notes.append(f"sha256 OK; converted from a verified download (source sha256 "
                                 f"{source.get('sha256') or '-'}, md5 {source.get('md5') or '-'})")
                if not fresh:
                    write_sidecar(file, {"sha256": got}, converted_from=source)
    else:
        algos = tuple(dict.fromkeys(("sha256", *exp.digests())))
        if use_cache and fresh and all(fresh.get(a) for a in algos):
            digests = {a: fresh[a] for a in algos}
        else:
            digests = _hash(file, algos)
            write_sidecar(file, digests)
        try:
            check_digests(f"{file}", exp, file.stat().st_size, digests)
        except ChecksumMismatch as exc:
            res.fail("; ".join(exc.problems))
        else:
            if exp.digests():
                res.verified = True
                res.legacy_matches = res.layout == "legacy"
                res.notes.append(", ".join(f"{a} OK" for a in exp.digests()))
            else:
                res.notes.append(f"no checksum in the registry (sha256 {digests['sha256']})")
    if res.layout == "standard":
        res.notes.append(detail)
    elif res.layout == "legacy" and spec.needs_conversion:
        res.fail(f"{detail}: not servable until converted; `gpt4all-j-server pull {spec.id}` converts it "
                 "in place" + ("" if res.verified else " (after downloading it again)"))
    else:
        res.fail(detail)
    return res


def _hash(file: Path, algos: tuple[str, ...]) -> dict[str, str]:
    rep = Reporter(f"hashing {file.name}", quiet_for=2.0)
    try:
        return hash_file(file, algos, rep)
    finally:
        rep.finish()


def cmd_verify(path: Path, name: str | None) -> int:
    """`verify [ID]`."""
    entries = load_entries(path)
    if name is not None:
        entries = [find_entry(entries, name, path)]
    else:
        entries = [(s, f) for s, f in entries if f.is_file()]
        if not entries:
            print(f"no model files present for {path}")
            return 0
    failed = 0
    for spec, file in entries:
        res = check_entry(spec, file)
        failed += not res.ok
        print(f"{spec.id}: {'OK' if res.ok else 'FAIL'} ({_show(file)})")
        for note in res.notes:
            print(f"  - {note}")
    return 1 if failed else 0


# --- pull ---------------------------------------------------------------------------------------------


def _writable_dir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"cannot create the model folder {folder}: {exc.strerror or exc}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CliError(f"the model folder {folder} is not writable")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise CliError(f"cannot write to the model folder {folder}: {exc.strerror or exc}") from None


def _check_space(folder: Path, spec: ModelSpec, part: Path) -> None:
    if spec.size is None:
        return
    have = part.stat().st_size if part.is_file() else 0
    need = spec.size - min(have, spec.size) + (spec.size if spec.needs_conversion else 0)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise CliError(f"not enough free space in {folder}: need {human_bytes(need)}, "
                       f"{human_bytes(free)} available")


def cmd_pull(path: Path, name: str, *, force: bool = False, keep_original: bool = False, retries: int = 4,
             retry_wait: float = 2.0, timeout: float = 60.0) -> int:
    """`pull ID`: download, verify, (convert), install."""
    spec, file = find_entry(load_entries(path), name, path)
    if not spec.url:
        how = "the server writes it at startup" if spec.create_if_missing else f"put its file at {file}"
        raise CliError(f"model {spec.id!r} has no url in {path}; {how}")
    _writable_dir(file.parent)
    legacy = file.with_name(file.name + ".legacy")
    if file.is_file() and not force:
        res = check_entry(spec, file, use_cache=True)
        if res.ok:
            state = "verified" if res.verified else "unverified"
            print(f"{spec.id}: already present ({state}): {_show(file)}; use --force to download it again")
            for note in res.notes:
                print(f"  - {note}")
            return 0
        if res.legacy_matches and spec.needs_conversion:
            _note(f"{file.name} is the verified original download; converting it in place")
            record = read_sidecar(file) or {}
            digests = {a: record[a] for a in ("sha256", "md5") if record.get(a)}
            os.replace(file, legacy)
            remove_sidecar(file)
            return _convert_in_place(spec, legacy, file, keep_original, digests or None)
        _note(f"{_show(file)} fails verification ({'; '.join(res.notes)}); downloading it again")
    target = legacy if spec.needs_conversion else file
    if spec.needs_conversion and legacy.is_file() and not force and _expected(spec).digests():
        try:
            digests = _hash(legacy, ("sha256", "md5"))
            check_digests(str(legacy), _expected(spec), legacy.stat().st_size, digests)
            _note(f"using the verified original download already at {_show(legacy)}")
            return _convert_in_place(spec, legacy, file, keep_original, digests)
        except ChecksumMismatch as exc:
            _note(f"{_show(legacy)} does not match the registry ({exc}); downloading it again")
    part = target.with_name(target.name + ".part")
    if force and part.is_file():
        part.unlink()
    _check_space(file.parent, spec, part)
    print(f"downloading {spec.url} -> {_show(target)}", file=sys.stderr, flush=True)
    rep = Reporter(f"{spec.id}")
    try:
        result = download(spec.url, part, expected=_expected(spec), algos=("sha256",), progress=rep,
                          notify=lambda m: (rep.finish(), _note(m)), retries=retries, retry_wait=retry_wait,
                          timeout=timeout)
    except KeyboardInterrupt:
        kept = part.stat().st_size if part.is_file() else 0
        raise CliError(f"interrupted; {kept:,} bytes kept in {part}; run the same command to resume",
                       130) from None
    except ChecksumMismatch as exc:
        raise CliError(f"{spec.id}: {exc}; the download was deleted and nothing was installed") from None
    except DownloadError as exc:
        raise CliError(f"{spec.id}: download failed: {exc}") from None
    finally:
        rep.finish()
    try:
        check_digests(spec.url, _expected(spec), result.size, result.digests)
    except ChecksumMismatch as exc:
        part.unlink(missing_ok=True)
        raise CliError(f"{spec.id}: the download does not match the registry: {'; '.join(exc.problems)}; "
                       "it was deleted and nothing was installed") from None
    os.replace(part, target)
    checked = ", ".join(f"{a} {result.digests[a]}" for a in _expected(spec).digests())
    checked = f"verified: {checked}" if checked else "no checksum in the registry to verify it"
    if not spec.needs_conversion:
        write_sidecar(file, result.digests)
        print(f"{spec.id}: downloaded {human_bytes(result.size)} to {_show(file)} ({checked})")
        return 0
    _note(f"downloaded {human_bytes(result.size)} to {_show(legacy)} ({checked})")
    return _convert_in_place(spec, legacy, file, keep_original, result.digests)


def _convert_in_place(spec: ModelSpec, legacy: Path, file: Path, keep_original: bool,
                      digests: dict[str, str] | None = None) -> int:
    from backends.ggml.reader import ModelFileError

    try:
        from backends.ggml.convert import convert_legacy
    except ImportError:
        raise CliError(f"this installation has no GGML converter; the verified download is kept at {legacy}") \
            from None
    if digests is None:
        digests = _hash(legacy, ("sha256", "md5"))
    source = {"file": legacy.name, "url": spec.url, "size": legacy.stat().st_size, **digests}
    rep = Reporter(f"converting {spec.id}", byte_units=False, counting="tensors")
    try:
        report = convert_legacy(legacy, file, progress=rep, overwrite=True)
    except ModelFileError as exc:
        raise CliError(f"{spec.id}: conversion failed: {exc}; the downloaded original is kept at {legacy} "
                       f"(`gpt4all-j-server pull {spec.id}` retries the conversion without downloading)") \
            from None
    finally:
        rep.finish()
    write_sidecar(file, _hash(file, ("sha256",)), converted_from=source)
    if not keep_original:
        legacy.unlink()
    kept = f"; original kept at {_show(legacy)}" if keep_original else ""
    print(f"{spec.id}: converted {report.src_ftype} -> {report.dst_ftype} ({report.tensors} tensors, "
          f"{human_bytes(report.bytes_written)}) to {_show(file)}{kept}")
    return 0


# --- convert ------------------------------------------------------------------------------------------


def cmd_convert(src: Path, dst: Path, overwrite: bool) -> int:
    """`convert IN OUT`: legacy GPT4All GGML layout -> standard layout."""
    from backends.ggml.reader import ModelFileError, inspect_model

    try:
        from backends.ggml.convert import convert_legacy
    except ImportError:
        raise CliError("this installation has no GGML converter (backends.ggml.convert)", 2) from None
    if dst.exists() and not overwrite:
        raise CliError(f"{dst} already exists; use --overwrite to replace it")
    rep = Reporter(f"converting {src.name}", byte_units=False, counting="tensors")
    try:
        report = convert_legacy(src, dst, progress=rep, overwrite=overwrite)
    except ModelFileError as exc:
        raise CliError(str(exc)) from None
    finally:
        rep.finish()
    info = inspect_model(dst)
    print(f"converted {src} ({report.src_ftype}, legacy layout) -> {dst} ({report.dst_ftype}): "
          f"{report.tensors} tensors, {report.bytes_written:,} bytes"
          + (f", {report.requantized} re-quantized to {report.dst_ftype}" if report.requantized else ""))
    print(info.describe())
    return 0
