"""Devices and dtypes by the names configs and commands use for them."""

from __future__ import annotations

import torch

from loraengine.core.errors import ConfigError, LoraEngineError

#: The dtype names a config or a command accepts.
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16,
                                  "bf16": torch.bfloat16}
#: safetensors' dtype codes for the same floating types.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {"F32": torch.float32, "F16": torch.float16,
                                              "BF16": torch.bfloat16}


def resolve_device(name: str, *, key: str = "training.device",
                   error: type[LoraEngineError] = ConfigError, probe: bool = True
                   ) -> torch.device:
    """The device ``name`` means (``auto``: CUDA when available, else the CPU).

    With ``probe`` the device must also be usable here (CUDA present, a tensor can be
    made on it); errors name ``key`` and are raised as ``error``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise error(f"{key}: unknown device {name!r}") from None
    if not probe:
        return dev
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise error(f"{key}: {name!r} requested but CUDA is not available")
    if dev.type != "meta":
        try:
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError) as exc:
            raise error(f"{key}: {name!r} is not usable here: "
                        f"{str(exc).splitlines()[0] if str(exc) else 'unavailable'}"
                        ) from None
    return dev


#: glibc's mallopt parameter for the size from which allocations get their own mapping
_M_MMAP_THRESHOLD = -3
#: allocations of this many bytes and more are returned to the system when freed
HOST_MMAP_THRESHOLD = 64 * 1024
_host_allocator_set = False


def return_freed_host_memory() -> bool:
    """Have glibc's allocator give freed tensors of 64 KiB and more back to the system.

    By default glibc raises the size from which an allocation gets its own memory
    mapping to that of the largest one freed so far (up to 32 MiB), so a training
    step's activations soon all come from the heap, where the holes they leave when
    freed stay part of the process: at SD1.5 size on the CPU that was 1.4 GB above the
    live tensors' peak. A fixed threshold keeps the process's memory at what its live
    tensors need. Nothing is changed when ``MALLOC_MMAP_THRESHOLD_`` is set (the user
    chose) or the C library has no ``mallopt``. True when the setting is in force."""
    global _host_allocator_set
    import ctypes
    import os

    if _host_allocator_set:
        return True
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    _host_allocator_set = bool(mallopt(_M_MMAP_THRESHOLD, HOST_MMAP_THRESHOLD))
    return _host_allocator_set
