"""The ``loraengine`` click group and its built-in commands."""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType


def _interrupted(signum: int, frame: FrameType | None) -> None:
    """Ctrl-C before a command's own handling starts (while the engine, torch and the
    plugins are imported): one line and exit 130, never a traceback. Nothing has been
    written yet, so the process ends at once (``os._exit``) rather than by raising: the
    signal may land in Python code that torch's C++ import machinery is running, where
    an exception is a C++ one that nothing catches and the process aborts."""
    sys.stderr.write(f"error: interrupted ({signal.Signals(signum).name}) while starting; "
                     f"nothing was written\n")
    sys.stderr.flush()
    os._exit(130)


_interrupted.startup_handler = True  # type: ignore[attr-defined]  # see reports_errors

# Installed first thing when this module is the program (``loraengine``, ``python -m``),
# not when it is imported by a caller of ``cli``.
if __name__ == "__main__" or os.path.basename(sys.argv[0] if sys.argv else "") == "loraengine":
    signal.signal(signal.SIGINT, _interrupted)

import contextlib  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import click  # noqa: E402

from loraengine import __version__  # noqa: E402
from loraengine.cli.common import State, reports_errors  # noqa: E402
from loraengine.core.errors import ConfigError, LoraEngineError, PluginError  # noqa: E402
from loraengine.core.plugins.host import PluginLoadWarning  # noqa: E402
from loraengine.plugins import build_plugin_manager  # noqa: E402


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="loraengine")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.option("--strict", is_flag=True, help="A plugin that fails to load is an error.")
@click.pass_context
def cli(ctx: click.Context, debug: bool, strict: bool) -> None:
    """Train LoRA-family adapters on diffusion models."""
    ctx.obj = State(debug, strict)


config_option = click.argument("config", type=click.Path(path_type=Path))
set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                          help="Override a config key, e.g. --set training.steps=100.")


@cli.command()
@config_option
@set_option
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")
@click.option("--events", type=click.Path(path_type=Path), default=None,
              help="Also append the run's events (one JSON line each: start, steps, "
              "files, end) to this file; an existing file must be an events log.")
@click.option("--resume", default=None, metavar="[DIR|latest]", is_flag=False,
              flag_value="latest", help="Continue from a checkpoint: latest (default), a "
              "checkpoints folder or one step_N folder. A changed optimizer.lr, "
              "lr_scheduler or training.steps takes effect from the resumed step; "
              "optimizer.name cannot change without --reset-optimizer.")
@click.option("--reset-optimizer", is_flag=True, help="With --resume: start a fresh "
              "optimizer state instead of the checkpoint's (needed when optimizer.name "
              "changed); the adapter, schedule position, data and noise streams resume.")
@click.pass_obj
@reports_errors
def train(state: State, config: Path, overrides: tuple[str, ...], quiet: bool,
          events: Path | None, resume: str | None, reset_optimizer: bool) -> None:
    """Train an adapter as CONFIG describes."""
    if reset_optimizer and resume is None:
        raise ConfigError("--reset-optimizer: only with --resume (a new run's optimizer "
                          "state is fresh already)")
    from loraengine.api import resolve_config
    from loraengine.cli.progress import EventLog, ProgressBar, summary_line
    from loraengine.core.build import build_pipeline
    from loraengine.core.checks import pipeline_warnings
    from loraengine.core.threads import training_threads
    from loraengine.core.train.loop import Trainer
    from loraengine.core.train.output_lock import lock_early

    host = state.host
    cfg, base_dir = resolve_config(config, host, overrides=list(overrides))
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 reports
    if not quiet and main_rank:
        host.register(ProgressBar(), name="loraengine.cli.progress")
    if events is not None and main_rank:
        _check_events_apart(events, cfg)
        host.register(EventLog(events, append=True), name="loraengine.cli.events")
    started = time.perf_counter()
    # a second run of this output is refused before its model loads
    early = lock_early(cfg.output.dir, cfg.output.name) if main_rank else None
    with training_threads(cfg.training.threads), _released(early):
        # what building says about the config and adapter.existing, as one line each
        with warnings.catch_warnings(record=True) as built:
            warnings.simplefilter("always", UserWarning)
            pipe = build_pipeline(cfg, host, base_dir=base_dir)
        try:
            if main_rank:
                for w in built:  # other kinds go on as they came
                    if w.category is UserWarning:
                        click.echo(f"warning: {w.message}", err=True)
                    else:
                        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
                for message in pipeline_warnings(pipe):
                    click.echo(f"warning: {message}", err=True)
            trainer = Trainer(pipe, output_lock=early)
            if resume is not None:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    used = trainer.resume(resume, reset_optimizer=reset_optimizer)
                for w in caught:
                    click.echo(f"warning: {w.message}", err=True)
                if used is not None and not quiet:
                    click.echo(f"resuming from {used} (step {trainer.start_step})", err=True)
            result = trainer.run()
        finally:
            pipe.close()
    if not quiet and main_rank:
        click.echo(summary_line(result, time.perf_counter() - started))
        for kind, path in result.files.items():
            click.echo(f"  {kind}: {path}")


