"""Memory and cost planning: what one training step will need, before training.

``estimate`` builds the configured pipeline (model family, adapters, every enabled
memory strategy, optimizer) on the ``meta`` device and runs training steps there: every
tensor has its shape and dtype but no storage, so nothing is computed and no device
memory is used (the model family still reads the weights once on the host to learn the
shapes). A dispatch-mode counter follows every meta allocation and its release, so the
peak it reports is the live bytes of a real step under the real strategies: what
checkpointing recomputes, what offloading loads and releases, what a quantized base
stores. The first step creates the optimizer state, the second is the one reported and
a third counts the FLOPs. Attention takes the fused kernel the CPU and CUDA would take
(on ``meta`` PyTorch would otherwise pick the unfused path, which keeps the attention
matrix). Not modelled: allocator caching and fragmentation, library workspaces.

``measure`` runs real steps on the pipeline's device and reports the measured peak, to
check an estimate: on CUDA from the allocator's own peak counter; on the CPU as the
tensors resident at the start of the step (the model's, the adapter's and the optimizer
state, host copies of offloading excluded) plus the largest rise of allocated bytes
that the CPU allocator reports to ``torch.profiler`` during one full step.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import os
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from loraengine.core.errors import ConfigError
from loraengine.core.plugins.host import PluginHost

MiB = 1024 * 1024

#: What the estimate leaves out (printed with every plan).
NOT_COUNTED = ("the interpreter and libraries (on a CPU about 0.4 GiB of resident "
               "memory before loading, some 60 MiB more once a step has run their "
               "kernels), the Python objects of the model's and the "
               "adapter's modules (host memory: about 140 MiB for an SD1.5 or SDXL UNet), "
               "memory the allocator keeps after tensors are "
               "freed (fragmentation, caching), scratch buffers inside kernels "
               "(convolution, attention), the data set held in memory")


@dataclass
class MemoryPlan:
    """Bytes of one training step's peak by kind, and the step's cost."""

    weights_device: int
    weights_host: int
    adapter: int
    optimizer_state: int
    gradients: int
    other_resident: int
    activations: int
    peak: int
    forward_flops: int
    backward_flops: int
    transfer_bytes: int
    strategies: list[str] = field(default_factory=list)
    device: str = ""

    def rows(self) -> list[tuple[str, int]]:
        return [("base weights (device)", self.weights_device),
                ("base weights (host, offloaded)", self.weights_host),
                ("adapter", self.adapter),
                ("optimizer state", self.optimizer_state),
                ("gradients", self.gradients),
                ("other resident tensors", self.other_resident),
                ("activations and temporaries", self.activations),
                ("estimated peak (device)", self.peak)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Measurement:
    """A measured step: device peak bytes, bytes resident at its start, its seconds."""

    peak: int
    resident: int
    seconds: float


# -- counting live bytes ---------------------------------------------------------------

#: The meta device's shape functions (most are Python: ``torch._refs`` and the
#: decompositions) remembered: per operator and its inputs' metadata, its outputs'.
_SHAPES: dict[Any, Any] = {}
_SHAPES_LIMIT = 50_000
#: Per operator: whether its outputs may be read from ``_SHAPES`` (``FRESH``: they
#: are new tensors; ``IN_PLACE``: the result is its first argument, written in place),
#: or need not be counted (``ALIASING``: views, every result an argument's storage).
_REUSABLE: dict[Any, int] = {}
FRESH, IN_PLACE, ALIASING = 1, 2, 3
#: Whether ``LiveBytes`` reads meta outputs from ``_SHAPES`` (tests plan both ways).
reuse_shapes = True

_SCALARS = frozenset((int, float, bool, complex, str, type(None), torch.dtype, torch.device,
                      torch.memory_format, torch.layout))
_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _reusable(func: Any) -> int:
    """How an ATen operator's outputs follow from its inputs' metadata: ``FRESH`` (no
    argument or result aliased or written: new tensors), ``IN_PLACE`` (writes its
    first argument's values only, and returns it), ``ALIASING`` (views: nothing
    written, every result aliases an argument, nothing new to count), 0 for any other
    (``out=``, metadata changed in place, an output whose shape hangs on values)."""
    known = _REUSABLE.get(func)
    if known is None:
        known = 0
        schema = getattr(func, "_schema", None)
        tags = set(getattr(func, "tags", ()))
        if getattr(func, "namespace", None) not in ("aten", "prims") or schema is None:
            pass
        elif schema.returns and all(r.alias_info is not None for r in schema.returns) \
                and not any(a.alias_info is not None and a.alias_info.is_write
                            for a in schema.arguments):
            known = ALIASING  # a view: nothing written, every result an argument's
        elif not tags & {torch.Tag.dynamic_output_shape, torch.Tag.data_dependent_output,
                         torch.Tag.inplace_view}:
            args, rets = schema.arguments, schema.returns
            if all(a.alias_info is None for a in (*args, *rets)):
                known = FRESH
            elif (torch.Tag.inplace in tags and args and len(rets) == 1
                  and args[0].alias_info is not None and args[0].alias_info.is_write
                  and args[0].alias_info.before_set
                  and rets[0].alias_info is not None
                  and rets[0].alias_info.before_set == args[0].alias_info.before_set
                  and all(a.alias_info is None for a in args[1:])):
                known = IN_PLACE
        _REUSABLE[func] = known
    return known


def _meta_key(values: Any, tensors: list[int]) -> tuple[Any, ...] | None:
    """A hashable picture of operator arguments as a meta kernel sees them (a meta
    tensor's dtype, shape, strides, offset and conj/neg bits; scalars with their
    type), or ``None`` for an argument of another kind; counts tensors in ``tensors``."""
    out: list[Any] = []
    for v in values:
        kind = type(v)
        if kind in _TENSORS:
            if not v.is_meta or v.layout != torch.strided:
                return None
            tensors[0] += 1
            out.append((v.dtype, v.shape, v.stride(), v.storage_offset(), v.is_conj(),
                        v.is_neg()))
        elif kind in _SCALARS:
            out.append((kind, v))
        elif kind is list or kind is tuple or kind is torch.Size:
            inner = _meta_key(v, tensors)
            if inner is None:
                return None
            out.append((kind, inner))
        else:
            return None
    return tuple(out)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in an operator's arguments or results (nested lists, tuples, dicts)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _out_spec(out: Any, inputs: set[int]) -> Any:
    """How to make ``out`` again (meta tensors of its dtype, shape and strides, alone
    or in a tuple or list, with ``None`` entries), or ``None`` where an output is
    another kind of value, shares a storage, or has a storage that ``empty_strided``
    would not give."""
    many = isinstance(out, (tuple, list))
    specs: list[Any] = []
    seen = set(inputs)
    for t in (out if many else (out,)):
        if t is None and many:
            specs.append(None)
            continue
        if (type(t) is not torch.Tensor or not t.is_meta or t.layout != torch.strided
                or t.is_conj() or t.is_neg() or t.storage_offset() != 0):
            return None
        st = t.untyped_storage()
        if id(st) in seen:
            return None
        seen.add(id(st))
        spec = (t.shape, t.stride(), t.dtype)
        if torch.empty_strided(spec[0], spec[1], dtype=spec[2], device="meta"
                               ).untyped_storage().nbytes() != st.nbytes():
            return None
        specs.append(spec)
    return (type(out) if many else None, specs)


def _remake(spec: Any) -> Any:
    kind, specs = spec
    outs = [None if s is None else torch.empty_strided(s[0], s[1], dtype=s[2], device="meta")
            for s in specs]
    return outs[0] if kind is None else kind(outs)


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of live storages on one device type, and their peak.

    A storage is counted when an operator returns it for the first time (outputs that
    share an input's storage, such as views and in-place results, are not new) and
    uncounted when it is freed, through a weak reference on the storage.

    On the meta device an operator's outputs depend only on its inputs' metadata, and
    working them out is most of a dry run's time (the shape functions are Python),
    while a model's repeated blocks call the same operators on the same shapes over
    and over: within a step, from step to step and from one plan to the next. So the
    outputs of an operator that makes fresh tensors from tensor inputs are remembered
    by operator and inputs' metadata (``_SHAPES``, for the process) and made again as
    empty meta tensors of the same dtype, shape and strides. Views, in-place
    operators and factories without tensor inputs always run.
    """

    def __init__(self, device_type: str):
        super().__init__()
        self.device_type = device_type
        self.live = 0
        self.peak = 0
        self._tracked: dict[int, Any] = {}

    def reset_peak(self) -> None:
        self.peak = self.live

    def _freed(self, key: int, nbytes: int, _ref: object = None) -> None:
        if self._tracked.pop(key, None) is not None:
            self.live -= nbytes

    def _count(self, st: Any) -> None:
        key = id(st)
        nbytes = st.nbytes()
        self._tracked[key] = weakref.ref(st, functools.partial(self._freed, key, nbytes))
        self.live += nbytes
        if self.live > self.peak:
            self.peak = self.live

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        kwargs = kwargs or {}
        key: Any = None
        kind = _reusable(func) if self.device_type == "meta" and reuse_shapes else 0
        if kind == ALIASING:
            return func(*args, **kwargs)
        if kind:
            count = [0]
            arg_key: Any = _meta_key(args, count)
            kw_key = _meta_key(tuple(kwargs.items()), count) if kwargs else ()
            # a factory without tensor inputs may read a global default (its dtype)
            if arg_key is not None and kw_key is not None and count[0]:
                key = (func, arg_key, kw_key)
                spec = _SHAPES.get(key)
                if spec is not None:
                    if kind == IN_PLACE:
                        return args[0]
                    out = _remake(spec)
                    for t in (out if spec[0] is not None else (out,)):
                        if t is not None:
                            self._count(t.untyped_storage())
                    return out
        out = func(*args, **kwargs)
        inputs = {id(_storage(t)) for t in _tensors((args, kwargs))}
        if key is not None and len(_SHAPES) < _SHAPES_LIMIT:
            if kind == FRESH:
                spec = _out_spec(out, inputs)
            else:  # the same tensor back, its metadata as it was
                spec = IN_PLACE if (out is args[0]
                                    and _meta_key(args[:1], [0]) == arg_key[:1]) else None
            if spec is not None:
                _SHAPES[key] = spec
        for t in _tensors(out):
            if t.device.type != self.device_type:
                continue
            st = _storage(t)
            if st is None or id(st) in inputs or id(st) in self._tracked:
                continue
            self._count(st)
        return out


