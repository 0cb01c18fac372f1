"""The state of a run that a checkpoint keeps, so that a resume continues bit for bit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from loraengine.core.data import BucketStream, IndexStream
from loraengine.core.errors import DataError
from loraengine.core.recipe import Recipe


def first_line(exc: BaseException) -> str:
    """An exception's first line (torch's load errors list every tensor, one a line)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


#: What every optimizer step records in the loss map.
STEP_KEYS = ("loss", "lr", "skipped")

#: The entries of ``TrainState.state_dict()`` a resume needs, with the type of each.
_NEEDED: dict[str, type] = {
    "step": int, "optimizer": dict, "lr_scheduler": dict, "noise_gen": torch.Tensor,
    "data": dict, "loss_map": dict}


def state_problem(state: dict[str, Any]) -> str | None:
    """What keeps ``state`` (a checkpoint's ``state.pt``) from being what
    ``TrainState.state_dict()`` returned, worded to follow "state.pt ...", or
    ``None``."""
    lacking = [k for k in _NEEDED if k not in state]
    if lacking:
        return f"lacks {', '.join(lacking)}"
    for key, kind in _NEEDED.items():
        value = state[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            return (f"has a {type(value).__name__} for {key!r}, not a "
                    f"{kind.__name__}")
    if state["step"] < 0:
        return f"has the step {state['step']}"
    if state["noise_gen"].dtype != torch.uint8:
        return "has a 'noise_gen' that is not a random generator's state"
    bad = [k for k in STEP_KEYS if not isinstance(state["loss_map"].get(k), list)]
    if bad:
        return f"has no list of {', '.join(bad)} in its 'loss_map'"
    return None


@dataclass
class TrainState:
    """Everything besides the adapter weights that a resume restores: the optimizer,
    LR schedule and grad scaler, the noise generator and the data stream, the loss map,
    the watchdog's and early stopping's counters, and each recipe's own state.

    ``state_dict()`` is what ``state.pt`` of a checkpoint holds."""

    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    scaler: torch.amp.GradScaler | None
    noise_gen: torch.Generator
    stream: IndexStream | BucketStream
    recipes: Sequence[Recipe] = ()
    loss_map: dict[str, list[float]] = field(
        default_factory=lambda: {k: [] for k in STEP_KEYS})
    #: Consecutive non-finite steps up to now (the watchdog counts them).
    bad_streak: int = 0
    #: Early stopping: the best validation loss so far and the validations since.
    best_val: float | None = None
    since_best: int = 0
    #: ``[first step, old lr, new lr]`` for each resume that changed ``optimizer.lr``.
    lr_changes: list[list[float]] = field(default_factory=list)
    #: ``[first step, old schedule, new schedule]`` (the ``lr_scheduler`` sections) for
    #: each resume that changed the LR schedule.
    schedule_changes: list[list[Any]] = field(default_factory=list)
    #: ``[first step, old optimizer, new optimizer]`` (names) for each resume that
    #: started a fresh optimizer state (``--reset-optimizer``).
    optimizer_resets: list[list[Any]] = field(default_factory=list)

    @property
    def step(self) -> int:
        """Optimizer steps taken in this run (those of ``adapter.existing`` excluded)."""
        return len(self.loss_map["loss"])

    def record(self, metrics: dict[str, float]) -> None:
        """Append one optimizer step's metrics to the loss map."""
        for k in STEP_KEYS:
            self.loss_map[k].append(metrics[k])

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "noise_gen": self.noise_gen.get_state(),
            "data": self.stream.state(),
            "loss_map": self.loss_map,
            "watch": {"bad_streak": self.bad_streak, "best_val": self.best_val,
                      "since_best": self.since_best},
            "lr_changes": [list(c) for c in self.lr_changes],
            "schedule_changes": [list(c) for c in self.schedule_changes],
            "optimizer_resets": [list(c) for c in self.optimizer_resets],
            "recipes": [r.state_dict() if hasattr(r, "state_dict") else None
                        for r in self.recipes],
        }

    def load_state_dict(self, state: dict[str, Any], reset_optimizer: bool = False) -> None:
        """Restore what ``state_dict`` returned; ``DataError`` when the optimizer state
        does not fit this run's adapter. With ``reset_optimizer`` the optimizer keeps
        the fresh state it was built with and the LR schedule is left as built too
        (the caller moves it to the resumed step)."""
        if not reset_optimizer:
            self._load_optimizer(state)
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.noise_gen.set_state(state["noise_gen"])
        self.stream.load_state(state["data"])
        self.loss_map = {k: list(v) for k, v in state["loss_map"].items()}
        watch = state.get("watch", {})
        self.bad_streak = int(watch.get("bad_streak", 0))
        self.best_val = watch.get("best_val")
        self.since_best = int(watch.get("since_best", 0))
        self.lr_changes = [list(c) for c in state.get("lr_changes", [])]
        self.schedule_changes = [list(c) for c in state.get("schedule_changes", [])]
        self.optimizer_resets = [list(c) for c in state.get("optimizer_resets", [])]
        for recipe, rstate in zip(self.recipes, state.get("recipes", []), strict=False):
            if rstate is not None and hasattr(recipe, "load_state_dict"):
                recipe.load_state_dict(rstate)

    def _load_optimizer(self, state: dict[str, Any]) -> None:
        fresh = [set(g) for g in self.optimizer.param_groups]
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"checkpoint does not fit this config's adapter: "
                            f"{first_line(exc)}") from None
        lacking = sorted(set().union(*fresh) - set().union(*(
            set(g) for g in self.optimizer.param_groups))) if fresh else []
        if lacking:
            raise DataError(f"checkpoint's optimizer state lacks {', '.join(lacking)}, which "
                            f"this config's optimizer needs (optimizer.name or its options "
                            f"changed?); resume with --reset-optimizer to start a fresh "
                            f"optimizer state")
