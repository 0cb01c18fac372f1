"""``loraengine bucket``: group mixed-size latents into resolution buckets."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import click
import torch

from loraengine.cli.common import path_option, reports_errors
from loraengine.core.data import group_into_buckets, read_safetensors
from loraengine.core.errors import ConfigError, DataError, OutputError
from loraengine.core.files import write_pair
from loraengine.tools.prepare.logic import CONDITIONING_FILE, LATENTS_FILE


def check_out(out_dir: Path, inputs: Mapping[str, Path], overwrite: bool) -> None:
    """Before anything is read: refuse an ``--out`` that is not a folder, an output
    file that is one of the inputs (real paths, links resolved) or is no regular file,
    and existing outputs unless ``overwrite``."""
    if os.path.lexists(out_dir) and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir}: cannot create the folder (a file of that "
                          f"name exists)")
    outputs = [out_dir / LATENTS_FILE, out_dir / CONDITIONING_FILE]
    existing = [p for p in outputs if os.path.lexists(p)]
    for path in existing:
        for option, source in inputs.items():
            if os.path.realpath(path) == os.path.realpath(source):
                raise ConfigError(f"--out: {path} is the {option} file; write the buckets "
                                  f"to another folder")
        if not path.is_file():
            raise ConfigError(f"--out: {path} exists and is not a regular file")
    if existing and not overwrite:
        names = " and ".join(str(p) for p in existing)
        it = "them" if len(existing) > 1 else "it"
        raise ConfigError(f"--out: {names} exist{'' if len(existing) > 1 else 's'} "
                          f"(pass --overwrite to replace {it})")


def check_keys(option: str, path: Path, tensors: Mapping[str, torch.Tensor], wanted: str,
               unwanted: str | None = None) -> None:
    """Refuse a file that holds no ``<wanted>.<k>`` tensor, or holds ``<unwanted>.<k>``
    ones: most likely the other file given to the option."""
    held = sorted(tensors)
    shown = ", ".join(held[:3]) + (" ..." if len(held) > 3 else "")
    if unwanted is not None and any(k.startswith(unwanted + ".") for k in held):
        raise DataError(f"{option}: {path} holds {unwanted}.<k> tensors ({shown}), which "
                        f"belong in the --{unwanted} file")
    if not any(k.startswith(wanted + ".") for k in held):
        raise DataError(f"{option}: {path} holds no {wanted}.<k> tensor (it holds "
                        f"{shown or 'none'})")


@click.command("bucket")
@path_option("--latents", "latents_path", required=True,
             help="safetensors with latents.<k> tensors of mixed sizes.")
@path_option("--conditioning", "cond_path", required=True,
             help="safetensors with cond.<k> (and other <key>.<k>) entries.")
@path_option("--out", "out_dir", required=True,
             help="Folder for latents.safetensors and conditioning.safetensors (never "
             "an input).")
@click.option("--overwrite", is_flag=True,
              help="Replace latents.safetensors and conditioning.safetensors in --out if "
              "they exist: both together, or neither when a write fails.")
@click.option("--video/--images", "video", default=None,
              help="The latents are video, one [C,T,H,W] each (bucketed by frames × "
              "height × width), or images [C,H,W]. Default: video when a latent is 5-D, or 4-D "
              "with a 2-D cond.")
@reports_errors
def bucket(latents_path: Path, cond_path: Path, out_dir: Path, overwrite: bool,
           video: bool | None) -> None:
    """Write bucketed latents.<i> / cond.<i> files for data.bucket_mode."""
    check_out(out_dir, {"--latents": latents_path, "--conditioning": cond_path}, overwrite)
    latents = read_safetensors(latents_path, "--latents")
    check_keys("--latents", latents_path, latents, "latents")
    conditioning = read_safetensors(cond_path, "--conditioning")
    check_keys("--conditioning", cond_path, conditioning, "cond", unwanted="latents")
    lat, cond = group_into_buckets(latents, conditioning, video=video)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"--out {out_dir}: cannot create the folder "
                          f"({exc.strerror or exc})") from None
    write_pair(out_dir / LATENTS_FILE, out_dir / CONDITIONING_FILE, lat, cond)
    for key in sorted(lat, key=lambda k: int(k.split(".")[1])):
        click.echo(f"{key}: {list(lat[key].shape)}")
