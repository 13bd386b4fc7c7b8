"""Reads and validates GGML GPT-J files (the container ctransformers' `gptj` loader reads).

`inspect_model` reads only the header, the vocab and the tensor record headers (it seeks over the
data), so it is cheap even for multi-GB files, and it rejects every file that ctransformers would
crash on, load with garbage, or refuse with an unhelpful message.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .constants import (
    EOS_TOKEN,
    FTYPE_NAMES,
    FTYPE_TO_GGML_TYPE,
    GGML_MAGIC,
    GGML_TYPE_F32,
    HPARAM_NAMES,
    LEGACY_FTYPE_NAMES,
    LEGACY_FTYPE_TO_GGML_TYPE,
    LEGACY_TYPE_BLOCK,
    OTHER_FTYPE_NAMES,
    OTHER_MAGICS,
    QNT_VERSION,
    QNT_VERSION_FACTOR,
    TYPE_BLOCK,
    TYPE_NAMES,
    gptj_tensor_shapes,
)
from .errors import CONVERT_HINT, LegacyModelFileError, ModelFileError, convert_command, converted_path
from .quants import dequantize, dequantize_legacy

_VOCAB_OFFSET = 32  # magic + 7 hparams; the vocab count follows
_MAX_TOKEN_LEN = 1 << 16
_HPARAM_LIMITS = {"n_vocab": 1 << 24, "n_ctx": 1 << 24, "n_embd": 1 << 17, "n_head": 1 << 12, "n_layer": 1 << 12}
_MAX_NAME_LEN = 1024
_LAYER_RE = re.compile(r"transformer\.h\.(\d+)\.")
@dataclass
class TensorInfo:
    """One tensor record: numpy shape (rows, row_len) or (n,), ggml type, data offset and size."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    nbytes: int

    @property
    def n_elements(self) -> int:
        """Number of weights."""
        return int(np.prod(self.shape))


@dataclass
class ModelInfo:
    """What `inspect_model` learned about a valid GGML GPT-J file."""

    path: str
    architecture: str
    n_vocab: int
    n_ctx: int
    n_embd: int
    n_head: int
    n_layer: int
    n_rot: int
    ftype: str
    ftype_code: int
    quant_version: int
    n_tensors: int
    n_params: int
    file_size: int
    eos_token_id: int | None

    def describe(self) -> str:
        """Multi-line human-readable summary (for a CLI)."""
        eos = "none" if self.eos_token_id is None else str(self.eos_token_id)
        return "\n".join(
            [
                f"file:          {self.path}",
                f"size:          {self.file_size:,} bytes ({self.file_size / 2**20:.1f} MiB)",
                f"architecture:  {self.architecture} (GGML container, magic 0x{GGML_MAGIC:08x})",
                f"weights:       {self.ftype} (header ftype {self.ftype_code}, quantization version "
                f"{self.quant_version})",
                f"parameters:    {self.n_params:,} in {self.n_tensors} tensors",
                f"vocabulary:    {self.n_vocab} tokens, end-of-text id {eos}",
                f"context:       {self.n_ctx} tokens",
                f"dimensions:    n_embd {self.n_embd}, n_head {self.n_head} (head dim "
                f"{self.n_embd // self.n_head}), n_layer {self.n_layer}, n_rot {self.n_rot}",
            ]
        )


class _Bad(Exception):
    """Internal: a problem found while parsing (becomes a ModelFileError)."""


def _open(path: str | os.PathLike) -> tuple[Path, int]:
    p = Path(path)
    if not p.exists():
        raise ModelFileError(p, "no such file")
    if not p.is_file():
        raise ModelFileError(p, "not a regular file")
    return p, p.stat().st_size


