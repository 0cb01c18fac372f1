"""``loraengine merge``: bake an adapter file into a diffusers model's weights.

A diffusers model folder (``config.json`` + weights) or a pipeline folder
(``model_index.json``; the denoiser is its ``unet`` or ``transformer`` subfolder) goes
in; the merged model comes out as the same kind of folder, written with
``save_pretrained``. The output appears atomically: everything is written to a
temporary folder beside it, which is renamed into place at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import click
import torch

from loraengine.core.errors import ConfigError, DataError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DENOISERS = ("unet", "transformer")


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


def _saved_dtype(folder: Path) -> torch.dtype:
    """The floating dtype the model's weights are stored in (fp32 when unknown)."""
    from safetensors import safe_open

    # the file from_pretrained loads, not a variant such as *.fp16.safetensors
    main = folder / "diffusion_pytorch_model.safetensors"
    files = [main] if main.exists() else sorted(
        f for f in folder.glob("*.safetensors") if f.name.count(".") == 1)
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():
                dtype = fh.get_slice(key).get_dtype()
                table = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
                if dtype in table:
                    return table[dtype]
    return torch.float32


def load_diffusers_model(folder: Path) -> Any:
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
    except (OSError, ValueError, RuntimeError) as exc:
        raise DataError(f"--model: cannot load {cls_name} from {folder}: "
                        f"{str(exc).splitlines()[0]}") from None


def merge_model(model_path: Path, lora: Path, out: Path, strength: float = 1.0,
                subfolder: str | None = None, dtype: str = "auto",
                overwrite: bool = False) -> dict[str, Any]:
    """Merge ``lora`` into the model at ``model_path`` and write it to ``out``."""
    from loraengine.inference import apply

    model_path, out = Path(model_path), Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"--out: {out} exists (pass --overwrite to replace it)")
    if out.resolve() == model_path.resolve():
        raise ConfigError("--out: must differ from --model")
    folder, sub = locate_denoiser(model_path, subfolder)
    target = _saved_dtype(folder) if dtype == "auto" else DTYPES[dtype]
    model = load_diffusers_model(folder)
    handle = apply(model, lora, strength=strength, mode="merge")
    model.to(target)
    if out.resolve().is_relative_to(Path(model_path).resolve()):
        raise DataError(f"--out: {out} is inside --model {model_path}; write the merged "
                        f"model somewhere else")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        if sub is not None:
            # A pipeline folder: copy everything else, then write the merged denoiser.
            shutil.copytree(model_path, tmp, dirs_exist_ok=True,
                            ignore=lambda d, names: [sub] if Path(d) == model_path else [])
            model.save_pretrained(str(tmp / sub))
        else:
            model.save_pretrained(str(tmp))
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "modules": len(handle.modules), "format": handle.key_format,
            "algorithms": sorted(set(handle.algorithms.values())),
            "dtype": str(target).replace("torch.", "")}


def _replace_dir(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is moved aside first and removed
    only once the new folder is in place."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.rmdir(old)
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@click.command("merge")
@click.option("--model", "model_path", required=True, type=click.Path(path_type=Path),
              help="A diffusers model folder or pipeline folder.")
@click.option("--lora", required=True, type=click.Path(path_type=Path),
              help="The adapter file (any format loraengine reads).")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder to write the merged model to.")
@click.option("--strength", type=float, default=1.0, show_default=True,
              help="Multiplier of the adapter's delta.")
@click.option("--subfolder", default=None, help="The denoiser's subfolder of a pipeline "
              "folder (default: unet, else transformer).")
@click.option("--dtype", type=click.Choice(["auto", *DTYPES]), default="auto",
              show_default=True, help="Weights dtype of the output; auto keeps the input's.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def merge(model_path: Path, lora: Path, out: Path, strength: float, subfolder: str | None,
          dtype: str, overwrite: bool) -> None:
    """Bake an adapter file into a model's weights and save the merged model."""
    from loraengine.cli.common import reports_errors

    info = reports_errors(merge_model)(model_path, lora, out, strength, subfolder, dtype,
                                       overwrite)
    click.echo(f"merged {info['modules']} module(s) ({', '.join(info['algorithms'])}, "
               f"{info['format']} keys) at strength {strength:g} -> {info['out']} "
               f"({info['dtype']})")
