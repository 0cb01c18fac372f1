"""What ``loraengine validate`` checks of a parsed config without training: the model
is there and its config readable by its family (no weights loaded), the data files
exist, are regular files and hold the tensors the model takes (read from their
headers), ``adapter.include`` selects some layer of the model (on its skeleton, built
from its config without weights), ``adapter.existing`` is an adapter file of
``adapter.algorithm``, and the outputs can be written (probed; nothing is left
behind).

Every check runs, so one call reports all problems: one line each, naming the key and
the file, as the run itself would report it when it got there.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from loraengine.core.adapter import ADAPTABLE, select_layers
from loraengine.core.build import adapter_include, check_option_defaults
from loraengine.core.data import (
    DataExpectations,
    first_nonfinite,
    make_bucketed_dataset,
    make_dataset,
    read_safetensors_layout,
)
from loraengine.core.devices import resolve_device
from loraengine.core.errors import LoraEngineError
from loraengine.core.files import looks_like, option_conflicts, read_adapter_file
from loraengine.core.model import ModelLayout
from loraengine.core.plugins.host import PluginHost
from loraengine.core.preflight import check_outputs

T = TypeVar("T")


def validate_config(config: Any, host: PluginHost, base_dir: Path | None = None
                    ) -> tuple[list[str], list[str]]:
    """(problems, notes) of ``config``: a problem is what would stop the run, a note
    says what could not be checked without loading the model."""
    problems: list[str] = []
    notes: list[str] = []
    # a plugin's option default its own field refuses, as the build would refuse it
    _attempt(problems, lambda: check_option_defaults(config, host.registry))
    layout = _model_layout(config, host, base_dir, problems, notes)
    _check_targets(config, host, layout, problems, notes)
    _check_data(config, layout, problems)
    _check_existing(config, host, problems)
    _attempt(problems, lambda: check_outputs(config))
    _attempt(problems, lambda: resolve_device(config.training.device))  # as train will
    return problems, notes


def _attempt(problems: list[str], check: Callable[[], T]) -> T | None:
    """Run ``check``; an engine error becomes a problem line (or several)."""
    try:
        return check()
    except LoraEngineError as exc:
        problems.extend(str(exc).splitlines() or [type(exc).__name__])
        return None


def _model_layout(config: Any, host: PluginHost, base_dir: Path | None,
                  problems: list[str], notes: list[str]) -> ModelLayout | None:
    spec = host.registry.get("model", config.model.family)
    if spec.describe is None:
        notes.append(f"model.family: {spec.name!r} cannot be checked without loading the "
                     f"model; its data is checked for shape only")
        return None
    describe = spec.describe

    def run() -> ModelLayout:
        with host.registry.blame("model", spec.name, "describe"):
            return describe(config.model, {
                "base_dir": base_dir, "module": None,
                "looks_like": lambda names: looks_like(host.registry, names)})

    return _attempt(problems, run)


def _check_targets(config: Any, host: PluginHost, layout: ModelLayout | None,
                   problems: list[str], notes: list[str]) -> None:
    """``adapter.include`` and ``adapter.exclude`` select some layer of the model, as
    the run selects them (``select_layers``, with the run's error), on the family's
    skeleton of it: the model built from its config, no weights read."""
    if layout is None:
        return  # not described: reported or noted already
    if layout.skeleton is None:
        notes.append(f"adapter.include: model.family {config.model.family!r} cannot build "
                     f"its model without loading it; the layers it selects are checked "
                     f"once the run has loaded the model")
        return
    build = layout.skeleton
    try:
        with host.registry.blame("model", config.model.family, "skeleton"):
            module = build()
    except LoraEngineError as exc:
        notes.append(f"adapter.include: not checked, the model could not be built "
                     f"without its weights: {str(exc).splitlines()[0]}")
        return
    acfg = config.adapter
    spec = host.registry.get("adapter", acfg.algorithm)
    include = adapter_include(acfg, layout.default_include)
    _attempt(problems, lambda: select_layers(module, include, acfg.exclude,
                                             spec.layer_types or ADAPTABLE))


def _check_data(config: Any, layout: ModelLayout | None, problems: list[str]) -> None:
    data = config.data
    expect = DataExpectations(
        latent_ndim=layout.latent_ndim if layout else None,
        latent_channels=layout.latent_channels if layout else None,
        cond_widths=dict(layout.cond_widths) if layout else {},
        allow_nonfinite=bool(data.allow_nonfinite))
    required = layout.cond_keys if layout else ()
    pairs = [("data.latents", data.latents, "data.conditioning", data.conditioning,
              bool(data.bucket_mode))]
    if data.validation is not None:
        pairs.append(("data.validation.latents", data.validation.latents,
                      "data.validation.conditioning", data.validation.conditioning, False))
    for lat_key, lat_path, cond_key, cond_path, bucketed in pairs:
        latents = _read_layout(lat_key, lat_path, "latents", problems)
        cond = _read_layout(cond_key, cond_path, "cond", problems)
        if latents is None or cond is None:
            continue  # reported already
        names = {"latents_name": f"{lat_key} {lat_path}",
                 "cond_name": f"{cond_key} {cond_path}"}
        pair = make_bucketed_dataset if bucketed else make_dataset
        try:
            pair(latents, cond, required=required, expect=expect, **names)
        except LoraEngineError as exc:
            problems.append(str(exc).splitlines()[0])


def _read_layout(key: str, path: Path | None, tensor: str, problems: list[str]
                 ) -> dict[str, torch.Tensor] | None:
    """The tensors (as ``meta`` tensors) of the data file ``key`` names, or ``None``
    with the problem added."""
    if path is None:  # a run from the command line has no data in memory
        problems.append(f"{key}: required (a safetensors file with '{tensor}')")
        return None
    try:
        return read_safetensors_layout(path, key)
    except LoraEngineError as exc:
        problems.append(str(exc).splitlines()[0])
        return None


def _check_existing(config: Any, host: PluginHost, problems: list[str]) -> None:
    """``adapter.existing`` reads as an adapter file whose every module is of
    ``adapter.algorithm`` (which layers they are is known only with the model)."""
    acfg = config.adapter
    if acfg.existing is None:
        return
    path = Path(acfg.existing)

    def check() -> None:
        try:
            file = read_adapter_file(path, host.registry, name=f"adapter.existing {path}")
        except LoraEngineError as exc:
            problems.append(f"adapter.existing: {str(exc).splitlines()[0]}")
            return
        if not file.modules:
            problems.append(f"adapter.existing: {path} holds no adapter tensors")
        bad = first_nonfinite(file.tensors)
        if bad is not None:
            problems.append(f"adapter.existing: {path}: tensor {bad!r} holds NaN or inf "
                            f"values")
        for mod_path, module in file.modules.items():
            if module.params and acfg.algorithm not in {s.name for s in module.owners}:
                found = (f"a {module.algorithm} adapter" if module.algorithm
                         else "an adapter of unknown algorithm")
                problems.append(f"adapter.existing: {path}: module {mod_path} holds "
                                f"{found}, but adapter.algorithm is "
                                f"{acfg.algorithm!r}")
                return
        if any(module.params for module in file.modules.values()):
            spec = host.registry.get("adapter", acfg.algorithm)
            problems.extend(option_conflicts(spec, file, acfg, str(path)))

    _attempt(problems, check)
