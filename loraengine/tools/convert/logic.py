"""Re-key an adapter file for one consumer: what ``loraengine convert`` does.

The file is read as ``adapter.existing``, ``apply`` and ``merge`` read it (any key
format, any layout of the model's names) and written with the consumer's exporter:

- ``comfyui``: ``diffusion_model.*`` in the names ComfyUI's own trainer writes (a UNet's
  checkpoint names, ``input_blocks.*``);
- ``kohya``: ``lora_unet_*`` as sd-scripts writes it (SAI names for SDXL);
- ``a1111``: ``lora_unet_*`` on the checkpoint (compvis) names for every UNet, which
  A1111/Forge map straight onto their layers;
- ``diffusers``: ``unet.*`` / ``transformer.*`` PEFT keys.

With ``--model`` (a diffusers model or pipeline folder) modules are checked against the
model's layers, the consumer's layout is chosen from its family, and where the consumer
cannot express the file exactly the difference is measured on the model's weights:
the max over layers of max |W_consumer − W| / max |W|, W the weight as loraengine merges
it. The output is written atomically and never over an input.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loraengine.core.errors import ConfigError, DataError
from loraengine.core.files import (
    AdapterFile,
    in_layout,
    load_options,
    module_layouts,
    read_adapter_file,
    save_lora,
    text_encoder_modules,
    text_encoder_note,
)
from loraengine.core.plugins.host import PluginHost
from loraengine.core.plugins.specs import ExporterSpec
from loraengine.plugins.exporters import (
    A1111,
    COMFYUI_NORM_AS_STANDARD,
    COMFYUI_NORM_RULES,
    COMFYUI_RULES,
    FORGE,
    KOHYA_RULES,
    LORA_PARAMS,
    LYCORIS,
    SD_SCRIPTS,
    comfyui_fused_limits,
    dora_norm,
    forge_limits,
    kohya_limits,
    lokr_pipeline,
    lokr_without_tucker,
    peft_lokr,
    unfused_modules,
)
from loraengine.plugins.models.comfy_names import own_path
from loraengine.tools.convert.targets import TARGETS

#: first parts of a UNet's original (checkpoint) module names
ORIGINAL_ROOTS = frozenset({"input_blocks", "middle_block", "output_blocks", "time_embed",
                            "label_emb", "out"})
#: the readers of kohya files each target names, whose limits (``kohya_limits``) it
#: reports: sd-scripts loads every algorithm but LoRA through LyCORIS
KOHYA_READERS = {"kohya": (LYCORIS,), "a1111": (A1111, FORGE)}
#: readers of kohya files whose limits are only named, never measured: sd-scripts'
#: own LoRA loader (what it does not place, and DoRA, which it has not)
KOHYA_NAMED_READERS = {"kohya": (SD_SCRIPTS,)}
CONSUMER_NAMES = {"comfyui": "ComfyUI", "kohya": "sd-scripts", "a1111": "A1111/Forge",
                  "diffusers": "diffusers"}


def default_out(source: Path, target: str) -> Path:
    return source.with_name(f"{source.stem}.{target}.safetensors")


def check_out(source: Path, out: Path, overwrite: bool) -> None:
    """Refuse to write over the input, or over an existing file unless asked."""
    if os.path.lexists(out) and os.path.realpath(out) == os.path.realpath(source):
        raise ConfigError(f"--out: {out} is the input file; write the converted file "
                          f"elsewhere")
    if os.path.lexists(out) and not overwrite:
        raise ConfigError(f"--out: {out} exists (pass --overwrite to replace it)")
    if os.path.lexists(out) and (out.is_dir() or out.is_symlink()):
        raise ConfigError(f"--out: {out} is {'a link' if out.is_symlink() else 'a folder'}")


def _exporter(host: PluginHost, target: str) -> ExporterSpec:
    if target not in TARGETS:
        raise ConfigError(f"--to: expected one of {', '.join(TARGETS)}, got {target!r}")
    name, layouts = TARGETS[target]
    spec: ExporterSpec = host.registry.get("exporter", name)
    if target == "a1111":  # LoKr's Tucker core written out: Forge fails on it
        write = spec.to_file
        spec = dataclasses.replace(spec, to_file=lambda modules: write(
            {path: lokr_without_tucker(params) for path, params in modules.items()}))
    return spec if layouts is None else dataclasses.replace(spec, layouts=layouts)


def exporter_for(target: str, host: PluginHost | None = None) -> ExporterSpec:
    """The exporter ``convert --to target`` writes with."""
    if host is None:
        from loraengine.plugins import build_plugin_manager

        host = build_plugin_manager()
    return _exporter(host, target)


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def _load(spec: Any, base: nn.Module, params: Mapping[str, torch.Tensor],
          options: Any = None) -> Any:
    """``spec``'s layer from ``params``, with ``options`` (the file's: ``load_options``;
    default the spec's defaults)."""
    return spec.load(base, dict(params), spec.config_model() if options is None else options)


