"""Bake an adapter file into a diffusers model's weights: what ``loraengine merge`` does.

A diffusers model folder (``config.json`` + weights) or a pipeline folder
(``model_index.json``; the denoiser is its ``unet`` or ``transformer`` subfolder) goes
in; the merged model comes out as the same kind of folder, written with
``save_pretrained``. The output appears atomically: everything is written to a
temporary folder beside it, which is renamed into place at the end.

A merge never touches its inputs: ``--out`` may not be, hold or sit inside ``--model``
or ``--lora`` (compared as real paths, links resolved), and ``--overwrite`` replaces
only a folder an earlier merge wrote, which it recognises by the marker file
``MARKER`` left in every merge output.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from loraengine.core.adapter.network import check_strength
from loraengine.core.config.source import shorten
from loraengine.core.data import first_nonfinite, open_regular
from loraengine.core.devices import DTYPES, SAFETENSORS_DTYPES
from loraengine.core.errors import ConfigError, DataError
from loraengine.core.files import (
    atomic_folder,
    path_overlap,
    read_adapter_file,
    text_encoder_note,
)
from loraengine.core.plugins.host import PluginHost

DENOISERS = ("unet", "transformer")

#: The file every merge output holds: what it was merged from, and the proof that
#: ``--overwrite`` may replace the folder.
MARKER = "loraengine_merge.json"


def check_output(model_path: Path, lora: Path, out: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` that would destroy an input or a folder merge did not write,
    before anything is loaded."""
    for option, source in (("--model", model_path), ("--lora", lora)):
        how = path_overlap(out, source)
        if how is not None:
            raise ConfigError(f"--out: {out} {how} {option} {source}; write the merged "
                              f"model to a folder apart from the inputs")
    if not os.path.lexists(out):
        return
    if not overwrite:
        raise ConfigError(f"--out: {out} exists (pass --overwrite to replace it)")
    if out.is_symlink() or not out.is_dir():
        kind = "a link" if out.is_symlink() else "a file"
        raise ConfigError(f"--out: {out} is {kind}, not a folder written by loraengine "
                          f"merge; --overwrite replaces only a merge output")
    if not (out / MARKER).is_file():
        raise ConfigError(f"--out: {out} is a folder loraengine merge did not write (it "
                          f"has no {MARKER}); --overwrite replaces only a merge output")


def locate_denoiser(root: Path, subfolder: str | None) -> tuple[Path, str | None]:
    """(model folder, its subfolder name inside a pipeline folder or None)."""
    if not root.is_dir():
        raise DataError(f"--model: {root} is not a folder")
    if (root / "model_index.json").exists():
        names = [subfolder] if subfolder else list(DENOISERS)
        for name in names:
            if (root / name / "config.json").exists():
                return root / name, name
        raise DataError(f"--model: pipeline folder {root} has no "
                        f"{' or '.join(n + '/config.json' for n in names)}")
    if subfolder:
        root = root / subfolder
    if not (root / "config.json").exists():
        raise DataError(f"--model: {root} has neither model_index.json nor config.json")
    return root, None


def saved_dtype(folder: Path) -> torch.dtype:
    """The floating dtype the model's weights are stored in (fp32 when unknown). Every
    weights file's header is read, so a corrupt, truncated or unreadable file is a
    ``DataError`` naming it before anything loads."""
    from safetensors import safe_open

    # the file from_pretrained loads, not a variant such as *.fp16.safetensors
    main = folder / "diffusion_pytorch_model.safetensors"
    files = [main] if main.exists() else sorted(
        f for f in folder.glob("*.safetensors") if f.name.count(".") == 1)
    found = []
    for file in files:
        with open_regular(file, "--model"):
            try:
                with safe_open(str(file), framework="pt") as fh:
                    found += [fh.get_slice(key).get_dtype() for key in fh.keys()]
            except (OSError, SafetensorError) as exc:
                reason = shorten((str(exc).splitlines() or [type(exc).__name__])[0])
                raise DataError(f"--model: cannot read {file}: {reason}") from None
    return next((SAFETENSORS_DTYPES[d] for d in found if d in SAFETENSORS_DTYPES),
                torch.float32)


