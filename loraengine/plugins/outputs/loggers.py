"""The built-in loggers that ``output.loggers`` names.

- ``events``: one JSON object per line appended to ``<dir>/<name>.events.jsonl`` (the
  run's start with its config, every step's metrics, every file written, the end). It
  is on by default and is what ``loraengine monitor`` reads; ``loraengine train --events PATH``
  appends the same stream to a file of the caller's choice (one that exists must be an
  events log already: any other file is refused, never written into).
- ``tensorboard``: event files under ``<dir>/tensorboard/<name>/`` (scalars ``loss``,
  ``lr``, ``val_loss``; the preview grids as images; the config as text). Needs the
  ``tensorboard`` package (the ``[tensorboard]`` extra).
- ``mlflow``: an offline MLflow file store in ``<dir>/mlruns/`` (experiment
  ``loraengine``, one run per training run named ``output.name``): the same metrics,
  the config as ``config.json``, preview grids and the loss plot as artifacts. Needs the
  ``mlflow-skinny`` package (the ``[mlflow]`` extra).

Each logger is an object registered for one run; it sees only that run's hooks.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from loraengine.core.errors import ConfigError
from loraengine.core.plugins.hookspecs import hookimpl
from loraengine.core.plugins.run import RunView
from loraengine.core.plugins.specs import LoggerSpec

#: The step metrics the loggers chart (``skipped`` and others stay in the event stream).
CHARTED = ("loss", "lr", "val_loss")


def config_dict(run: RunView) -> dict[str, Any]:
    """The run's validated config as plain JSON data."""
    data: dict[str, Any] = json.loads(run.config.model_dump_json())
    return data


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(float(value))


class EventLog:
    """Writes one JSON object per line: ``train_start`` (``total_steps``,
    ``start_step``, ``name``, ``config``), ``step`` (``step`` and its metrics),
    ``save`` (``kind``, ``path``) and ``train_end`` (``steps``, or ``error``). Every
    line carries ``time`` (seconds since the epoch) and is flushed as it is written, so
    a reader can follow the file while the run writes it. NaN is written as ``null``.

    ``append`` keeps what the file holds; a path given with ``append`` that names a
    non-empty file which is not an events log is refused (``ConfigError``) before it is
    opened, so a mistyped path never costs a file. Made without a path (as the ``events``
    logger), it appends to ``<dir>/<name>.events.jsonl`` when the run starts: the file
    is the log of every run of that name, each from its ``train_start`` on (a resumed
    run's ``start_step`` says where it continues), and a run that fails never costs the
    lines of an earlier one."""

    def __init__(self, path: Path | None = None, append: bool = False):
        self.path = None if path is None else Path(path)
        self.append = append
        self._fh: Any = None
        self._key = "--events" if path is not None else "output.loggers (events)"
        if self.path is not None:
            self._open(self.path, append)

    def _open(self, path: Path, append: bool) -> None:
        self.path = path
        if append and path.is_file() and not _is_events_log(path):
            raise ConfigError(f"{self._key} {path}: the file exists and is not an events log "
                              f"(its first line is no loraengine event); events are "
                              f"appended, so choose a new file or an earlier run's log")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = path.open("a" if append else "w", encoding="utf-8")
        except OSError as exc:
            blocking = next((p for p in path.parents if p.is_file()), None)
            reason = f"{blocking} is a file" if blocking is not None else \
                exc.strerror or str(exc)
            raise ConfigError(f"{self._key} {path}: cannot write ({reason})") from None

    def _write(self, event: dict[str, Any]) -> None:
        if self._fh is None or self._fh.closed:
            return
        event["time"] = time.time()
        event = {k: (None if isinstance(v, float) and v != v else v) for k, v in event.items()}
        self._fh.write(json.dumps(event) + "\n")
        self._fh.flush()

    @hookimpl
    def loraengine_on_train_start(self, run: RunView) -> None:
        if self._fh is None:
            self._open(events_path(run.output_dir, run.config.output.name), append=True)
        self._write({"event": "train_start", "total_steps": run.total_steps,
                     "start_step": run.start_step, "name": run.config.output.name,
                     "config": config_dict(run)})

    @hookimpl
    def loraengine_on_step_end(self, run: RunView, step: int, metrics: dict[str, float]
                               ) -> None:
        self._write({"event": "step", "step": step, **metrics})

    @hookimpl
    def loraengine_on_save(self, run: RunView, path: str, kind: str) -> None:
        self._write({"event": "save", "kind": kind, "path": path})

    @hookimpl
    def loraengine_on_train_end(self, run: RunView, result: Any) -> None:
        if result is None:
            self._write({"event": "train_end", "error": True})
        else:
            self._write({"event": "train_end", "steps": result.steps})
            if self.path is not None:  # listed with the run's files (what to monitor)
                result.files["events"] = self.path
        if self._fh is not None:
            self._fh.close()


