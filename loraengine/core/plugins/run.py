"""What plugins see of a run: ``RunView``, the read-only view of a training run that
the lifecycle hooks receive, and ``RunResult``, the outcome
``loraengine_on_train_end`` gets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from loraengine.core.adapter import AdapterNetwork
    from loraengine.core.data import Dataset
    from loraengine.core.model import LoadedModel
    from loraengine.core.plugins.assembly import RunConfig
    from loraengine.core.plugins.registry import Registry


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
