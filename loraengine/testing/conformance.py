"""The adapter conformance suite: what every adapter algorithm, built in or third party,
must satisfy.

For each layer case (Linear, Conv1d, Conv2d 3×3, Conv2d 1×3, Conv2d stride 2, Conv3d,
all with a bias) and an ``alpha`` different from ``rank``, the checks are:

- ``options``: the options model forbids unknown keys, has a valid default for every
  option, defines none of the keys the engine gives every algorithm (``adapter.rank``,
  ``adapter.alpha``...: the engine refuses such a plugin) and gives a JSON schema;
- ``parameters``: the adapter ``spec.create`` builds has at least one trainable
  ``nn.Parameter``, and no tensor attribute (or buffer) of it requires a gradient
  without being a registered parameter (the optimizer never sees such a tensor, so it
  never trains);
- ``zero_init``: ΔW (and Δb) is exactly zero at init, and the bypass and weight-mode
  outputs equal the base layer's output bit for bit;
- ``paths_agree``: after perturbing the adapter's parameters (seeded), the bypass
  output, the rebuilt-weight output (the base operation run with W+ΔW, b+Δb), the
  adapter's own forward and the merged-weight output agree in fp32 (≤ ``rtol``
  relative to the output's largest magnitude), and differ from the base output;
- ``file_roundtrip``: ``file_tensors()`` written to safetensors and read back, then
  ``spec.load`` into a fresh copy of the base layer, gives identical outputs; the
  spec's ``owns_keys`` recognises the keys, and the loaded adapter passes the
  ``parameters`` check too (training resumed from a file must train);
- ``gradients``: with the base frozen, every adapter parameter gets a finite gradient,
  none is the base layer's own tensor, and the base weight/bias get no gradient;
- ``training_paths``: weight mode forced onto the factored path and onto the rebuild
  path (``adapter.path``) gives the same output and the same gradients of every
  adapter parameter and of the input (fp32, ≤ ``rtol`` relative), and the forced
  path is the one taken where the algorithm has a factored form (``path_flops``);
- ``low_precision``: with the base in fp16 and in bf16 (adapter in fp32 and cast to
  the same dtype) the outputs keep the input dtype, are finite and near the fp32 ones.

A plugin's tests use it in one line::

    from loraengine.testing.conformance import run_adapter_conformance
    run_adapter_conformance(MY_SPEC, {"my_option": 2})

or parametrised, one test per case and check::

    @pytest.mark.parametrize("case", adapter_cases(), ids=str)
    @pytest.mark.parametrize("check", CHECKS)
    def test_conformance(case, check):
        run_check(MY_SPEC, case, check, {"my_option": 2})

Every failure is an ``AssertionError`` naming the algorithm, options, case and check:
an output of the wrong shape, and an exception from the algorithm's own code
(``create``, ``load``, ``file_tensors``, ``bypass``...) included.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from loraengine.core.adapter import AdapterLayer, AdapterNetwork, AttachMode, layer_op
from loraengine.core.adapter.layer import bias_of, weight_of
from loraengine.core.plugins.specs import AdapterSpec
from loraengine.testing.suite import (
    Checks,
    ConformanceReport,
    Failing,
    options_check,
    options_text,
    relative_error,
    resolve,
)

__all__ = [
    "CHECKS", "ConformanceReport", "LayerCase", "adapter_cases", "build_adapter",
    "parameter_problem", "perturb", "relative_error", "resolve_options",
    "run_adapter_conformance", "run_check",
]

#: Defaults of the suite: alpha deliberately differs from rank.
RANK, ALPHA = 4, 3.0


@dataclass(frozen=True)
class LayerCase:
    """One base layer to adapt: a constructor and the shape of an input batch."""

    name: str
    make: Callable[[], nn.Module]
    input_shape: tuple[int, ...]

    def __str__(self) -> str:
        return self.name

    def layer(self, seed: int = 0) -> nn.Module:
        """The base layer with seeded weights and bias (never the global RNG)."""
        module = self.make()
        g = torch.Generator().manual_seed(1000 + seed)
        with torch.no_grad():
            w, bias = weight_of(module), bias_of(module)
            w.copy_(torch.randn(w.shape, generator=g) / w[0].numel() ** 0.5)
            if bias is not None:
                bias.copy_(torch.randn(bias.shape, generator=g) * 0.1)
        module.requires_grad_(False)
        return module.eval()

    def input(self, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        g = torch.Generator().manual_seed(2000 + seed)
        return torch.randn(self.input_shape, generator=g).to(dtype)

    def supported_by(self, spec: AdapterSpec) -> bool:
        """Whether ``spec`` declares it adapts this kind of layer."""
        return not spec.layer_types or isinstance(self.make(), spec.layer_types)


def _skip(cls: type[nn.Module], *args: Any, **kwargs: Any) -> Callable[[], nn.Module]:
    # skip_init: no draw from the global RNG; ``layer()`` fills the tensors itself.
    return lambda: nn.utils.skip_init(cls, *args, **kwargs)


def adapter_cases(spec: AdapterSpec | None = None) -> list[LayerCase]:
    """The layer cases; with ``spec``, only those its ``layer_types`` allow.

    Channel counts are composite (LoKr factorises them, OFT splits them into blocks).
    """
    cases = [
        LayerCase("linear", _skip(nn.Linear, 24, 16), (3, 24)),
        LayerCase("conv1d", _skip(nn.Conv1d, 8, 16, 3, padding=1), (2, 8, 9)),
        LayerCase("conv2d_3x3", _skip(nn.Conv2d, 8, 16, 3, padding=1), (2, 8, 7, 7)),
        LayerCase("conv2d_1x3", _skip(nn.Conv2d, 8, 16, (1, 3), padding=(0, 1)),
                  (2, 8, 5, 6)),
        LayerCase("conv2d_stride2", _skip(nn.Conv2d, 8, 16, 3, stride=2, padding=1),
                  (2, 8, 8, 8)),
        LayerCase("conv3d", _skip(nn.Conv3d, 4, 8, 3, padding=1), (2, 4, 4, 5, 5)),
    ]
    if spec is not None:
        cases = [c for c in cases if c.supported_by(spec)]
    return cases


# -- helpers --------------------------------------------------------------------------

def resolve_options(spec: AdapterSpec, options: Any = None) -> Any:
    """``None`` or a mapping -> the spec's validated option model; a model passes."""
    return resolve(spec.config_model, options)


