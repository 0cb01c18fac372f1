"""Every hook of loraengine. Built-in plugins implement these exactly as third-party
packages do; a package publishes its module under the ``loraengine`` entry-point group.

Registration hooks return iterables of spec records (see ``loraengine.core.plugins.specs``);
a plugin implements only the hooks it needs, so each specification's own body returns
nothing to register. Lifecycle hooks are called by the trainer and return nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import click
    from pydantic import BaseModel

    from loraengine.core.plugins import specs as S
    from loraengine.core.plugins.run import RunResult, RunView

PROJECT = "loraengine"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def loraengine_optimizers() -> Iterable[S.OptimizerSpec[BaseModel]]:
    """Return the ``OptimizerSpec`` records this plugin provides.

    Example::

        @hookimpl
        def loraengine_optimizers():
            return [OptimizerSpec("lion", factory=make_lion, config_model=LionOptions)]
    """
    return ()


@hookspec
def loraengine_losses() -> Iterable[S.LossSpec[BaseModel]]:
    """Return the ``LossSpec`` records this plugin provides.

    Example::

        @hookimpl
        def loraengine_losses():
            return [LossSpec("charbonnier", factory=lambda o: charbonnier)]
    """
    return ()


@hookspec
def loraengine_adapters() -> Iterable[S.AdapterSpec[BaseModel]]:
    """Return the ``AdapterSpec`` records (adapter algorithms) this plugin provides.

    Example::

        @hookimpl
        def loraengine_adapters():
            return [AdapterSpec("myalgo", create=..., load=..., owns_keys=...)]
    """
    return ()


@hookspec
def loraengine_memory_strategies() -> Iterable[S.MemoryStrategySpec]:
    """Return the ``MemoryStrategySpec`` records this plugin provides. Their option
    fields join the ``memory`` config section.

    Example::

        @hookimpl
        def loraengine_memory_strategies():
            return [MemoryStrategySpec("cpu_adam", MyOptions, enabled=..., apply=...)]
    """
    return ()


@hookspec
def loraengine_models() -> Iterable[S.ModelFamilySpec[BaseModel]]:
    """Return the ``ModelFamilySpec`` records (model families) this plugin provides.

    Example::

        @hookimpl
        def loraengine_models():
            return [ModelFamilySpec("mymodel", load=load_mymodel, config_model=MyOptions)]
    """
    return ()


@hookspec
def loraengine_lr_schedulers() -> Iterable[S.LRSchedulerSpec[BaseModel]]:
    """Return the ``LRSchedulerSpec`` records this plugin provides.

    Example::

        @hookimpl
        def loraengine_lr_schedulers():
            return [LRSchedulerSpec("step", factory=make_step, config_model=StepOptions)]
    """
    return ()


@hookspec
def loraengine_exporters() -> Iterable[S.ExporterSpec]:
    """Return the ``ExporterSpec`` records (LoRA file key formats) this plugin provides.

    Example::

        @hookimpl
        def loraengine_exporters():
            return [ExporterSpec("mine", to_file=..., from_file=...)]
    """
    return ()


@hookspec
def loraengine_timestep_samplers() -> Iterable[S.TimestepSamplerSpec[BaseModel]]:
    """Return the ``TimestepSamplerSpec`` records (training-timestep distributions) this
    plugin provides; the config picks one with ``timestep_sampler.name``.

    Example::

        @hookimpl
        def loraengine_timestep_samplers():
            return [TimestepSamplerSpec("beta", factory=make_beta, config_model=BetaOptions)]
    """
    return ()


@hookspec
def loraengine_loss_weightings() -> Iterable[S.LossWeightingSpec[BaseModel]]:
    """Return the ``LossWeightingSpec`` records (per-sample loss weights by timestep)
    this plugin provides; the config picks one with ``loss_weighting.name``.

    Example::

        @hookimpl
        def loraengine_loss_weightings():
            return [LossWeightingSpec("p2", factory=make_p2, config_model=P2Options)]
    """
    return ()


@hookspec
def loraengine_recipes() -> Iterable[S.RecipeSpec]:
    """Return the ``RecipeSpec`` records (training tweaks such as noise offset or EMA)
    this plugin provides. Their option fields join the ``recipe`` config section.

    Example::

        @hookimpl
        def loraengine_recipes():
            return [RecipeSpec("swa", SWAOptions, enabled=lambda c: c.recipe.swa,
                               build=make_swa)]
    """
    return ()


@hookspec
def loraengine_samplers() -> Iterable[S.SamplerSpec[BaseModel]]:
    """Return the ``SamplerSpec`` records (samplers for preview images and
    ``loraengine sample``) this plugin provides; ``output.samples.sampler`` picks one.

    Example::

        @hookimpl
        def loraengine_samplers():
            return [SamplerSpec("heun", factory=make_heun, prediction_types=("flow",))]
    """
    return ()


@hookspec
def loraengine_loggers() -> Iterable[S.LoggerSpec]:
    """Return the ``LoggerSpec`` records (metric loggers) this plugin provides; a run
    uses those ``output.loggers`` names. The factory's object receives the lifecycle
    hooks of that run only.

    Example::

        @hookimpl
        def loraengine_loggers():
            return [LoggerSpec("csv", factory=CsvLogger)]
    """
    return ()


@hookspec
def loraengine_on_train_start(run: RunView) -> None:
    """Called once before the first step. ``run`` is a read-only ``RunView``
    (``loraengine.core.plugins.run``): ``config``, ``total_steps``, ``start_step``,
    ``steps_done``, ``output_dir``, ``loss_map``, the model and adapters, and
    ``record_file`` / ``register`` for what the plugin writes or keeps per run.

    Example::

        @hookimpl
        def loraengine_on_train_start(run):
            print("training", run.config.output.name)
    """


@hookspec
def loraengine_on_step_end(run: RunView, step: int, metrics: dict[str, float]) -> None:
    """Called after every optimizer step with the 1-based ``step`` and its ``metrics``
    (``loss``, ``lr``, ``skipped``...).

    Example::

        @hookimpl
        def loraengine_on_step_end(run, step, metrics):
            wandb.log(metrics, step=step)
    """


@hookspec
def loraengine_on_save(run: RunView, path: str, kind: str) -> None:
    """Called after a file has been written atomically. ``kind`` is ``lora``,
    ``loss_map``, ``plot``, ``checkpoint``, ``best``, ``samples``, a recipe's variant
    (``ema``) or what a plugin passed to ``run.record_file``. The LoRA, its variants
    and the loss map are all written before the first of their calls.

    Example::

        @hookimpl
        def loraengine_on_save(run, path, kind):
            upload(path)
    """


@hookspec
def loraengine_on_train_end(run: RunView, result: RunResult | None) -> None:
    """Called once after training ends, with the ``TrainResult`` — or ``None`` when
    training stopped with an error (so loggers can close and displays stop).

    Example::

        @hookimpl
        def loraengine_on_train_end(run, result):
            print(result.steps)
    """


@hookspec
def loraengine_register_commands(cli: click.Group) -> None:
    """Add subcommands to the ``loraengine`` click group ``cli``.

    Example::

        @hookimpl
        def loraengine_register_commands(cli):
            cli.add_command(my_command)
    """