def _storage(t: torch.Tensor) -> Any:
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


_sdpa = F.scaled_dot_product_attention


def _fused_attention_on_meta(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                             is_causal: bool = False, scale: float | None = None,
                             **kwargs: Any) -> torch.Tensor:
    """``scaled_dot_product_attention`` that takes the fused kernel on meta tensors,
    whose saved tensors (output and log-sum-exp) are what CPU and CUDA keep."""
    if query.device.type == "meta" and not kwargs.get("enable_gqa", False):
        try:
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                query, key, value, float(dropout_p), bool(is_causal), attn_mask=attn_mask,
                scale=scale)[0]
        except (RuntimeError, TypeError):
            pass  # shapes the fused kernel refuses: the default path
    return _sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                 is_causal=is_causal, scale=scale, **kwargs)


@contextlib.contextmanager
def _fused_attention() -> Iterator[None]:
    # Patched at module level rather than with a TorchFunctionMode: checkpointing's
    # recomputation in the backward pass must see it too.
    F.scaled_dot_product_attention = _fused_attention_on_meta  # type: ignore[assignment]
    try:
        yield
    finally:
        F.scaled_dot_product_attention = _sdpa


def _attention_flops(q: Any, k: Any, v: Any, *args: Any, **kwargs: Any) -> int:
    b, h, lq, d = q
    lk, dv = k[-2], v[-1]
    return 2 * b * h * lq * lk * (d + dv)


