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
