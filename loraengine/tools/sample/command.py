"""``loraengine sample``: render images from a model with an adapter file applied.

The model is a local diffusers pipeline or model folder, a single-file checkpoint (with
``--family``), or a training config whose ``model`` section says what to load. Prompts
are a conditioning ``.safetensors`` (``cond`` plus family extras, as ``loraengine
prepare`` writes) or a ``.txt`` file with one prompt per line, encoded with the model's
own text encoders. The adapter goes on with ``loraengine.apply``; images are decoded by
the pipeline's VAE when it has one. Written to ``--out``: ``grid.png`` (rows: prompts,
columns: seeds), ``image_<p>_<j>.png`` per image and, with ``--lora``, ``compare.png``
(base beside adapted, same noise).
"""


from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from loraengine.cli.common import State, field_option, path_option, reports_errors
from loraengine.cli.progress import TaskBars
from loraengine.core.config.root import SamplesConfig
from loraengine.core.devices import DTYPES
from loraengine.core.errors import ConfigError
from loraengine.inference import ApplyMode
from loraengine.tools.sample import logic as S


def _parse_options(items: tuple[str, ...]) -> dict[str, Any]:
    """``--sampler-option KEY=VALUE`` items as a dict (values read as YAML)."""
    import yaml

    options: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--sampler-option {item!r}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        options[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return options


@click.command("sample")
@path_option("--model", "model_path", required=True,
             help="A diffusers pipeline or model folder, a single-file checkpoint (with "
             "--family) or a training config whose model section is used.")
@path_option("--lora",
             help="The adapter file to apply (omit to sample the base model).")
@path_option("--prompts", required=True,
             help="Conditioning .safetensors (cond [P,L,D] + family extras) or a .txt "
             "file, one prompt per line.")
@path_option("--out", required=True,
             help="Folder for grid.png, compare.png and the single images.")
@click.option("--family", default=None, help="Model family (default: detected).")
@path_option("--negative",
             help="Negative conditioning for guidance (.safetensors or .txt); default: "
             "an empty conditioning.")
# The options below mirror output.samples: range, default and help come from its fields.
@field_option(SamplesConfig, "seed", "--seed", help="Seeds the starting noise; the same seed, "
              "prompts and size give the same images, with or without --lora.")
@field_option(SamplesConfig, "steps", "--steps")
@field_option(SamplesConfig, "guidance", "--guidance")
@field_option(SamplesConfig, "sampler", "--sampler")
@click.option("--sampler-option", "sampler_options", multiple=True, metavar="KEY=VALUE",
              help="A sampler option, e.g. eta=0.5 or karras=true.")
@field_option(SamplesConfig, "per_prompt", "--per-prompt", default=1)
@click.option("--size", type=(int, int), default=None, metavar="H W",
              help="Latent height and width (default: the model's sample size).")
@click.option("--frames", type=click.IntRange(1), default=None,
              help="Video families: latent frames (Wan: 1 + 4k pixel frames become 1 + k; "
              "default 1). Each sample is shown as a strip of its frames.")
@click.option("--strength", type=float, default=1.0, show_default=True,
              help="Multiplier of the adapter's effect (0: the base model, 1: as trained).")
@click.option("--mode", type=click.Choice(["bypass", "merge"]), default="bypass",
              show_default=True, help="How the adapter goes on the model.")
@field_option(SamplesConfig, "compare", "--compare/--no-compare",
              help="With --lora, also render the base model to compare.png.")
@click.option("--device", default="auto", show_default=True,
              help="auto (cuda when available), cpu, cuda or cuda:N.")
@click.option("--overwrite", is_flag=True, help="Replace the images of an earlier sample "
              "in --out (without it such a folder is refused before anything renders).")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="fp32", show_default=True,
              help="Dtype the model runs in while sampling.")
@click.pass_obj
def sample(state: State, model_path: Path, lora: Path | None, prompts: Path, out: Path,
           family: str | None, negative: Path | None, seed: int, steps: int, guidance: float,
           sampler: str, sampler_options: tuple[str, ...], per_prompt: int,
           size: tuple[int, int] | None, strength: float, mode: ApplyMode, compare: bool,
           device: str, dtype: str, overwrite: bool, frames: int | None) -> None:
    """Render prompts with a model and (optionally) an adapter file."""

    def run() -> dict[str, Any]:
        settings = S.SampleSettings(steps=steps, guidance=guidance, seed=seed,
                                    sampler=sampler,
                                    sampler_options=_parse_options(sampler_options),
                                    sampler_key="--sampler", options_key="--sampler-option",
                                    steps_key="--steps")
        with TaskBars(transient=True) as bars:
            return S.sample_to_folder(
                model_path, prompts, out, host=state.host, lora=lora, family=family,
                strength=strength, mode=mode, negative=negative, settings=settings,
                per_prompt=per_prompt, size=size, compare=compare, device=device,
                dtype=dtype, progress=lambda done, total: bars("sampling", done, total),
                overwrite=overwrite, frames=frames)

    info = reports_errors(run)()
    click.echo(f"{info['images']} image(s) of a {info['family']} model "
               f"(latents {'x'.join(map(str, info['shape']))}) -> {info['grid']}")
    if "compare" in info:
        click.echo(f"base vs adapted ({info['modules']} adapted modules) -> {info['compare']}")
