"""What memory strategies and recipes work on while a pipeline is assembled.

``BuildContext`` holds the model, adapters and device a memory strategy or a training
recipe acts on; a strategy hands back a ``StrategyResult`` record instead of writing
into shared objects, and the assembly folds the records into the pipeline before
freezing it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeAlias

if TYPE_CHECKING:
    import torch
    from torch import nn

    from loraengine.core.adapter import AdapterNetwork
    from loraengine.core.adapter.layer import AttachMode
    from loraengine.core.model import LoadedModel
    from loraengine.core.options import TrainConfig

#: The validated root config: its class is built at run time from the installed plugins'
#: option models, as a subclass of ``TrainConfig`` (which types every shared key).
RunConfig: TypeAlias = "TrainConfig"


class HostStreaming(Protocol):
    """A strategy that keeps the frozen base on the host and streams it to the device
    (offloading) counts what it moves: ``stats["bytes_in"]``, ``stats["loads"]``..."""

    @property
    def stats(self) -> Mapping[str, int]: ...

    def enter(self, module: nn.Module) -> None:
        """Make the base tensors of ``module`` (a block, or a module inside one) resident
        before it runs as one compiled region (``training.compile: blocks``); inside
        compiled code the strategy's per-layer loading must not run."""
        ...


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


class Recipe:
    """Base of what a ``RecipeSpec.build`` returns; every hook defaults to doing nothing."""

    name: str = ""

    def perturb_noise(self, noise_xt: torch.Tensor, noise_target: torch.Tensor,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Change one sample's noise (no batch dimension). Returns the noise that makes
        ``x_t`` and the noise the target is built from. Draw only from ``generator``."""
        return noise_xt, noise_target

    def after_optimizer_step(self) -> None:
        """Called after each optimizer step that was not skipped."""

    def variants(self) -> dict[str, Callable[[], AbstractContextManager[None]]]:
        """Other versions of the adapter to save: file suffix -> a context manager during
        which the adapter network holds that version's weights."""
        return {}

    def state_dict(self) -> dict[str, object]:
        """What a checkpoint must keep to resume this recipe exactly."""
        return {}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore what ``state_dict`` returned."""
