"""ggml-python 0.0.45 access: loaded without exporting its symbols, pointer return types fixed, helpers.

Import `ggml` through this module (`from .lib import ggml`), before anything else imports it.
ggml-python loads libggml-base/libggml-cpu with RTLD_GLOBAL; their `ggml_*` symbols then interpose on
the older ggml inside ctransformers' library in the same process (its calls land in the new ggml and
abort: "ggml_new_object: not enough space"). Loading them RTLD_LOCAL keeps the two apart.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from dataclasses import dataclass

log = logging.getLogger("ggml")


def _import_ggml_locally():
    """Import ggml-python with its shared libraries' symbols kept local to them."""
    if "ggml" in sys.modules:
        log.warning("ggml was imported before backends.batched: its symbols may be global and break "
                    "ctransformers in this process")
        return sys.modules["ggml"]
    saved = ctypes.RTLD_GLOBAL
    ctypes.RTLD_GLOBAL = ctypes.RTLD_LOCAL  # read by ggml-python's loader for its dependencies
    try:
        import ggml
    finally:
        ctypes.RTLD_GLOBAL = saved
    return ggml


ggml = _import_ggml_locally()

GGML_PYTHON_VERSION = "0.0.45"  # the pinned version this package is written against


def _check_version() -> None:
    """Warn when the installed ggml-python is not the pinned one (struct layouts and signatures move)."""
    from importlib import metadata

    try:
        found = metadata.version("ggml-python")
    except metadata.PackageNotFoundError:
        found = "unknown"
    if found != GGML_PYTHON_VERSION:
        log.warning("ggml-python %s is installed; backends.batched is written for %s", found, GGML_PYTHON_VERSION)


_check_version()
_EXTRA_BUFTS = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)


def _fix_pointer_restypes() -> list[str]:
    """Give c_void_p to functions ggml-python declares as returning a truncating int NewType."""
    fixed = []
    for name in dir(ggml):
        fn = getattr(ggml, name)
        if isinstance(fn, ctypes._CFuncPtr) and fn.restype is not None and not isinstance(fn.restype, type):
            fn.restype = ctypes.c_void_p
            fixed.append(name)
    return fixed


FIXED_RESTYPES = _fix_pointer_restypes()
_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR, 5: logging.DEBUG}


@ggml.ggml_log_callback
def _log_to_logging(level: int, text: bytes, _user) -> None:
    """ggml's messages (e.g. one per repacked tensor) go to the "ggml" logger, not stderr."""
    log.log(_LEVELS.get(level, logging.INFO), "%s", (text or b"").decode("utf-8", "replace").rstrip())


ggml.ggml_log_set(_log_to_logging, None)


def new_context(n_tensors: int) -> int:
    """A metadata-only ggml context (tensor data lives in backend buffers) for n_tensors tensors."""
    size = n_tensors * ggml.ggml_tensor_overhead() + ggml.ggml_graph_overhead_custom(max(n_tensors, 16), False)
    ctx = ggml.ggml_init(ggml.ggml_init_params(mem_size=size, mem_buffer=None, no_alloc=True))
    if not ctx:
        raise MemoryError(f"ggml_init failed for {size} bytes of metadata")
    return ctx


def cpu_backend(threads: int) -> int:
    """A CPU backend running graphs on `threads` threads."""
    backend = ggml.ggml_backend_cpu_init()
    if not backend:
        raise RuntimeError("ggml_backend_cpu_init failed")
    ggml.ggml_backend_cpu_set_n_threads(backend, max(1, int(threads)))
    return backend


def extra_buffer_types() -> dict[str, int]:
    """The CPU device's extra buffer types by name (e.g. CPU_REPACK), if the build has any."""
    reg = ggml.ggml_backend_cpu_reg()
    addr = ggml.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
    if not addr:
        return {}
    arr = _EXTRA_BUFTS(addr)(ggml.ggml_backend_reg_dev_get(reg, 0))
    out, i = {}, 0
    while arr and arr[i]:
        out[ggml.ggml_backend_buft_name(arr[i]).decode()] = arr[i]
        i += 1
    return out


@dataclass
class Buffer:
    """A backend buffer holding every tensor of one context."""

    handle: int
    buft_name: str
    nbytes: int


def alloc_context(ctx: int, buft: int) -> Buffer:
    """Allocate all tensors of `ctx` in one buffer of type `buft`."""
    handle = ggml.ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft)
    if not handle:
        raise MemoryError(f"could not allocate a {ggml.ggml_backend_buft_name(buft).decode()} buffer")
    return Buffer(handle, ggml.ggml_backend_buft_name(buft).decode(), ggml.ggml_backend_buffer_get_size(handle))


def tensor_set(tensor, address: int) -> None:
    """Copy ggml_nbytes(tensor) bytes from `address` into a tensor via its buffer (repacks if needed)."""
    ggml.ggml_backend_tensor_set(tensor, ctypes.c_void_p(address), 0, ggml.ggml_nbytes(tensor))


def tensor_extra(tensor) -> int:
    """The tensor's `extra` pointer (the repack traits in a CPU_REPACK buffer; 0 when not repacked)."""
    return tensor.contents.extra or 0
