"""The adapter contract: one adapted layer, and the channel deltas of biases and norms.

An ``AdapterLayer`` adapts one base layer (Linear or Conv1d/2d/3d). It provides
``delta_weight()`` (ΔW with its scale), ``bypass(x, base_out)`` (the adapted output
from the base output, without building W+ΔW where the algorithm allows it) and
``file_tensors()`` (its tensors under their standard key names). The engine uses
three equivalent paths: *rebuild* (run the layer with W+ΔW), *bypass* (forward hook)
and *merge* (write W+ΔW into the base weight).

Weight mode (training) computes the adapted output one of two ways, per layer:
*rebuild* (the base op with W+ΔW: backward then needs the full weight gradient dL/dΔW
before it reaches the factors) or *factored* (the base op with W, plus the adapter's
own cheaper route from its factors, never building a weight-sized tensor where the
algorithm allows it). An algorithm with a factored form implements ``path_flops``, its
cost model; ``path`` (the ``adapter.path`` option) is ``auto`` (the cheaper by that
model, per input shape), ``factored`` or ``rebuild``. ``last_path`` says which ran.
"""

from __future__ import annotations

import math
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: What the cost models charge, in FLOPs, for each activation element a memory-bound op
#: (a permute copy, a thin matrix product over a contraction of 8 or 16, an add) reads
#: or writes: such ops run far below a dense product's FLOP rate. Set from single-thread
#: CPU timings of the LoKr and OFT factored paths against their rebuild paths on
#: 128–640-channel layers (the crossover fan-in of OFT with blocks of 8 is about 190).
TRAFFIC_FLOPS = 20.0
AttachMode = Literal["weight", "bypass"]
#: ``adapter.path``: how weight mode computes the adapted output.
TrainingPath = Literal["auto", "factored", "rebuild"]


def weight_of(layer: nn.Module) -> torch.Tensor:
    """``layer.weight`` as a tensor. ``nn.Module`` attribute lookup is typed
    ``Tensor | Module``; the weight of every layer an adapter wraps (Linear, Conv, a
    norm, a quantized stand-in) is a tensor."""
    return cast(torch.Tensor, layer.weight)


def bias_of(layer: nn.Module) -> torch.Tensor | None:
    """``layer.bias`` as a tensor or ``None`` (typed as :func:`weight_of` says; torch's
    ``nn.RMSNorm`` has no ``bias`` attribute at all)."""
    return cast("torch.Tensor | None", getattr(layer, "bias", None))


def layer_op(base: nn.Module, x: torch.Tensor, weight: torch.Tensor,
             bias: torch.Tensor | None) -> torch.Tensor:
    """Run ``base``'s operation (linear or its convolution) with another weight/bias."""
    if isinstance(base, nn.Linear):
        return F.linear(x, weight, bias)
    if isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        out: torch.Tensor = base._conv_forward(x, weight, bias)  # untyped in torch
        return out
    raise TypeError(f"cannot adapt {type(base).__name__}")


