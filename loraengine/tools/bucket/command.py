"""``loraengine bucket``: group mixed-size latents into resolution buckets."""

from __future__ import annotations

from pathlib import Path

import click
from safetensors.torch import save_file

from loraengine.cli.common import path_option, reports_errors
from loraengine.core.data import group_into_buckets, read_safetensors
from loraengine.core.files import write_atomic


@click.command("bucket")
@path_option("--latents", "latents_path", required=True,
             help="safetensors with latents.<k> tensors of mixed sizes.")
@path_option("--conditioning", "cond_path", required=True,
             help="safetensors with cond.<k> (and other <key>.<k>) entries.")
@path_option("--out", "out_dir", required=True,
             help="Folder for latents.safetensors and conditioning.safetensors.")
@click.option("--video/--images", "video", default=None,
              help="The latents are video, one [C,T,H,W] each (bucketed by frames × "
              "height × width), or images [C,H,W]. Default: video when a latent is 5-D, or 4-D "
              "with a 2-D cond.")
@reports_errors
def bucket(latents_path: Path, cond_path: Path, out_dir: Path, video: bool | None) -> None:
    """Write bucketed latents.<i> / cond.<i> files for data.bucket_mode."""
    lat, cond = group_into_buckets(read_safetensors(latents_path, "latents"),
                                   read_safetensors(cond_path, "conditioning"), video=video)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "latents.safetensors", lambda p: save_file(lat, str(p)))
    write_atomic(out_dir / "conditioning.safetensors", lambda p: save_file(cond, str(p)))
    for key in sorted(lat, key=lambda k: int(k.split(".")[1])):
        click.echo(f"{key}: {list(lat[key].shape)}")