def _norm(options: Any) -> str:
    return str(getattr(options, "weight_decompose_norm", "standard"))


def _merged(base: nn.Module, layer: Any) -> torch.Tensor:
    weight = base.weight
    assert isinstance(weight, torch.Tensor)
    return (weight.float() + layer.delta_weight().float()).detach()


def consumer_weight(target: str, base: nn.Module, params: Mapping[str, torch.Tensor],
                    spec: Any, reads_lokr: bool = False, options: Any = None
                    ) -> tuple[str, torch.Tensor] | None:
    """How ``target`` reads one module differently from loraengine: (the limit, the
    weight it computes), or ``None`` when it reads the module exactly. ``reads_lokr``:
    the model is one whose diffusers pipeline reads LoKr (``lokr_pipeline``);
    ``options``: the file's (``load_options``: its DoRA norm)."""
    weight = base.weight
    assert isinstance(weight, torch.Tensor)
    w = weight.detach().float()
    name = spec.name
    if target == "comfyui" and name == "ia3":
        return "ComfyUI has no IA3 (layers left unchanged)", w
    if target == "diffusers" and reads_lokr and name == "lokr" and \
            peft_lokr(params) is not None:
        return None
    if target == "diffusers" and name != "lora":
        return f"diffusers reads only LoRA ({name} layers left unchanged)", w
    if target == "diffusers" and "dora_scale" in params and set(params) <= LORA_PARAMS \
            and _norm(options) != "standard":
        return COMFYUI_NORM_AS_STANDARD, _dora_read_as(base, params, spec, options, "standard")
    if target == "comfyui" and "rescale" in params:
        rest = {k: v for k, v in params.items() if k != "rescale"}
        return ("ComfyUI loads OFT's rescale and never applies it",
                _merged(base, _load(spec, base, rest, options)))
    if target == "comfyui" and "dora_scale" in params and _norm(options) == "standard":
        # ComfyUI divides by the norm of W, not of W + ΔW, per output channel (a
        # per-input magnitude: ComfyUI's reading is ours)
        got = _comfyui_dora(base, params, spec, options)
        return None if got is None else \
            ("ComfyUI's DoRA normalises by the norm of W, not of W + ΔW", got)
    return None


def _texts(consumer: str) -> set[str]:
    return {text for who, text, _ in (*KOHYA_RULES, *COMFYUI_NORM_RULES) if consumer in who}


def _rule(consumer: str, start: str) -> str:
    """The ``kohya_limits`` text of ``consumer``'s limit beginning with ``start``."""
    return next(text for who, text, _ in KOHYA_RULES if consumer in who and
                text.startswith(start))


def _dora_read_as(base: nn.Module, params: Mapping[str, torch.Tensor], spec: Any,
                  options: Any, norm: str) -> torch.Tensor:
    """The weight a reader whose DoRA divides by ``norm`` (``weight_decompose_norm``)
    computes for a module (the file's other options as they are)."""
    options = spec.config_model() if options is None else options
    return _merged(base, _load(spec, base, params,
                               options.model_copy(update={"weight_decompose_norm": norm})))


def _comfyui_dora(base: nn.Module, params: Mapping[str, torch.Tensor], spec: Any,
                  options: Any = None) -> torch.Tensor | None:
    """The weight ComfyUI's (and Forge's) DoRA computes: W + ΔW scaled by m / (‖W‖ + ε)
    per output channel, the ``comfyui`` norm (tests/test_interop_comfyui_dora.py pins it
    against ComfyUI's own code); None for a per-input magnitude, which it reads as
    loraengine's standard norm does (to float32's ε)."""
    weight = base.weight
    assert isinstance(weight, torch.Tensor)
    if params["dora_scale"].numel() != weight.shape[0]:
        return None
    return _dora_read_as(base, params, spec, options, "comfyui")


