"""Reading a denoiser from one original-layout ``.safetensors`` file (``model.path`` a
file, ``model.config`` the diffusers folder of its config).

The file's names are turned into diffusers' by diffusers' own single-file converter
for the class (``diffusers.loaders.single_file_model``), as ``from_single_file`` does;
what is read is then checked against the model the config builds, tensor by tensor, so
a file of another model, another size or a partial file is one line naming what does
not fit (and, from the families' layer names, which model the file looks made for)
instead of a model left with uninitialised weights.

An all-in-one checkpoint puts ``model.diffusion_model.`` before the denoiser's names
(its VAE and text encoders beside it); ComfyUI's ``diffusion_models`` files and most
releases do not. Where diffusers' converter for the class does not take the prefix off
itself (Flux.2, Qwen-Image), the names are tried again without it, the rest of the file
left out. The check runs on the header alone first (tensors on the ``meta`` device go
through the converter), so ``loraengine validate`` needs no weights, and loading reads
only the tensors of the denoiser. ComfyUI's "scaled fp8" files (fp8 weights, each with
its ``scale_weight``) are dequantised as ComfyUI does before the names are converted.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from loraengine.core.errors import DataError

#: the prefix all-in-one checkpoints put before the denoiser's names
CHECKPOINT_PREFIX = "model.diffusion_model."
#: the key of ComfyUI's scaled-fp8 files that says their weights are scaled
SCALED_FP8 = "scaled_fp8"
#: how many names an error shows
_SHOWN = 3

LooksLike = Callable[[Collection[str]], "str | None"]


def converter(cls: type) -> Callable[..., dict[str, Any]] | None:
    """diffusers' single-file converter for ``cls`` (or its nearest base that has
    one); ``None`` when diffusers reads no single file of it."""
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    table = cast(Mapping[str, Mapping[str, Any]], SINGLE_FILE_LOADABLE_CLASSES)
    for base in cls.__mro__:
        entry = table.get(base.__name__)
        if entry is not None:
            fn: Callable[..., dict[str, Any]] = entry["checkpoint_mapping_fn"]
            return fn
    return None


def header(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors as ``meta`` tensors (names, shapes and dtypes from its
    header; nothing is read)."""
    from safetensors import safe_open

    from loraengine.plugins.models.weights import header_of

    header_of(path)  # our own reason where safetensors' would be terse or wrong
    out: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as fh:
        for name in fh.keys():
            part = fh.get_slice(name)
            dtype = _DTYPES.get(part.get_dtype())
            if dtype is None:
                raise DataError(f"model.path: {path}: tensor {name} has dtype "
                                f"{part.get_dtype()}, which is not read here")
            out[name] = torch.empty(part.get_shape(), dtype=dtype, device="meta")
    return out


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
           "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _candidates(names: Collection[str]) -> list[tuple[str, list[str]]]:
    """The file's names as they are, then, when some carry the checkpoint prefix, only
    those without it: ``(prefix, names of the file read)``."""
    out = [("", list(names))]
    prefixed = [n for n in names if n.startswith(CHECKPOINT_PREFIX)]
    if prefixed:
        out.append((CHECKPOINT_PREFIX, prefixed))
    return out


def unscaled(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None
             ) -> dict[str, torch.Tensor]:
    """``tensors`` of a ComfyUI "scaled fp8" file (a ``scaled_fp8`` marker; beside each
    such weight ``<layer>.scale_weight``, and ``<layer>.scale_input`` for fp8 matrix
    products) with each weight dequantised as ComfyUI computes it,
    ``weight.to(dtype) * scale_weight.to(dtype)`` (float32 when ``dtype`` is ``None``),
    and the marker and scales left out. Other files come back as they are."""
    if SCALED_FP8 not in tensors:
        return tensors
    target = dtype or torch.float32
    out = {k: v for k, v in tensors.items()
           if k != SCALED_FP8 and not k.endswith((".scale_weight", ".scale_input"))}
    for key, scale in tensors.items():
        if key.endswith(".scale_weight"):
            weight = key[:-len(".scale_weight")] + ".weight"
            if weight not in out:
                raise DataError(f"model.path: {key} scales a weight the file does not "
                                f"hold ({weight})")
            out[weight] = out[weight].to(target) * scale.to(target)
    return out


def _convert(cls: type, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
             expected: Collection[str]) -> dict[str, torch.Tensor]:
    """``tensors`` in diffusers' names: as they are when they are the model's names
    already (as ``from_single_file`` decides), else through diffusers' converter."""
    if set(tensors) == set(expected):
        return dict(tensors)
    fn = converter(cls)
    assert fn is not None
    return dict(fn(checkpoint=dict(tensors), config=dict(config)))


def _shown(names: Collection[str]) -> str:
    first = sorted(names)[:_SHOWN]
    return ", ".join(first) + (" ..." if len(names) > _SHOWN else "")


#: (badness, what does not fit, whether every tensor is there: a config of another model
#: of the family, rather than another file)
Problem = tuple[int, str, bool]


