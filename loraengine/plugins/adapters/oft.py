"""OFT (orthogonal fine-tuning, LyCORIS "diag-oft"): the output rows of the weight are
rotated block by block, W′ₖ = Rₖᵀ·Wₖ, with Rₖ = (I+Qₖ)(I−Qₖ)⁻¹ the Cayley transform of
the skew-symmetric Qₖ = Bₖ − Bₖᵀ. Blocks start at zero, so R = I and ΔW = 0.

Keys (LyCORIS/ComfyUI): ``oft_blocks`` ``[n, b, b]``, ``alpha`` (the norm constraint on
Q) and, with ``rescaled``, ``rescale`` ``[out, 1, ...]`` (a per-output-row scale).

The constraint bounds the Frobenius norm of all of a layer's Q together: the blocks are
scaled down as a whole when ‖Q‖_F exceeds it. Readers disagree on a file's ``alpha``
(ComfyUI: ‖Q‖_F ≤ alpha; LyCORIS and A1111: alpha·out_dim) but all read 0 as "off", so
files hold the blocks already scaled onto the bound, with ``alpha`` 0: every reader then
computes the same rotation. Reading, a file's ``alpha`` above 0 is taken in ComfyUI's
reading (files written before, and ComfyUI's own).

This module also holds ``ChannelMapLayer``, the base of every adapter whose adapted
weight is a linear map T applied to the output-channel axis of W (OFT, BOFT): the
weight path computes T(W), the bypass path applies T to the weight-only part of the
base output, ``T(y − b) + b``, so the bias is never rotated; and what the OFT and BOFT
specs share: their common options, the Cayley transform, and reading saved blocks.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from loraengine.core.adapter import (
    TRAFFIC_FLOPS,
    AdapterLayer,
    bias_of,
    layer_dims,
    layer_op,
    weight_of,
)
from loraengine.core.plugins.specs import AdapterSpec, PluginOptions
from loraengine.plugins.adapters.common import CONV_BY_NDIM, ConvArgs, conv_args, frozen_weight_op
from loraengine.plugins.adapters.lora_fused import fusable

#: Added to ‖Q‖ before dividing, as both reference implementations do.
NORM_EPS = 1e-8


class RotationOptions(PluginOptions):
    """The options OFT and BOFT share; their options models derive from this."""

    constraint: float = Field(
        0.0, ge=0, description="Bound on the Frobenius norm of Q over all blocks (and "
        "stages) of a layer (0: off). Files hold the blocks already scaled onto the bound "
        "with alpha 0, which ComfyUI, LyCORIS and A1111 all read alike. There is no "
        "scale: adapter.alpha does not apply.")
    rescaled: bool = Field(False, description="Also train a per-output-row scale "
                           "(LyCORIS `rescale`).")


class OFTOptions(RotationOptions):
    block_size: int | None = Field(
        None, ge=1, description="Rotation block size: the largest divisor of each layer's "
        "output size not above this value. Default: derived from adapter.rank as ComfyUI "
        "and LyCORIS do (output size split into two balanced factors, the smaller at most "
        "rank; the smaller factor is the block size). LyCORIS only reloads files whose "
        "block size is at most the block count.")
    block_count: int | None = Field(
        None, ge=1, description="Number of rotation blocks per layer (at least this many: "
        "the block size is the largest divisor of the output size not above "
        "output/block_count). Exclusive with block_size.")

    @model_validator(mode="after")
    def _one_block_rule(self) -> OFTOptions:
        if self.block_size is not None and self.block_count is not None:
            raise ValueError("set block_size or block_count, not both")
        return self


# -- block-size rules ------------------------------------------------------------------

def balanced_split(dim: int, factor: int) -> tuple[int, int]:
    """``(block_size, block_count)`` with ``block_size ≤ block_count`` as ComfyUI's
    TrainLoraNode and LyCORIS derive them from ``rank``: an exact split when ``factor``
    divides ``dim``, otherwise the most balanced split whose smaller part is at most
    ``factor`` (``factor ≤ 0``: no cap)."""
    if factor > 0 and dim % factor == 0:
        a, b = factor, dim // factor
        return min(a, b), max(a, b)
    cap = dim if factor <= 0 else factor
    best = 1
    d = 1
    # d + dim/d shrinks as d grows towards √dim, so the last divisor below √dim wins.
    while d * d <= dim and d <= cap:
        if dim % d == 0:
            best = d
        d += 1
    return best, dim // best


def largest_divisor_at_most(dim: int, limit: int) -> int:
    limit = max(1, min(limit, dim))
    for d in range(limit, 0, -1):
        if dim % d == 0:
            return d
    return 1


def oft_block_size(out_dim: int, rank: int, options: object) -> int:
    size = getattr(options, "block_size", None)
    count = getattr(options, "block_count", None)
    if size is not None:
        return largest_divisor_at_most(out_dim, size)
    if count is not None:
        return largest_divisor_at_most(out_dim, out_dim // min(count, out_dim))
    return balanced_split(out_dim, rank)[0]


# -- the shared math -------------------------------------------------------------------

def constrained_blocks(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """The blocks B (fp32) scaled down as a whole so that Q = B − Bᵀ has ‖Q‖_F at most
    ``constraint`` (> 0; 0: unchanged). Q is linear in B, so this is the constraint
    itself, and a file holding these blocks with no constraint means the same."""
    blocks = blocks.float()
    if constraint > 0:
        norm = torch.linalg.vector_norm(blocks - blocks.transpose(-1, -2)) + NORM_EPS
        if norm > constraint:
            blocks = blocks * (constraint / norm)
    return blocks


def cayley(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """R = (I+Q)(I−Q)⁻¹ for every trailing ``[b, b]`` block, Q = B − Bᵀ, with the
    blocks scaled down as a whole when ‖Q‖_F exceeds ``constraint`` (> 0;
    ``constrained_blocks``). Computed in fp32."""
    blocks = constrained_blocks(blocks, constraint)
    eye, minus_eye = _identity(blocks.shape[-1], blocks.dtype, blocks.device)
    # With M = (I−Q)⁻¹, which commutes with I+Q: R = M·(I+Q) = M·(2I − (I−Q)) = 2M − I.
    # One batched inverse, whose backward is two batched products (−Mᵀ·G·Mᵀ), where a
    # solve costs an LU factoring forward and another LU solve backward, with pivot
    # checks each time: on blocks this small, the per-call work is most of the cost.
    # I−Q is never singular (Q is skew-symmetric: its eigenvalues are imaginary), so
    # the inverse skips torch's error checks.
    m = torch.linalg.inv_ex((eye - blocks).add_(blocks.transpose(-1, -2)))[0]
    return torch.add(minus_eye, m, alpha=2)


def _identity(size: int, dtype: torch.dtype, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """I and −I ``[size, size]``: made once per size, dtype and device (the Cayley
    transform runs once per layer and step), and in place while torch.compile traces
    (which does not trace through the cache)."""
    make = _make_identity if torch.compiler.is_compiling() else _cached_identity
    return make(size, dtype, device)


def _make_identity(size: int, dtype: torch.dtype, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    eye = torch.eye(size, dtype=dtype, device=device)
    return eye, -eye


_cached_identity = functools.lru_cache(maxsize=64)(_make_identity)


class ChannelMapLayer(AdapterLayer):
    """An adapter whose adapted weight is T(W) for a linear map T on the output-channel
    axis, optionally followed by a trainable per-row ``rescale``. Subclasses implement
    ``channel_map(t)``, applying T along the last axis of ``t``.

    The multiplier m scales the change linearly: W + m·(T(W) − W), and in bypass
    y + m·(T(y − b) − (y − b)); at m = 1 this is exactly T(W).
    """

    #: The rotation parameters, shaped by the subclass.
    oft_blocks: nn.Parameter
    rescale: nn.Parameter | None

    def __init__(self, base: nn.Module, rank: int, alpha: float, rescaled: bool):
        super().__init__(base, rank, alpha)
        w = weight_of(base)
        if rescaled:
            self.rescale = nn.Parameter(
                torch.ones(w.shape[0], *([1] * (w.ndim - 1)), dtype=torch.float32))
        else:
            self.rescale = None

    @property
    def constraint(self) -> float:
        return self.alpha

    def channel_map(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _mapped_minus_identity(self, t: torch.Tensor) -> torch.Tensor:
        """T(t) − t along the last axis, rescale included."""
        out = self.channel_map(t)
        if self.rescale is not None:
            out = out * self.rescale.reshape(-1).to(out.dtype)
        return out - t

    def map_weight_rows(self, w: torch.Tensor) -> torch.Tensor:
        """T applied to the output-row axis of a ``[out, cols]`` matrix (rescale not
        included). Default: move the rows last and use ``channel_map``; a subclass
        with a direct form on this layout overrides it."""
        return self.channel_map(w.t()).t()

    def mapped_weight(self) -> torch.Tensor:
        """T(W)·rescale in fp32, shaped like W: the adapted weight at multiplier 1."""
        w = weight_of(self.base).detach().float()
        out = self.map_weight_rows(w.reshape(w.shape[0], -1))
        if self.rescale is not None:
            out = out * self.rescale.reshape(-1, 1)
        return out.reshape(w.shape)

    def delta_weight(self) -> torch.Tensor:
        w = weight_of(self.base).detach().float()
        return (self.mapped_weight() - w) * self.multiplier

    def rebuild(self, x: torch.Tensor) -> torch.Tensor:
        """The base op with T(W) itself (at multiplier 1), not W + (T(W) − W): one
        weight-sized sum and its backward less per layer."""
        base = self.base
        w = weight_of(base)
        if self.multiplier == 1:
            adapted = self.mapped_weight().to(w.dtype)
        else:
            adapted = w + self.delta_weight().to(w.dtype)
        return layer_op(base, x, adapted, bias_of(base))

    def bypass(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        channel_axis = self._channel_axis()
        weight_part = base_out
        bias = bias_of(self.base)
        if bias is not None:
            weight_part = base_out - self._on_channels(bias.detach(), base_out)
        moved = weight_part.movedim(channel_axis, -1)
        delta = self._mapped_minus_identity(moved).movedim(-1, channel_axis)
        return base_out + delta * self.multiplier

    # -- the factored training path -------------------------------------------------
    def _channel_axis(self) -> int:
        return -1 if isinstance(self.base, nn.Linear) else 1

    def _on_channels(self, v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """A per-output-channel vector shaped to broadcast over ``out``."""
        v = v.reshape(-1).to(out.dtype)
        return v if self._channel_axis() == -1 else v.reshape(-1, *([1] * (out.ndim - 2)))

    def map_output(self, t: torch.Tensor) -> torch.Tensor:
        """T applied along the output-channel axis of a layer output ``t`` (rescale not
        included). Default: move the axis last and use ``channel_map``."""
        axis = self._channel_axis()
        return self.channel_map(t.movedim(axis, -1)).movedim(-1, axis)

    def map_flops(self) -> float:
        """FLOPs of one forward of ``channel_map`` on one row of output channels."""
        raise NotImplementedError

    def path_flops(self, x: torch.Tensor) -> tuple[float, float] | None:
        n, fan_in, _ = layer_dims(self.base, x)
        out = weight_of(self.base).shape[0]
        per_row = self.map_flops()
        # factored: T on N output rows; rebuild: T on the I weight columns, and backward
        # computes the full dL/dW' (2·N·I·O) to reach the rotation. The factored map is
        # thin (contractions of one block) and makes about 16 passes over the N·O
        # output (permutes, the block products, the bias), which count as well.
        factored = 3.0 * n * per_row + TRAFFIC_FLOPS * 16.0 * n * out
        return factored, 3.0 * fan_in * per_row + 2.0 * n * fan_in * out

    def run_factored(self, x: torch.Tensor) -> torch.Tensor:
        """y = W x + m·(T(W x)·rescale − W x) + b: the map acts on the weight-only part of
        the base output, so the rotation's gradient needs only W x and dL/dy."""
        base = self.base
        wx = frozen_weight_op(base, x)  # backward keeps W x for the rotation, not x too
        mapped = self.map_output(wx)
        if self.rescale is not None:
            mapped = mapped * self._on_channels(self.rescale, mapped)
        out = mapped if self.multiplier == 1 else wx + (mapped - wx) * self.multiplier
        bias = bias_of(base)
        return out if bias is None else out + self._on_channels(bias, out)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        # the blocks as the rotation uses them, so alpha 0 means the same to every reader
        blocks = constrained_blocks(self.oft_blocks, self.constraint) if self.constraint \
            else self.oft_blocks
        out: dict[str, torch.Tensor] = {"oft_blocks": blocks, "alpha": torch.tensor(0.0)}
        if self.rescale is not None:
            out["rescale"] = self.rescale
        return out