def build_adapter(spec: AdapterSpec, base: nn.Module, options: Any = None, *,
                  rank: int = RANK, alpha: float = ALPHA, seed: int = 0) -> AdapterLayer:
    """A fresh adapter from ``spec.create`` with a seeded generator."""
    layer = _create(spec, base, resolve_options(spec, options), rank, alpha, seed)
    layer.algorithm = spec.name
    return layer


def _create(spec: AdapterSpec, base: nn.Module, options: Any, rank: int, alpha: float,
            seed: int) -> AdapterLayer:
    g = torch.Generator().manual_seed(3000 + seed)
    return spec.create(base, rank, alpha, options, g)


def _unregistered(adapter: nn.Module) -> list[str]:
    """Tensors of the adapter that require a gradient without being registered
    parameters: plain attributes (also inside a list, tuple or dict attribute) and
    buffers. The optimizer is handed ``parameters()``, so none of them ever trains."""
    found = []
    for prefix, module in adapter.named_modules():
        at = f"{prefix}." if prefix else ""
        for name, value in vars(module).items():
            members: Iterable[tuple[str, Any]] = [(name, value)]
            if isinstance(value, (list, tuple)):
                members = [(f"{name}[{i}]", v) for i, v in enumerate(value)]
            elif isinstance(value, dict) and not name.startswith("_"):
                members = [(f"{name}[{k!r}]", v) for k, v in value.items()]
            found += [f"{at}{n}" for n, v in members
                      if isinstance(v, torch.Tensor) and v.requires_grad]
        found += [f"{at}{n} (a buffer)" for n, b in module.named_buffers(recurse=False)
                  if b.requires_grad]
    return found