@contextlib.contextmanager
def _released(lock: Any) -> Iterator[None]:
    """Give ``lock`` (an ``OutputLock`` or ``None``) back on leaving, however."""
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _check_events_apart(events: Path, cfg: Any) -> None:
    """``--events`` may not be a file the run itself writes: the LoRA or loss map would
    replace the events, and the events logger's own file would get each line twice."""
    from loraengine.core.preflight import output_paths
    from loraengine.plugins.outputs.loggers import events_path

    owned = dict(output_paths(cfg))
    if "events" in cfg.output.loggers:
        owned["output.loggers (events)"] = events_path(Path(cfg.output.dir), cfg.output.name)
    real = os.path.realpath(events)
    for key, path in owned.items():
        if os.path.realpath(path) == real:
            raise ConfigError(f"--events {events}: is the file the run writes for {key}; "
                              f"choose another path")


@cli.command()
@config_option
@set_option
@click.option("--syntax-only", is_flag=True, help="Check the keys and values only, not "
              "the files they name.")
@click.pass_obj
@reports_errors
def validate(state: State, config: Path, overrides: tuple[str, ...],
             syntax_only: bool) -> None:
    """Check CONFIG without training: its keys and values, then that the model is there
    and readable (no weights loaded), the data files hold the tensors the model takes,
    adapter.existing is readable and the outputs can be written. Every problem is one
    line; exit status 2 when the config has any, 1 when a plugin is broken under
    --strict."""
    from loraengine.api import resolve_config
    from loraengine.core.errors import ConfigError
    from loraengine.core.preflight import check_outputs
    from loraengine.core.validate import validate_config

    cfg, base_dir = resolve_config(config, state.host, overrides=list(overrides))
    if syntax_only:
        check_outputs(cfg)  # the output paths too: probed, nothing created
        click.echo(f"{config}: ok (syntax only)")
        return
    problems, notes = validate_config(cfg, state.host, base_dir)
    for note in notes:
        click.echo(f"note: {note}", err=True)
    if problems:
        raise ConfigError("\n".join(problems))
    click.echo(f"{config}: ok")


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON records.")
@click.pass_obj
@reports_errors
def plugins_cmd(state: State, as_json: bool) -> None:
    """List every installed plugin record.

    A plugin that failed to load, or whose registration hook failed, is listed too:
    with ``--json`` as a record with an ``error`` (and ``name`` null, there being no
    record; ``category`` null when it never loaded), and as a ``failed:`` line on
    stderr either way. The listing still exits 0; with ``--strict`` it is an error."""
    host = state.host
    registry, hook_failures = host.survey()
    if hook_failures and state.strict:
        raise PluginError("\n".join(f.describe() for f in hook_failures))
    records: list[dict[str, str | None]] = [
        {"category": p.category, "name": p.name, "plugin": p.plugin,
         "distribution": p.distribution, "version": p.version} for p in registry.all()]
    failed: list[dict[str, str | None]] = [
        {"category": None, "name": None, "plugin": f.entry_point,
         "distribution": f.distribution, "version": f.version, "error": f.describe()}
        for f in host.failures]
    failed += [{"category": f.category, "name": None, "plugin": f.plugin,
                "distribution": f.distribution, "version": f.version, "error": f.describe()}
               for f in hook_failures]
    if as_json:
        click.echo(json.dumps(records + failed, indent=1))
        _echo_failed(failed)
        return
    from rich.console import Console
    from rich.table import Table

    # Category and name are what a user copies into a config: kept whole on one line
    # (no_wrap columns are the last rich narrows); the other columns fold onto further
    # lines at a narrow terminal; nothing is cut with an ellipsis. Written to a pipe or a
    # file, where no terminal's width applies (rich would assume 80 columns), every
    # column is kept whole.
    table = Table()
    for column in ("category", "name", "plugin", "distribution", "version"):
        table.add_column(column, overflow="fold", no_wrap=column in ("category", "name"))
    for r in records:
        table.add_row(*(str(r[k] or "-") for k in ("category", "name", "plugin",
                                                     "distribution", "version")))
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=_UNBOUNDED)
    console.print(table)
    _echo_failed(failed)


