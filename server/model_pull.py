"""`pull` (download, verify, convert, install) and `convert`."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from backends.download import (
    ChecksumMismatch,
    DownloadError,
    check_digests,
    download,
    read_sidecar,
    remove_sidecar,
    write_sidecar,
)
from backends.registry import ModelSpec
from server.model_cli import check_entry, expected_of, find_entry, hash_with_progress, load_entries, show_path
from server.progress import CliError, Reporter, human_bytes, note as _note

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
            print(f"{spec.id}: already present ({state}): {show_path(file)}; use --force to download it again")
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
        _note(f"{show_path(file)} fails verification ({'; '.join(res.notes)}); downloading it again")
    target = legacy if spec.needs_conversion else file
    if spec.needs_conversion and legacy.is_file() and not force and expected_of(spec).digests():
        try:
            digests = hash_with_progress(legacy, ("sha256", "md5"))
            check_digests(str(legacy), expected_of(spec), legacy.stat().st_size, digests)
            _note(f"using the verified original download already at {show_path(legacy)}")
            return _convert_in_place(spec, legacy, file, keep_original, digests)
        except ChecksumMismatch as exc:
            _note(f"{show_path(legacy)} does not match the registry ({exc}); downloading it again")
    part = target.with_name(target.name + ".part")
    if force and part.is_file():
        part.unlink()
    _check_space(file.parent, spec, part)
    print(f"downloading {spec.url} -> {show_path(target)}", file=sys.stderr, flush=True)
    rep = Reporter(f"{spec.id}")
    try:
        result = download(spec.url, part, expected=expected_of(spec), algos=("sha256",), progress=rep,
                          notify=lambda m: (rep.finish(), _note(m)), retries=retries, retry_wait=retry_wait,
                          timeout=timeout)
    except KeyboardInterrupt:
        kept = part.stat().st_size if part.is_file() else 0
        if not kept:
            raise CliError("interrupted; nothing was downloaded", 130) from None
        raise CliError(f"interrupted; {kept:,} bytes kept in {part}; run the same command to resume",
                       130) from None
    except ChecksumMismatch as exc:
        raise CliError(f"{spec.id}: {exc}; the download was deleted and nothing was installed") from None
    except DownloadError as exc:
        raise CliError(f"{spec.id}: download failed: {exc}") from None
    finally:
        rep.finish()
    try:
        check_digests(spec.url, expected_of(spec), result.size, result.digests)
    except ChecksumMismatch as exc:
        part.unlink(missing_ok=True)
        raise CliError(f"{spec.id}: the download does not match the registry: {'; '.join(exc.problems)}; "
                       "it was deleted and nothing was installed") from None
    os.replace(part, target)
    checked = ", ".join(f"{a} {result.digests[a]}" for a in expected_of(spec).digests())
    checked = f"verified: {checked}" if checked else "no checksum in the registry to verify it"
    if not spec.needs_conversion:
        write_sidecar(file, result.digests)
        print(f"{spec.id}: downloaded {human_bytes(result.size)} to {show_path(file)} ({checked})")
        return 0
    _note(f"downloaded {human_bytes(result.size)} to {show_path(legacy)} ({checked})")
    return _convert_in_place(spec, legacy, file, keep_original, result.digests)


def _convert_in_place(spec: ModelSpec, legacy: Path, file: Path, keep_original: bool,
                      digests: dict[str, str] | None = None) -> int:
    from backends.ggml.reader import ModelFileError

    from backends.ggml.convert import convert_legacy

    if digests is None:
        digests = hash_with_progress(legacy, ("sha256", "md5"))
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
    write_sidecar(file, hash_with_progress(file, ("sha256",)), converted_from=source)
    if not keep_original:
        legacy.unlink()
    kept = f"; original kept at {show_path(legacy)}" if keep_original else ""
    print(f"{spec.id}: converted {report.src_ftype} -> {report.dst_ftype} ({report.tensors} tensors, "
          f"{human_bytes(report.bytes_written)}) to {show_path(file)}{kept}")
    return 0


# --- convert ------------------------------------------------------------------------------------------


def cmd_convert(src: Path, dst: Path, overwrite: bool) -> int:
    """`convert IN OUT`: legacy GPT4All GGML layout -> standard layout."""
    from backends.ggml.reader import ModelFileError, inspect_model

    from backends.ggml.convert import convert_legacy

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