def parameter_problem(adapter: nn.Module) -> str | None:
    """What the ``parameters`` check finds wrong with an adapter's parameters, or
    ``None``."""
    stray = _unregistered(adapter)
    if len(stray) == 1:
        stray_text = (f"{stray[0]} requires a gradient but is not a registered "
                      f"nn.Parameter: the optimizer never receives it, so it never trains")
    else:
        stray_text = (f"{', '.join(stray)} require a gradient but are not registered "
                      f"nn.Parameters: the optimizer never receives them, so they never "
                      f"train")
    stray_text += (" (assign an nn.Parameter to the attribute, or use register_buffer "
                   "for a tensor that stays fixed)")
    if not any(p.requires_grad for p in adapter.parameters()):
        return ("the adapter has no trainable parameters (no registered nn.Parameter "
                "with requires_grad=True): training would have nothing to optimise"
                + (f"; {stray_text}" if stray else ""))
    return stray_text if stray else None


@torch.no_grad()
def perturb(adapter: AdapterLayer, seed: int = 0, std: float = 0.1) -> None:
    """Add seeded noise to every trainable adapter parameter, so nothing is zero."""
    g = torch.Generator().manual_seed(4000 + seed)
    for _, p in sorted(adapter.named_parameters()):
        if p.requires_grad:
            p.add_((torch.randn(p.shape, generator=g) * std).to(p.dtype))


def _rebuilt(adapter: AdapterLayer, x: torch.Tensor) -> torch.Tensor:
    """The base operation with W+ΔW and b+Δb, computed here, not by the adapter."""
    base = adapter.base
    weight = weight_of(base)
    w = weight + adapter.delta_weight().to(weight.dtype)
    b = bias_of(base)
    db = adapter.delta_bias()
    if db is not None:
        b = db.to(w.dtype) if b is None else b + db.to(b.dtype)
    return layer_op(base, x, w, b)


def _attached(adapter: AdapterLayer, x: torch.Tensor, mode: AttachMode) -> torch.Tensor:
    """Call the base layer with the adapter attached through an AdapterNetwork."""
    net = AdapterNetwork({"layer": adapter})
    net.attach(mode)
    try:
        out: torch.Tensor = adapter.base(x)  # Module.__call__ is typed Any
        return out
    finally:
        net.detach()