def kohya_reader_weight(consumer: str, base: nn.Module, params: Mapping[str, torch.Tensor],
                        spec: Any, options: Any = None) -> tuple[str, torch.Tensor] | None:
    """The weight one reader of kohya files (A1111 1.8, Forge, LyCORIS) computes where
    it differs from loraengine's and the difference is a formula: (the limit's text, as
    ``kohya_limits`` words it, the weight); ``None`` otherwise. ``options``: the file's
    (``load_options``: Forge computes the ``comfyui`` DoRA norm, LyCORIS the standard
    one)."""
    weight = base.weight
    assert isinstance(weight, torch.Tensor)
    w = weight.detach().float()
    name = spec.name
    unchanged = {FORGE: ("oft", "boft", "ia3"), A1111: ("glora",), LYCORIS: ("ia3",)}
    if name in unchanged[consumer]:
        start = {FORGE: "no OFT", A1111: "GLoRA fails", LYCORIS: "IA3 cannot"}[consumer]
        return _rule(consumer, start), w
    if consumer == A1111 and "dora_scale" in params:
        raw = {k: v for k, v in params.items() if k != "dora_scale"}
        return _rule(A1111, "no DoRA"), _merged(base, _load(spec, base, raw, options))
    if consumer == FORGE and "dora_scale" in params and _norm(options) == "standard":
        got = _comfyui_dora(base, params, spec, options)
        return None if got is None else (_rule(FORGE, "DoRA normalised"), got)
    if consumer == LYCORIS and "dora_scale" in params and _norm(options) != "standard":
        return COMFYUI_NORM_AS_STANDARD, _dora_read_as(base, params, spec, options, "standard")
    if consumer == LYCORIS and name in ("loha", "lokr") and "dora_scale" not in params:
        layer = _load(spec, base, params, options)
        # its merge applies the layer's scale to a ΔW that already holds it
        return _rule(LYCORIS, "LoHa/LoKr merged"), \
            (w + layer.delta_weight().float() * layer.scale).detach()
    return None


def measure(target: str, file: AdapterFile, model: nn.Module) -> dict[str, tuple[float, str, int]]:
    """``{limit: (max relative error, worst layer, layers)}`` of ``target`` reading
    ``file`` on ``model``."""
    found: dict[str, tuple[float, str, int]] = {}
    reads_lokr = lokr_pipeline(file.modules) is not None
    for path, module in sorted(file.modules.items()):
        if not module.params or not module.owners:
            continue
        try:
            base = model.get_submodule(path)
        except AttributeError:
            continue
        spec = module.owners[0]
        options = load_options(spec, file)
        readers = KOHYA_READERS.get(target, ())
        got = [consumer_weight(target, base, module.params, spec, reads_lokr, options),
               *(kohya_reader_weight(r, base, module.params, spec, options)
                 for r in readers)]
        for limit, consumer in filter(None, got):
            ours = _merged(base, _load(spec, base, module.params, options))
            err = _relative(consumer, ours)
            prev = found.get(limit, (-1.0, "", 0))
            found[limit] = (max(prev[0], err), path if err > prev[0] else prev[1],
                            prev[2] + 1)
    return found


def fused_warnings(file: AdapterFile, model: nn.Module,
                   modules: Mapping[str, Mapping[str, torch.Tensor]], exporter: ExporterSpec,
                   layouts: Mapping[str, Mapping[str, str]]) -> list[str]:
    """ComfyUI's line for the modules over a layer its model fuses that the ``comfyui``
    format keeps under diffusers' names (``comfyui_fused_limits``), with what ComfyUI
    then leaves out: the largest relative change of those layers' weights."""
    named = in_layout(modules, exporter, layouts)
    summary = {name: (file.modules[path].algorithm or "deltas" if path in file.modules
                      else "deltas", named[name])
               for path, name in zip(modules, named, strict=True)}
    lines = comfyui_fused_limits(summary)
    if not lines:
        return []
    worst, where = 0.0, ""
    for name in unfused_modules(summary):
        path = own_path(name)
        module = file.modules.get(path)
        if module is None or not module.owners:
            continue
        base = model.get_submodule(path)
        weight = base.weight
        assert isinstance(weight, torch.Tensor)
        ours = _merged(base, _load(module.owners[0], base, module.params))
        err = _relative(weight.detach().float(), ours)
        if err >= worst:
            worst, where = err, path
    return [f"ComfyUI: {line}; unloaded, max relative weight error {worst:.2g} "
            f"(worst {where})" for line in lines]


