"""Converts GPT4All's legacy (pre-May-2023) GGML GPT-J files to the standard layout ctransformers reads.

The legacy layout differs only in the header ftype (no quantization version) and in the quantized
blocks: float32 scales and nibbles packed in consecutive pairs. q4_0, q4_1 and q8_0 are repacked
directly on the block bytes (integer quants unchanged, scales rounded to fp16, nibbles reordered to
halves), so the only change to any weight is the fp16 rounding of its block's scale (and min). q4_2
(16-weight blocks, gone from ggml) is dequantized and re-quantized to q4_0 with ggml's reference
quantizer. f32 and f16 tensors, the header's other fields, the vocab and the tensor records are
copied verbatim.

The source is memory-mapped and converted a bounded chunk at a time, so memory use stays around one
chunk of one tensor whatever the file size. Output goes to `dst + ".part"`, is fsynced, checked with
the reader and only then renamed to `dst`; the `.part` file is removed on any failure.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .constants import (
    FTYPE_CODES,
    GGML_TYPE_F16,
    GGML_TYPE_F32,
    GGML_TYPE_Q4_0,
    GGML_TYPE_Q4_1,
    GGML_TYPE_Q4_2,
    GGML_TYPE_Q8_0,
    LEGACY_TYPE_BLOCK,
    QK,
    QNT_VERSION,
    QNT_VERSION_FACTOR,
    QUANTIZED_FTYPES,
    TYPE_BLOCK,
    TYPE_NAMES,
)
from .quants import dequantize_legacy, quantize
from .reader import (
    LegacyModelFileError,
    ModelFileError,
    TensorInfo,
    convert_command,
    converted_path,
    inspect_model,
    scan_model,
)

CHUNK_WEIGHTS = 1 << 20  # weights repacked at once (a multiple of 32): ~0.6 MiB of q4_0 blocks
REQUANT_CHUNK_WEIGHTS = 1 << 15  # weights re-quantized at once (float32 temporaries: 128 KiB each)
_FTYPE_OFFSET = 28  # magic + 6 int32 hparams, then the int32 ftype
_TYPE_FIELD = 8  # within a tensor record: int32 n_dims, int32 name length, int32 type

# Legacy ggml type -> standard ggml type it becomes.
_TARGET = {
    GGML_TYPE_F32: GGML_TYPE_F32,
    GGML_TYPE_F16: GGML_TYPE_F16,
    GGML_TYPE_Q4_0: GGML_TYPE_Q4_0,
    GGML_TYPE_Q4_1: GGML_TYPE_Q4_1,
    GGML_TYPE_Q8_0: GGML_TYPE_Q8_0,
    GGML_TYPE_Q4_2: GGML_TYPE_Q4_0,
}
# Block layouts as numpy structured dtypes (packed, little-endian): legacy -> standard.
_BLOCKS = {
    GGML_TYPE_Q4_0: (np.dtype([("d", "<f4"), ("qs", "u1", 16)]), np.dtype([("d", "<f2"), ("qs", "u1", 16)])),
    GGML_TYPE_Q4_1: (
        np.dtype([("d", "<f4"), ("m", "<f4"), ("qs", "u1", 16)]),
        np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)]),
    ),
    GGML_TYPE_Q8_0: (np.dtype([("d", "<f4"), ("qs", "u1", 32)]), np.dtype([("d", "<f2"), ("qs", "u1", 32)])),
}


class ConvertError(ModelFileError):
    """A file that cannot be converted (or an output that cannot be written); the message says why."""


@dataclass
class ConvertReport:
    """What `convert_legacy` did."""

    src: Path
    dst: Path
    src_ftype: str  # legacy weight type of the source, e.g. "q4_0" or "q4_2"
    dst_ftype: str  # weight type of the converted file
    tensors: int
    bytes_written: int
    requantized: int  # tensors re-quantized (q4_2 -> q4_0) instead of repacked exactly


def _pairs_to_halves(qs: np.ndarray, out: np.ndarray) -> None:
    """Legacy nibbles (byte k = weights 2k low, 2k+1 high) -> current (byte j = weights j low, j+16 high)."""
    lo, hi = qs[:, :8], qs[:, 8:]  # weights 0..15 and 16..31
    even, odd = out[:, 0::2], out[:, 1::2]  # in place, one temporary: memory ~ the output
    tmp = np.left_shift(hi, 4)
    np.bitwise_or(np.bitwise_and(lo, 0x0F, out=even), tmp, out=even)  # weights j | j+16, j even
    np.bitwise_or(np.right_shift(lo, 4, out=odd), np.bitwise_and(hi, 0xF0, out=tmp), out=odd)


def _scales_to_fp16(src: np.ndarray, dst: np.ndarray, what: str) -> None:
    """Round float32 scales to fp16 into `dst`; a scale beyond the fp16 range cannot be repacked."""
    with np.errstate(over="ignore"):
        dst[...] = src
    if not np.isfinite(dst).all() and (np.isinf(dst) & np.isfinite(src)).any():
        raise ValueError(f"a block {what} exceeds the fp16 range (|{what}| > 65504)")


def _repack(mm: mmap.mmap, off: int, nbytes: int, ggml_type: int) -> np.ndarray:
    """Legacy q4_0/q4_1/q8_0 blocks -> standard blocks, without touching the integer quants."""
    old, new = _BLOCKS[ggml_type]
    src = np.frombuffer(mm, dtype=old, count=nbytes // old.itemsize, offset=off)
    out = np.empty(len(src), dtype=new)
    _scales_to_fp16(src["d"], out["d"], "scale")
    if ggml_type == GGML_TYPE_Q4_1:
        _scales_to_fp16(src["m"], out["m"], "minimum")
    if ggml_type == GGML_TYPE_Q8_0:
        out["qs"] = src["qs"]
    else:
        _pairs_to_halves(src["qs"], out["qs"])
    return out


def _bytes_at(mm: mmap.mmap, off: int, nbytes: int) -> np.ndarray:
    """A zero-copy uint8 view of `nbytes` of the mapped file at `off`."""
    return np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=off)


def _requantize(mm: mmap.mmap, off: int, nbytes: int, n: int) -> bytes:
    """Legacy q4_2 blocks of `n` weights -> q4_0 (ggml's reference quantizer)."""
    return quantize(dequantize_legacy(_bytes_at(mm, off, nbytes), GGML_TYPE_Q4_2, n), GGML_TYPE_Q4_0)


def _chunks(t: TensorInfo, chunk_weights: int) -> Iterator[tuple[int, int, int]]:
    """(data offset, legacy bytes, weights) of consecutive whole-block pieces of a tensor."""
    qk, size = LEGACY_TYPE_BLOCK[t.ggml_type]
    step = max(chunk_weights // QK, 1) * QK  # whole blocks of 16 and 32 weights
    for start in range(0, t.n_elements, step):
        n = min(step, t.n_elements - start)
        yield t.offset + start // qk * size, n // qk * size, n


def _converted_data(mm: mmap.mmap, t: TensorInfo) -> Iterator[bytes | np.ndarray]:
    """The standard-layout data of one legacy tensor, a bounded chunk at a time."""
    if t.ggml_type in (GGML_TYPE_F32, GGML_TYPE_F16):
        for off, nbytes, _ in _chunks(t, CHUNK_WEIGHTS):
            yield _bytes_at(mm, off, nbytes)
    elif t.ggml_type == GGML_TYPE_Q4_2:
        for off, nbytes, n in _chunks(t, REQUANT_CHUNK_WEIGHTS):
            yield _requantize(mm, off, nbytes, n)
    else:
        for off, nbytes, _ in _chunks(t, CHUNK_WEIGHTS):
            yield _repack(mm, off, nbytes, t.ggml_type)


def _record_start(t: TensorInfo) -> int:
    """File offset of the tensor record header (n_dims, name length, type, dims, name) before the data."""
    return t.offset - (12 + 4 * len(t.shape) + len(t.name.encode()))


def _record_header(mm: mmap.mmap, t: TensorInfo) -> bytes:
    """The tensor record header, copied, with the type field set to the standard type."""
    start = _record_start(t)
    head = bytearray(mm[start : t.offset])
    struct.pack_into("<i", head, _TYPE_FIELD, _TARGET[t.ggml_type])
    return bytes(head)


def _std_ftype(wtype: int) -> int:
    """Standard header ftype of a file whose 2-D tensors have ggml type `wtype` (quantized: + 2000)."""
    code = FTYPE_CODES[TYPE_NAMES[wtype]]
    return code + (QNT_VERSION * QNT_VERSION_FACTOR if code in QUANTIZED_FTYPES else 0)


def _check_paths(src: Path, dst: Path, overwrite: bool) -> None:
    """Refuse dst == src and an existing dst (unless overwrite); dst must not be a directory."""
    if dst.resolve() == src.resolve() or (dst.exists() and os.path.samefile(src, dst)):
        raise ConvertError(dst, "the output is the input file; choose another output path")
    if dst.is_dir():
        raise ConvertError(dst, "the output path is a directory; give a file name")
    if dst.exists() and not overwrite:
        raise ConvertError(dst, "the output file already exists; choose another path or allow overwriting")


def _legacy_source(src: Path) -> tuple[list[TensorInfo], int]:
    """Validate the source: its tensor records and legacy weight type, or a ConvertError saying why not."""
    try:
        info, tensors, legacy = scan_model(src, allow_legacy=True)
    except LegacyModelFileError as e:
        raise ConvertError(src, f"legacy GGML file is damaged ({e.damage}); download it again") from None
    except ModelFileError as e:
        raise ConvertError(src, f"cannot convert: {e.problem}") from None
    if not legacy:
        raise ConvertError(
            src, f"already in the standard GGML layout ({info.ftype}, header ftype {info.ftype_code}): nothing "
            "to convert, serve it as it is"
        )
    wtype = max(tensors, key=lambda t: len(t.shape)).ggml_type  # 2-D tensors carry the weight type
    if wtype not in _TARGET:
        supported = ", ".join(sorted(TYPE_NAMES[t] for t in _TARGET if t not in (GGML_TYPE_F32, GGML_TYPE_F16)))
        raise ConvertError(
            src, f"legacy {TYPE_NAMES.get(wtype, wtype)} blocks (pre-May-2023 ggml) cannot be converted; "
            f"supported legacy types: {supported}"
        )
    return tensors, wtype


def _write(src: Path, mm: mmap.mmap, tensors: list[TensorInfo], wtype: int, f, progress) -> int:
    """Write the converted file to `f`; return the number of re-quantized tensors."""
    head = bytearray(mm[: _record_start(tensors[0])])  # magic, hparams, vocab: verbatim
    struct.pack_into("<i", head, _FTYPE_OFFSET, _std_ftype(_TARGET[wtype]))
    f.write(head)
    requantized = 0
    for i, t in enumerate(tensors, 1):
        f.write(_record_header(mm, t))
        try:
            for piece in _converted_data(mm, t):
                f.write(piece)
        except ValueError as e:
            raise ConvertError(src, f"cannot convert tensor '{t.name}': {e}") from None
        requantized += t.ggml_type == GGML_TYPE_Q4_2
        if progress is not None:
            progress(i, len(tensors))
    return requantized


def _expected_size(tensors: list[TensorInfo]) -> int:
    """Size of the converted file: the prefix, every record header and the standard-layout data."""
    total = _record_start(tensors[0])
    for t in tensors:
        qk, size = TYPE_BLOCK[_TARGET[t.ggml_type]]
        total += t.offset - _record_start(t) + t.n_elements // qk * size
    return total


@contextlib.contextmanager
def _mapped(path: Path) -> Iterator[mmap.mmap]:
    """The file memory-mapped read-only (closed on exit unless a traceback still holds a view of it)."""
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        yield mm
    finally:
        with contextlib.suppress(BufferError):  # then the garbage collector closes it
            mm.close()


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path`'s folder durable (best effort)."""
    with contextlib.suppress(OSError):
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def convert_legacy(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    progress: Callable[[int, int], None] | None = None,
    overwrite: bool = False,
) -> ConvertReport:
    """Rewrite a legacy GPT4All GGML GPT-J file as a standard one; raises ModelFileError (ConvertError)."""
    src, dst = Path(src), Path(dst)
    tensors, wtype = _legacy_source(src)
    _check_paths(src, dst, overwrite)
    part = Path(f"{dst}.part")
    try:
        with _mapped(src) as mm, open(part, "wb") as f:
            requantized = _write(src, mm, tensors, wtype, f, progress)
            f.flush()
            os.fsync(f.fileno())
            written = f.tell()
        if written != _expected_size(tensors):
            raise ConvertError(part, f"wrote {written:,} bytes, expected {_expected_size(tensors):,} (bug)")
        inspect_model(part)  # the result must be a valid standard file before it takes dst's name
        os.replace(part, dst)
    except BaseException as e:
        part.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise ConvertError(dst, f"conversion failed, nothing written: {e}") from e
        raise
    _fsync_dir(dst)
    return ConvertReport(src, dst, TYPE_NAMES[wtype], TYPE_NAMES[_TARGET[wtype]], len(tensors), written, requantized)


__all__ = ["ConvertError", "ConvertReport", "convert_command", "convert_legacy", "converted_path"]