def _roundtrip_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` (an adapter's ``file_tensors()``) through a real safetensors
    serialisation."""
    return st_load(st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}))


def _shape(t: Any) -> Any:
    return list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


# -- the checks -----------------------------------------------------------------------

class _Ctx:
    """Everything one check needs, with a failure message prefix."""

    def __init__(self, spec: AdapterSpec, case: LayerCase, check: str, options: Any,
                 rank: int, alpha: float, seed: int, rtol: float):
        self.spec, self.case, self.check, self.rank, self.alpha = spec, case, check, rank, alpha
        self.options = resolve_options(spec, options)
        self.seed, self.rtol = seed, rtol
        self.fail = Failing(f"{spec.name}{options_text(self.options) or ''} on {case.name}")

    def input(self) -> torch.Tensor:
        return self.case.input(self.seed)

    def fresh(self) -> tuple[nn.Module, AdapterLayer]:
        base = self.case.layer(self.seed)
        with self.fail.calling(self.check, "spec.create(layer, rank, alpha, options, "
                               "generator)"):
            adapter = _create(self.spec, base, self.options, self.rank, self.alpha,
                              self.seed)
        if not isinstance(adapter, AdapterLayer):
            raise self.fail(self.check, f"spec.create returned {type(adapter).__name__}, "
                            f"not an AdapterLayer")
        adapter.algorithm = self.spec.name
        return base, adapter

    def load(self, base: nn.Module, tensors: dict[str, torch.Tensor]) -> AdapterLayer:
        """``spec.load`` on ``base``, failing the check when it raises or returns
        something else than an adapter."""
        with self.fail.calling(self.check, "spec.load(layer, tensors, options)"):
            loaded = self.spec.load(base, tensors, self.options)
        if not isinstance(loaded, AdapterLayer):
            raise self.fail(self.check, f"spec.load returned {type(loaded).__name__}, not "
                            f"an AdapterLayer")
        loaded.algorithm = self.spec.name
        return loaded

    def file_tensors(self, adapter: AdapterLayer) -> dict[str, torch.Tensor]:
        """``file_tensors()`` through a real safetensors serialisation, failing the
        check when the adapter does not give a mapping of names to tensors."""
        if type(adapter).file_tensors is AdapterLayer.file_tensors:
            raise self.fail(self.check, f"{type(adapter).__name__} does not implement "
                            f"file_tensors() (AdapterLayer's raises NotImplementedError): "
                            f"return the tensors to save under their key names, alpha "
                            f"included")
        with self.fail.calling(self.check, "file_tensors()"):
            tensors = adapter.file_tensors()
        if not isinstance(tensors, Mapping) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()):
            raise self.fail(self.check, f"file_tensors() returned {type(tensors).__name__}, "
                            f"not a mapping of key names to tensors")
        with self.fail.calling(self.check, "saving file_tensors() as safetensors"):
            return _roundtrip_tensors(tensors)

    def shape_matches(self, label: str, out: Any, want: torch.Tensor, of: str) -> None:
        """Fail the check unless ``out`` is a tensor of ``want``'s shape."""
        if not isinstance(out, torch.Tensor) or out.shape != want.shape:
            raise self.fail(self.check, f"{label} output shape {_shape(out)} != {of} "
                            f"shape {list(want.shape)}")

    def error(self, label: str, out: Any, want: torch.Tensor, of: str) -> float:
        """:func:`relative_error` of ``out`` from ``want``, after failing the check when
        their shapes differ."""
        self.shape_matches(label, out, want, of)
        return relative_error(out, want)

    def perturbed(self) -> tuple[nn.Module, AdapterLayer]:
        base, adapter = self.fresh()
        perturb(adapter, self.seed)
        return base, adapter

    def identical(self, check: str, outputs: Iterable[tuple[str, torch.Tensor, torch.Tensor]],
                  differs: str, of: str) -> None:
        """Fail ``check`` unless each ``(label, out, want)`` matches bit for bit; ``of``
        names what ``want`` is (for a difference in shape)."""
        for label, out, want in outputs:
            self.shape_matches(label, out, want, of)
            if not torch.equal(out, want):
                raise self.fail(check, f"{label} output {differs} "
                                f"(relative {relative_error(out, want):.3g})")


_TABLE: Checks[_Ctx] = Checks()
_TABLE("options")(options_check("adapter"))


@_TABLE("parameters")
def _check_parameters(c: _Ctx) -> None:
    _, adapter = c.fresh()
    problem = parameter_problem(adapter)
    if problem is not None:
        raise c.fail("parameters", problem)


@_TABLE("zero_init")
@torch.no_grad()
def _check_zero_init(c: _Ctx) -> None:
    base, adapter = c.fresh()
    x = c.input()
    dw = adapter.delta_weight()
    weight = weight_of(base)
    if tuple(dw.shape) != tuple(weight.shape):
        raise c.fail("zero_init", f"delta_weight shape {list(dw.shape)} != weight shape "
                     f"{list(weight.shape)}")
    if int(torch.count_nonzero(dw)):
        raise c.fail("zero_init", f"ΔW has {int(torch.count_nonzero(dw))} non-zero "
                     f"entries at init (max |ΔW| {float(dw.abs().max()):.3g})")
    db = adapter.delta_bias()
    if db is not None and int(torch.count_nonzero(db)):
        raise c.fail("zero_init", "Δb is not zero at init")
    ref = base(x)
    c.identical("zero_init", ((label, out, ref) for label, out in (
        ("bypass", adapter.bypass(x, base(x))),
        ("bypass hook", _attached(adapter, x, "bypass")),
        ("weight mode", _attached(adapter, x, "weight")))),
        "differs from the base output at init", "the base layer's output")


@_TABLE("paths_agree")
@torch.no_grad()
def _check_paths_agree(c: _Ctx) -> None:
    base, adapter = c.perturbed()
    x = c.input()
    base_out = base(x)
    outs = {
        "bypass": adapter.bypass(x, base(x)),
        "bypass hook": _attached(adapter, x, "bypass"),
        "adapter forward": adapter(x),
        "weight mode": _attached(adapter, x, "weight"),
    }
    rebuilt = _rebuilt(adapter, x)
    if relative_error(rebuilt, base_out) < 1e-4:
        raise c.fail("paths_agree", "after perturbing the parameters the adapted output "
                     "still equals the base output: the adapter has no effect")
    adapter.merge()
    outs["merged"] = base(x)
    for label, out in outs.items():
        err = c.error(label, out, rebuilt, "the rebuilt-weight output's")
        if not err <= c.rtol:
            raise c.fail("paths_agree", f"{label} output differs from the rebuilt-weight "
                         f"output by {err:.3g} relative (tolerance {c.rtol:g})")


@_TABLE("file_roundtrip")
@torch.no_grad()
def _check_file_roundtrip(c: _Ctx) -> None:
    base, adapter = c.perturbed()
    fresh_base = c.case.layer(c.seed)
    x = c.input()
    tensors = c.file_tensors(adapter)
    with c.fail.calling("file_roundtrip", "owns_keys(keys)"):
        owned = c.spec.owns_keys(set(tensors))
    if not owned:
        raise c.fail("file_roundtrip", f"owns_keys does not recognise its own keys "
                     f"{sorted(tensors)}")
    loaded = c.load(fresh_base, tensors)
    if loaded.base is not fresh_base:
        raise c.fail("file_roundtrip", "spec.load did not wrap the layer it was given")
    problem = parameter_problem(loaded)
    if problem is not None:
        raise c.fail("file_roundtrip", f"the adapter spec.load rebuilt: {problem}")
    c.identical("file_roundtrip",
                (("bypass", loaded.bypass(x, fresh_base(x)), adapter.bypass(x, base(x))),
                 ("adapter forward", loaded(x), adapter(x))),
                "after save/load differs", "the saved adapter's output")
    if not torch.equal(loaded.delta_weight(), adapter.delta_weight()):
        raise c.fail("file_roundtrip", "ΔW after save/load differs")
    again = c.file_tensors(loaded)
    if set(again) != set(tensors):
        raise c.fail("file_roundtrip", f"keys change on a second save: {sorted(tensors)} "
                     f"-> {sorted(again)}")


@_TABLE("gradients")
def _check_gradients(c: _Ctx) -> None:
    base, adapter = c.perturbed()
    x = c.input()
    base_tensors = [t for t in (weight_of(base), bias_of(base)) if t is not None]
    params = [(n, p) for n, p in adapter.named_parameters() if p.requires_grad]
    if not params:
        raise c.fail("gradients", "the adapter has no trainable parameters")
    for n, p in adapter.named_parameters():
        if any(p is t or p.data_ptr() == t.data_ptr() for t in base_tensors):
            raise c.fail("gradients", f"adapter parameter {n} is the base layer's tensor")
    g = torch.Generator().manual_seed(5000 + c.seed)
    modes: tuple[AttachMode, ...] = ("bypass", "weight")
    for mode in modes:
        adapter.zero_grad(set_to_none=True)
        out = _attached(adapter, x, mode)
        (out * torch.randn(out.shape, generator=g)).sum().backward()
        for t, label in zip(base_tensors, ("weight", "bias"), strict=False):
            if t.grad is not None:
                raise c.fail("gradients", f"{mode} mode: the base {label} got a gradient")
        grads = []
        for n, p in params:
            if p.grad is None:
                raise c.fail("gradients", f"{mode} mode: parameter {n} got no gradient")
            if not bool(torch.isfinite(p.grad).all()):
                raise c.fail("gradients", f"{mode} mode: parameter {n} has a non-finite "
                             f"gradient")
            grads.append(p.grad)
        if not any(bool(grad.abs().sum() > 0) for grad in grads):
            raise c.fail("gradients", f"{mode} mode: every gradient is zero")


@_TABLE("training_paths")
def _check_training_paths(c: _Ctx) -> None:
    _, adapter = c.perturbed()
    x0 = c.input()
    has_factored = adapter.path_flops(x0) is not None
    results: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for path in ("rebuild", "factored"):
        adapter.path = path
        adapter.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        adapter.last_path = None
        out = _attached(adapter, x, "weight")
        if adapter.last_path is None:
            return  # its own forward (not the base's path choice): no paths to compare
        want = path if has_factored else "rebuild"
        if adapter.last_path != want:
            raise c.fail("training_paths", f"adapter.path {path}: weight mode took the "
                         f"{adapter.last_path} path, not {want}")
        g = torch.Generator().manual_seed(6000 + c.seed)
        (out * torch.randn(out.shape, generator=g)).sum().backward()
        got = [("output", out.detach()), ("input gradient", _grad_of(x))]
        got += [(f"gradient of {n}", _grad_of(p)) for n, p in adapter.named_parameters()
                if p.requires_grad]
        results[path] = got
    adapter.path = "auto"
    for (label, f), (_, r) in zip(results["factored"], results["rebuild"], strict=True):
        err = c.error(f"factored {label}", f, r, "the rebuild path's")
        if not err <= c.rtol:
            raise c.fail("training_paths", f"factored {label} differs from the rebuild "
                         f"path's by {err:.3g} relative (tolerance {c.rtol:g})")


def _grad_of(t: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(t) if t.grad is None else t.grad.detach().clone()


#: Loose agreement with fp32 expected of each half precision.
LOW_PRECISION_TOL = {torch.float16: 2e-2, torch.bfloat16: 1e-1}


@_TABLE("low_precision")
@torch.no_grad()
def _check_low_precision(c: _Ctx) -> None:
    base, adapter = c.perturbed()
    x32 = c.input()
    ref = _rebuilt(adapter, x32)
    modes: tuple[AttachMode, ...] = ("bypass", "weight")
    for dtype, tol in LOW_PRECISION_TOL.items():
        for adapter_dtype in (torch.float32, dtype):
            b = copy.deepcopy(base).to(dtype)
            a = c.load(b, c.file_tensors(adapter)).to(adapter_dtype)
            x = x32.to(dtype)
            for mode in modes:
                out = _attached(a, x, mode)
                what = f"{mode} mode, base {dtype}, adapter {adapter_dtype}"
                if out.dtype != dtype:
                    raise c.fail("low_precision", f"{what}: output dtype {out.dtype}")
                if not bool(torch.isfinite(out).all()):
                    raise c.fail("low_precision", f"{what}: non-finite output")
                err = c.error(what, out, ref, "the fp32 output's")
                if not err <= tol:
                    raise c.fail("low_precision", f"{what}: {err:.3g} relative from fp32 "
                                 f"(tolerance {tol:g})")


#: The checks, in the order they run.
CHECKS: tuple[str, ...] = _TABLE.names


# -- entry points ---------------------------------------------------------------------

def run_check(spec: AdapterSpec, case: LayerCase, check: str, options: Any = None, *,
              rank: int = RANK, alpha: float = ALPHA, seed: int = 0,
              rtol: float = 1e-5) -> None:
    """Run one check on one case; raise ``AssertionError`` when it fails."""
    _TABLE.run(check, lambda: _Ctx(spec, case, check, options, rank, alpha, seed, rtol),
               f"{spec.name} on {case.name}")


def run_adapter_conformance(spec: AdapterSpec, options: Mapping[str, Any] | Any = None, *,
                            rank: int = RANK, alpha: float = ALPHA, seed: int = 0,
                            rtol: float = 1e-5, cases: Iterable[LayerCase] | None = None,
                            checks: Iterable[str] = CHECKS) -> ConformanceReport:
    """Run every check on every case the spec supports; raise ``AssertionError`` on the
    first failure, else return what ran."""
    if alpha == rank:
        raise ValueError("conformance needs alpha != rank, or a wrong scale goes unseen")
    report = ConformanceReport(spec.name)
    checks = list(checks)
    for case in (adapter_cases() if cases is None else list(cases)):
        if not case.supported_by(spec):
            report.skipped.append(case.name)
            continue
        for check in checks:
            run_check(spec, case, check, options, rank=rank, alpha=alpha, seed=seed,
                      rtol=rtol)
            report.passed.append((case.name, check))
    if not report.passed:
        raise AssertionError(f"{spec.name}: supports none of the conformance cases")
    return report