def unmeasured(target: str, file: AdapterFile) -> list[str]:
    """Without a model: which limits of ``target`` the file hits (not measured)."""
    names = {m.algorithm for m in file.modules.values() if m.params}
    params = {p for m in file.modules.values() for p in m.params}
    out = []
    if target == "comfyui" and "ia3" in names:
        out.append("ComfyUI has no IA3")
    if target == "comfyui" and "rescale" in params:
        out.append("ComfyUI never applies OFT's rescale")
    if target == "comfyui" and "dora_scale" in params and \
            dora_norm(file.metadata) == "standard":
        out.append("ComfyUI's DoRA normalises by the norm of W")
    if target == "diffusers" and dora_norm(file.metadata) != "standard" and any(
            "dora_scale" in m.params and set(m.params) <= LORA_PARAMS
            for m in file.modules.values()):
        out.append(COMFYUI_NORM_AS_STANDARD)
    if target == "diffusers" and lokr_pipeline(file.modules) is not None and all(
            peft_lokr(m.params) is not None for m in file.modules.values()
            if m.algorithm == "lokr" and m.params):
        names.discard("lokr")
    if target == "diffusers" and names - {"lora", None}:
        out.append(f"diffusers reads only LoRA (found {', '.join(sorted(n for n in names if n and n != 'lora'))})")
    return out


def _in_layout_summary(file: AdapterFile, modules: Mapping[str, Mapping[str, torch.Tensor]],
                       exporter: ExporterSpec, layouts: Mapping[str, Mapping[str, str]]
                       ) -> dict[str, tuple[str, dict[str, tuple[int, ...]]]]:
    """The modules as the exporter's ``limits`` takes them (as ``train`` hands them
    over): named as the file will name them, ``(algorithm, {tensor: shape})``."""
    renamed = in_layout({p: {} for p in modules}, exporter, layouts)
    out = {}
    for (path, params), name in zip(modules.items(), renamed, strict=True):
        module = file.modules.get(path)
        algorithm = module.algorithm if module is not None and module.params and \
            module.algorithm else "deltas"
        out[name] = (algorithm, {k: tuple(v.shape) for k, v in params.items()})
    return out


#: the targets whose readers take sd-scripts' text-encoder modules (``lora_te_*``) as
#: sd-scripts writes them (ComfyUI's ``model_lora_keys_clip``, A1111/Forge, sd-scripts)
TEXT_ENCODER_READERS = ("comfyui", "kohya", "a1111")


def _text_encoder_tensors(file: AdapterFile, target: str, warnings: list[str]
                          ) -> dict[str, torch.Tensor]:
    """The file's text-encoder tensors, carried over unchanged where ``target`` reads
    them; for diffusers (whose kohya reader takes a file in one layout only) they are
    left out, with a line in ``warnings``."""
    names = set(text_encoder_modules(file.tensors))
    if not names:
        return {}
    if target not in TEXT_ENCODER_READERS:
        note = text_encoder_note(file, f"written for {CONSUMER_NAMES[target]}")
        warnings.append(f"{note}; convert the text encoders with their own tool")
        return {}
    return {k: v for k, v in file.tensors.items() if k.split(".", 1)[0] in names}


#: The prefix kohya's writer puts before a denoiser module's flattened name.
KOHYA_PREFIX = "lora_unet_"


