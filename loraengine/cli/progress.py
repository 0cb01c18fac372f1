"""Progress display of the command line: the one rich progress-bar helper, task bars for
commands (prepare, sample), and the lifecycle-hook plugins the CLI registers for
training (a progress bar and a JSON-lines event log)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

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
    compiled = getattr(result, "compile_seconds", None)
    first = (f" (first step, compiling: {format_duration(compiled)})"
             if compiled is not None else "")
    return (f"trained {len(losses)} steps (total {result.steps}){loss}; "
            f"{skipped} skipped; {format_duration(elapsed)}{first}")


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


class SlowdownWatch:
    """Notices a run slowing far below its own pace, the mark of an oversubscribed
    machine (more busy threads than cores, e.g. other work on the same CPUs).

    Steps are timed in windows of at least ``window`` steps and ``min_seconds``; the
    first ``warmup`` windows (allocation, first-call costs) are not compared. Once a
    window's rate falls below ``1/factor`` of the best window after the warm-up,
    ``observe`` returns the hint, once per run. ``clock`` is injectable for tests."""

    def __init__(self, *, window: int = 5, min_seconds: float = 2.0, warmup: int = 1,
                 factor: float = 3.0, clock: Callable[[], float] | None = None):
        self.window, self.min_seconds, self.warmup = window, min_seconds, warmup
        self.factor, self.clock = factor, clock or time.perf_counter
        self.best: float | None = None
        self.fired = False
        self._windows = 0
        self._start: tuple[int, float] | None = None

    def restart(self) -> None:
        """Drop the window under way: time went into something other than steps
        (a checkpoint, sample grids, a validation loss)."""
        self._start = None

    def observe(self, step: int) -> str | None:
        """Call after each step; the hint when the run has just become too slow."""
        now = self.clock()
        if self._start is None:
            self._start = (step, now)
            return None
        first, began = self._start
        steps, took = step - first, now - began
        if steps < self.window or took < self.min_seconds:
            return None
        self._start = (step, now)
        rate = steps / took
        self._windows += 1
        if self._windows <= self.warmup or self.fired:
            return None
        if self.best is None or rate > self.best:
            self.best = rate
            return None
        if rate * self.factor >= self.best:
            return None
        self.fired = True
        return slowdown_hint(rate, self.best)


def slowdown_hint(rate: float, best: float) -> str:
    """The one-time note of a run gone much slower than its best pace."""
    import torch

    threads = torch.get_num_threads()
    return (f"slow: {rate:.2f} it/s, against {best:.2f} it/s earlier in this run; the "
            f"machine may be oversubscribed. torch uses {threads} thread"
            f"{'s' if threads != 1 else ''}: with other work on these cores, fewer "
            f"(training.threads, or OMP_NUM_THREADS) is often much faster")


class ProgressBar:
    """The training run's progress bar with loss, it/s and ETA, and a one-time note
    when the run slows far below its own pace (``SlowdownWatch``); silent when not on
    a terminal."""

    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None,
                 slowdown: Callable[[], SlowdownWatch] = SlowdownWatch):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._progress: Any = None
        self._task: Any = None
        self._make_watch = slowdown

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
        self._slowdown = self._make_watch()

    @hookimpl
    def loraengine_on_step_end(self, run: Any, step: int, metrics: dict[str, float]) -> None:
        if self._progress is None:
            return
        if "compile_s" in metrics:
            # the step that compiled the denoiser: reported once, left out of it/s
            self._t0, self._done0 = time.perf_counter(), step
            self._progress.console.log(f"first step, compiling (training.compile): "
                                       f"{format_duration(metrics['compile_s'])}")
            self._slowdown.restart()
        rate = (step - self._done0) / max(time.perf_counter() - self._t0, 1e-9)
        loss = metrics.get("loss")
        self._progress.update(self._task, completed=step,
                              loss="-" if loss is None else f"{loss:.4f}",
                              rate=f"{rate:.2f}" if step > self._done0 else "-")
        if "val_loss" in metrics:
            self._slowdown.restart()  # that step's time includes the validation pass
        hint = self._slowdown.observe(step)
        if hint is not None:
            self._progress.console.log(hint)

    @hookimpl
    def loraengine_on_save(self, run: Any, path: str, kind: str) -> None:
        """Note checkpoints and sample grids above the bar as they are written."""
        if self._progress is not None and kind in ("checkpoint", "samples", "best"):
            self._progress.console.log(f"{kind}: {path}")
        if self._progress is not None:
            self._slowdown.restart()  # writing is not stepping

    @hookimpl
    def loraengine_on_train_end(self, run: Any, result: Any) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def __getattr__(name: str) -> Any:
    """``EventLog`` (``--events PATH``) lives with the loggers; imported on first use, so
    a command's ``--help`` loads no plugin."""
    if name == "EventLog":
        from loraengine.plugins.outputs.loggers import EventLog
        return EventLog
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
