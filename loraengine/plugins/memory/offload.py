"""Offloading: the frozen base lives on the host and visits the compute device block by
block.

The denoiser is cut into *units*: each top-level block (down/mid/up block, transformer
block) and each remaining top-level layer outside the blocks. Every frozen parameter
and buffer of a unit keeps a host copy (pinned memory when CUDA is present); on the
device its module entry holds an empty placeholder of the same dtype. The first layer
of a unit that runs loads the whole unit and starts loading the unit that ran after it
last time (the next block, learned from the previous pass; the next in module order on
the first pass), on a side CUDA stream where there is one. Every other unit is released:
its entries point at the placeholders again and the device copies are freed.

Loading installs *new* tensors in the module (it never rewrites a parameter's data in
place), so a tensor that autograd saved for the backward pass stays correct whatever
happens to the unit later. To keep those saved weights from pinning device memory
between the forward and the backward pass, a saved-tensor hook replaces each saved
device copy by a note of where it came from and fetches it from the host again when the
backward pass needs it. With gradient checkpointing, a block's recomputation loads the
block again through the same layer hooks (and prefetches the block recomputed after it).

On a CPU-only machine the compute device is the CPU: units are still copied in and
released, so the mechanism runs and is testable, but it saves nothing there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, Field
from torch import nn

from loraengine.core.model import top_level_blocks
from loraengine.core.patching import patch_forward
from loraengine.core.plugins.assembly import BuildContext, StrategyResult
from loraengine.core.plugins.specs import MemoryStrategySpec, PluginOptions


class OffloadOptions(PluginOptions):
    offloading: bool = Field(False, description="Keep the frozen base weights on the CPU "
                             "and move them to the device block by block (next block "
                             "prefetched), releasing each after use.")
    offload_blocks: int | None = Field(
        None, ge=1, description="With offloading: move only the first N blocks of the "
        "model (its checkpointing/offload units) to the CPU; the other blocks and the "
        "layers outside the blocks stay on the device. Default: everything.")


@dataclass(eq=False)
class _Slot:
    """One frozen tensor of a unit: where it sits in the model and its host copy."""

    module: nn.Module
    name: str
    is_param: bool
    home: torch.Tensor
    placeholder: torch.Tensor

    def install(self, value: torch.Tensor) -> None:
        if self.is_param:
            self.module._parameters[self.name] = nn.Parameter(value, requires_grad=False)
        else:
            self.module._buffers[self.name] = value


@dataclass(eq=False)
class _Unit:
    name: str
    slots: list[_Slot] = field(default_factory=list)
    copies: list[torch.Tensor] | None = None
    ready: Any = None  # a CUDA event while a prefetch is in flight

    @property
    def nbytes(self) -> int:
        return sum(s.home.numel() * s.home.element_size() for s in self.slots)


@dataclass(frozen=True)
class _Fetch:
    """What the saved-tensor hook keeps instead of a device copy of a weight."""

    slot: _Slot
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


def offload_units(model: nn.Module, blocks: list[nn.Module]) -> list[tuple[str, nn.Module]]:
    """The units of ``model`` in module order: each block, and each subtree outside the
    blocks that holds tensors. Tensors held directly by an ancestor of a block are left
    on the device."""
    block_ids = {id(b) for b in blocks}
    holds_block = {id(m) for m in model.modules()
                   if any(id(d) in block_ids for d in m.modules())}
    units: list[tuple[str, nn.Module]] = []

    def visit(mod: nn.Module, path: str) -> None:
        if id(mod) in block_ids or id(mod) not in holds_block:
            if next(mod.parameters(), None) is not None or next(mod.buffers(), None) is not None:
                units.append((path or "<root>", mod))
            return
        for name, child in mod.named_children():
            visit(child, f"{path}.{name}" if path else name)

    visit(model, "")
    return units


class Offloader:
    """Moves units between the host and ``device``; counts what it does in ``stats``."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module], device: torch.device,
                 only: list[nn.Module] | None = None):
        self.model = model
        self.device = device
        self.units: list[_Unit] = []
        self.resident: set[int] = set()
        self.phase = "forward"
        self.current: int | None = None
        #: phase -> unit -> the unit that ran after it last time (what to prefetch)
        self.successor: dict[str, dict[int, int]] = {"forward": {}, "backward": {}}
        self.stats = {"loads": 0, "prefetches": 0, "releases": 0, "fetches": 0,
                      "bytes_in": 0}
        self._by_storage: dict[int, tuple[_Slot, torch.Tensor]] = {}
        self._owners: list[tuple[nn.Module, int]] = []
        self._entry: dict[int, int | None] = {}  # module id -> its unit (``enter``)
        self._undo: list[Callable[[], None]] = []
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        pin = device.type == "cuda"
        seen: set[int] = set()
        chosen = None if only is None else {id(b) for b in only}
        for name, root in offload_units(model, blocks):
            if chosen is not None and id(root) not in chosen:
                continue  # partial offloading: this unit stays on the device
            unit = _Unit(name)
            for mod in root.modules():
                owned = False
                for pname, t in list(mod._parameters.items()) + list(mod._buffers.items()):
                    if t is None or id(t) in seen or (isinstance(t, nn.Parameter)
                                                      and t.requires_grad):
                        continue  # trainable tensors, and tied ones, stay on the device
                    seen.add(id(t))
                    is_param = pname in mod._parameters
                    home = t.detach().to("cpu") if device.type != "meta" else t.detach()
                    if pin:
                        home = home.pin_memory()
                    unit.slots.append(_Slot(mod, pname, is_param, home,
                                            torch.empty(0, dtype=t.dtype, device=device)))
                    owned = True
                if owned:
                    self._owners.append((mod, len(self.units)))
            if unit.slots:
                self.units.append(unit)
        for unit in self.units:
            for slot in unit.slots:
                slot.install(slot.placeholder)

    # -- moving units -------------------------------------------------------------------
    def _load(self, idx: int, prefetch: bool = False) -> None:
        unit = self.units[idx]
        if unit.copies is None:
            if self._stream is not None:
                self._stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(self._stream):
                    copies = [s.home.to(self.device, non_blocking=True) for s in unit.slots]
                unit.ready = torch.cuda.Event()
                unit.ready.record(self._stream)
            else:
                copies = [s.home.to(self.device, copy=True) for s in unit.slots]
            unit.copies = copies
            for slot, copy in zip(unit.slots, copies, strict=True):
                slot.install(copy)
                st = copy.untyped_storage()
                self._by_storage[id(st)] = (slot, copy)
            self.resident.add(idx)
            self.stats["prefetches" if prefetch else "loads"] += 1
            self.stats["bytes_in"] += unit.nbytes
        if not prefetch and unit.ready is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(unit.ready)
            for copy in unit.copies or ():
                copy.record_stream(stream)  # used on the compute stream from now on
            unit.ready = None

    def _release(self, idx: int) -> None:
        unit = self.units[idx]
        for slot in unit.slots:
            slot.install(slot.placeholder)
        for copy in unit.copies or ():
            self._by_storage.pop(id(copy.untyped_storage()), None)
        unit.copies = None
        unit.ready = None
        self.resident.discard(idx)
        self.stats["releases"] += 1

    def release_all(self) -> None:
        for idx in sorted(self.resident):
            self._release(idx)
        self.current = None

    def use(self, idx: int) -> None:
        """Called before a layer of unit ``idx`` runs."""
        if self.current == idx and idx in self.resident:
            return
        table = self.successor[self.phase]
        if self.current is not None and self.current != idx:
            table[self.current] = idx
        self.current = idx
        nxt = table.get(idx)
        if nxt is None and self.phase == "forward" and idx + 1 < len(self.units):
            nxt = idx + 1
        for other in sorted(self.resident - {idx, nxt}):
            self._release(other)
        self._load(idx)
        if nxt is not None:
            self._load(nxt, prefetch=True)

    def enter(self, module: nn.Module) -> None:
        """Load the unit of ``module`` (the unit of its first layer holding unit
        tensors) before it runs as compiled code, which skips the layers' loading."""
        key = id(module)
        if key not in self._entry:
            owner = {id(m): i for m, i in self._owners}
            self._entry[key] = next((owner[id(m)] for m in module.modules()
                                     if id(m) in owner), None)
        idx = self._entry[key]
        if idx is not None:
            self.use(idx)

    # -- saved tensors --------------------------------------------------------------------
    def pack(self, t: torch.Tensor) -> Any:
        found = self._by_storage.get(id(t.untyped_storage()))
        if found is None:
            return t
        return _Fetch(found[0], tuple(t.shape), tuple(t.stride()), int(t.storage_offset()))

    def unpack(self, packed: Any) -> torch.Tensor:
        if not isinstance(packed, _Fetch):
            return packed
        self.stats["fetches"] += 1
        self.stats["bytes_in"] += packed.slot.home.numel() * packed.slot.home.element_size()
        copy = packed.slot.home.to(self.device, copy=True)
        return copy.as_strided(packed.size, packed.stride, packed.offset)

    # -- wiring into the model ----------------------------------------------------------
    def _layer_forward(self, inner: Callable[..., Any], idx: int) -> Callable[..., Any]:
        def forward(_self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            if not torch.compiler.is_compiling():  # compiled: ``enter`` loaded it
                self.use(idx)
            return inner(*args, **kwargs)

        return forward

    def _layer_wrapper(self, idx: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        return lambda inner: self._layer_forward(inner, idx)

    def _model_forward(self, inner: Callable[..., Any]) -> Callable[..., Any]:
        def forward(_self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            self.release_all()
            self.phase = "forward"
            try:
                with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                    return inner(*args, **kwargs)
            finally:
                # Everything the backward pass needs was saved as a note (or will be
                # recomputed by a checkpoint), so the device copies can go now.
                self.release_all()
                self.phase = "backward"

        return forward

    def install(self) -> None:
        """Wrap the forward of every layer that holds unit tensors (it loads its unit
        first) and the model's forward (saved-tensor hooks, release at the end).

        Forwards are wrapped rather than hooked because checkpointing recomputes a
        wrapped layer by calling its forward directly, skipping module hooks; hence
        offloading applies before checkpointing wraps anything."""
        for mod, idx in self._owners:
            self._undo.append(patch_forward(mod, self._layer_wrapper(idx)))
        self._undo.append(patch_forward(self.model, self._model_forward))

    def close(self) -> None:
        """Unwrap, and put every tensor back on the device as a plain resident tensor."""
        while self._undo:
            self._undo.pop()()
        self.release_all()
        for unit in self.units:
            for slot in unit.slots:
                home = slot.home
                slot.install(home if home.device == self.device else home.to(self.device))
        self._by_storage.clear()

    @property
    def host_bytes(self) -> int:
        return sum(u.nbytes for u in self.units)


def _place_the_rest(model: nn.Module, device: torch.device) -> None:
    """Move what no unit owns (tensors held by an ancestor of a block) to the device:
    the engine leaves the loaded model on the host when offloading is on."""
    if device.type == "meta":
        return
    for mod in model.modules():
        for name, t in list(mod._parameters.items()):
            if t is not None and t.device != device:
                mod._parameters[name] = nn.Parameter(t.detach().to(device),
                                                     requires_grad=t.requires_grad)
        for name, buf in list(mod._buffers.items()):
            if buf is not None and buf.device != device:
                mod._buffers[name] = buf.to(device)


def apply(ctx: BuildContext, memory: BaseModel) -> StrategyResult:
    model = ctx.model
    blocks = ctx.loaded.blocks or top_level_blocks(model)
    count = getattr(memory, "offload_blocks", None)
    offloader = Offloader(model, blocks, ctx.device, None if count is None else blocks[:count])
    _place_the_rest(model, ctx.device)
    offloader.install()
    # Host copies, so that memory planning can tell them from device memory.
    resident = tuple(s.home for u in offloader.units for s in u.slots)
    return StrategyResult(undo=offloader.close, host_resident=resident, streaming=offloader)


SPEC = MemoryStrategySpec(
    "offloading", OffloadOptions, enabled=lambda c: c.memory.offloading, apply=apply,
    order=40, places_weights=True, description="Frozen base weights on the CPU, moved to the device block by "
                          "block with the next block prefetched.")