def _attention_backward_flops(grad: Any, q: Any, k: Any, v: Any, *args: Any, **kwargs: Any
                              ) -> int:
    return 2 * _attention_flops(q, k, v)


def _flop_counter() -> Any:
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    custom = {aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
              aten._scaled_dot_product_flash_attention_for_cpu_backward:
                  _attention_backward_flops}
    return FlopCounterMode(display=False, custom_mapping=custom)


# -- what is resident -------------------------------------------------------------------

def _nbytes(tensors: Iterable[torch.Tensor], device_type: str | None = None,
            exclude: set[int] | None = None, seen: set[int] | None = None) -> int:
    seen = set() if seen is None else seen
    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        if device_type is not None and t.device.type != device_type:
            continue
        st = _storage(t)
        if st is None or id(st) in seen or (exclude and id(st) in exclude):
            continue
        seen.add(id(st))
        total += st.nbytes()
    return total


def _optimizer_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in opt.state.values() for v in state.values()
            if isinstance(v, torch.Tensor)]


def _host_storages(pipe: Any) -> set[int]:
    return {id(_storage(t)) for t in pipe.host_resident}


def resident_parts(pipe: Any) -> dict[str, int]:
    """Bytes resident on the pipeline's device now, by kind (storages counted once)."""
    dev = pipe.device.type
    host = _host_storages(pipe)
    seen: set[int] = set()
    model = pipe.model
    weights = _nbytes([*model.parameters(), *model.buffers()], dev, host, seen)
    adapter = _nbytes(pipe.network.parameters(), dev, host, seen)
    state = _nbytes(_optimizer_tensors(pipe.optimizer), dev, host, seen)
    host_bytes = _nbytes(pipe.host_resident)
    return {"weights": weights, "adapter": adapter, "optimizer_state": state,
            "host": host_bytes}