def convert_file(source: Path, target: str, model_path: Path | None = None,
                 out: Path | None = None, overwrite: bool = False, *,
                 host: PluginHost | None = None, model: nn.Module | None = None
                 ) -> dict[str, Any]:
    """Convert ``source`` for ``target``; returns ``out``, ``format`` (read),
    ``modules``, ``keys`` and ``warnings`` (one line each)."""
    if host is None:
        from loraengine.plugins import build_plugin_manager

        host = build_plugin_manager()
    source = Path(source)
    exporter = _exporter(host, target)
    out = Path(out) if out is not None else default_out(source, target)
    check_out(source, out, overwrite)
    if model is None and model_path is not None:
        from loraengine.tools.merge.logic import load_diffusers_model, locate_denoiser

        folder, _ = locate_denoiser(Path(model_path), None)
        model = load_diffusers_model(folder)
    warnings: list[str] = []
    measured: dict[str, tuple[float, str, int]] = {}
    consumer = CONSUMER_NAMES[target]
    if model is not None:
        from loraengine.inference import adaptable_layers, network_from_file

        file = read_adapter_file(source, host.registry, adaptable_layers(model), model=model)
        network, _, _ = network_from_file(model, file, host.registry)
        modules: dict[str, Mapping[str, torch.Tensor]] = dict(network.file_modules())
        layouts = module_layouts(host.registry, model)
        measured = measure(target, file, model)
        for limit, (err, worst, count) in measured.items():
            reader = next((r for r in KOHYA_READERS.get(target, ())
                           if limit in _texts(r)), consumer)
            warnings.append(f"{reader}: {limit}: {count} layer(s), max relative weight "
                            f"error {err:.2g} (worst {worst})")
    else:
        file = read_adapter_file(source, host.registry)
        if file.key_format == "kohya" and target in ("comfyui", "diffusers"):
            # lora_unet_down_blocks_0_...: the dots of the module paths these keys need
            # were lost to "_"
            raise ConfigError(f"--model: {source} has kohya's flattened names (e.g. "
                              f"{next(iter(sorted(file.modules)), '')}); which layer each is "
                              f"can only be read off the model, so pass --model PATH")
        if file.key_format == "kohya":
            # kohya (and a1111) keep the file's own flattened names: the writer adds the
            # prefix the names already carry, so it comes off first (not doubled)
            file = dataclasses.replace(file, modules={
                path.removeprefix(KOHYA_PREFIX): m for path, m in file.modules.items()})
        modules = {path: {**m.params, **m.deltas} for path, m in file.modules.items()}
        original = sorted(p for p in modules if p.split(".", 1)[0] in ORIGINAL_ROOTS)
        if target == "diffusers" and original:
            raise ConfigError(f"--model: {source} names its layers in the original "
                              f"layout (e.g. {original[0]}); diffusers needs the model's "
                              f"own names, so pass the model (--model PATH)")
        layouts = {}
        warnings += [f"{consumer}: {limit} (pass --model to measure the difference)"
                     for limit in unmeasured(target, file)]
    # each module as the written file names it (a layout marks fused and swapped layers)
    paths = list(file.modules)
    named = dict(zip(paths, in_layout({p: {} for p in paths}, exporter, layouts), strict=True))
    written = (lokr_without_tucker if target == "a1111" else dict)
    summary = {named[path]: (m.algorithm or "deltas",
                             {k: tuple(v.shape) for k, v in
                              written({**m.params, **m.deltas}).items()})
               for path, m in file.modules.items()}
    if target in KOHYA_READERS:
        # the limits not measured above, by name
        readers = (*KOHYA_READERS[target], *KOHYA_NAMED_READERS.get(target, ()))
        warnings += [line for line in kohya_limits(summary, readers, metadata=file.metadata)
                     if not any(f": {text} (" in line for text in measured)]
    elif target in ("comfyui", "diffusers"):
        # Forge reads these files too (FLUX.1/SD3 ones; not measured)
        warnings += [line for line in forge_limits(summary, target, file.metadata)
                     if not any(f": {text} (" in line for text in measured)]
    if target == "comfyui" and exporter.limits is not None:
        # the structural limits (fused and swapped layers kept under diffusers' names):
        # measured where the model is given, else named
        fused = fused_warnings(file, model, modules, exporter, layouts) \
            if model is not None and layouts else []
        skip = tuple(text for text, _ in COMFYUI_RULES) + (f"{FORGE}:",) + \
            (tuple(line.removeprefix("ComfyUI: ").partition(";")[0] for line in fused))
        warnings += [f"{consumer}: {line}" for line in
                     exporter.limits(_in_layout_summary(file, modules, exporter, layouts),
                                     metadata=file.metadata)
                     if not line.startswith(skip)] + fused
    tensors = exporter.to_file(in_layout(modules, exporter, layouts))
    tensors.update(_text_encoder_tensors(file, target, warnings))
    if not tensors:
        raise DataError(f"{source}: holds no adapter tensors to convert; nothing written")
    meta = dict(file.metadata) | {"loraengine.converted_for": target}
    save_lora(out, tensors, meta)
    return {"out": out, "format": file.key_format or "unknown", "modules": len(modules),
            "keys": len(tensors), "warnings": warnings}
