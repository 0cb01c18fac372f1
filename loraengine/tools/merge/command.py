"""``loraengine merge``: bake an adapter file into a diffusers model's weights (see
``loraengine.tools.merge.logic``)."""

from __future__ import annotations

from pathlib import Path

import click

from loraengine.cli.common import State, path_option, reports_errors
from loraengine.core.devices import DTYPES


@click.command("merge")
@path_option("--model", "model_path", required=True,
             help="A diffusers model folder or pipeline folder.")
@path_option("--lora", required=True, help="The adapter file (any format loraengine reads).")
@path_option("--out", required=True,
             help="Folder to write the merged model to.")
@click.option("--strength", type=float, default=1.0, show_default=True,
              help="Multiplier of the adapter's delta.")
@click.option("--subfolder", default=None, help="The denoiser's subfolder of a pipeline "
              "folder (default: unet, else transformer).")
@click.option("--dtype", type=click.Choice(["auto", *DTYPES]), default="auto",
              show_default=True, help="Weights dtype of the output; auto keeps the input's.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.pass_obj
@reports_errors
def merge(state: State, model_path: Path, lora: Path, out: Path, strength: float,
          subfolder: str | None, dtype: str, overwrite: bool) -> None:
    """Bake an adapter file into a model's weights and save the merged model."""
    from loraengine.tools.merge.logic import merge_model

    info = merge_model(model_path, lora, out, strength, subfolder, dtype, overwrite,
                       host=state.host)
    click.echo(f"merged {info['modules']} module(s) ({', '.join(info['algorithms'])}, "
               f"{info['format']} keys) at strength {strength:g} -> {info['out']} "
               f"({info['dtype']})")
    for line in info["warnings"]:
        click.echo(f"warning: {line}", err=True)
