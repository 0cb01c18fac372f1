"""Progress display of the command line: the one rich progress-bar helper, task bars for
commands (prepare, sample), and the lifecycle-hook plugins the CLI registers for
training (a progress bar and a JSON-lines event log)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from loraengine.core.errors import ConfigError
from loraengine.core.plugins.hookspecs import hookimpl


def rich_progress(stream: TextIO, *fields: str, transient: bool = False) -> Any:
    """A rich ``Progress`` on ``stream``: name, bar, done/total, then ``fields`` (column
    templates such as ``"loss {task.fields[loss]}"``), elapsed time and ETA. Not started."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    # log_path=False: lines logged above the bar (checkpoints, sample grids) would
    # otherwise end in the file:line of this module, which says nothing to a user.
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        *(TextColumn(f) for f in fields), TimeElapsedColumn(), TextColumn("ETA"),
        TimeRemainingColumn(), console=Console(file=stream, log_path=False),
        transient=transient)


def format_duration(seconds: float) -> str:
    """``12.3 s``, ``4 min 05 s`` or ``1 h 02 min``: a run's elapsed time for people."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def summary_line(result: Any, elapsed: float) -> str:
    """The line ``loraengine train`` ends with: steps run (and the total with an
    ``adapter.existing`` or a resume), the loss from first to last step, how many
    steps were skipped as non-finite, and the wall time."""
    losses = result.loss_map["loss"]
    skipped = int(sum(1 for s in result.loss_map.get("skipped", []) if s))
    loss = f"; loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else ""
    return (f"trained {len(losses)} steps (total {result.steps}){loss}; "
            f"{skipped} skipped; {format_duration(elapsed)}")


class TaskBars:
    """Progress bars by task name, on stderr and only when it is a terminal; a context
    manager. ``bars(task, done, total)`` adds the task's bar on first use.

    ``label`` turns a task name into the text shown (``"encoding {}"``)."""

    def __init__(self, enabled: bool = True, *, label: str = "{}", transient: bool = False,
                 stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.stream.isatty()
        self.label, self.transient = label, transient
        self.progress: Any = None
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> TaskBars:
        if self.enabled:
            self.progress = rich_progress(self.stream, transient=self.transient)
            self.progress.start()
        return self

    def __call__(self, task: str, done: int, total: int) -> None:
        if self.progress is None:
            return
        if task not in self.tasks:
            self.tasks[task] = self.progress.add_task(self.label.format(task), total=total)
        self.progress.update(self.tasks[task], completed=done, total=total)

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class ProgressBar:
    """The training run's progress bar with loss, it/s and ETA; silent when not on a
    terminal."""

    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._progress: Any = None
        self._task: Any = None

    @hookimpl
    def loraengine_on_train_start(self, run: Any) -> None:
        if not self.enabled:
            return
        self._progress = rich_progress(self.stream, "loss {task.fields[loss]}",
                                       "{task.fields[rate]} it/s")
        self._progress.start()
        self._task = self._progress.add_task(run.config.output.name, total=run.total_steps,
                                             completed=run.start_step, loss="-", rate="-")
        self._t0 = time.perf_counter()
        self._done0 = run.start_step

    @hookimpl
    def loraengine_on_step_end(self, run: Any, step: int, metrics: dict[str, float]) -> None:
        if self._progress is None:
            return
        rate = (step - self._done0) / max(time.perf_counter() - self._t0, 1e-9)
        loss = metrics.get("loss")
        self._progress.update(self._task, completed=step,
                              loss="-" if loss is None else f"{loss:.4f}", rate=f"{rate:.2f}")

    @hookimpl
    def loraengine_on_save(self, run: Any, path: str, kind: str) -> None:
        """Note checkpoints and sample grids above the bar as they are written."""
        if self._progress is not None and kind in ("checkpoint", "samples", "best"):
            self._progress.console.log(f"{kind}: {path}")

    @hookimpl
    def loraengine_on_train_end(self, run: Any, result: Any) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class EventLog:
    """Writes one JSON object per line: train_start, step, save, train_end."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self.path.open("w", encoding="utf-8")
        except OSError as exc:
            blocking = next((p for p in self.path.parents if p.is_file()), None)
            reason = f"{blocking} is a file" if blocking is not None else \
                exc.strerror or str(exc)
            raise ConfigError(f"--events {self.path}: cannot write ({reason})") from None

    def _write(self, event: dict[str, Any]) -> None:
        event["time"] = time.time()
        event = {k: (None if isinstance(v, float) and v != v else v) for k, v in event.items()}
        self._fh.write(json.dumps(event) + "\n")
        self._fh.flush()

    @hookimpl
    def loraengine_on_train_start(self, run: Any) -> None:
        self._write({"event": "train_start", "total_steps": run.total_steps,
                     "start_step": run.start_step})

    @hookimpl
    def loraengine_on_step_end(self, run: Any, step: int, metrics: dict[str, float]) -> None:
        self._write({"event": "step", "step": step, **metrics})

    @hookimpl
    def loraengine_on_save(self, run: Any, path: str, kind: str) -> None:
        self._write({"event": "save", "kind": kind, "path": path})

    @hookimpl
    def loraengine_on_train_end(self, run: Any, result: Any) -> None:
        if result is None:
            self._write({"event": "train_end", "error": True})
        else:
            self._write({"event": "train_end", "steps": result.steps})
        self._fh.close()
