"""The network of all adapters of one model and how it attaches to the model: by
patching each layer's forward (rebuild), as forward hooks (bypass), or merged."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

import torch
from torch import nn

from loraengine.core.adapter.layer import ADAPTABLE, AdapterLayer, AttachMode, ChannelDelta
from loraengine.core.errors import ConfigError
from loraengine.core.patching import ForwardMaker, patch_forward


def _through(adapter: AdapterLayer) -> ForwardMaker:
    """A forward maker that routes the base layer's calls through ``adapter`` (which
    calls the base itself, so the layer's current forward is not needed)."""
    def make(_current: Callable[..., Any]) -> Callable[..., torch.Tensor]:
        def forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any
                    ) -> torch.Tensor:
            out: torch.Tensor = adapter(x)  # Module.__call__ is typed Any
            return out

        return forward

    return make


class AdapterNetwork(nn.Module):
    """All adapters of one model, keyed by module path, and their attachment."""

    def __init__(self, layers: dict[str, AdapterLayer],
                 deltas: dict[str, ChannelDelta] | None = None):
        super().__init__()
        self.paths = list(layers)
        self.layers = nn.ModuleDict({_key(p): m for p, m in layers.items()})
        deltas = deltas or {}
        self.delta_paths = list(deltas)
        self.deltas = nn.ModuleDict({_key(p): m for p, m in deltas.items()})
        self._undo: list[Callable[[], None]] = []
        self.mode: AttachMode | None = None

    # ModuleDict entries are typed nn.Module; __init__ put in only adapters and deltas.
    def delta_items(self) -> Iterator[tuple[str, ChannelDelta]]:
        for p in self.delta_paths:
            yield p, cast(ChannelDelta, self.deltas[_key(p)])

    def items(self) -> Iterator[tuple[str, AdapterLayer]]:
        for p in self.paths:
            yield p, self[p]

    def __getitem__(self, path: str) -> AdapterLayer:
        return cast(AdapterLayer, self.layers[_key(path)])

    def attach(self, mode: AttachMode = "weight") -> None:
        """Route each base layer through its adapter: ``weight`` replaces the layer's
        forward by the adapter's (rebuild or factored path); ``bypass`` adds a forward
        hook that maps the untouched base output."""
        self.detach()
        for _, layer in self.items():
            base = layer.base
            if mode == "weight":
                self._undo.append(patch_forward(base, _through(layer)))
            else:
                handle = base.register_forward_hook(
                    lambda mod, args, out, a=layer: a.bypass(args[0], out))
                self._undo.append(handle.remove)
        for _, delta in self.delta_items():  # output-side deltas: a hook in every mode
            handle = delta.base.register_forward_hook(
                lambda mod, args, out, d=delta: d.bypass(args[0], out))
            self._undo.append(handle.remove)
        self.mode = mode

    def detach(self) -> None:
        while self._undo:
            self._undo.pop()()
        self.mode = None

    def all_items(self) -> Iterator[tuple[str, AdapterLayer]]:
        yield from self.items()
        yield from self.delta_items()

    def set_multiplier(self, value: float) -> None:
        for _, layer in self.all_items():
            layer.multiplier = float(value)

    @torch.no_grad()
    def merge(self) -> None:
        """Bake every adapter into its base layer and detach."""
        self.detach()
        for _, layer in self.all_items():  # adapters first: DoRA reads the base weight
            layer.merge()

    def file_modules(self, dtype: torch.dtype | None = None) -> dict[str, dict[str, torch.Tensor]]:
        out: dict[str, dict[str, torch.Tensor]] = {}
        for path, layer in self.all_items():
            tensors = out.setdefault(path, {})
            for k, v in layer.file_tensors().items():
                v = v.detach()
                if dtype is not None and v.is_floating_point():
                    v = v.to(dtype)
                tensors[k] = v.contiguous().cpu()
        return out


def check_strength(strength: float, option: str = "--strength") -> None:
    """Refuse a NaN or infinite strength (the multiplier of every adapter): each adapted
    output, or merged weight, would be NaN or infinite. ``option`` names the input."""
    if not math.isfinite(strength):
        raise ConfigError(f"{option}: must be a finite number, got {strength}")


def _key(path: str) -> str:
    return path.replace(".", "::")


def select_layers(model: nn.Module, include: Iterable[str], exclude: Iterable[str],
                  types_: tuple[type[nn.Module], ...] = ADAPTABLE) -> dict[str, nn.Module]:
    """The adaptable layers of ``model`` whose path matches ``include`` but not
    ``exclude`` (shell-style globs over dotted module paths)."""
    include, exclude = list(include), list(exclude)
    found: dict[str, nn.Module] = {}
    for path, mod in model.named_modules():
        if not path or not isinstance(mod, types_):
            continue
        if getattr(mod, "groups", 1) != 1:
            continue  # grouped convolutions have no low-rank form here
        if any(fnmatch.fnmatchcase(path, p) for p in include) and not any(
                fnmatch.fnmatchcase(path, p) for p in exclude):
            found[path] = mod
    if not found:
        raise ConfigError(f"adapter.include: no Linear/Conv layer matches {include} "
                          f"(minus {exclude}){_why_none(model, include, types_)}")
    return found


def _why_none(model: nn.Module, include: list[str], types_: tuple[type[nn.Module], ...]
              ) -> str:
    """What ``select_layers`` found for no layer: the include patterns that match none
    of the model's layers of ``types_`` (else: ``exclude`` removed every match), with
    an example of how its layers are named."""
    paths = [p for p, m in model.named_modules()
             if p and isinstance(m, types_) and getattr(m, "groups", 1) == 1]
    if not paths:
        return ": the model has no such layer"
    if not include:
        return ": the list is empty"
    dead = [p for p in include if not any(fnmatch.fnmatchcase(path, p) for path in paths)]
    if not dead:
        return ": adapter.exclude removes every layer it matches"
    which = ", ".join(repr(p) for p in dead)
    like = next((path for path in paths if "." in path), paths[0])
    return (f": {which} match{'es' if len(dead) == 1 else ''} no layer of the model "
            f"(its layers are named like {like!r})")
