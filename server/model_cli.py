"""The model-management commands: `models list`, `pull`, `verify` and `convert`.

Results go to stdout, progress and notes to stderr. Verification results are cached next to each model
in `<file>.verified.json` (size, mtime, digests and, for converted files, the verified download they
came from), so `models list` never hashes multi-GB files.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from backends.download import (
    ChecksumMismatch,
    Expected,
    check_digests,
    hash_file,
    read_sidecar,
    write_sidecar,
)
from backends.registry import ModelSpec, RegistryError, entry_file, file_problem, load_registry_file
from backends.registry_paths import find_registry

from server.progress import CliError, Reporter, human_bytes


# --- registry access ----------------------------------------------------------------------------------


def registry_path(arg: Path | None) -> Path:
    """The registry `serve` would use: --registry, $GPT4ALL_J_REGISTRY, ./model_registry.yaml, the per-user one."""
    from server.settings import ENV_PREFIX

    env = os.environ.get(ENV_PREFIX + "REGISTRY") or None
    data_dir = os.environ.get(ENV_PREFIX + "DATA_DIR") or None
    given = arg if arg is not None else Path(env) if env else None
    try:
        path, why = find_registry(given, Path(data_dir) if data_dir else None)
    except RegistryError as exc:
        raise CliError(str(exc), 2) from None
    if given is None:
        print(f"registry: {path} ({why})", file=sys.stderr)
    return path


def load_entries(path: Path) -> list[tuple[ModelSpec, Path]]:
    """Every registry entry with its absolute file path (files need not exist)."""
    try:
        parsed = load_registry_file(path)
    except RegistryError as exc:
        raise CliError(str(exc), 2) from None
    return [(spec, entry_file(path, spec, parsed.model_dir)) for spec in parsed.models]


def find_entry(entries: list[tuple[ModelSpec, Path]], name: str, path: Path) -> tuple[ModelSpec, Path]:
    """The entry whose id or alias is `name`."""
    for spec, file in entries:
        if name == spec.id or name in spec.aliases:
            return spec, file
    known = ", ".join(spec.id for spec, _ in entries)
    raise CliError(f"no model {name!r} in {path} (known: {known})", 2)


def show_path(path: Path) -> str:
    """The path relative to the working directory when it is below it, else as given."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def expected_of(spec: ModelSpec) -> Expected:
    """The size and checksums the registry promises for an entry."""
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
    exp = expected_of(spec)
    kind = file_problem(file)
    row = {"id": spec.id, "aliases": list(spec.aliases), "path": str(file), "present": kind is None,
           "size": None, "expected_size": spec.size, "checksum": "-", "layout": None,
           "needs_conversion": spec.needs_conversion, "converted": None, "partial_bytes": None,
           "url": spec.url, "problem": None, "file_kind": kind or "regular file"}
    for part in (file.with_name(file.name + ".part"), file.with_name(file.name + ".legacy.part")):
        if part.is_file():
            row["partial_bytes"] = part.stat().st_size
    if kind is not None:
        if kind != "missing":
            row["problem"] = f"the path is {kind}, not a model file"
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
        kind = r["file_kind"]
        state = "present" if r["present"] else "missing" if kind == "missing" else f"not a file ({kind})"
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
                      layout, show_path(Path(r["path"]))))
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
    kind = file_problem(file)
    if kind == "missing":
        res.fail(f"file {file} is missing" + (f"; run `gpt4all-j-server pull {spec.id}`" if spec.url else ""))
        return res
    if kind is not None:
        res.fail(f"{file} is {kind}, not a model file")
        return res
    exp = expected_of(spec)
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
            got = record["sha256"] if use_cache and fresh else hash_with_progress(file, ("sha256",))["sha256"]
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
            digests = hash_with_progress(file, algos)
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


def hash_with_progress(file: Path, algos: tuple[str, ...]) -> dict[str, str]:
    """Hash a file, showing progress when it takes more than 2 s."""
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
        entries = [(s, f) for s, f in entries if file_problem(f) != "missing"]
        if not entries:
            print(f"no model files present for {path}")
            return 0
    failed = 0
    for spec, file in entries:
        res = check_entry(spec, file)
        failed += not res.ok
        print(f"{spec.id}: {'OK' if res.ok else 'FAIL'} ({show_path(file)})")
        for note in res.notes:
            print(f"  - {note}")
    return 1 if failed else 0
