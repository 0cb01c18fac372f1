"""BOFT (butterfly orthogonal fine-tuning): the output rows of the weight pass through
m stages of block-diagonal Cayley rotations, each stage pairing rows further apart,
like the butterfly of an FFT. The product is orthogonal and can mix every row with
every other while each block stays small.

Layout (LyCORIS and ComfyUI): the output size is b·2ᵖ with an even block size b;
``oft_blocks`` is ``[m, 2ᵖ, b, b]`` with m ≤ p+1 stages. Stage i views the rows in
groups of 2ⁱ·b, interleaves each group's two halves (row j of the first half next to
row j of the second) and applies the rotations to consecutive runs of b rows, then
undoes the interleave. Keys: ``oft_blocks``, ``alpha`` (the norm constraint, in
ComfyUI's reading as for OFT) and optional ``rescale``.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from loraengine.core.errors import ConfigError
from loraengine.core.plugins.specs import AdapterSpec, PluginOptions
from loraengine.plugins.adapters.oft import (
    ChannelMapLayer,
    _read_rescale,
    _warn_alpha,
    blocks_with_rank,
    cayley,
    constraint_metadata,
    fill_saved,
)


class BOFTOptions(PluginOptions):
    block_size: int | None = Field(
        None, ge=2, description="Largest block size to use: the largest even b not above "
        "it with output size / b a power of two. Default: adapter.rank (as LyCORIS).")
    stages: int | None = Field(
        None, ge=1, description="Butterfly stages m (capped at log2(blocks)+1, which "
        "also is the default: every row can reach every other). LyCORIS only reloads "
        "files with the full stage count.")
    constraint: float = Field(
        0.0, ge=0, description="Bound on the Frobenius norm of Q over all blocks and "
        "stages of a layer (0: off); saved as alpha in ComfyUI's reading.")
    rescaled: bool = Field(False, description="Also train a per-output-row scale.")


def power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def butterfly_split(dim: int, limit: int) -> tuple[int, int] | None:
    """``(b, n)``: the largest even ``b ≤ limit`` with ``dim = b·n``, n a power of two."""
    for b in range(min(limit, dim) // 2 * 2, 1, -2):
        if dim % b == 0 and power_of_two(dim // b):
            return b, dim // b
    return None


def max_stages(block_count: int) -> int:
    return block_count.bit_length()  # log2(n) + 1 for a power of two n


class BOFTLayer(ChannelMapLayer):
    """Butterfly product of block rotations on the output rows."""

    algorithm = "boft"

    def __init__(self, base: nn.Module, block_size: int, stages: int,
                 constraint: float = 0.0, rescaled: bool = False):
        out_dim = int(base.weight.shape[0])
        if block_size % 2 or out_dim % block_size or not power_of_two(out_dim // block_size):
            raise ValueError(f"BOFT block size {block_size} does not fit output size "
                             f"{out_dim} (need an even size with a power-of-two count)")
        count = out_dim // block_size
        if not 1 <= stages <= max_stages(count):
            raise ValueError(f"BOFT with {count} blocks has 1 to {max_stages(count)} "
                             f"stages, not {stages}")
        super().__init__(base, block_size, constraint, rescaled)
        self.oft_blocks = nn.Parameter(torch.zeros(stages, count, block_size, block_size,
                                                   dtype=torch.float32))

    def channel_map(self, t: torch.Tensor) -> torch.Tensor:
        r = cayley(self.oft_blocks, self.constraint).to(t.dtype)
        stages, count, b, _ = r.shape
        half = b // 2
        for i in range(stages):
            span = half << i  # rows in half a group at this stage
            # (..., groups, 2, span) -> (..., groups, span, 2): pair row j with row j+span
            t = t.unflatten(-1, (-1, 2, span)).transpose(-1, -2).flatten(-3)
            t = torch.einsum("kij,...kj->...ki", r[i], t.unflatten(-1, (count, b)))
            t = t.flatten(-2).unflatten(-1, (-1, span, 2)).transpose(-1, -2).flatten(-3)
        return t


def _shape_for(out_dim: int, rank: int, options: Any) -> tuple[int, int, int]:
    limit = getattr(options, "block_size", None) or rank
    split = butterfly_split(out_dim, limit)
    if split is None:
        nearest = next((b for b in range(2, out_dim + 1, 2)
                        if out_dim % b == 0 and power_of_two(out_dim // b)), None)
        hint = (f"; the smallest block size that fits is {nearest} (adapter.block_size)"
                if nearest else "; exclude this layer with adapter.exclude")
        raise ConfigError(f"adapter: BOFT cannot split output size {out_dim} into even "
                          f"blocks of at most {limit} with a power-of-two count{hint}")
    b, n = split
    stages = getattr(options, "stages", None) or max_stages(n)
    return b, n, min(stages, max_stages(n))


def create(base: nn.Module, rank: int, alpha: float, options: Any,
           generator: torch.Generator | None) -> BOFTLayer:
    _warn_alpha(options, "boft")
    b, _, stages = _shape_for(int(base.weight.shape[0]), rank, options)
    return BOFTLayer(base, b, stages, float(getattr(options, "constraint", 0.0) or 0.0),
                     bool(getattr(options, "rescaled", False)))


def load(base: nn.Module, tensors: dict[str, torch.Tensor], options: Any) -> BOFTLayer:
    blocks = tensors["oft_blocks"]
    if blocks.ndim != 4:
        hint = " (an OFT file: use adapter.algorithm: oft)" if blocks.ndim == 3 else ""
        raise ValueError(f"oft_blocks has shape {list(blocks.shape)}, BOFT needs "
                         f"[stages, blocks, size, size]{hint}")
    stages, n, b, b2 = blocks.shape
    out_dim = int(base.weight.shape[0])
    if b != b2 or n * b != out_dim:
        raise ValueError(f"oft_blocks {list(blocks.shape)} does not fit a layer with "
                         f"{out_dim} output channels")
    constraint = float(tensors["alpha"]) if "alpha" in tensors else 0.0
    rescale = _read_rescale(tensors, out_dim)
    layer = BOFTLayer(base, b, stages, max(constraint, 0.0), rescaled=rescale is not None)
    return fill_saved(layer, blocks, rescale)


owns_keys = blocks_with_rank(4)


SPEC = AdapterSpec(
    name="boft", create=create, load=load, owns_keys=owns_keys, config_model=BOFTOptions,
    network_module="lycoris.kohya", file_metadata=constraint_metadata,
    description="Butterfly OFT: stages of block rotations that mix all output rows.")
