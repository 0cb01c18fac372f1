"""LoKr: ΔW = kron(w1, w2) · α/r — a Kronecker product of a small and a large factor
(LyCORIS keys ``lokr_w1`` or ``lokr_w1_a``/``lokr_w1_b``, ``lokr_w2`` or
``lokr_w2_a``/``lokr_w2_b`` [+ ``lokr_t2``], ``alpha``).

Geometry (as LyCORIS and ComfyUI): ``out = a·b`` and ``in = c·d`` split by
``factorization(dim, factor)``; ``w1`` is ``[a, c]``, ``w2`` is ``[b, d, *kernel]``.
``w2`` is stored low rank (``w2_a`` ``[b, r]`` · ``w2_b`` ``[r, d·k]``; with Tucker,
``t2`` ``[r, r, *k]``, ``w2_a`` ``[r, b]``, ``w2_b`` ``[r, d]``) unless
``r ≥ max(b, d)/2`` (the full-matrix rule) or ``full_matrix`` is set; ``w1`` is stored
low rank only with ``decompose_both`` and ``r < max(a, c)/2``. When neither factor is
low rank, the scale is 1 whatever alpha says. The zero-initialised factor is ``w2``
(or ``w2_b``).

``factor`` defaults to the rank, as ComfyUI's trainer uses its rank input; ``-1`` picks
the most balanced split (LyCORIS's default). Bypass (and the factored training path)
applies the Kronecker product
factored — ``y = vec(w1 · unvec(x) · w2ᵀ)`` as a grouped op chain — and never builds
ΔW, except for files whose ``w2`` mixes the conv kernel into its split (ComfyUI's
trainer can write such), where it builds ΔW. In training, backward keeps only the
layer input: a Linear runs as one autograd function (``_KronLinear``) that recomputes
the ``[c, b]`` intermediate, a convolution recomputes its side path.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any, cast

import torch
from pydantic import Field, field_validator
from torch import nn
from torch.utils.checkpoint import checkpoint

from loraengine.core.adapter import TRAFFIC_FLOPS, bias_of, layer_dims, layer_op, weight_of
from loraengine.core.plugins.specs import AdapterSpec
from loraengine.plugins.adapters.common import pointwise, saved_alpha, tucker
from loraengine.plugins.adapters.dora import (
    AdditiveAdapter,
    DoRAOptions,
    dora_file_options,
    dora_metadata,
    load_dora,
    with_dora,
)

KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


class LoKrOptions(DoRAOptions):
    factor: int | None = Field(None, ge=-1, description="Split each dimension as "
                               "factor × rest. Default: the rank, as ComfyUI's trainer "
                               "does; -1: the most balanced split (LyCORIS).")
    decompose_both: bool = Field(False, description="Also store the small factor w1 low "
                                 "rank when the rank is below half its size.")
    full_matrix: bool = Field(False, description="Never store a factor low rank (scale "
                              "1); the parameter count of ComfyUI's trainer.")
    use_tucker: bool = Field(False, description="Tucker-decompose w2 of conv kernels "
                             "larger than 1×1 (lokr_t2).")

    @field_validator("factor")
    @classmethod
    def _not_zero(cls, v: int | None) -> int | None:
        if v == 0:
            raise ValueError("factor must be -1 (balanced) or a positive integer")
        return v


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dim`` into ``(m, n)``, ``m ≤ n``, ``m·n = dim``: ``m = factor`` when it
    divides ``dim``; otherwise walk the divisors upwards while they stay ≤ ``factor``
    (any, for -1) and until the split crosses the square root."""
    if factor > 0 and dim % factor == 0:
        m, n = factor, dim // factor
        return (m, n) if m <= n else (n, m)
    limit = dim if factor < 0 else factor
    m, n = 1, dim
    while m < n:
        nxt = m + 1
        while dim % nxt:
            nxt += 1
        if nxt > limit:
            break
        m, n = nxt, dim // nxt
    return (m, n) if m <= n else (n, m)


def _kaiming(*shape: int, generator: torch.Generator | None) -> torch.Tensor:
    t = torch.empty(shape)
    nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)
    return t


