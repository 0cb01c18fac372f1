"""The non-finite watchdog: it counts consecutive skipped steps and says when to stop.

It only decides; the loop acts on the decision (rolls back to a checkpoint, writes the
adapter, raises ``NonFiniteError``)."""

from __future__ import annotations

from dataclasses import dataclass

from loraengine.core.train.state import TrainState


@dataclass(frozen=True)
class NonFiniteStreak:
    """Steps ``first``..``last`` were all non-finite, and that is too many."""

    first: int
    last: int

    @property
    def length(self) -> int:
        return self.last - self.first + 1

    @property
    def last_good(self) -> int:
        """The last step whose update was finite."""
        return self.first - 1


class Watchdog:
    """Stops a run after ``limit`` consecutive non-finite steps
    (``training.max_bad_steps``). The streak lives in the ``TrainState``, so a resume
    continues the count."""

    def __init__(self, limit: int):
        self.limit = limit

    def observe(self, state: TrainState, step: int, skipped: bool) -> NonFiniteStreak | None:
        """Count step ``step``; the streak to stop for, or ``None`` to go on."""
        state.bad_streak = state.bad_streak + 1 if skipped else 0
        if state.bad_streak < self.limit:
            return None
        return NonFiniteStreak(first=step - state.bad_streak + 1, last=step)
