"""What plugins see of a run.

``RunView`` is the read-only view of a training run that the lifecycle hooks receive;
``RunResult`` the outcome ``loraengine_on_train_end`` gets. ``BuildContext`` holds the
parts a memory strategy or a training recipe works on while the pipeline is assembled,
and a strategy hands back a ``StrategyResult`` record instead of writing into shared
objects: the assembly folds the records into the pipeline before freezing it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

if TYPE_CHECKING:
    import torch
    from torch import nn

    from loraengine.core.adapter import AdapterNetwork
    from loraengine.core.adapter.layer import AttachMode
    from loraengine.core.data import Dataset
    from loraengine.core.model import LoadedModel
    from loraengine.core.plugins.registry import Registry

#: The validated root config. Its model is assembled at run time from the installed
#: plugins' option models, so no static class describes it yet.
RunConfig: TypeAlias = Any  # type: ignore[explicit-any]


class HostStreaming(Protocol):
    """A strategy that keeps the frozen base on the host and streams it to the device
    (offloading) counts what it moves: ``stats["bytes_in"]``, ``stats["loads"]``..."""

    @property
    def stats(self) -> Mapping[str, int]: ...


@dataclass(frozen=True)
class BuildContext:
    """The parts of a pipeline being assembled that a memory strategy or a recipe may
    work on: the adapters are attached (in weight mode) when strategies apply."""

    config: RunConfig
    loaded: LoadedModel
    network: AdapterNetwork
    device: torch.device

    @property
    def model(self) -> nn.Module:
        return self.loaded.module

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.network.parameters() if p.requires_grad]


@dataclass(frozen=True)
class StrategyResult:
    """What a memory strategy's ``apply`` hands back.

    ``undo`` removes what it installed (called in reverse order when the pipeline
    closes); ``attach_mode`` is set when it re-attached the adapters in another mode;
    ``host_resident`` lists tensors it keeps on the host (memory planning tells them
    from device memory); ``streaming`` is its transfer counter when it streams the base
    to the device."""

    undo: Callable[[], None] | None = None
    attach_mode: AttachMode | None = None
    host_resident: tuple[torch.Tensor, ...] = ()
    streaming: HostStreaming | None = None


class RunResult(Protocol):
    """The outcome of a finished run (a ``TrainResult``)."""

    lora: dict[str, torch.Tensor]
    loss_map: dict[str, list[float]]
    steps: int
    path: Path | None
    files: dict[str, Path]
    stopped_early: bool


class RunView(Protocol):
    """The read-only view of a training run that lifecycle hooks receive.

    Plugins read the run through it and report the files they write with
    ``record_file``; they never reach into the trainer or the pipeline."""

    @property
    def config(self) -> RunConfig:
        """The validated config of the run."""

    @property
    def total_steps(self) -> int:
        """The optimizer step the run ends at (``training.steps``)."""

    @property
    def start_step(self) -> int:
        """The step the run starts after: 0, or the step of the resumed checkpoint."""

    @property
    def steps_done(self) -> int:
        """Steps the adapter has seen, those of ``adapter.existing`` included."""

    @property
    def output_dir(self) -> Path:
        """``output.dir``."""

    @property
    def writes_files(self) -> bool:
        """False for in-memory runs and on every rank but the first."""

    @property
    def loss_map(self) -> Mapping[str, Sequence[float]]:
        """The loss map so far: ``loss``, ``lr``, ``skipped`` per step (and
        ``val_loss`` / ``val_loss_step`` when validating)."""

    @property
    def loaded(self) -> LoadedModel:
        """The model being trained (its module, schedule, VAE settings)."""

    @property
    def network(self) -> AdapterNetwork:
        """The adapters being trained."""

    @property
    def dataset(self) -> Dataset:
        """The training data."""

    @property
    def device(self) -> torch.device:
        """Where the model computes."""

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the model computes in."""

    @property
    def registry(self) -> Registry:
        """Every installed plugin record."""

    def record_file(self, kind: str, path: Path) -> None:
        """Report a file the plugin has written for this run: it is listed in the
        result's ``files[kind]`` and ``loraengine_on_save`` fires with ``kind``."""

    def register(self, plugin: object) -> None:
        """Register a plugin object (with hook implementations) for the rest of this
        run; it is unregistered after ``loraengine_on_train_end``. The place for a
        lifecycle plugin's per-run state."""
