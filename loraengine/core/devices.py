"""Devices and dtypes by the names configs and commands use for them."""

from __future__ import annotations

from typing import Any

import torch

from loraengine.core.errors import ConfigError, LoraEngineError

#: The dtype names a config or a command accepts.
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16,
                                  "bf16": torch.bfloat16}
#: safetensors' dtype codes for the same floating types.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {"F32": torch.float32, "F16": torch.float16,
                                              "BF16": torch.bfloat16}


def resolve_device(name: str, *, key: str = "training.device",
                   error: type[LoraEngineError] = ConfigError, probe: bool = True,
                   allow_meta: bool = True) -> torch.device:
    """The device ``name`` means (``auto``: CUDA when available, else the CPU).

    With ``probe`` the device must also be usable here (CUDA present, a tensor can be
    made on it), and ``meta`` (which holds no values) only with ``allow_meta``; errors
    name ``key`` and are raised as ``error``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise error(f"{key}: unknown device {name!r}") from None
    if not probe:
        return dev
    if dev.type == "meta" and not allow_meta:
        raise error(f"{key}: 'meta' holds no values to compute on")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise error(f"{key}: {name!r} requested but CUDA is not available")
    if dev.type != "meta":
        try:
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else "unavailable"
            if len(first) > 160:  # torch's dispatcher lists every backend it knows
                first = first[:first.find(". ") + 1 or 160].rstrip() + " ..."
            raise error(f"{key}: {name!r} is not usable here: {first}") from None
    return dev


#: glibc's mallopt parameters: the size from which allocations get their own mapping,
#: and how much free memory at the top of the heap it keeps before giving it back
_M_MMAP_THRESHOLD = -3
_M_TRIM_THRESHOLD = -1
#: ``training.host_memory: return``: allocations of this many bytes and more are
#: returned to the system when freed
HOST_MMAP_THRESHOLD = 64 * 1024
#: ``reuse`` after ``return`` in one process: where glibc's own adaptive thresholds end
#: up once a large block has been freed (mapping from 32 MiB, trimming above twice that)
REUSE_MMAP_THRESHOLD = 32 * 1024 * 1024
REUSE_TRIM_THRESHOLD = 2 * REUSE_MMAP_THRESHOLD
#: glibc's own trim threshold before it adapts (128 KiB)
DEFAULT_TRIM_THRESHOLD = 128 * 1024
#: the mode this process's allocator was last set to here (None: as the C library began)
_host_mode: str | None = None


def _mallopt() -> Any:
    """glibc's ``mallopt``, or None where the C library has none (or the user set the
    threshold in the environment: their choice stands)."""
    import ctypes
    import os

    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return None
    try:
        return ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None


def return_freed_host_memory() -> bool:
    """Have glibc's allocator give freed tensors of 64 KiB and more back to the system
    (``training.host_memory: return``).

    By default glibc raises the size from which an allocation gets its own memory
    mapping to that of the largest one freed so far (up to 32 MiB), so a training
    step's activations soon all come from the heap, where the holes they leave when
    freed stay part of the process: at SD1.5 size on the CPU that was 1.4 GB above the
    live tensors' peak. A fixed threshold keeps the process's memory at what its live
    tensors need, at a price: every such allocation is a fresh mapping whose pages
    fault in again (about 80,000 faults per step on the tiny Flux benchmark, half of
    the step's CPU time). Nothing is changed when ``MALLOC_MMAP_THRESHOLD_`` is set (the
    user chose) or the C library has no ``mallopt``. True when the setting is in force."""
    global _host_mode
    if _host_mode == "return":
        return True
    mallopt = _mallopt()
    if mallopt is None:
        return False
    # after reuse, the heap's top is trimmed from glibc's default size again
    trim = (mallopt(_M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD) if _host_mode == "reuse"
            else True)
    if mallopt(_M_MMAP_THRESHOLD, HOST_MMAP_THRESHOLD) and trim:
        _host_mode = "return"
    return _host_mode == "return"


def reuse_freed_host_memory() -> bool:
    """``training.host_memory: reuse`` (the default): freed memory stays in the process
    for the next tensors, as glibc's allocator does on its own. Nothing to do unless
    ``return_freed_host_memory`` ran earlier in this process; then the thresholds are
    set to where glibc's own adaptive ones settle (its adaptation cannot be switched
    back on). True when reuse is in force."""
    global _host_mode
    if _host_mode != "return":
        return True
    mallopt = _mallopt()
    if mallopt is None:
        return False
    if mallopt(_M_MMAP_THRESHOLD, REUSE_MMAP_THRESHOLD) and mallopt(
            _M_TRIM_THRESHOLD, REUSE_TRIM_THRESHOLD):
        _host_mode = "reuse"
    return _host_mode == "reuse"


def set_host_memory(mode: str) -> bool:
    """Apply ``training.host_memory`` (``reuse`` or ``return``) to the C allocator of
    this process, for training on the CPU. True when the mode is in force."""
    return return_freed_host_memory() if mode == "return" else reuse_freed_host_memory()