def _map(p: Path, size: int):
    """Context manager: the file mapped read-only (b"" when empty)."""
    if size == 0:
        return contextlib.nullcontext(b"")
    with open(p, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _header(mm, size: int) -> dict[str, int]:
    if size < 4:
        raise _Bad(f"file is only {size} bytes long: not a GGML model")
    (magic,) = struct.unpack_from("<I", mm, 0)
    if magic != GGML_MAGIC:
        head = bytes(mm[:4])
        if magic in OTHER_MAGICS:
            what = f"a {OTHER_MAGICS[magic]} file"
        elif head.startswith(b"PK"):
            what = "a zip archive (a PyTorch checkpoint?)"
        else:
            what = "not a GGML file"
        raise _Bad(
            f"bad magic {head!r} (0x{magic:08x}): {what}; expected the unversioned GGML container "
            f"(magic 0x{GGML_MAGIC:08x}, 'lmgg' on disk) of a GPT-J model"
        )
    if size < _VOCAB_OFFSET:
        raise _Bad(f"file is truncated inside the header ({size} bytes)")
    return dict(zip(HPARAM_NAMES, struct.unpack_from("<7i", mm, 4)))


def _check_hparams(hp: dict[str, int]) -> None:
    for key in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"):
        if hp[key] <= 0:
            raise _Bad(f"invalid hyperparameter {key}={hp[key]} (must be positive)")
    for key, limit in _HPARAM_LIMITS.items():
        if hp[key] > limit:
            raise _Bad(f"implausible hyperparameter {key}={hp[key]} (more than {limit}; corrupt header?)")
    if hp["n_embd"] % hp["n_head"]:
        raise _Bad(f"n_head {hp['n_head']} does not divide n_embd {hp['n_embd']}")
    head_dim = hp["n_embd"] // hp["n_head"]
    if not 0 <= hp["n_rot"] <= head_dim:
        raise _Bad(f"n_rot {hp['n_rot']} is outside [0, {head_dim}] (the head dimension n_embd/n_head)")


def _ftype(raw: int) -> tuple[str, int, int, bool]:
    """Header ftype -> (name, weight ggml type, quantization version, legacy?)."""
    qver, base = divmod(raw, QNT_VERSION_FACTOR) if raw >= 0 else (0, raw)
    supported = ", ".join(f"{n} ({c})" for c, n in FTYPE_NAMES.items())
    if base in (0, 1) and 0 <= qver <= QNT_VERSION:
        return FTYPE_NAMES[base], FTYPE_TO_GGML_TYPE[base], qver, False
    if base in FTYPE_TO_GGML_TYPE and qver == QNT_VERSION:
        return FTYPE_NAMES[base], FTYPE_TO_GGML_TYPE[base], qver, False
    if base in LEGACY_FTYPE_TO_GGML_TYPE and qver == 0:
        return LEGACY_FTYPE_NAMES[base], LEGACY_FTYPE_TO_GGML_TYPE[base], 0, True
    if base in FTYPE_TO_GGML_TYPE and qver == 1:
        raise _Bad(
            f"header ftype {raw} is {FTYPE_NAMES[base]} in quantization version 1 (ggml of mid-May 2023, "
            "f32 scales), which ctransformers 0.2.27 cannot read; re-quantize from f16"
        )
    if base in OTHER_FTYPE_NAMES and qver in (0, QNT_VERSION):
        raise _Bad(f"ftype {raw} ({OTHER_FTYPE_NAMES[base]}) is not supported; supported: {supported}")
    raise _Bad(f"unknown ftype {raw} in the header; supported (+{QNT_VERSION_FACTOR * QNT_VERSION} "
               f"when quantized): {supported}")


def _vocab(mm, off: int, size: int, n_vocab: int, keep: bool) -> tuple[int, int | None, list[bytes]]:
    """Walk the vocab: (end offset, EOS id or None, tokens if keep)."""
    if off + 4 > size:
        raise _Bad("file is truncated before the vocabulary")
    (count,) = struct.unpack_from("<i", mm, off)
    if count != n_vocab:
        raise _Bad(f"vocabulary has {count} tokens but the header says n_vocab={n_vocab}")
    off += 4
    eos, tokens, unpack = None, [], struct.Struct("<I").unpack_from
    n_eos = len(EOS_TOKEN)
    for i in range(count):
        if off + 4 > size:
            raise _Bad(f"file is truncated inside the vocabulary (token {i} of {count})")
        (length,) = unpack(mm, off)
        off += 4
        if length > _MAX_TOKEN_LEN:
            raise _Bad(f"vocabulary token {i} has an impossible length {length} (corrupt file)")
        if off + length > size:
            raise _Bad(f"file is truncated inside the vocabulary (token {i} of {count})")
        if keep:
            tokens.append(bytes(mm[off : off + length]))
        if length == n_eos and eos is None and mm[off : off + length] == EOS_TOKEN:
            eos = i
        off += length
    return off, eos, tokens


def _walk(mm, off: int, size: int, hp: dict[str, int], wtype: int, blocks: dict) -> list[TensorInfo]:
    """Read every tensor record header from `off`, checking it against the GPT-J layout."""
    expected = gptj_tensor_shapes(hp["n_vocab"], hp["n_embd"], hp["n_layer"])
    wname = TYPE_NAMES.get(wtype, str(wtype))
    seen: dict[str, TensorInfo] = {}
    while off < size:
        if len(seen) == len(expected):
            raise _Bad(f"{size - off} trailing bytes after the last tensor (at offset {off})")
        if size - off < 12:
            raise _Bad(f"file is truncated: {size - off} stray bytes at offset {off} where a tensor record starts")
        n_dims, name_len, ttype = struct.unpack_from("<3i", mm, off)
        if n_dims not in (1, 2) or not 0 < name_len <= _MAX_NAME_LEN:
            raise _Bad(
                f"corrupt tensor record at offset {off} (n_dims={n_dims}, name length={name_len}) "
                f"after {len(seen)} tensors"
            )
        name_off = off + 12 + 4 * n_dims
        if name_off + name_len > size:
            raise _Bad(f"file is truncated inside the tensor record at offset {off}")
        dims = struct.unpack_from(f"<{n_dims}i", mm, off + 12)
        name = bytes(mm[name_off : name_off + name_len]).decode("utf-8", "replace")
        if name not in expected:
            m = _LAYER_RE.match(name)
            hint = ""
            if m and int(m.group(1)) >= hp["n_layer"]:
                hint = f" (layer {m.group(1)}, but the header says n_layer={hp['n_layer']})"
            raise _Bad(f"unexpected tensor '{name}' at offset {off}{hint}")
        if name in seen:
            raise _Bad(f"duplicate tensor '{name}' at offset {off}")
        shape = tuple(reversed(dims))
        if shape != expected[name]:
            raise _Bad(
                f"tensor '{name}' has shape {list(shape)}, expected {list(expected[name])} for n_vocab="
                f"{hp['n_vocab']}, n_embd={hp['n_embd']}"
            )
        want = wtype if n_dims == 2 else GGML_TYPE_F32
        if ttype != want:
            got = TYPE_NAMES.get(ttype, f"unknown type {ttype}")
            raise _Bad(
                f"tensor '{name}' is stored as {got}, expected {TYPE_NAMES[want]} (2-D tensors use the "
                f"file's weight type {wname}, 1-D tensors f32)"
            )
        qk, bsize = blocks[ttype]
        if dims[0] % qk:
            raise _Bad(f"tensor '{name}' rows of {dims[0]} weights are not a multiple of the {wname} block ({qk})")
        nbytes = int(np.prod(shape, dtype=np.int64)) // qk * bsize
        data_off = name_off + name_len
        if data_off + nbytes > size:
            raise _Bad(
                f"file is truncated: tensor '{name}' needs {nbytes:,} bytes at offset {data_off:,} but the "
                f"file ends at {size:,} ({data_off + nbytes - size:,} bytes missing)"
            )
        seen[name] = TensorInfo(name, shape, ttype, data_off, nbytes)
        off = data_off + nbytes
    missing = [n for n in expected if n not in seen]
    if missing:
        shown = ", ".join(f"'{n}'" for n in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise _Bad(f"missing {len(missing)} of {len(expected)} tensors (file truncated?): {shown}")
    return list(seen.values())


def _legacy_message(p: Path, hp: dict[str, int], name: str, damage: str | None = None) -> str:
    what = (
        f"this is GPT4All's legacy pre-May-2023 GGML layout (header ftype {hp['ftype']} = {name} without a "
        "quantization version, old block layout), which ctransformers 0.2.27 cannot load: "
    )
    if damage is None:
        return what + CONVERT_HINT.format(command=convert_command(p))
    return f"{what}it needs a one-time conversion, but the file looks damaged ({damage}): download it again"


def _scan(path, allow_legacy: bool = False) -> tuple[ModelInfo, list[TensorInfo], bool]:
    """Parse and validate a file: (info, tensor records, legacy layout?)."""
    p, size = _open(path)
    with _map(p, size) as mm:
        try:
            hp = _header(mm, size)
            _check_hparams(hp)
            name, wtype, qver, legacy = _ftype(hp["ftype"])
            off, eos, _ = _vocab(mm, _VOCAB_OFFSET, size, hp["n_vocab"], False)
            if not legacy:
                tensors = _walk(mm, off, size, hp, wtype, TYPE_BLOCK)
            else:
                try:
                    tensors = _walk(mm, off, size, hp, wtype, LEGACY_TYPE_BLOCK)
                except _Bad as legacy_err:
                    try:
                        _walk(mm, off, size, hp, wtype, TYPE_BLOCK)
                    except _Bad:
                        err = LegacyModelFileError(p, _legacy_message(p, hp, name, str(legacy_err)))
                        err.damage = str(legacy_err)
                        raise err from None
                    raise _Bad(
                        f"header ftype {hp['ftype']} lacks the quantization version (expected "
                        f"{hp['ftype'] + QNT_VERSION * QNT_VERSION_FACTOR}) although the blocks use the "
                        "current layout"
                    ) from None
                if not allow_legacy:
                    raise LegacyModelFileError(p, _legacy_message(p, hp, name))
        except _Bad as e:
            raise ModelFileError(p, str(e)) from None
    info = ModelInfo(
        path=str(p),
        architecture="gptj",
        **{k: hp[k] for k in HPARAM_NAMES[:-1]},
        ftype=name,
        ftype_code=hp["ftype"],
        quant_version=qver,
        n_tensors=len(tensors),
        n_params=sum(t.n_elements for t in tensors),
        file_size=size,
        eos_token_id=eos,
    )
    return info, tensors, legacy


def scan_model(path: str | os.PathLike, *, allow_legacy: bool = False) -> tuple[ModelInfo, list[TensorInfo], bool]:
    """Parse and validate a file: (info, tensor records, whether it is in the legacy layout)."""
    return _scan(path, allow_legacy)


def inspect_model(path: str | os.PathLike) -> ModelInfo:
    """Validate a GGML GPT-J file (headers only) and describe it; raises ModelFileError."""
    return _scan(path)[0]


def list_tensors(path: str | os.PathLike, *, allow_legacy: bool = False) -> list[TensorInfo]:
    """Validate a file and list its tensor records in file order."""
    return _scan(path, allow_legacy)[1]


def read_hparams(path: str | os.PathLike) -> dict[str, int]:
    """The 7 header integers (n_vocab, n_ctx, n_embd, n_head, n_layer, n_rot, raw ftype); checks magic only."""
    p, size = _open(path)
    with open(p, "rb") as f:
        head = f.read(_VOCAB_OFFSET)
    try:
        return _header(head, len(head))
    except _Bad as e:
        raise ModelFileError(p, str(e)) from None


def read_vocab(path: str | os.PathLike) -> list[bytes]:
    """The vocabulary as raw token bytes (id order); checks magic only, so legacy files work too."""
    p, size = _open(path)
    with _map(p, size) as mm:
        try:
            return _vocab(mm, _VOCAB_OFFSET, size, _header(mm, size)["n_vocab"], True)[2]
        except _Bad as e:
            raise ModelFileError(p, str(e)) from None


def read_tensors(path: str | os.PathLike, *, allow_legacy: bool = False) -> dict[str, np.ndarray]:
    """All tensors dequantized to float32, numpy shape = reversed ggml dims, in file order."""
    _, tensors, legacy = _scan(path, allow_legacy)
    decode = dequantize_legacy if legacy else dequantize
    out = {}
    with open(path, "rb") as f:
        for t in tensors:
            f.seek(t.offset)
            out[t.name] = decode(f.read(t.nbytes), t.ggml_type, t.n_elements).reshape(t.shape)
    return out


__all__ = [
    "CONVERT_HINT",
    "LegacyModelFileError",
    "ModelFileError",
    "ModelInfo",
    "TensorInfo",
    "convert_command",
    "converted_path",
    "inspect_model",
    "list_tensors",
    "read_hparams",
    "read_tensors",
    "read_vocab",
    "scan_model",
]