def _is_events_log(path: Path) -> bool:
    """Whether ``path`` is empty or starts with a line this logger writes."""
    try:
        with path.open("rb") as fh:
            first = fh.readline(1 << 20)
    except OSError:
        return True  # opening it for appending says why it cannot be used
    if not first:
        return True  # empty: nothing to lose
    try:
        event = json.loads(first)
    except ValueError:
        return False
    return isinstance(event, dict) and isinstance(event.get("event"), str)


def events_path(output_dir: Path, name: str) -> Path:
    """Where the ``events`` logger writes a run's stream."""
    return Path(output_dir) / f"{name}.events.jsonl"


class TensorBoardLogger:
    """Scalars, preview images and the config into TensorBoard event files."""

    writer: Any = None
    step = 0

    @hookimpl
    def loraengine_on_train_start(self, run: RunView) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.folder = Path(run.output_dir) / "tensorboard" / run.config.output.name
        self.writer = SummaryWriter(log_dir=str(self.folder))
        self.step = run.start_step
        text = json.dumps(config_dict(run), indent=1)
        self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()),
                             global_step=run.start_step)

    @hookimpl
    def loraengine_on_step_end(self, run: RunView, step: int, metrics: dict[str, float]
                               ) -> None:
        self.step = step
        for key in CHARTED:
            value = metrics.get(key)
            if _finite(value):
                self.writer.add_scalar(key, float(value), global_step=step)  # type: ignore[arg-type]

    @hookimpl
    def loraengine_on_save(self, run: RunView, path: str, kind: str) -> None:
        if kind != "samples" or not path.endswith(".png"):
            return
        import numpy as np
        from PIL import Image

        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        tag = "samples/compare" if Path(path).name == "compare.png" else "samples"
        self.writer.add_image(tag, pixels, global_step=self.step, dataformats="HWC")

    @hookimpl
    def loraengine_on_train_end(self, run: RunView, result: Any) -> None:
        if self.writer is None:  # another plugin's start failed before this one's
            return
        self.writer.flush()
        self.writer.close()


class MLflowLogger:
    """Metrics, the config and preview grids into an offline MLflow file store."""

    EXPERIMENT = "loraengine"

    client: Any = None
    run_id = ""

    @hookimpl
    def loraengine_on_train_start(self, run: RunView) -> None:
        # MLflow keeps the file store for offline use behind this switch; without it
        # the client asks for a database server instead.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.store = (Path(run.output_dir) / "mlruns").resolve()
        self.client = MlflowClient(tracking_uri=self.store.as_uri())
        found = self.client.get_experiment_by_name(self.EXPERIMENT)
        experiment = (found.experiment_id if found is not None
                      else self.client.create_experiment(self.EXPERIMENT))
        self.run_id = self.client.create_run(
            experiment, run_name=run.config.output.name).info.run_id
        self.client.log_dict(self.run_id, config_dict(run), "config.json")
        self.client.log_param(self.run_id, "total_steps", run.total_steps)
        self.client.log_param(self.run_id, "start_step", run.start_step)

    @hookimpl
    def loraengine_on_step_end(self, run: RunView, step: int, metrics: dict[str, float]
                               ) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(metrics[key]), now, step) for key in CHARTED
                 if _finite(metrics.get(key))]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    @hookimpl
    def loraengine_on_save(self, run: RunView, path: str, kind: str) -> None:
        if kind in ("samples", "plot") and Path(path).is_file():
            self.client.log_artifact(self.run_id, path, kind)

    @hookimpl
    def loraengine_on_train_end(self, run: RunView, result: Any) -> None:
        if self.client is None:
            return
        self.client.set_terminated(self.run_id, "FAILED" if result is None else "FINISHED")


def _needs(module: str, package: str, extra: str) -> Any:
    def missing() -> str | None:
        try:  # found without importing it: reading a config stays fast
            if importlib.util.find_spec(module) is not None:
                return None
        except (ImportError, ValueError):  # a module set to None in sys.modules
            pass
        return f"the {package} package: pip install 'loraengine[{extra}]'"
    return missing


@hookimpl
def loraengine_loggers() -> list[LoggerSpec]:
    return [
        LoggerSpec("events", EventLog,
                   description="JSON lines in <dir>/<name>.events.jsonl (loraengine monitor)"),
        LoggerSpec("tensorboard", TensorBoardLogger,
                   missing=_needs("tensorboard", "tensorboard", "tensorboard"),
                   description="TensorBoard event files in <dir>/tensorboard/<name>/"),
        LoggerSpec("mlflow", MLflowLogger, missing=_needs("mlflow", "mlflow-skinny", "mlflow"),
                   description="an offline MLflow file store in <dir>/mlruns/"),
    ]