def _problem(converted: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
             ) -> Problem | None:
    """(badness, what does not fit, all there) of a converted file against the model's tensors
    (its :func:`skeleton`'s); ``None`` when every parameter is there with its shape and
    nothing else is. A buffer the file lacks keeps the value the class builds (the
    skeleton's buffers are real tensors, its parameters on ``meta``), as diffusers
    leaves it."""
    missing = {k for k, v in expected.items() if k not in converted and v.is_meta}
    if missing:
        return len(missing) * 2 + 1, (f"{len(missing)} of the model's {len(expected)} "
                                      f"tensors are not in it ({_shown(missing)})"), False
    wrong = [k for k in sorted(expected) if k in converted
             and tuple(converted[k].shape) != tuple(expected[k].shape)]
    if wrong:
        k = wrong[0]
        return len(wrong) * 2, (f"{len(wrong)} tensor(s) have other shapes than the "
                                f"model's: {k} is {list(converted[k].shape)} in the file "
                                f"and {list(expected[k].shape)} in the model"), True
    extra = set(converted) - set(expected)
    if extra:
        return len(extra), (f"{len(extra)} of its tensors have no place in the model "
                            f"({_shown(extra)})"), True
    return None


def plan(cls: type, config: Mapping[str, Any], file: Path, tensors: Mapping[str, torch.Tensor],
         expected: Mapping[str, torch.Tensor], what: str, looks_like: LooksLike | None
         ) -> tuple[str, list[str]]:
    """How to read ``file`` (its tensors, real or ``meta``) as the model ``expected``:
    ``(prefix taken off, names of the file read)``; raises ``DataError`` naming what
    does not fit, and the model the file looks made for where that is another one."""
    worst: Problem | None = None
    for prefix, names in _candidates(list(tensors)):
        part = unscaled({n[len(prefix):]: tensors[n] for n in names}, None)
        try:
            converted = _convert(cls, config, part, expected)
        except Exception as exc:  # a converter meets names it does not know
            text = str(exc).strip().splitlines()
            found: Problem = (
                4 * len(expected) + 4,
                f"diffusers' converter for {cls.__name__} fails on it "
                f"({type(exc).__name__}: {text[0] if text else ''})", False)
        else:
            problem = _problem(converted, expected)
            if problem is None:
                return prefix, names
            found = problem
        if worst is None or found[0] < worst[0]:
            worst = found
    assert worst is not None
    line = f"model.path: {file} does not hold {what}: {worst[1]}"
    theirs = own = None
    if looks_like is not None:
        theirs = looks_like(_module_names(tensors))
        own = looks_like(_module_names(expected))
    if theirs and theirs != own:
        line += f"; the file looks made for {theirs}"
    elif worst[2]:  # every tensor is there, some do not fit
        line += " (is model.config the config of this file's model?)"
    raise DataError(line)


def _module_names(tensors: Collection[str]) -> list[str]:
    return sorted({name.rpartition(".")[0] or name for name in tensors})


def skeleton(cls: Any, config: Mapping[str, Any]) -> nn.Module:
    """The model ``config`` builds, its parameters on the ``meta`` device."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        module: nn.Module = cls.from_config(dict(config))
    return module


def check(cls: Any, config_dir: Path, file: Path, what: str,
          looks_like: LooksLike | None = None) -> None:
    """That ``file`` reads as the model of ``config_dir``, from its header alone."""
    config = cls.load_config(str(config_dir))
    expected = skeleton(cls, config).state_dict()
    plan(cls, config, file, header(file), expected, what, looks_like)


def load(cls: Any, config_dir: Path, file: Path, what: str, dtype: torch.dtype | None,
         prepare: Callable[[str, nn.Module], None] | None = None,
         looks_like: LooksLike | None = None) -> nn.Module:
    """The model of ``config_dir`` with the weights of the single ``file``: floating
    tensors in ``dtype`` (``None``: the dtype the class builds them in), ``prepare``
    applied to each module as its tensors arrive."""
    from safetensors import safe_open

    config = cls.load_config(str(config_dir))
    module = skeleton(cls, config)
    expected = module.state_dict(keep_vars=True)
    prefix, names = plan(cls, config, file, header(file), expected, what, looks_like)
    with safe_open(str(file), framework="pt") as fh:
        raw = {name[len(prefix):]: fh.get_tensor(name) for name in names}
    converted = _convert(cls, config, unscaled(raw, dtype), expected)
    del raw
    if _problem(converted, expected) is not None:  # the header said otherwise
        raise DataError(f"model.path: {file}: its tensors differ from its header")
    for name in list(converted):
        tensor = converted.pop(name)
        target = dtype or expected[name].dtype
        if tensor.is_floating_point() and tensor.dtype != target:
            tensor = tensor.to(target)
        owner_path, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_path)
        owner.load_state_dict({leaf: tensor}, strict=False, assign=True)
        del tensor
        if prepare is not None:
            prepare(owner_path, owner)
    left = [n for n, p in module.named_parameters() if p.is_meta]
    if left:  # cannot happen after the checks above; never train on empty weights
        raise DataError(f"model.path: {file}: no weights for {_shown(left)}")
    if dtype is not None:
        module.to(dtype)  # buffers the class builds (not loaded), as for a folder
    module.eval()
    return module


__all__ = ["CHECKPOINT_PREFIX", "SCALED_FP8", "check", "converter", "header", "load", "plan",
           "skeleton", "unscaled"]
