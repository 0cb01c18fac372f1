"""``loraengine convert``: re-key an adapter file for ComfyUI, sd-scripts, A1111/Forge
or diffusers (see ``loraengine.tools.convert.logic``)."""

from __future__ import annotations

from pathlib import Path

import click

from loraengine.cli.common import State, path_option, reports_errors
from loraengine.tools.convert.targets import TARGETS


@click.command("convert")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--to", "target", type=click.Choice(sorted(TARGETS)), required=True,
              help="The program the file is for.")
@path_option("--model", "model_path",
             help="A diffusers model or pipeline folder: names the layers in the "
             "consumer's layout and measures what it cannot express.")
@path_option("--out", help="Output file (default: FILE.<to>.safetensors "
             "beside it).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists (never the "
              "input).")
@click.pass_obj
@reports_errors
def convert(state: State, file: Path, target: str, model_path: Path | None,
            out: Path | None, overwrite: bool) -> None:
    """Re-key an adapter file (ours or another program's) for one consumer."""
    from loraengine.tools.convert.logic import convert_file

    info = convert_file(file, target, model_path, out, overwrite, host=state.host)
    for line in info["warnings"]:
        click.echo(f"warning: {line}", err=True)
    click.echo(f"converted {info['modules']} module(s) ({info['format']} keys) -> "
               f"{info['out']} ({info['keys']} {target} keys)")