def enabled_strategies(config: Any, host: PluginHost) -> list[str]:
    """The enabled memory strategies, in the order they apply, as each names itself."""
    return [spec.label(config)
            for spec in sorted(host.registry.specs("memory"), key=lambda s: s.order)
            if spec.enabled(config)]


@contextlib.contextmanager
def _earlier_objects_frozen() -> Iterator[None]:
    """Leave the objects that exist before a plan (the imported libraries, most of the
    process) out of its garbage collections (``gc.freeze``): the collection after the
    first step looks for cycles among what the dry run made, and walking the rest
    took as long as a step of a small model. Not done where the caller froze objects
    itself (``gc.unfreeze`` would release those too)."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class _CountFlops:
    """Counts the FLOPs of every forward pass and every backward pass of a step."""

    def __init__(self) -> None:
        self.forward_mode, self.backward_mode = _flop_counter(), _flop_counter()

    def forward(self) -> contextlib.AbstractContextManager[object]:
        return self.forward_mode

    def backward(self) -> contextlib.AbstractContextManager[object]:
        return self.backward_mode


def estimate(config: Any, host: PluginHost, *, model: torch.nn.Module | None = None,
             latents: Any = None, conditioning: Any = None,
             base_dir: Path | None = None, count_flops: bool = True) -> MemoryPlan:
    """Plan one training step of ``config`` by a dry run on the meta device (without
    ``count_flops``, the FLOP-counting step is skipped and the FLOPs read 0)."""
    from loraengine.core.build import build_pipeline
    from loraengine.core.devices import resolve_device
    from loraengine.core.train.loop import Trainer

    try:
        target = str(resolve_device(config.training.device))
    except ConfigError:  # planning for a GPU this machine lacks is still useful
        target = str(config.training.device)
    dry = config.model_copy(deep=True)
    dry.training.device = "meta"
    if model is not None:
        model = copy.deepcopy(model)  # the dry run moves it to meta
    counter = LiveBytes("meta")
    flops = _CountFlops()
    with _earlier_objects_frozen(), counter, _fused_attention():
        pipe = build_pipeline(dry, host, model=model, latents=latents,
                              conditioning=conditioning, base_dir=base_dir)
        try:
            trainer = Trainer(pipe, write_files=False)
            trainer.step()  # creates the optimizer state
            gc.collect()  # storages held only by reference cycles would count as live
            parts = resident_parts(pipe)
            offloader = pipe.offloader
            moved_before = offloader.stats["bytes_in"] if offloader is not None else 0
            start = counter.live
            counter.reset_peak()
            trainer.step()
            peak_rise = counter.peak - start
            moved = (offloader.stats["bytes_in"] - moved_before) if offloader else 0
            grads = _nbytes(pipe.trainable_parameters())
            # FLOPs in a step of their own: the counter keeps tensors alive that a
            # checkpointed step would free, which would spoil the memory figure.
            if count_flops:
                trainer.step(flops)
        finally:
            pipe.close()
    host_bytes = parts["host"]
    device_start = start - host_bytes
    known = parts["weights"] + parts["adapter"] + parts["optimizer_state"]
    activations = max(peak_rise - grads, 0)
    return MemoryPlan(
        weights_device=parts["weights"], weights_host=host_bytes, adapter=parts["adapter"],
        optimizer_state=parts["optimizer_state"], gradients=grads,
        other_resident=max(device_start - known, 0), activations=activations,
        peak=device_start + peak_rise,
        forward_flops=int(flops.forward_mode.get_total_flops()),
        backward_flops=int(flops.backward_mode.get_total_flops()), transfer_bytes=int(moved),
        strategies=enabled_strategies(config, host), device=target)


# -- measuring a real step ----------------------------------------------------------------

def _cpu_allocation_rise(fn: Callable[[], Any]) -> int:
    """The largest rise of CPU-allocated bytes while ``fn`` runs, from the allocator
    events ``torch.profiler`` records with ``profile_memory=True``."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # no profiler banner on stderr
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type().name == "CPU")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def measure(pipe: Any, trainer: Any | None = None, *, timed: bool = True) -> Measurement:
    """Run one warm-up step (it creates the optimizer state), time one step, then
    measure the peak of another (on the CPU the profiler slows that one down). Without
    ``timed`` the peak is measured in the step after the warm-up and ``seconds`` is NaN
    (with offloading that step can still peak higher than the later ones)."""
    from loraengine.core.train.loop import Trainer

    trainer = trainer or Trainer(pipe, write_files=False)
    trainer.step()
    dev = pipe.device
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    seconds = float("nan")
    if timed:
        sync()
        t0 = time.perf_counter()
        trainer.step()
        sync()
        seconds = time.perf_counter() - t0
    if dev.type == "cuda":
        resident = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        trainer.step()
        sync()
        return Measurement(torch.cuda.max_memory_allocated(dev), resident, seconds)
    parts = resident_parts(pipe)
    resident = parts["weights"] + parts["adapter"] + parts["optimizer_state"]
    return Measurement(resident + _cpu_allocation_rise(trainer.step), resident, seconds)


def format_plan(plan: MemoryPlan, measured: Measurement | None = None) -> str:
    """The plan as aligned text lines."""
    lines = [f"memory plan (device {plan.device}; strategies: "
             f"{', '.join(plan.strategies) or 'none'})"]
    for label, nbytes in plan.rows():
        lines.append(f"  {label:<32}{nbytes / MiB:>12.2f} MiB")
    lines.append("step cost")
    lines.append(f"  {'forward':<32}{plan.forward_flops / 1e9:>12.3f} GFLOP")
    lines.append(f"  {'backward (with recomputation)':<32}"
                 f"{plan.backward_flops / 1e9:>12.3f} GFLOP")
    lines.append(f"  {'host to device':<32}{plan.transfer_bytes / MiB:>12.2f} MiB")
    lines.append("not counted: " + NOT_COUNTED)
    if measured is not None:
        ratio = plan.peak / measured.peak if measured.peak else float("nan")
        lines.append(f"measured peak (one real step)   {measured.peak / MiB:>12.2f} MiB "
                     f"(estimate / measured = {ratio:.2f}; step {measured.seconds:.3f} s)")
    return "\n".join(lines)