def layer_dims(base: nn.Module, x: torch.Tensor) -> tuple[int, int, int]:
    """``(positions, fan_in, out)`` of running ``base`` on ``x``: output positions
    (tokens, or batch × output pixels of a conv, estimated from the input size and the
    stride), the columns of its weight (in · kernel) and its output channels — the
    numbers a cost model multiplies (one dense layer costs 2·N·I·O FLOPs)."""
    w = weight_of(base)
    out, fan_in = int(w.shape[0]), int(w[0].numel())
    if isinstance(base, nn.Linear):
        return max(1, x.numel() // max(1, int(x.shape[-1]))), fan_in, out
    stride = cast("tuple[int, ...]", getattr(base, "stride", (1,)))
    spatial = x.shape[2:] if x.ndim == w.ndim else x.shape[1:]
    batch = int(x.shape[0]) if x.ndim == w.ndim else 1
    # a list, not a generator: torch.compile traces this inside checkpointed regions,
    # where a generator argument cannot be traced
    positions = batch * math.prod([max(1, int(s) // int(st)) for s, st in
                                   zip(spatial, stride, strict=False)])
    return max(1, positions), fan_in, out


class AdapterLayer(nn.Module):
    """Base class of one adapted layer. Subclasses define ``delta_weight`` and may
    override ``bypass``, ``delta_bias`` and ``forward``.

    Parameters are kept in their own (master) dtype and cast to the compute dtype of
    the input on use.
    """

    #: Set by the spec; used when writing files.
    algorithm: str = ""
    #: ``adapter.path``: ``auto`` (the cost model decides), ``factored`` or ``rebuild``.
    path: TrainingPath = "auto"
    #: The path the last weight-mode forward took (``None`` before the first).
    last_path: Literal["factored", "rebuild"] | None = None

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        self._base = (base,)  # a tuple keeps the base layer out of this module's tree
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.multiplier = 1.0
        #: ``choose_path``'s answers by ``(path, *input shape)``
        self._paths: dict[tuple[Any, ...], Literal["factored", "rebuild"]] = {}

    @property
    def base(self) -> nn.Module:
        return self._base[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta_weight(self) -> torch.Tensor:
        """ΔW in the shape of the base weight, scale and multiplier included."""
        raise NotImplementedError

    def delta_bias(self) -> torch.Tensor | None:
        """Δb, or ``None`` when the algorithm leaves the bias alone."""
        return None

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors to save, by parameter key (``lora_down.weight``, ``alpha``...)."""
        raise NotImplementedError

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        return x.dtype if x.is_floating_point() else torch.float32

    # -- the training path ----------------------------------------------------------
    def path_flops(self, x: torch.Tensor) -> tuple[float, float] | None:
        """The cost model: ``(factored, rebuild)`` FLOPs of the adapter's share of one
        forward+backward on ``x`` (what both paths share — the base op and dL/dx through
        it — left out); ``None`` when the algorithm has no factored form here."""
        return None

    def choose_path(self, x: torch.Tensor) -> Literal["factored", "rebuild"]:
        """The path weight mode takes for ``x``: ``path`` unless that is ``auto``, then
        the cheaper by ``path_flops``; ``rebuild`` where no factored form exists.

        The answer depends only on ``path``, the input's shape and the layer's own
        structure, so it is remembered per ``(path, shape)``: the cost model runs once
        per input shape, not on every forward (a few tens of microseconds per layer and
        step otherwise). A subclass that changes what ``path_flops`` answers calls
        ``forget_paths``."""
        if torch.compiler.is_compiling():  # traced once; no state to keep in the graph
            return self._cheaper_path(x)
        key = (self.path, *x.shape)
        path = self._paths.get(key)
        if path is None:
            path = self._paths[key] = self._cheaper_path(x)
        return path

    def forget_paths(self) -> None:
        """Drop the paths ``choose_path`` remembered (the cost model changed)."""
        self._paths.clear()

    def _cheaper_path(self, x: torch.Tensor) -> Literal["factored", "rebuild"]:
        costs = self.path_flops(x)
        if costs is None or self.path == "rebuild":
            return "rebuild"
        if self.path == "factored":
            return "factored"
        factored, rebuild = costs
        return "factored" if factored <= rebuild else "rebuild"

    def run_factored(self, x: torch.Tensor) -> torch.Tensor:
        """The factored path: the base op with its own weight, then ``bypass``."""
        base = self.base
        return self.bypass(x, layer_op(base, x, weight_of(base), bias_of(base)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Weight mode: the factored or the rebuild path (see ``choose_path``)."""
        path = self.choose_path(x)
        if not torch.compiler.is_compiling() and path != self.last_path:
            # not while torch.compile traces: an attribute set inside a checkpointed
            # region breaks its graph; compiled code runs the path chosen at trace time
            # and leaves ``last_path`` as the last eager forward set it (the check comes
            # first, so tracing reads no attribute to guard on). Set only on a change:
            # ``nn.Module.__setattr__`` costs microseconds per layer and step.
            self.last_path = path
        return self.run_factored(x) if path == "factored" else self.rebuild(x)

    def rebuild(self, x: torch.Tensor) -> torch.Tensor:
        """The rebuild path: the base operation with W+ΔW (and b+Δb)."""
        base = self.base
        w = weight_of(base)
        dw = self.delta_weight().to(dtype=w.dtype, device=w.device)
        b = bias_of(base)
        db = self.delta_bias()
        if db is not None:
            db = db.to(dtype=w.dtype, device=w.device)
            b = db if b is None else b + db
        return layer_op(base, x, w + dw, b)

    def bypass(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """The adapted output given the base output. Default: add the delta layer's
        output, which never reads the base weight."""
        dw = self.delta_weight().to(dtype=base_out.dtype, device=base_out.device)
        db = self.delta_bias()
        if db is not None:
            db = db.to(dtype=base_out.dtype, device=base_out.device)
        return base_out + layer_op(self.base, x.to(base_out.dtype), dw, db)

    @torch.no_grad()
    def merge(self) -> None:
        """Add ΔW (and Δb) into the base layer's parameters in place."""
        base = self.base
        weight, bias = weight_of(base), bias_of(base)
        weight.add_(self.delta_weight().to(weight.dtype))
        db = self.delta_bias()
        if db is not None:
            if bias is None:
                base.bias = nn.Parameter(db.to(weight.dtype), requires_grad=False)
            else:
                bias.add_(db.to(bias.dtype))


NORMS: tuple[type, ...] = (nn.GroupNorm, nn.LayerNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def _channels_last(base: nn.Module) -> bool:
    return isinstance(base, (nn.Linear, nn.LayerNorm)) or (
        hasattr(nn, "RMSNorm") and isinstance(base, nn.RMSNorm))


class ChannelDelta(AdapterLayer):
    """Full deltas of a layer's 1-D parameters, as ComfyUI trains them: ``diff_b`` for a
    bias (any layer) and ``diff`` for a norm layer's scale. Both start at zero and act
    on the output alone, so one formula serves every mode:
    ``y + norm(x)·diff + diff_b`` (the normalised input times the scale delta)."""

    algorithm = "diff"

    def __init__(self, base: nn.Module, weight: bool, bias: bool):
        super().__init__(base, 1, 1.0)
        self.diff = nn.Parameter(torch.zeros(weight_of(base).shape)) if weight else None
        self.diff_b = (nn.Parameter(torch.zeros(cast(torch.Tensor, base.bias).shape))
                       if bias else None)  # asked for only when the base has a bias

    def _channel(self, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        t = t.to(out.dtype) * self.multiplier
        if _channels_last(self.base):
            return t
        return t.reshape(-1, *([1] * (out.ndim - 2)))

    def _normalised(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base
        if isinstance(b, nn.GroupNorm):
            return F.group_norm(x, b.num_groups, None, None, b.eps)
        if isinstance(b, nn.LayerNorm):
            return F.layer_norm(x, b.normalized_shape, None, None, b.eps)
        # A scale delta exists only on NORMS, so what is left is an RMSNorm (named as a
        # string: older torch has no nn.RMSNorm, and then this line is never reached).
        rms = cast("nn.RMSNorm", b)
        return F.rms_norm(x, rms.normalized_shape, None, rms.eps)

    def bypass(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        out = base_out
        if self.diff is not None:
            out = out + self._normalised(x.to(out.dtype)) * self._channel(self.diff, out)
        if self.diff_b is not None:
            out = out + self._channel(self.diff_b, out)
        return out

    def delta_weight(self) -> torch.Tensor:
        if self.diff is None:
            return torch.zeros_like(weight_of(self.base))
        return self.diff * self.multiplier

    def delta_bias(self) -> torch.Tensor | None:
        return None if self.diff_b is None else self.diff_b * self.multiplier

    def file_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.diff is not None:
            out["diff"] = self.diff
        if self.diff_b is not None:
            out["diff_b"] = self.diff_b
        return out

    @classmethod
    def fresh(cls, base: nn.Module) -> ChannelDelta | None:
        """Deltas for every 1-D parameter ComfyUI trains on ``base``, or None."""
        weight = isinstance(base, NORMS) and getattr(base, "weight", None) is not None
        bias = getattr(base, "bias", None) is not None
        return cls(base, weight, bias) if (weight or bias) else None

    @classmethod
    def from_tensors(cls, base: nn.Module, tensors: dict[str, torch.Tensor]) -> ChannelDelta:
        layer = cls(base, "diff" in tensors, "diff_b" in tensors)
        with torch.no_grad():
            for name in ("diff", "diff_b"):
                if name in tensors:
                    target = getattr(layer, name)
                    if target.numel() != tensors[name].numel():
                        raise ValueError(f"{name} has {tensors[name].numel()} values; the "
                                         f"layer needs {target.numel()}")
                    target.copy_(tensors[name].reshape(target.shape).float())
        return layer


DELTA_KEYS = frozenset({"diff", "diff_b"})


def split_deltas(params: dict[str, torch.Tensor]
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Separate a saved module's 1-D channel deltas (``diff_b``, a norm's 1-D ``diff``)
    from its adapter tensors. A ``diff`` of two or more dimensions is a full ΔW and stays
    with the adapter (the ``full`` algorithm)."""
    if "diff" in params and params["diff"].ndim >= 2:
        return dict(params), {}
    deltas = {k: v for k, v in params.items() if k in DELTA_KEYS}
    return {k: v for k, v in params.items() if k not in DELTA_KEYS}, deltas
