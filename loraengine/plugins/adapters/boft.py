"""BOFT (butterfly orthogonal fine-tuning): the output rows of the weight pass through
m stages of block-diagonal Cayley rotations, each stage pairing rows further apart,
like the butterfly of an FFT. The product is orthogonal and can mix every row with
every other while each block stays small.

Layout (LyCORIS and ComfyUI): the output size is b·2ᵖ with an even block size b;
``oft_blocks`` is ``[m, 2ᵖ, b, b]`` with m ≤ p+1 stages. Stage i views the rows in
groups of 2ⁱ·b, interleaves each group's two halves (row j of the first half next to
row j of the second) and applies the rotations to consecutive runs of b rows, then
undoes the interleave. Keys: ``oft_blocks``, ``alpha`` (0: the blocks are written
already scaled onto the norm constraint, as for OFT) and optional ``rescale``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from pydantic import Field
from torch import nn

from loraengine.core.adapter import weight_of
from loraengine.core.errors import ConfigError
from loraengine.core.plugins.specs import AdapterSpec
from loraengine.plugins.adapters.common import CONV_BY_NDIM
from loraengine.plugins.adapters.oft import (
    ChannelMapLayer,
    RotationOptions,
    blocks_with_rank,
    cayley,
    constraint_metadata,
    fill_saved,
    load_constraint,
    rotation_settings,
    saved_blocks,
)


class BOFTOptions(RotationOptions):
    block_size: int | None = Field(
        None, ge=2, description="Largest block size to use: the largest even b not above "
        "it with output size / b a power of two. Default: adapter.rank (as LyCORIS).")
    stages: int | None = Field(
        None, ge=1, description="Butterfly stages m (capped at log2(blocks)+1, which "
        "also is the default: every row can reach every other). LyCORIS only reloads "
        "files with the full stage count.")


#: The cost, in FLOPs per element and stage, of the passes a butterfly stage makes over
#: the rows it maps (a row gather and a thin batched product, forward and backward),
#: beyond its block FLOPs. From single-thread CPU timings of both forms on 64–1088 rows
#: of 128–1024 channels: dense wins from about 1000 rows of 128 channels with 8×8
#: blocks, and stage by stage for 512 channels and up.
DENSE_TRAFFIC = 64


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
        out_dim = int(weight_of(base).shape[0])
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
        self._gather_cache: dict[torch.device, list[torch.Tensor]] = {}

    def dense_for(self, rows: int) -> bool:
        """Whether T on ``rows`` rows runs as one dense ``[out, out]`` matrix (the product
        of the stages, built by the stages on the ``out`` rows of the identity) rather
        than stage by stage. A stage costs each row ``out·(2b + DENSE_TRAFFIC)`` (its
        block product and its passes: a row gather and a thin batched product, forward
        and backward); the dense product ``2·out²`` at full speed, plus building A."""
        stages, count, b, _ = self.oft_blocks.shape
        out = count * b
        per_row = stages * out * (2 * b + DENSE_TRAFFIC)
        return rows * (per_row - 2 * out * out) > out * per_row

    def _gathers(self, device: torch.device) -> list[torch.Tensor]:
        """Row orders for the stages on a channels-first ``[out, cols]`` matrix: entry i
        takes stage i−1's block order to stage i's (undo one interleave, apply the
        next: one gather between two stages), the last one back to the rows' order."""
        cached = self._gather_cache.get(device)
        if cached is not None:
            return cached
        stages, count, b, _ = self.oft_blocks.shape
        rows = torch.arange(count * b)
        # stage i's interleave: new position (group, j, half) holds row (group, half, j)
        perms = [rows.view(-1, 2, (b // 2) << i).transpose(1, 2).reshape(-1)
                 for i in range(stages)]
        inverse = [torch.argsort(p) for p in perms]
        orders = [perms[0], *(inverse[i - 1][perms[i]] for i in range(1, stages)),
                  inverse[-1]]
        cached = [o.to(device) for o in orders]
        self._gather_cache[device] = cached
        return cached

    def stage_map(self, u: torch.Tensor) -> torch.Tensor:
        """T on the rows of a channels-first ``[out, cols]`` matrix, stage by stage: per
        stage one row gather and one batched product of the blocks with a view."""
        r = cayley(self.oft_blocks, self.constraint).to(u.dtype)
        stages, count, b, _ = r.shape
        orders = self._gathers(u.device)
        for i in range(stages):
            u = u.index_select(0, orders[i]).view(count, b, -1)
            u = torch.bmm(r[i], u).view(count * b, -1)
        return u.index_select(0, orders[-1])

    def matrix(self, dtype: torch.dtype) -> torch.Tensor:
        """A ``[out, out]`` with T(t) = t·A for rows t (so T(U) = Aᵀ·U on columns): the
        stages applied to the identity (fp32 products, then cast)."""
        stages, count, b, _ = self.oft_blocks.shape
        eye = torch.eye(count * b, device=self.oft_blocks.device)
        return self.stage_map(eye).t().to(dtype)

    def channel_map(self, t: torch.Tensor) -> torch.Tensor:
        if self.dense_for(t.numel() // max(1, t.shape[-1])):
            return t @ self.matrix(t.dtype)
        return self.stage_map(t.reshape(-1, t.shape[-1]).t()).t().reshape(t.shape)

    def map_weight_rows(self, w: torch.Tensor) -> torch.Tensor:
        # W [out, cols] is channels-first already: its columns are the rows T maps
        if self.dense_for(w.shape[1]):
            return self.matrix(w.dtype).t() @ w  # W′ = Aᵀ·W
        return self.stage_map(w)

    def map_output(self, t: torch.Tensor) -> torch.Tensor:
        if self._channel_axis() == -1 or not self.dense_for(t.numel() // t.shape[1]):
            return super().map_output(t)
        # a convolution's output: the dense map is a 1×1 convolution with kernel Aᵀ, so
        # the activations are not permuted
        kernel = self.matrix(t.dtype).t().reshape(*([t.shape[1]] * 2), *([1] * (t.ndim - 2)))
        return CONV_BY_NDIM[t.ndim](t, kernel)

    def map_flops(self) -> float:
        stages, count, b, _ = self.oft_blocks.shape
        return 2.0 * stages * count * b * b


def _shape_for(out_dim: int, rank: int, options: object) -> tuple[int, int, int]:
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


owns_keys = blocks_with_rank(4)


def create(base: nn.Module, rank: int, alpha: float, options: object,
           generator: torch.Generator | None) -> BOFTLayer:
    constraint, rescaled = rotation_settings(options, "boft")
    b, _, stages = _shape_for(int(weight_of(base).shape[0]), rank, options)
    return BOFTLayer(base, b, stages, constraint, rescaled)


def load(base: nn.Module, tensors: Mapping[str, torch.Tensor], options: object) -> BOFTLayer:
    blocks, constraint, rescale = saved_blocks(base, tensors, 4)
    stages, _, b, _ = blocks.shape
    layer = BOFTLayer(base, b, stages, load_constraint(constraint, options),
                      rescaled=rescale is not None)
    return fill_saved(layer, blocks, rescale)


SPEC = AdapterSpec(
    name="boft", create=create, load=load, owns_keys=owns_keys, config_model=BOFTOptions,
    network_module="lycoris.kohya", file_metadata=constraint_metadata,
    description="Butterfly OFT: stages of block rotations that mix all output rows.")
