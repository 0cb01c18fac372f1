"""Put a saved adapter file on a model for inference: ``loraengine.apply``.

Reads any file the engine writes, in any installed key format (kohya, ComfyUI,
diffusers/PEFT...), and kohya/LyCORIS files from elsewhere. The file is read by
``loraengine.core.files.read_adapter_file``, the reader ``adapter.existing``, ``merge``
and ``inspect`` share: the exporters map file keys to module paths and each module's
tensors pick their algorithm through the adapter specs' ``owns_keys``; here the chosen
spec rebuilds the adapter with its shapes inferred. Then either
``bypass`` (forward hooks; the base weights stay untouched and the strength can change
later) or ``merge`` (W+ΔW written into the weights, what ComfyUI's LoRA loader does).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from loraengine.core.adapter import AdapterLayer, AdapterNetwork, ChannelDelta
from loraengine.core.adapter.network import check_strength
from loraengine.core.data import first_nonfinite
from loraengine.core.errors import ConfigError, DataError, LoraEngineError
from loraengine.core.files import (
    AdapterFile,
    load_options,
    owners_of,
    read_adapter_file,
    text_encoder_note,
    unplaced_message,
    unread_message,
)
from loraengine.core.plugins.host import PluginHost
from loraengine.core.plugins.registry import Registry

ApplyMode = Literal["bypass", "merge"]


@dataclass
class AppliedAdapter:
    """What ``apply`` put on a model. ``remove()`` takes bypass hooks off again;
    usable as a context manager."""

    network: AdapterNetwork
    mode: ApplyMode
    key_format: str
    algorithms: dict[str, str] = field(default_factory=dict)  # module path -> algorithm
    strength: float = 1.0
    removed: bool = False

    @property
    def modules(self) -> list[str]:
        return list(self.network.paths)

    def set_strength(self, strength: float) -> None:
        """Change the strength of bypass hooks in place."""
        if self.mode != "bypass":
            raise RuntimeError("the strength of a merged adapter is fixed; apply the file "
                               "again to a fresh model")
        self.network.set_multiplier(strength)
        self.strength = float(strength)

    def remove(self) -> None:
        """Take the bypass hooks off; the model is as it was before ``apply``."""
        if self.mode != "bypass":
            raise RuntimeError("a merged adapter is part of the weights; reload the model "
                               "to remove it")
        self.network.detach()
        self.removed = True

    def __enter__(self) -> AppliedAdapter:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.mode == "bypass" and not self.removed:
            self.remove()


def adaptable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every layer of ``model`` with a weight tensor, by path: where a file may adapt."""
    return {p: m for p, m in model.named_modules()
            if p and isinstance(getattr(m, "weight", None), torch.Tensor)}


def build_network(model: nn.Module, tensors: Mapping[str, torch.Tensor],
                  metadata: Mapping[str, str] | None = None, *, host: PluginHost | None = None,
                  source: str = "adapter", strict: bool = True
                  ) -> tuple[AdapterNetwork, str, dict[str, str]]:
    """Rebuild every adapter of a file's tensors on ``model``'s layers (not attached).

    Returns the network, the key format found and each module's algorithm."""
    host = host if host is not None else _default_host()
    file = read_adapter_file(tensors, host.registry, adaptable_layers(model), name=source,
                             metadata=metadata, model=model)
    return network_from_file(model, file, host.registry, strict=strict)


def _default_host() -> PluginHost:
    from loraengine.plugins import build_plugin_manager

    return build_plugin_manager()


def network_from_file(model: nn.Module, file: AdapterFile, registry: Registry, *,
                      strict: bool = True) -> tuple[AdapterNetwork, str, dict[str, str]]:
    """Rebuild the adapters of a file read against ``model`` (``read_adapter_file``):
    each module by the first of its owners whose ``load`` accepts the tensors."""
    source = file.source
    layers = adaptable_layers(model)
    unknown = file.not_in(layers)
    if unknown:
        msg = unplaced_message(file, unknown, registry, model)
        if strict:
            raise DataError(msg)
        warnings.warn(msg, stacklevel=3)
    unread = unread_message(file, registry, model)
    if unread:
        if strict:
            raise DataError(unread)
        warnings.warn(unread, stacklevel=3)
    built: dict[str, AdapterLayer] = {}
    deltas: dict[str, ChannelDelta] = {}
    algorithms: dict[str, str] = {}
    for path in sorted(set(file.modules) & set(layers)):
        module, base = file.modules[path], layers[path]
        device = _device_of(base)
        if module.deltas:
            try:
                deltas[path] = ChannelDelta.from_tensors(base, module.deltas).to(device=device)
            except ValueError as exc:
                raise DataError(f"{source}: module {path}: {exc}") from None
        if not module.params:
            continue
        if not module.owners:
            raise DataError(f"{source}: module {path}: keys {sorted(module.params)} match no "
                            f"installed adapter algorithm ({', '.join(registry.names('adapter'))})")
        errors = []
        for spec in module.owners:  # names alone may be shared; the shapes then decide
            try:
                layer = spec.load(base, dict(module.params), load_options(spec, file))
            except LoraEngineError:
                raise
            except Exception as exc:
                errors.append(f"{spec.name}: {exc}")
                continue
            layer.algorithm = spec.name
            built[path] = layer.to(device=device)
            algorithms[path] = spec.name
            break
        else:
            raise DataError(f"{source}: module {path}: cannot load the adapter "
                            f"({'; '.join(errors)})")
    if not built and not deltas:
        # placing nothing is never a silent no-op: say what was tried
        raise DataError(unplaced_message(file, unknown, registry, model) if unknown else
                        f"{source}: no adapter in it fits a layer of this model")
    return AdapterNetwork(built, deltas), file.key_format or "", algorithms


def _device_of(layer: nn.Module) -> torch.device:
    weight = layer.weight
    assert isinstance(weight, torch.Tensor)  # _adaptable_paths keeps only such layers
    return weight.device


def apply(model: nn.Module, path: str | Path | Mapping[str, torch.Tensor],
          strength: float = 1.0, mode: ApplyMode = "bypass", *, host: PluginHost | None = None,
          strict: bool = True) -> AppliedAdapter:
    """Apply an adapter file (or its tensors, e.g. ``TrainResult.lora``) to ``model``.

    ``mode="bypass"`` adds forward hooks (``handle.remove()`` takes them off);
    ``mode="merge"`` adds ΔW to the weights in place. ``strict`` makes modules the model
    lacks an error rather than a warning.
    """
    if mode not in ("bypass", "merge"):
        raise ConfigError(f"mode: expected 'bypass' or 'merge', got {mode!r}")
    check_strength(strength, "strength")
    host = host if host is not None else _default_host()
    file = read_adapter_file(path if isinstance(path, Mapping) else Path(path), host.registry,
                             adaptable_layers(model), model=model)
    bad = first_nonfinite(file.tensors)
    if bad is not None:  # every output of the adapted model would be NaN
        raise DataError(f"{file.source}: tensor {bad!r} holds NaN or inf values; the adapter "
                        f"is not applied")
    network, key_format, algorithms = network_from_file(model, file, host.registry,
                                                        strict=strict)
    note = text_encoder_note(file, "applied")
    if note:
        warnings.warn(note, stacklevel=2)
    network.set_multiplier(strength)
    handle = AppliedAdapter(network, mode, key_format, algorithms, float(strength))
    if mode == "merge":
        with torch.no_grad():
            network.merge()
    else:
        network.eval()
        network.attach("bypass")
    return handle


__all__ = ["AppliedAdapter", "ApplyMode", "apply", "build_network", "network_from_file",
           "owners_of"]
