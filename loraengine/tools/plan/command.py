"""``loraengine plan``: the memory a config's training step will need, before training.

Prints the estimated peak by kind (base weights, adapter, gradients, optimizer state,
activations) under the configured memory strategies and the step's cost (FLOPs,
host-to-device traffic), from a dry run on the meta device (``loraengine.tools.plan.logic``).
``--measure`` also runs three real steps and prints the measured peak beside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click


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


@click.command("plan")
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, e.g. --set memory.checkpoint_depth=2.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--measure", is_flag=True, help="Also run three real steps and print the "
              "measured peak (this trains for three steps; nothing is written).")
@click.pass_obj
def plan(state: Any, config: Path, overrides: tuple[str, ...], as_json: bool,
         measure: bool) -> None:
    """Estimate CONFIG's peak memory and step cost without training."""
    from loraengine.cli.common import reports_errors

    reports_errors(_run)(state, config, overrides, as_json, measure)
