"""`loraengine inspect FILE`: what a LoRA file holds, without a model."""

from __future__ import annotations

import json
from pathlib import Path

import click

from loraengine.cli.common import State, reports_errors


@click.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
@reports_errors
def inspect(state: State, file: Path, as_json: bool) -> None:
    """Describe a LoRA file: metadata, algorithm, rank/alpha, modules, parameters."""
    from loraengine.tools.inspect.logic import describe

    info = describe(file, state.host.registry)
    for line in info["warnings"]:
        click.echo(f"warning: {line}", err=True)
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    click.echo(f"file:        {info['file']}")
    click.echo(f"algorithm:   {info['algorithm']}")
    click.echo(f"rank:        {info['rank']}")
    click.echo(f"alpha:       {info['alpha']}")
    click.echo(f"modules:     {info['modules']}")
    if info["text_encoder_modules"]:
        click.echo(f"text encoder: {info['text_encoder_modules']} module(s) (lora_te*; "
                   f"loraengine adapts the denoiser only)")
    click.echo(f"parameters:  {info['parameters']:,}")
    click.echo(f"steps:       {info['steps']}")
    click.echo(f"dtype:       {', '.join(info['dtypes'])}")
    click.echo("metadata:")
    for k, v in sorted(info["metadata"].items()):
        v = v if len(v) <= 100 else v[:97] + "..."
        click.echo(f"  {k}: {v}")