def check_finite(tensors: Mapping[str, torch.Tensor], source: Path | str) -> None:
    """Refuse an adapter file holding NaN or inf values, naming the first tensor."""
    bad = first_nonfinite(tensors)
    if bad is not None:
        raise DataError(f"--lora {source}: tensor {bad!r} holds NaN or inf values; "
                        f"nothing was merged or written")


def load_diffusers_model(folder: Path) -> Any:
    """The diffusers model class the folder's ``config.json`` names, loaded in fp32."""
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    try:
        cls_name = json.loads((folder / "config.json").read_text(encoding="utf-8"))["_class_name"]
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"--model: {folder}/config.json: cannot read the model class ({exc})"
                        ) from None
    cls = getattr(diffusers, cls_name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise DataError(f"--model: {folder} holds a {cls_name}, not a diffusers model class")
    try:
        # fp32 for the merge itself; the result is cast back to the stored dtype.
        return cls.from_pretrained(str(folder), local_files_only=True, torch_dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise DataError(f"--model: cannot load {cls_name} from {folder}: "
                        f"{str(exc).splitlines()[0]}") from None


def merge_model(model_path: Path, lora: Path, out: Path, strength: float = 1.0,
                subfolder: str | None = None, dtype: str = "auto",
                overwrite: bool = False, *, host: PluginHost | None = None) -> dict[str, Any]:
    """Merge ``lora`` into the model at ``model_path`` and write it to ``out``.

    Returns what was written: ``out``, ``modules``, key ``format``, ``algorithms`` and
    the output ``dtype``."""
    from loraengine.inference import adaptable_layers, network_from_file

    if host is None:
        from loraengine.plugins import build_plugin_manager

        host = build_plugin_manager()
    model_path, lora, out = Path(model_path), Path(lora), Path(out)
    check_strength(strength)
    check_output(model_path, lora, out, overwrite)
    folder, sub = locate_denoiser(model_path, subfolder)
    stored = saved_dtype(folder)  # reads every weights header: a bad file fails here
    target = stored if dtype == "auto" else DTYPES[dtype]
    model = load_diffusers_model(folder)
    file = read_adapter_file(lora, host.registry, adaptable_layers(model), model=model)
    check_finite(file.tensors, lora)
    network, key_format, algorithms = network_from_file(model, file, host.registry)
    network.set_multiplier(strength)
    with torch.no_grad():
        network.merge()
    model.to(target)
    # finite inputs can still overflow (a large strength, or a delta beyond fp16's range)
    bad = next((n for n, p in model.named_parameters() if p.is_floating_point()
                and not bool(torch.isfinite(p).all())), None)
    if bad is not None:
        raise DataError(f"--lora {lora}: merged at strength {strength:g}, the weight {bad} "
                        f"holds NaN or inf values in {str(target).replace('torch.', '')}; "
                        f"nothing was written")
    info = {"out": str(out), "modules": len(network.paths), "format": key_format,
            "algorithms": sorted(set(algorithms.values())),
            "dtype": str(target).replace("torch.", ""),
            "warnings": [n for n in [text_encoder_note(file, "merged")] if n]}
    # Checked again just before writing: the folders may have changed while loading.
    check_output(model_path, lora, out, overwrite)
    existed = out.exists()
    try:
        with atomic_folder(out) as tmp:
            if sub is not None:
                # A pipeline folder: copy everything else, then write the merged denoiser.
                shutil.copytree(model_path, tmp, dirs_exist_ok=True,
                                ignore=lambda d, names: [sub] if Path(d) == model_path else [])
                model.save_pretrained(str(tmp / sub))
            else:
                model.save_pretrained(str(tmp))
            (tmp / MARKER).write_text(json.dumps(
                {**info, "model": str(model_path), "lora": str(lora), "strength": strength},
                indent=2) + "\n", encoding="utf-8")
    except (OSError, SafetensorError) as exc:
        kept = f"the earlier {out} is kept" if existed else "nothing was written"
        reason = getattr(exc, "strerror", None) or shorten(
            (str(exc).splitlines() or [type(exc).__name__])[0])
        raise DataError(f"--out: cannot write {out}: {reason} ({kept})") from None
    return info