def initial_tensors(base: nn.Module, rank: int, options: object,
                    generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """Fresh factors for ``base`` (``w2`` or ``w2_b`` zero, so ΔW is zero)."""
    w = weight_of(base)
    out, cin, kernel = w.shape[0], w.shape[1], tuple(w.shape[2:])
    factor = getattr(options, "factor", None)
    factor = rank if factor is None else factor
    full = getattr(options, "full_matrix", False)
    a, b = factorization(out, factor)
    c, d = factorization(cin, factor)
    ksize = math.prod(kernel)
    tucker = getattr(options, "use_tucker", False) and any(k != 1 for k in kernel)
    t: dict[str, torch.Tensor] = {}
    if getattr(options, "decompose_both", False) and not full and rank < max(a, c) / 2:
        t["lokr_w1_a"] = _kaiming(a, rank, generator=generator)
        t["lokr_w1_b"] = _kaiming(rank, c, generator=generator)
    else:
        t["lokr_w1"] = _kaiming(a, c, generator=generator)
    if full or rank >= max(b, d) / 2:
        t["lokr_w2"] = torch.zeros(b, d, *kernel)
    elif tucker:
        t["lokr_t2"] = _kaiming(rank, rank, *kernel, generator=generator)
        t["lokr_w2_a"] = _kaiming(rank, b, generator=generator)
        t["lokr_w2_b"] = torch.zeros(rank, d)
    else:
        t["lokr_w2_a"] = _kaiming(b, rank, generator=generator)
        t["lokr_w2_b"] = torch.zeros(rank, d * ksize)
    return t


class LoKrLayer(AdditiveAdapter):
    """Kronecker-product update of one Linear/Conv layer, built from its factors."""

    algorithm = "lokr"

    # The factors a module has are parameters, the others None (see KEYS).
    lokr_w1: nn.Parameter | None
    lokr_w1_a: nn.Parameter | None
    lokr_w1_b: nn.Parameter | None
    lokr_w2: nn.Parameter | None
    lokr_w2_a: nn.Parameter | None
    lokr_w2_b: nn.Parameter | None
    lokr_t2: nn.Parameter | None

    def __init__(self, base: nn.Module, tensors: Mapping[str, torch.Tensor], alpha: float):
        low = tensors.get("lokr_w2_b", tensors.get("lokr_w1_b"))
        super().__init__(base, int(low.shape[0]) if low is not None else 1, alpha)
        self.factored = low is not None
        for name in KEYS:
            if name in tensors:
                setattr(self, name, nn.Parameter(tensors[name].detach().float().clone()))
            else:
                setattr(self, name, None)
        self._check_geometry()

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.factored else 1.0

    # -- geometry ---------------------------------------------------------------------
    def _check_geometry(self) -> None:
        w = weight_of(self.base)
        out, cin, kernel = w.shape[0], w.shape[1], tuple(w.shape[2:])
        self.kernel = kernel
        if self.lokr_w1 is not None:
            a, c = self.lokr_w1.shape
        elif self.lokr_w1_a is not None and self.lokr_w1_b is not None:
            a, c = self.lokr_w1_a.shape[0], self.lokr_w1_b.shape[1]
        else:
            raise ValueError("LoKr module has neither lokr_w1 nor lokr_w1_a/lokr_w1_b")
        if self.lokr_w2 is not None:
            b, cols = self.lokr_w2.shape[0], self.lokr_w2[0].numel()
        elif self.lokr_w2_a is not None and self.lokr_w2_b is not None:
            if self.lokr_t2 is not None:
                b = self.lokr_w2_a.shape[1]
                cols = self.lokr_w2_b.shape[1] * math.prod(self.lokr_t2.shape[2:])
            else:
                b, cols = self.lokr_w2_a.shape[0], self.lokr_w2_b[0].numel()
        else:
            raise ValueError("LoKr module has neither lokr_w2 nor lokr_w2_a/lokr_w2_b")
        ksize = math.prod(kernel)
        if a * b != out or c * cols != cin * ksize:
            raise ValueError(f"LoKr factors [{a}, {c}] ⊗ [{b}, {cols}] do not fit a layer "
                             f"with weight {list(w.shape)}")
        self.a, self.b, self.c = int(a), int(b), int(c)
        # Channel layout: w1 mixes whole groups of input channels and w2 holds the kernel,
        # so the product factors through the input. Otherwise the kernel is split.
        self.by_channel = cin % c == 0 and cols == (cin // c) * ksize
        self.d = cin // c if self.by_channel else int(cols)
        if self.lokr_t2 is not None and not (kernel and self.by_channel):
            raise ValueError("LoKr Tucker core (lokr_t2) on a layer without a spatial kernel")

    def w1(self) -> torch.Tensor:
        if self.lokr_w1 is not None:
            return self.lokr_w1
        return _given(self.lokr_w1_a) @ _given(self.lokr_w1_b)

    def w2(self) -> torch.Tensor:
        """[b, d, *kernel] in channel layout, else [b, cols]."""
        if self.lokr_t2 is not None:
            return tucker(self.lokr_t2, _given(self.lokr_w2_a), _given(self.lokr_w2_b))
        w2 = self.lokr_w2 if self.lokr_w2 is not None else \
            _given(self.lokr_w2_a) @ _given(self.lokr_w2_b).flatten(1)
        if self.by_channel:
            return w2.reshape(self.b, self.d, *self.kernel)
        return w2.reshape(self.b, -1)

    # -- the contract -----------------------------------------------------------------
    def raw_delta(self) -> torch.Tensor:
        # torch.kron views its inputs, which a Tucker product (einsum output with
        # permuted strides) does not allow: hand it contiguous copies.
        w1, w2 = self.w1().contiguous(), self.w2().contiguous()
        w1 = w1.reshape(*w1.shape, *([1] * (w2.ndim - 2)))
        return torch.kron(w1, w2).reshape(weight_of(self.base).shape) * self.scale

    def rebuild(self, x: torch.Tensor) -> torch.Tensor:
        """W + kron(w1·scale, w2) as one broadcast multiply-add on W viewed
        ``[a, b, c, d, *kernel]`` (channel layout, no DoRA): the scale rides on the
        small factor, and no ΔW-sized product or sum is made apart from the result."""
        if not self.by_channel or self.dora_scale is not None:
            return super().rebuild(x)
        base = self.base
        w = weight_of(base)
        ones = [1] * len(self.kernel)
        w1 = (self.w1() * (self.scale * self.multiplier)).to(w.dtype)
        w2 = self.w2().to(w.dtype)
        adapted = torch.addcmul(w.reshape(self.a, self.b, self.c, self.d, *self.kernel),
                                w1.reshape(self.a, 1, self.c, 1, *ones),
                                w2.reshape(1, self.b, 1, self.d, *self.kernel))
        return layer_op(base, x, adapted.reshape(w.shape), bias_of(base))

    def raw_bypass(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        if not self.by_channel:
            return super().raw_bypass(x, gain)
        dt = x.dtype
        w1 = (self.w1() * (self.scale * gain)).to(dt)  # the small factor carries the scale
        if not self.kernel:  # Linear: one function that saves x alone (see _KronLinear)
            w2 = self.w2().reshape(self.b, self.d).to(dt)
            return cast(torch.Tensor, _KronLinear.apply(x, w1, w2))
        if torch.is_grad_enabled() and (x.requires_grad or any(
                p.requires_grad for p in self.parameters())):
            # Backward recomputes the grouped w2 output instead of keeping it: the only
            # tensor kept is x, which the base convolution keeps anyway.
            return cast(torch.Tensor, checkpoint(self._conv_bypass, x, w1, use_reentrant=False,
                                                preserve_rng_state=False))
        return self._conv_bypass(x, w1)

    def _conv_bypass(self, x: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
        a, b, c, d = self.a, self.b, self.c, self.d
        n = x.shape[0]
        h = self._w2_apply(x.reshape(n * c, d, *x.shape[2:]), x.dtype)  # [n·c, b, *sp]
        spatial = h.shape[2:]
        y = torch.matmul(w1, h.reshape(n, c, -1))  # [n, a, b·sp]
        return y.reshape(n, a * b, *spatial)

    def _w2_apply(self, h: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        """Apply w2 to grouped conv inputs ``[n·c, d, *sp] -> [n·c, b, *sp']`` with the
        base layer's stride and padding."""
        ones = [1] * len(self.kernel)
        if self.lokr_w2 is not None:
            return layer_op(self.base, h, self.w2().to(dt), None)
        wa, wb = _given(self.lokr_w2_a).to(dt), _given(self.lokr_w2_b).to(dt)
        if self.lokr_t2 is not None:
            h = pointwise(h, wb.reshape(*wb.shape, *ones))  # d -> r
            h = layer_op(self.base, h, self.lokr_t2.to(dt), None)  # the kernel, r -> r
            return pointwise(h, wa.t().reshape(self.b, -1, *ones))  # r -> b
        h = layer_op(self.base, h, wb.reshape(wb.shape[0], self.d, *self.kernel), None)
        return pointwise(h, wa.reshape(*wa.shape, *ones))  # r -> b

    def factored_flops(self, x: torch.Tensor) -> float | None:
        if not self.by_channel:
            return None  # the kernel is split across the factors: ΔW is built
        n, _, _ = layer_dims(self.base, x)
        a, b, c, d = self.a, self.b, self.c, self.d
        k = math.prod(self.kernel)
        r = self.rank
        if self.lokr_w2 is not None:
            w2 = b * d * k
        elif self.lokr_t2 is not None:
            w2 = r * (d + r * k + b)
        else:
            w2 = r * (d * k + b)
        # per output position: w2 on each of the c groups, then w1 across them; a conv
        # recomputes that forward in backward (×4/3). Every op here is thin (contractions
        # of a, b, c or d), so the elements they move count too: about 6 passes over the
        # input, 10 over the output and 11 over the [c, b] intermediate, per position.
        passes = 6.0 * c * d + 10.0 * a * b + 11.0 * c * b
        return (8.0 if self.kernel else 6.0) * n * c * (w2 + a * b) \
            + TRAFFIC_FLOPS * n * passes

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {k: getattr(self, k) for k in KEYS
                                        if getattr(self, k) is not None}
        out["alpha"] = torch.tensor(self.alpha)
        return out


class _KronLinear(torch.autograd.Function):
    """``y = vec(w1 · X · w2ᵀ)`` per token, ``X`` the token's ``[c, d]`` input, with a
    hand-written backward that keeps only ``x`` and the two small factors and recomputes
    the ``[c, b]`` intermediate, so the adapter adds one input-sized tensor to what
    backward holds (the rebuild path keeps the input too). Every contraction is a plain
    2-D matrix product over all tokens; the ``c`` axis is brought in front by a copy."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor
                ) -> torch.Tensor:
        a, c = w1.shape
        b, d = w2.shape
        lead = x.shape[:-1]
        x2 = x.reshape(-1, d)  # [N·c, d]
        n = x2.shape[0] // c
        ht = (x2 @ w2.t()).view(n, c, b).transpose(0, 1).reshape(c, n * b)
        y = (w1 @ ht).view(a, n, b).transpose(0, 1).reshape(*lead, a * b)
        ctx.save_for_backward(x, w1, w2)
        return y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w1, w2 = ctx.saved_tensors
        a, c = w1.shape
        b, d = w2.shape
        x2 = x.reshape(-1, d)
        n = x2.shape[0] // c
        gt = g.reshape(n, a, b).transpose(0, 1).reshape(a, n * b)  # [a, N·b]
        dx = dw1 = dw2 = None
        if ctx.needs_input_grad[1]:
            ht = (x2 @ w2.t()).view(n, c, b).transpose(0, 1).reshape(c, n * b)
            dw1 = gt @ ht.t()
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[2]:
            dh = (w1.t() @ gt).view(c, n, b).transpose(0, 1).reshape(n * c, b)
            if ctx.needs_input_grad[0]:
                dx = (dh @ w2).view(x.shape)
            if ctx.needs_input_grad[2]:
                dw2 = dh.t() @ x2
        return dx, dw1, dw2


def _given(factor: torch.Tensor | None) -> torch.Tensor:
    """A factor that ``_check_geometry`` has shown to be present when it is read."""
    return cast(torch.Tensor, factor)


def create(base: nn.Module, rank: int, alpha: float, options: object,
           generator: torch.Generator | None) -> LoKrLayer:
    layer = LoKrLayer(base, initial_tensors(base, rank, options, generator), alpha)
    if not layer.factored:
        layer.rank = int(rank)  # informative only: the scale is 1
    return with_dora(layer, options)


def load(base: nn.Module, tensors: Mapping[str, torch.Tensor], options: object) -> LoKrLayer:
    """Rebuild from saved tensors: which factors are low rank, the rank, the split and
    Tucker all follow from the keys and shapes present."""
    present = {k: tensors[k] for k in KEYS if k in tensors}
    low = present.get("lokr_w2_b", present.get("lokr_w1_b"))
    rank = int(low.shape[0]) if low is not None else 1
    layer = LoKrLayer(base, present, saved_alpha(tensors, rank) or float(rank))
    return load_dora(layer, tensors, options)


def owns_keys(keys: Collection[str]) -> bool:
    names = set(keys)  # a set of names, or the tensors by name
    return bool({"lokr_w1", "lokr_w1_a"} & names) and bool({"lokr_w2", "lokr_w2_a"} & names)


SPEC = AdapterSpec(
    name="lokr", create=create, load=load, owns_keys=owns_keys,
    file_metadata=dora_metadata, file_options=dora_file_options, config_model=LoKrOptions,
    network_module="lycoris.kohya", description="LoKr: Kronecker product of a small and a "
    "(low-rank) large factor (LyCORIS), optional Tucker conv and DoRA.")