#: The width the plugins table is given where no terminal bounds it (wider than any row).
_UNBOUNDED = 10_000


def _echo_failed(failed: list[dict[str, str | None]]) -> None:
    """One ``failed:`` line on stderr for each plugin ``plugins`` could not list whole."""
    for f in failed:
        click.echo(f"failed: {f['error']}", err=True)


@cli.group("config")
def config_group() -> None:
    """Inspect the configuration schema."""


@config_group.command("schema")
@click.pass_obj
@reports_errors
def config_schema(state: State) -> None:
    """Print the JSON Schema of the config for the installed plugins."""
    from loraengine.core.config.root import build_config_model

    model = build_config_model(state.host.registry)
    click.echo(json.dumps(model.model_json_schema(), indent=1))


#: Built-in subcommands kept in modules of their own: (module, command object).
BUILTIN_COMMANDS = (
    ("loraengine.tools.inspect.command", "inspect"),
    ("loraengine.tools.merge.command", "merge"),
    ("loraengine.tools.convert.command", "convert"),
    ("loraengine.tools.prepare.command", "prepare"),
    ("loraengine.tools.plan.command", "plan"),
    ("loraengine.tools.sample.command", "sample"),
    ("loraengine.tools.bucket.command", "bucket"),
    ("loraengine.tools.monitor.command", "monitor"),
)
for _module, _name in BUILTIN_COMMANDS:
    cli.add_command(getattr(importlib.import_module(_module), _name))


#: Options of the group itself, which come before the command's name.
_GROUP_FLAGS = frozenset({"--debug", "--strict"})


def _named_command(args: list[str]) -> str | None:
    """The command name on a command line (``None``: none, as in ``loraengine --help``
    or ``--version``)."""
    for arg in args:
        if arg in _GROUP_FLAGS:
            continue
        return None if arg.startswith("-") else arg
    return None


def main() -> None:
    """The console script: plugins may add subcommands before the group runs.

    Plugins are loaded here only when a command line may need a plugin's command: a
    built-in command (its ``--help`` included) loads them when it runs, if it needs
    them at all; the group's own ``--help`` lists plugin commands, which only entry
    points add (the built-in commands are ``BUILTIN_COMMANDS``), so the built-in
    plugins are left unloaded for it. Ctrl-C up to a command's own handling is one
    line (``_interrupted``); from there on each command reports it (``reports_errors``;
    training finishes its step first)."""
    signal.signal(signal.SIGINT, _interrupted)
    command = _named_command(sys.argv[1:])
    if command is None or command not in cli.commands:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PluginLoadWarning)  # reported when commands run
            try:
                host = build_plugin_manager() if command is not None else \
                    build_plugin_manager(builtins=False)
                host.register_commands(cli)
            except LoraEngineError:
                pass  # a broken plugin set is reported by the command that needs it
    cli(prog_name="loraengine")


if __name__ == "__main__":  # pragma: no cover
    main()
