"""Put a saved adapter file on a model for inference: ``loraengine.apply``.

Reads any file the engine writes, in any installed key format (kohya, ComfyUI,
diffusers/PEFT...), and kohya/LyCORIS files from elsewhere. The exporters map file keys
to module paths; each module's tensors pick their algorithm through the adapter specs'
``owns_keys``, and the spec rebuilds the adapter with its shapes inferred. Then either
``bypass`` (forward hooks; the base weights stay untouched and the strength can change
later) or ``merge`` (W+ΔW written into the weights, what ComfyUI's LoRA loader does).
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from loraengine.core.adapter import AdapterLayer, AdapterNetwork, ChannelDelta, split_deltas
from loraengine.core.errors import ConfigError, DataError, LoraEngineError
from loraengine.core.files import load_lora, split_modules
from loraengine.plugins import BUILTIN_PLUGINS

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


def _adaptable_paths(model: nn.Module) -> dict[str, nn.Module]:
    return {p: m for p, m in model.named_modules()
            if p and isinstance(getattr(m, "weight", None), torch.Tensor)}


def owners_of(specs: list[Any], params: Mapping[str, torch.Tensor], hint: str | None = None,
              builtin: Collection[str] = ()) -> list[Any]:
    """The adapter specs claiming a saved module, best first: the algorithm the file's
    metadata names, then built-in algorithms, then plugins'.

    ``owns_keys`` is asked with the parameter names, as its contract says. When several
    specs claim the same names (OFT's and BOFT's ``oft_blocks``), the ones that accept
    the tensors themselves — a richer question some specs answer — are preferred."""
    owners = [s for s in specs if s.owns_keys(set(params))]
    if len(owners) > 1:
        narrowed = [s for s in owners if _claims_tensors(s, params)]
        owners = narrowed or owners
    owners.sort(key=lambda s: (s.name != hint, s.name not in builtin))
    return owners


def _claims_tensors(spec: Any, params: Mapping[str, torch.Tensor]) -> bool:
    try:
        return bool(spec.owns_keys(params))
    except Exception:  # a spec that only understands a set of names
        return True


def build_network(model: nn.Module, tensors: Mapping[str, torch.Tensor],
                  metadata: Mapping[str, str] | None = None, *, host: Any = None,
                  source: str = "adapter", strict: bool = True
                  ) -> tuple[AdapterNetwork, str, dict[str, str]]:
    """Rebuild every adapter of a file's tensors on ``model``'s layers (not attached).

    Returns the network, the key format found and each module's algorithm."""
    if host is None:
        from loraengine.plugins import build_plugin_manager

        host = build_plugin_manager()
    reg = host.registry
    layers = _adaptable_paths(model)
    key_format, grouped = split_modules(tensors, reg.specs("exporter"), layers)
    unknown = sorted(set(grouped) - set(layers))
    if unknown:
        msg = (f"{source}: {len(unknown)} module(s) are not layers of this model: "
               f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
        if strict:
            raise DataError(msg)
        warnings.warn(msg, stacklevel=3)
    hint = (metadata or {}).get("loraengine.algorithm")
    specs = reg.specs("adapter")
    builtin = {n for n, p in reg.entries["adapter"].items() if p.plugin in BUILTIN_PLUGINS}
    built: dict[str, AdapterLayer] = {}
    deltas: dict[str, ChannelDelta] = {}
    algorithms: dict[str, str] = {}
    for path in sorted(set(grouped) & set(layers)):
        params, delta = split_deltas(dict(grouped[path]))
        if delta:
            try:
                deltas[path] = ChannelDelta.from_tensors(layers[path], delta).to(
                    device=layers[path].weight.device)
            except ValueError as exc:
                raise DataError(f"{source}: module {path}: {exc}") from None
        if not params:
            continue
        owners = owners_of(specs, params, hint, builtin)
        if not owners:
            raise DataError(f"{source}: module {path}: keys {sorted(params)} match no "
                            f"installed adapter algorithm ({', '.join(reg.names('adapter'))})")
        base = layers[path]
        errors = []
        for spec in owners:  # names alone may be shared; the shapes then decide
            try:
                layer = spec.load(base, dict(params), spec.config_model())
            except LoraEngineError:
                raise
            except Exception as exc:
                errors.append(f"{spec.name}: {exc}")
                continue
            layer.algorithm = spec.name
            built[path] = layer.to(device=base.weight.device)
            algorithms[path] = spec.name
            break
        else:
            raise DataError(f"{source}: module {path}: cannot load the adapter "
                            f"({'; '.join(errors)})")
    if not built and not deltas:
        raise DataError(f"{source}: no adapter in it fits a layer of this model")
    return AdapterNetwork(built, deltas), key_format, algorithms


def apply(model: nn.Module, path: str | Path | Mapping[str, torch.Tensor],
          strength: float = 1.0, mode: ApplyMode = "bypass", *, host: Any = None,
          strict: bool = True) -> AppliedAdapter:
    """Apply an adapter file (or its tensors, e.g. ``TrainResult.lora``) to ``model``.

    ``mode="bypass"`` adds forward hooks (``handle.remove()`` takes them off);
    ``mode="merge"`` adds ΔW to the weights in place. ``strict`` makes modules the model
    lacks an error rather than a warning.
    """
    if mode not in ("bypass", "merge"):
        raise ConfigError(f"mode: expected 'bypass' or 'merge', got {mode!r}")
    if isinstance(path, Mapping):
        tensors, metadata, source = dict(path), {}, "adapter tensors"
    else:
        tensors, metadata = load_lora(Path(path))
        source = str(path)
    network, key_format, algorithms = build_network(
        model, tensors, metadata, host=host, source=source, strict=strict)
    network.set_multiplier(strength)
    handle = AppliedAdapter(network, mode, key_format, algorithms, float(strength))
    if mode == "merge":
        with torch.no_grad():
            network.merge()
    else:
        network.eval()
        network.attach("bypass")
    return handle
