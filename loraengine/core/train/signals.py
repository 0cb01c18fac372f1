"""Ctrl-C and SIGTERM: finish the current step, then stop cleanly."""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

from loraengine.core.errors import LoraEngineError


class TrainingInterrupted(LoraEngineError):
    """SIGINT/SIGTERM: the current step finished, a checkpoint and the LoRA so far were
    written; or, for a signal that came while the final outputs were written or the
    end-of-run hooks (``loraengine_on_train_end``) ran, those finished first and the
    run's outputs are complete."""

    exit_code = 130


class SignalGuard:
    """While active, SIGINT and SIGTERM are recorded in ``received`` instead of
    stopping the process, so the loop can stop between steps; a second signal stops at
    once (``KeyboardInterrupt``). Outside the main thread it does nothing (Python only
    delivers signals there)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else "signal"

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
