"""Independent, reproducible random streams derived from ``training.seed``."""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, stream: str) -> int:
    """A 63-bit seed for ``stream``, a pure function of ``(seed, stream)``."""
    digest = hashlib.sha256(f"loraengine:{seed}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_generator(seed: int, stream: str) -> torch.Generator:
    """A CPU generator for ``stream``. Random draws happen on the CPU and are moved to
    the compute device, so a seed gives the same numbers on every device."""
    g = torch.Generator(device="cpu")
    g.manual_seed(derive_seed(seed, stream))
    return g
