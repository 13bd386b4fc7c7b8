"""GPT-J weights from a GGML file, copied once into ggml CPU buffers (repacked where ggml can)."""

from __future__ import annotations

import mmap
import time
from dataclasses import dataclass, field

import numpy as np

from backends.ggml.reader import ModelInfo, TensorInfo, read_vocab, scan_model

from . import lib
from .lib import ggml

_LAYER_NAMES = ("ln_1.weight", "ln_1.bias", "attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight",
                "attn.out_proj.weight", "mlp.fc_in.weight", "mlp.fc_in.bias", "mlp.fc_out.weight",
                "mlp.fc_out.bias")
_NOT_MATMUL = {"transformer.wte.weight"}  # read with get_rows: must keep the plain layout


@dataclass
class LoadReport:
    """What loading cost and where the weights went."""

    seconds_total: float
    seconds_copy: float  # copying every tensor (the repack included)
    bytes_repacked: int
    bytes_plain: int
    repacked: list[str] = field(default_factory=list)
    buffer_types: dict[str, int] = field(default_factory=dict)
    seconds_repack: float = 0.0  # copying the repacked tensors: ggml rearranges their blocks as they go in

    def describe(self) -> str:
        """One line for a log: sizes and times of the whole load, the repack and the plain copy."""
        total = (self.bytes_repacked + self.bytes_plain) / 2**20
        return (f"weights {total:,.1f} MiB loaded in {self.seconds_total:.2f} s: "
                f"{self.bytes_repacked / 2**20:,.1f} MiB repacked in {self.seconds_repack:.2f} s "
                f"({len(self.repacked)} tensors), {self.bytes_plain / 2**20:,.1f} MiB copied plain in "
                f"{self.seconds_copy - self.seconds_repack:.2f} s")


@dataclass
class Layer:
    """One transformer block's tensors (ggml tensor pointers)."""

    ln_w: object
    ln_b: object
    wq: object
    wk: object
    wv: object
    wo: object
    fc_in_w: object
    fc_in_b: object
    fc_out_w: object
    fc_out_b: object


@dataclass
class Weights:
    """A loaded GPT-J model: hyperparameters, vocabulary and ggml tensors in CPU buffers."""

    info: ModelInfo
    vocab: list[bytes]
    wte: object
    layers: list[Layer]
    ln_f_w: object
    ln_f_b: object
    lm_head_w: object
    lm_head_b: object
    report: LoadReport
    _ctxs: list[int]
    _buffers: list[lib.Buffer]

    def free(self) -> None:
        """Release the buffers and contexts (the tensors become invalid)."""
        for buf in self._buffers:
            ggml.ggml_backend_buffer_free(buf.handle)
        for ctx in self._ctxs:
            ggml.ggml_free(ctx)
        self._buffers, self._ctxs = [], []


_PROBES: dict[tuple[int, int, int], bool] = {}


def repackable(buft: int, ggml_type: int, row_len: int, rows: int) -> bool:
    """Whether ggml would repack such a matrix (probed once per shape on an untouched allocation)."""
    key = (ggml_type, row_len, rows)
    if key not in _PROBES:
        ctx = lib.new_context(1)
        try:
            t = ggml.ggml_new_tensor_2d(ctx, ggml_type, row_len, rows)
            buf = lib.alloc_context(ctx, buft)
            _PROBES[key] = bool(lib.tensor_extra(t))
            ggml.ggml_backend_buffer_free(buf.handle)
        finally:
            ggml.ggml_free(ctx)
    return _PROBES[key]


def _new_tensor(ctx: int, t: TensorInfo):
    dims = tuple(reversed(t.shape))  # ggml order: row length first
    if len(dims) == 1:
        out = ggml.ggml_new_tensor_1d(ctx, t.ggml_type, dims[0])
    else:
        out = ggml.ggml_new_tensor_2d(ctx, t.ggml_type, dims[0], dims[1])
    ggml.ggml_set_name(out, t.name.encode())
    return out


def load_weights(path: str, *, repack: bool = True) -> Weights:
    """Read a standard GGML GPT-J file and copy every tensor once into ggml CPU buffers."""
    t0 = time.perf_counter()
    info, records, _legacy = scan_model(path)
    vocab = read_vocab(path)
    extra = lib.extra_buffer_types() if repack else {}
    repack_buft = extra.get("CPU_REPACK")
    plain_buft = ggml.ggml_backend_cpu_buffer_type()

    def goes_repacked(t: TensorInfo) -> bool:
        return (repack_buft is not None and len(t.shape) == 2 and t.name not in _NOT_MATMUL
                and repackable(repack_buft, t.ggml_type, t.shape[1], t.shape[0]))

    groups = {"repack": [t for t in records if goes_repacked(t)]}
    groups["plain"] = [t for t in records if not goes_repacked(t)]
    tensors, ctxs, buffers = {}, [], []
    try:
        for kind, recs in groups.items():
            if not recs:
                continue
            ctx = lib.new_context(len(recs))
            ctxs.append(ctx)
            for t in recs:
                tensors[t.name] = _new_tensor(ctx, t)
            buffers.append(lib.alloc_context(ctx, repack_buft if kind == "repack" else plain_buft))
        t1 = time.perf_counter()
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            base = np.frombuffer(mm, dtype=np.uint8)
            addr = base.ctypes.data
            for t in groups["repack"]:
                lib.tensor_set(tensors[t.name], addr + t.offset)
            t_repack = time.perf_counter()
            for t in groups["plain"]:
                lib.tensor_set(tensors[t.name], addr + t.offset)
            del base
        t2 = time.perf_counter()
    except BaseException:
        for buf in buffers:
            ggml.ggml_backend_buffer_free(buf.handle)
        for ctx in ctxs:
            ggml.ggml_free(ctx)
        raise
    report = LoadReport(
        seconds_total=time.perf_counter() - t0, seconds_copy=t2 - t1, seconds_repack=t_repack - t1,
        bytes_repacked=sum(t.nbytes for t in groups["repack"]),
        bytes_plain=sum(t.nbytes for t in groups["plain"]),
        repacked=[t.name for t in groups["repack"]],
        buffer_types={b.buft_name: b.nbytes for b in buffers},
    )
    layers = [Layer(*(tensors[f"transformer.h.{i}.{n}"] for n in _LAYER_NAMES)) for i in range(info.n_layer)]
    return Weights(info, vocab, tensors["transformer.wte.weight"], layers, tensors["transformer.ln_f.weight"],
                   tensors["transformer.ln_f.bias"], tensors["lm_head.weight"], tensors["lm_head.bias"],
                   report, ctxs, buffers)