#: From this many activation elements on, OFT's 8×8 blocks are applied two at a time as
#: 16×16 blocks (zero off the diagonal). On the CPU the batched product of 8-wide
#: blocks runs far below its 16-wide rate: twice the FLOPs take half the time forward
#: and backward (single-thread timings on 64–4096 rows of 64–512 channels), except on
#: a few rows, where building the pairs costs more.
PAIR_ELEMENTS = 65536


def _paired(r: torch.Tensor) -> torch.Tensor:
    """``[n, 8, 8]`` blocks as ``[n/2, 16, 16]``: each pair on the diagonal, zeros off
    it (the same block-diagonal map)."""
    n, b, _ = r.shape
    zero = r.new_zeros(n // 2, b, b)
    first, second = r[0::2], r[1::2]
    top = torch.cat([first, zero], dim=2)
    bottom = torch.cat([zero, second], dim=2)
    return torch.cat([top, bottom], dim=1)


#: The width of the blocks ``_RotatedWeightOp``'s backward contracts at once (see there).
GROUP_WIDTH = 16


class _RotatedWeightOp(torch.autograd.Function):
    """OFT's rebuild path as one node: ``y = op(x, W′, b)`` with ``W′ₖ = Rₖᵀ·Wₖ`` per
    block of output rows, the frozen ``W``, ``b`` and the base's operation (a Linear, or
    a zero-padded ungrouped convolution) inside.

    Autograd's own backward of that graph computes the full weight gradient
    ``dL/dW′ = Gᵀ·X`` (2·N·I·O FLOPs, as much as the layer's forward) only to contract it
    down to the ``[b, b]`` blocks. The blocks need far less: with ``u = W x`` (per output
    position, its block k a row of b values), ``y − b`` is ``u·Rₖ`` block by block, so
    ``dL/dRₖ = Σ uₖᵀ·gₖ = Rₖ·Σ (y − b)ₖᵀ·gₖ`` (``Rₖ`` orthogonal, so ``u = (y − b)·Rₖᵀ``):
    one pass over the output and its gradient, 2·N·O·b FLOPs. Backward keeps the output
    (not the input) and ``W′``; ``dL/dx = g·W′`` as the base op's own."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                rotation: torch.Tensor, conv: ConvArgs | None) -> torch.Tensor:
        n, b, _ = rotation.shape
        rows = weight.reshape(n, b, -1).to(rotation.dtype)
        adapted = torch.bmm(rotation.transpose(1, 2), rows).view(weight.shape).to(weight.dtype)
        if conv is None:
            y = F.linear(x, adapted, bias)
        else:
            y = CONV_BY_NDIM[weight.ndim](x, adapted, bias, *conv)
        ctx.save_for_backward(adapted, rotation, y, bias)
        ctx.conv, ctx.x_shape = conv, x.shape
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        adapted, rotation, y, bias = ctx.saved_tensors
        need_x, need_r = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        dx = dr = None
        if need_x:
            if ctx.conv is None:
                dx = grad.new_empty(ctx.x_shape)  # not a view: autograd adds into it
                torch.mm(grad.reshape(-1, grad.shape[-1]), adapted,
                         out=dx.view(-1, adapted.shape[1]))
            else:
                stride, padding, dilation = ctx.conv
                like = grad.new_empty(1).expand(ctx.x_shape)  # only its shape is read
                dx = torch.ops.aten.convolution_backward(
                    grad, like, adapted, None, stride, padding, dilation, False,
                    [0] * len(stride), 1, (True, False, False))[0]
        if need_r:
            n, b, _ = rotation.shape
            dt = rotation.dtype
            # Blocks narrower than GROUP_WIDTH are contracted p at a time, as blocks of
            # p·b whose diagonal b×b blocks are the ones wanted: on the CPU the batched
            # product of 8-wide blocks runs far below its 16-wide rate (twice the FLOPs
            # take a quarter of the time on 4k rows of 128–768 channels)
            # (a convolution's products contract over each sample's positions, rows
            # of the output: one per sample, at the same rate for any block width)
            p = GROUP_WIDTH // b if b < GROUP_WIDTH and GROUP_WIDTH % b == 0 else 1
            p = p if n % p == 0 and ctx.conv is None else 1
            wide = b * p
            if ctx.conv is None:  # [positions, groups, p·b]
                yk = y.reshape(-1, n // p, wide).to(dt)
                gk = grad.reshape(-1, n // p, wide).to(dt)
                m = torch.bmm(yk.permute(1, 2, 0), gk.permute(1, 0, 2))
                g_sum = gk.sum(0)
            else:  # per sample [blocks, b, spatial]
                yk = y.reshape(y.shape[0], n, b, -1).to(dt)
                gk = grad.reshape(grad.shape[0], n, b, -1).to(dt)
                m = torch.bmm(yk[0], gk[0].transpose(1, 2))
                for z in range(1, yk.shape[0]):
                    m.baddbmm_(yk[z], gk[z].transpose(1, 2))
                g_sum = gk.sum((0, 3))
            if p > 1:  # the diagonal b×b blocks of each p·b group
                m = torch.diagonal(m.view(n // p, p, b, p, b), dim1=1, dim2=3)
                m = m.permute(0, 3, 1, 2).reshape(n, b, b)
            else:
                m = m.view(n, b, b)
            if bias is not None:  # Σ (y − b)ᵀg = Σ yᵀg − b·(Σ g)ᵀ
                m = m - bias.to(dt).view(n, b, 1) * g_sum.reshape(n, 1, b)
            dr = torch.bmm(rotation, m)
        return dx, None, None, dr, None


class OFTLayer(ChannelMapLayer):
    """Block-diagonal orthogonal rotation of the output rows."""

    algorithm = "oft"

    def __init__(self, base: nn.Module, block_size: int, constraint: float = 0.0,
                 rescaled: bool = False):
        out_dim = int(weight_of(base).shape[0])
        if out_dim % block_size:
            raise ValueError(f"OFT block size {block_size} does not divide the output size "
                             f"{out_dim}")
        super().__init__(base, block_size, constraint, rescaled)
        self.oft_blocks = nn.Parameter(torch.zeros(out_dim // block_size, block_size,
                                                   block_size, dtype=torch.float32))

    def rotation(self) -> torch.Tensor:
        """R per block, ``[n, b, b]`` (fp32)."""
        return cayley(self.oft_blocks, self.constraint)

    def channel_map(self, t: torch.Tensor) -> torch.Tensor:
        r = self.rotation().to(t.dtype)
        n, b, _ = r.shape
        # Row m of block k becomes Σₙ R[k, n, m]·row n: the rows are multiplied by Rᵀ.
        # One batched product over the blocks ([k, rows, b] @ R[k]), which runs faster
        # on the CPU than the equivalent einsum's own layout.
        if b == 8 and n % 2 == 0 and t.device.type == "cpu" and t.numel() >= PAIR_ELEMENTS:
            r, n, b = _paired(r), n // 2, 16
        rows = t.reshape(-1, n, b).transpose(0, 1)
        return torch.bmm(rows, r).transpose(0, 1).reshape(t.shape)

    def map_weight_rows(self, w: torch.Tensor) -> torch.Tensor:
        # W's rows are already grouped by block: W′ₖ = Rₖᵀ·Wₖ, one batched product on a
        # view of W, no permuted copies
        r = self.rotation().to(w.dtype)
        n, b, _ = r.shape
        return torch.bmm(r.transpose(1, 2), w.reshape(n, b, -1)).reshape(w.shape)

    def map_output(self, t: torch.Tensor) -> torch.Tensor:
        if self._channel_axis() == -1:
            return self.channel_map(t)
        # a convolution's output: the block rotation is a grouped 1×1 convolution, with
        # out[k·b+m] = Σₙ R[k, n, m]·in[k·b+n], so no permute of the activations
        r = self.rotation().to(t.dtype)
        n, b, _ = r.shape
        kernel = r.transpose(1, 2).reshape(n * b, b, *([1] * (t.ndim - 2)))
        return CONV_BY_NDIM[t.ndim](t, kernel, groups=n)

    def map_flops(self) -> float:
        n, b, _ = self.oft_blocks.shape
        return 2.0 * n * b * b

    def _one_node(self) -> bool:
        """Whether the rebuild path runs as ``_RotatedWeightOp``: at multiplier 1 (the
        adapted weight is then the rotation itself), without ``rescale``, on a frozen
        Linear or zero-padded ungrouped convolution."""
        return self.multiplier == 1 and self.rescale is None and fusable(self.base)

    def rebuild(self, x: torch.Tensor) -> torch.Tensor:
        if not self._one_node():
            return super().rebuild(x)
        base = self.base
        conv = conv_args(base)
        out: torch.Tensor = _RotatedWeightOp.apply(x, weight_of(base), bias_of(base),
                                                   self.rotation(), conv)
        return out


# -- what the OFT and BOFT specs share -------------------------------------------------

Rotation = TypeVar("Rotation", bound=ChannelMapLayer)

#: oft_blocks rank -> (algorithm, block layout, the hint that a file is of that kind)
_LAYOUTS = {3: ("OFT", "[blocks, size, size]", " (an OFT file: use adapter.algorithm: oft)"),
            4: ("BOFT", "[stages, blocks, size, size]",
                " (a BOFT file: use adapter.algorithm: boft)")}


def rotation_settings(options: object, name: str) -> tuple[float, bool]:
    """``(constraint, rescaled)`` for ``create``; warns that adapter.alpha, if set,
    does nothing for ``name``."""
    if getattr(options, "alpha", None) is not None:
        warnings.warn(f"adapter.alpha has no effect on {name} (no scale); the norm bound "
                      f"is adapter.constraint", stacklevel=3)
    return (float(getattr(options, "constraint", 0.0) or 0.0),
            bool(getattr(options, "rescaled", False)))


def saved_blocks(base: nn.Module, tensors: Mapping[str, torch.Tensor], ndim: int
                 ) -> tuple[torch.Tensor, float, torch.Tensor | None]:
    """``(oft_blocks, constraint, rescale)`` of a saved module for ``load``, checked
    against ``base`` (``ndim``: 3 for OFT, 4 for BOFT)."""
    blocks = tensors["oft_blocks"]
    if blocks.ndim != ndim:
        name, layout, _ = _LAYOUTS[ndim]
        hint = _LAYOUTS[blocks.ndim][2] if blocks.ndim in _LAYOUTS else ""
        raise ValueError(f"oft_blocks has shape {list(blocks.shape)}, {name} needs "
                         f"{layout}{hint}")
    n, b, b2 = blocks.shape[-3:]
    out_dim = int(weight_of(base).shape[0])
    if b != b2 or n * b != out_dim:
        raise ValueError(f"oft_blocks {list(blocks.shape)} does not fit a layer with "
                         f"{out_dim} output channels")
    constraint = float(tensors["alpha"]) if "alpha" in tensors else 0.0
    return blocks, max(constraint, 0.0), _read_rescale(tensors, out_dim)


def load_constraint(saved: float, options: object) -> float:
    """The constraint a loaded layer keeps: the file's (ComfyUI's reading) when it has
    one; otherwise ``options.constraint``, so that training resumed from a file (which
    holds its blocks already within the bound, alpha 0) keeps its bound."""
    return saved if saved > 0 else float(getattr(options, "constraint", 0.0) or 0.0)


def _read_rescale(tensors: Mapping[str, torch.Tensor], out_dim: int) -> torch.Tensor | None:
    rescale = tensors.get("rescale")
    if rescale is None:
        return None
    if rescale.numel() != out_dim:
        raise ValueError(f"rescale has {rescale.numel()} values, the layer has {out_dim} "
                         f"output channels")
    return rescale


def fill_saved(layer: Rotation, blocks: torch.Tensor, rescale: torch.Tensor | None
               ) -> Rotation:
    """Copy saved ``oft_blocks`` (and ``rescale``) into a fresh OFT/BOFT layer."""
    with torch.no_grad():
        layer.oft_blocks.copy_(blocks.float())
        if rescale is not None and layer.rescale is not None:
            layer.rescale.copy_(rescale.float().reshape(layer.rescale.shape))
    return layer


def blocks_with_rank(ndim: int) -> Callable[[Collection[str]], bool]:
    """``owns_keys`` for ``oft_blocks`` of ``ndim`` dimensions. Given only names, OFT and
    BOFT files look the same (both use ``oft_blocks``); given the tensors, the block
    rank tells them apart (OFT 3, BOFT 4)."""
    def owns_keys(keys: Collection[str]) -> bool:
        if "oft_blocks" not in keys:
            return False
        if isinstance(keys, Mapping):
            return getattr(keys["oft_blocks"], "ndim", ndim) == ndim
        return True

    return owns_keys


def constraint_metadata(options: object) -> dict[str, str]:
    """How a reader must take the file's ``alpha`` (shared with BOFT)."""
    return {"loraengine.oft_constraint": f"{getattr(options, 'constraint', 0.0):g}",
            "loraengine.alpha_reading": "alpha 0: blocks already scaled onto the "
                                        "constraint (every reader alike)"}


# -- the spec ---------------------------------------------------------------------------

owns_keys = blocks_with_rank(3)


def create(base: nn.Module, rank: int, alpha: float, options: object,
           generator: torch.Generator | None) -> OFTLayer:
    constraint, rescaled = rotation_settings(options, "oft")
    out_dim = int(weight_of(base).shape[0])
    return OFTLayer(base, oft_block_size(out_dim, rank, options), constraint, rescaled)


def load(base: nn.Module, tensors: Mapping[str, torch.Tensor], options: object) -> OFTLayer:
    blocks, constraint, rescale = saved_blocks(base, tensors, 3)
    layer = OFTLayer(base, blocks.shape[1], load_constraint(constraint, options),
                     rescaled=rescale is not None)
    return fill_saved(layer, blocks, rescale)


SPEC = AdapterSpec(
    name="oft", create=create, load=load, owns_keys=owns_keys, config_model=OFTOptions,
    network_module="lycoris.kohya", file_metadata=constraint_metadata,
    description="Orthogonal fine-tuning: block-diagonal Cayley rotation of output rows.")
