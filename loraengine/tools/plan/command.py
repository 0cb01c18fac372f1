"""``loraengine plan``: the memory a config's training step will need, before training.

Prints the estimated peak by kind (base weights, adapter, gradients, optimizer state,
activations) under the configured memory strategies and the step's cost (FLOPs,
host-to-device traffic), from a dry run on the meta device (``loraengine.tools.plan.logic``).
``--measure`` also runs three real steps and prints the measured peak beside it.
``--real NAME`` (no CONFIG) plans a released model at its real size instead, from the
config values the package carries (``loraengine.tools.plan.real_size``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from loraengine.cli.common import field_option, reports_errors
from loraengine.core.config.root import AdapterOptions, TrainingConfig
from loraengine.core.errors import ConfigError

#: Options that only ``--real`` reads, and those only a CONFIG does (by parameter name).
REAL_ONLY = ("resolution", "frames", "rank", "batch", "offload_blocks")
CONFIG_ONLY = ("overrides", "measure")


def _run(state: Any, config: Path, overrides: tuple[str, ...], as_json: bool,
         measure: bool) -> None:
    from loraengine.api import resolve_config
    from loraengine.tools.plan import logic as planning

    host = state.host
    cfg, base_dir = resolve_config(config, host, overrides=list(overrides))
    estimate = planning.estimate(cfg, host, base_dir=base_dir)
    measured = None
    if measure:
        from loraengine.core.build import build_pipeline

        pipe = build_pipeline(cfg, host, base_dir=base_dir)
        try:
            measured = planning.measure(pipe)
        finally:
            pipe.close()
    if as_json:
        out = estimate.to_dict()
        out["not_counted"] = planning.NOT_COUNTED
        if measured is not None:
            out["measured"] = {"peak": measured.peak, "resident": measured.resident,
                               "seconds": measured.seconds}
        click.echo(json.dumps(out, indent=1))
    else:
        click.echo(planning.format_plan(estimate, measured))


def _run_real(state: Any, name: str, resolution_text: str | None, frames: int | None,
              rank: int, batch: int, offload: int | None, as_json: bool) -> None:
    from loraengine.tools.plan import real_size

    resolution = real_size.parse_resolution(resolution_text)
    rows = real_size.plan_scenarios(name, state.host, resolution, rank, batch, offload,
                                    frames=frames)
    if as_json:
        click.echo(json.dumps({label: None if p is None else p.to_dict()
                               for label, p in rows}, indent=1))
    else:
        click.echo(real_size.format_scenarios(name, rows, resolution, rank, batch, frames))


@click.command("plan")
@click.argument("config", type=click.Path(path_type=Path), required=False)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, e.g. --set memory.checkpoint_depth=2.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--measure", is_flag=True, help="Also run three real steps and print the "
              "measured peak (this trains for three steps; nothing is written).")
@click.option("--real", "real", metavar="NAME", help="Plan the released model NAME at "
              "its real size (qwen_image, flux2_dev, flux1_dev, sd3.5_large, sdxl_base_1.0, "
              "sd15, wan2.1_t2v_14b, ...; an unknown NAME lists them all) instead of a "
              "CONFIG: nothing is downloaded.")
@click.option("--resolution", metavar="SIDE|HxW", default=None,
              help="With --real: a square side (1024) or height x width (480x832) in "
              "pixels. Default: 1024 for an image model, the record's for a video model "
              "(480x832).")
@click.option("--frames", type=int, default=None,
              help="With --real, a video model: frames per clip (default 81).")
@field_option(AdapterOptions, "rank", "--rank", default=16, help="With --real.")
@field_option(TrainingConfig, "batch_size", "--batch", help="With --real.")
@click.option("--offload-blocks", type=click.IntRange(1), default=None,
              help="With --real: blocks offloaded in the partial-offload rows "
              "(default: 16 of 60, scaled to the model).")
@click.pass_obj
def plan(state: Any, config: Path | None, overrides: tuple[str, ...], as_json: bool,
         measure: bool, real: str | None, resolution: str | None, frames: int | None,
         rank: int, batch: int, offload_blocks: int | None) -> None:
    """Estimate CONFIG's peak memory and step cost without training."""
    ctx = click.get_current_context()

    def given(names: tuple[str, ...]) -> str:
        """The options of ``names`` on the command line, as the user spells them."""
        options = {p.name: p.opts[0] for p in ctx.command.params}
        return ", ".join(options[n] for n in names
                         if ctx.get_parameter_source(n) in (ParameterSource.COMMANDLINE,
                                                            ParameterSource.ENVIRONMENT))

    def checked() -> None:
        if real is not None and config is not None:
            raise ConfigError("plan: give a CONFIG file or --real NAME, not both")
        if real is not None and given(CONFIG_ONLY):
            raise ConfigError(f"{given(CONFIG_ONLY)}: only with a CONFIG, not with --real")
        if real is None and given(REAL_ONLY):
            raise ConfigError(f"{given(REAL_ONLY)}: only with --real NAME (a CONFIG sets "
                              f"these itself; change it with --set KEY=VALUE)")
        if real is None and config is None:
            raise ConfigError("plan: give a CONFIG file, or --real NAME")

    reports_errors(checked)()
    if real is not None:
        reports_errors(_run_real)(state, real, resolution, frames, rank, batch,
                                  offload_blocks, as_json)
    else:
        reports_errors(_run)(state, config, overrides, as_json, measure)
