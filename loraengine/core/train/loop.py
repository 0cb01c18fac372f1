"""The training loop: optimizer steps, validation and early stopping, checkpoints, the
non-finite watchdog, Ctrl-C, the output lock, and the run's output files.

``Trainer`` composes the parts: the ``TrainState`` a checkpoint keeps, a
``Checkpointer`` for its folder, a ``Watchdog`` that decides when non-finite steps
stop the run, a ``SignalGuard`` and an ``OutputLock`` (one run at a time per output);
each optimizer step is ``step.train_step``. To lifecycle hooks the trainer is a
``RunView``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loraengine.core import preflight
from loraengine.core.adapter import AdapterNetwork
from loraengine.core.build import Pipeline, check_lr_scheduler
from loraengine.core.config.root import config_to_dict
from loraengine.core.data import BucketedDataset, BucketStream, Dataset, IndexStream
from loraengine.core.errors import ConfigError, DataError, NonFiniteError
from loraengine.core.files import in_layout, module_layouts, save_lora, write_text_atomic
from loraengine.core.model import LoadedModel
from loraengine.core.plugins.registry import Registry
from loraengine.core.plugins.run import RunView
from loraengine.core.seeding import make_generator
from loraengine.core.train import checkpoints as ckpt
from loraengine.core.train.output_lock import OutputLock
from loraengine.core.train.signals import SignalGuard, TrainingInterrupted
from loraengine.core.train.state import STEP_KEYS, TrainState, first_line
from loraengine.core.train.step import StepProbe, draw_noise, micro_step, train_step
from loraengine.core.train.watchdog import NonFiniteStreak, Watchdog
from loraengine.core.version import __version__

__all__ = ["STEP_KEYS", "Trainer", "TrainingInterrupted", "TrainResult"]


@dataclass
class TrainResult:
    """The node's three outputs: the adapter tensors (file keys; a model of several
    ``file_parts`` gives each part's under ``<part>.``), the loss map and the
    total step count (including the steps of ``adapter.existing``)."""

    lora: dict[str, torch.Tensor]
    loss_map: dict[str, list[float]]
    steps: int
    path: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)
    stopped_early: bool = False
    #: the metadata the run's file has (or would have, when nothing is written)
    metadata: dict[str, str] = field(default_factory=dict)
    #: ``training.compile``: the wall time of the first step, which compiled the
    #: denoiser (``None`` when nothing was compiled)
    compile_seconds: float | None = None

    def __repr__(self) -> str:
        # Short on purpose: the default dataclass repr prints every adapter tensor.
        losses = self.loss_map.get("loss", [])
        loss = f"{losses[0]:.4g} -> {losses[-1]:.4g}" if losses else "-"
        files = ", ".join(f"{k}={v}" for k, v in self.files.items()) or "none"
        return (f"TrainResult(steps={self.steps}, trained={len(losses)}, loss={loss}, "
                f"tensors={len(self.lora)}, files: {files}"
                f"{', stopped early' if self.stopped_early else ''})")


def _make_scaler(pipe: Pipeline) -> torch.amp.GradScaler | None:
    # fp16 needs loss scaling; a dry run on meta has no values to scale
    if pipe.compute_dtype != torch.float16 or pipe.device.type == "meta":
        return None
    return torch.amp.GradScaler(pipe.device.type)


class Trainer:
    """Runs a built pipeline from ``start_step`` to ``total_steps``."""

    def __init__(self, pipeline: Pipeline, *, write_files: bool = True,
                 output_lock: OutputLock | None = None):
        self.pipe = pipeline
        self.config = pipeline.config
        #: the first step's wall time when ``training.compile`` is on (see ``run``)
        self.compile_seconds: float | None = None
        self.host = pipeline.host
        self.total_steps = int(self.config.training.steps)
        self.start_step = 0
        self.output_dir = Path(self.config.output.dir)
        self.dist = pipeline.dist
        self.writes_files = write_files and self.dist.is_main
        seed = self.config.training.seed
        data_gen = make_generator(seed, "data")
        dataset = pipeline.dataset
        stream: IndexStream | BucketStream = (
            BucketStream(dataset, data_gen) if isinstance(dataset, BucketedDataset)
            else IndexStream(len(dataset), data_gen))
        self.state = TrainState(
            optimizer=pipeline.optimizer, lr_scheduler=pipeline.lr_scheduler,
            scaler=_make_scaler(pipeline), noise_gen=make_generator(seed, "noise"),
            stream=stream, recipes=pipeline.recipes)
        out = self.config.output
        self.checkpointer = ckpt.Checkpointer(self.output_dir / f"{out.name}.checkpoints",
                                              out.keep_last)
        self.watchdog = Watchdog(self.config.training.max_bad_steps)
        self._files: dict[str, Path] = {}  # the files of the result being made
        self._run_plugins: list[str] = []  # names of plugins registered for this run
        #: one run at a time per output: held from before the first write to the end of
        #: ``run`` (``close`` gives it back for a trainer that is not run)
        #: (``output_lock``: one taken already, by ``lock_early`` before the model loaded)
        self.output_lock: OutputLock | None = None
        if self.writes_files:
            self.output_lock = output_lock or OutputLock(self.output_dir, out.name)
        elif output_lock is not None:  # this trainer writes nothing: nothing to guard
            output_lock.release()
        if self.writes_files:
            self._prepare_outputs()

    def _prepare_outputs(self) -> None:
        """Before the first step: the outputs are writable and fit on the disk, and what
        a killed earlier run of this name left half-written is gone. The output lock
        is taken as soon as the output folder exists (it lives there), before anything
        else is written or cleaned up: the debris of a run still writing is no debris."""
        preflight.check_outputs(self.config, create=True)
        self._hold_output()
        try:
            self._check_and_clean_outputs()
        except BaseException:
            self.close()
            raise

    def _check_and_clean_outputs(self) -> None:
        params = [p for p in self.pipe.network.parameters()]
        adapter_bytes = sum(p.numel() * p.element_size() for p in params)
        file_bytes = sum(p.numel() for p in params) * self.pipe.save_dtype.itemsize
        preflight.check_disk(self.config, adapter_bytes, file_bytes)
        self.checkpointer.clean_debris()
        name = self.config.output.name
        suffixes = {"best", *(s for r in self.pipe.recipes for s in r.variants())}
        preflight.clean_output_debris(
            self.output_dir, [f"{name}.safetensors", f"{name}.loss.json",
                              f"{name}.loss.png",
                              *(f"{name}.{s}.safetensors" for s in sorted(suffixes))])

    # -- the parts tests and tools reach -----------------------------------------------
    @property
    def indices(self) -> IndexStream | BucketStream:
        """The training data stream."""
        return self.state.stream

    @property
    def noise_gen(self) -> torch.Generator:
        """The training noise generator."""
        return self.state.noise_gen

    @noise_gen.setter
    def noise_gen(self, generator: torch.Generator) -> None:
        self.state.noise_gen = generator

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        return self.state.scaler

    # -- the RunView of lifecycle hooks ------------------------------------------------
    @property
    def loss_map(self) -> dict[str, list[float]]:
        return self.state.loss_map

    @property
    def steps_done(self) -> int:
        return self.pipe.previous_steps + self.state.step

    @property
    def loaded(self) -> LoadedModel:
        return self.pipe.loaded

    @property
    def network(self) -> AdapterNetwork:
        return self.pipe.network

    @property
    def dataset(self) -> Dataset:
        return self.pipe.dataset

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.pipe.compute_dtype

    @property
    def registry(self) -> Registry:
        return self.host.registry

    def record_file(self, kind: str, path: Path) -> None:
        """List ``path`` in the result's ``files[kind]`` and announce it."""
        self._files[kind] = Path(path)
        self._announce(kind, path)

    def register(self, plugin: object) -> None:
        """Register a plugin object for the rest of this run (it is unregistered once
        ``loraengine_on_train_end`` has run): per-run state for a lifecycle plugin."""
        self._run_plugins.append(self.host.register(plugin))

    def _announce(self, kind: str, path: Path | str) -> None:
        self.host.on_save(self.view(), str(path), kind)

    def view(self) -> RunView:
        """The trainer as lifecycle hooks see it (the same object, typed read-only)."""
        return self

    # -- one step ----------------------------------------------------------------------
    def _noise_and_timesteps(self, x0: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return draw_noise(self.pipe, x0, self.state.noise_gen)

    def micro_step(self, indices: torch.Tensor, dataset: Dataset | None = None,
                   part: slice | None = None, generator: torch.Generator | None = None
                   ) -> torch.Tensor:
        """One micro-batch's mean loss (see ``step.micro_step``); the draws come from
        ``generator``, the training noise generator by default."""
        return micro_step(self.pipe, indices, generator or self.state.noise_gen, dataset,
                          part)

    def step(self, probe: StepProbe | None = None) -> dict[str, float]:
        """One optimizer step (see ``step.train_step``)."""
        return train_step(self.pipe, self.state.stream, self.state.noise_gen,
                          self.state.scaler, probe)

    # -- the run ----------------------------------------------------------------------
    def _hold_output(self) -> None:
        if self.output_lock is not None:
            self.output_lock.acquire()

    def close(self) -> None:
        """Give back the output lock: ``run`` does at its end, also on an error or an
        interruption, and so does a ``resume`` that fails; for a trainer made and then
        not run. Calling it again does nothing."""
        if self.output_lock is not None:
            self.output_lock.release()

    def run(self) -> TrainResult:
        """Train from ``start_step`` to ``total_steps``: checkpoints, validation, early
        stop, the non-finite watchdog and Ctrl-C handling included. The output lock is
        held throughout and given back at the end, however the run ends."""
        self._hold_output()  # again, when an earlier run or a failed resume gave it back
        try:
            return self._run()
        finally:
            self.close()

    def _run(self) -> TrainResult:
        out = self.config.output
        self._refuse_foreign_checkpoints()
        try:
            self._start_loggers()
            self.host.on_train_start(self.view())
        except BaseException:
            self._unregister_run_plugins()
            raise
        self.pipe.network.train()
        stopped_early = False
        result: TrainResult | None = None
        with SignalGuard() as guard:
            try:
                compiling = bool(self.config.training.compile)
                for step in range(self.start_step + 1, self.total_steps + 1):
                    began = time.perf_counter()
                    metrics = self.step()
                    if compiling:
                        # the first step compiles the denoiser: its time is reported
                        # apart (``compile_s``) and kept out of steps-per-second figures
                        compiling = False
                        self.compile_seconds = time.perf_counter() - began
                        metrics = {**metrics, "compile_s": self.compile_seconds}
                    self.state.record(metrics)
                    streak = self.watchdog.observe(self.state, step,
                                                   bool(metrics["skipped"]))
                    if streak is not None:
                        self._stop_for(streak)
                    if self._validation_due(step):
                        stopped_early = self._validate(step, metrics)
                    self.host.on_step_end(self.view(), step, metrics)
                    if self.writes_files and out.save_every and step % out.save_every == 0:
                        self.save_checkpoint(step)
                    if stopped_early:
                        break
                    if guard.received is not None:
                        self._interrupted(step, guard)
                # still guarded: a signal while the outputs are written lets them finish
                self._refuse_if_nothing_learned()
                result = self.finish()
                result.stopped_early = stopped_early
            finally:
                # also when training stops with an error: loggers close, displays stop.
                # Still guarded: a signal while these hooks run (a last preview can take
                # seconds to render) lets them finish, the events logger records the
                # end, and the run ends as interrupted below, its files kept.
                before_hooks = guard.received
                try:
                    self.host.on_train_end(self.view(), result)
                finally:
                    self._unregister_run_plugins()
        if guard.received is not None:
            when = ("the outputs were written" if before_hooks is not None
                    else "the end-of-run hooks ran")
            raise TrainingInterrupted(
                f"{guard.name}: received while {when}; training had finished (step "
                f"{self.steps_done}) and {result.path or 'the result'} is complete")
        return result

    def _start_loggers(self) -> None:
        """The ``output.loggers`` of a run that writes files, registered for this run."""
        if not self.writes_files:
            return
        registry = self.registry
        for name in self.config.output.loggers:
            spec = registry.get("logger", name)
            with registry.blame("logger", name, "factory"):
                plugin = spec.factory()
            self.register(plugin)

    def _unregister_run_plugins(self) -> None:
        while self._run_plugins:
            self.host.unregister(self._run_plugins.pop())

    def _refuse_foreign_checkpoints(self) -> None:
        """``ConfigError`` when a run that starts afresh would write its checkpoints
        among an earlier run's: saving step N replaces theirs and ``keep_last`` prunes
        the rest, so the earlier run could no longer be resumed."""
        if not (self.writes_files and self.config.output.save_every and self.start_step == 0):
            return
        found = ckpt.list_checkpoints(self.checkpointer.folder)
        if found:
            raise ConfigError(
                f"output.save_every: {self.checkpointer.folder} holds the checkpoints of an "
                f"earlier run (steps {found[0][0]}-{found[-1][0]}); continue that run with "
                f"--resume (resume= in loraengine.train), or start afresh under another "
                f"output.name or after removing the folder")

    def _refuse_if_nothing_learned(self) -> None:
        """``NonFiniteError`` when every step so far (a resumed run's earlier ones
        included) was non-finite and skipped: the adapter is still its starting point,
        and writing it would replace an earlier run's file with an untrained one."""
        skipped = self.loss_map.get("skipped", [])
        if not skipped or not all(skipped):
            return
        kept = ""
        if self.writes_files:
            final = self.output_dir / f"{self.config.output.name}.safetensors"
            kept = f"; {final} is left as it was" if final.exists() else ""
        raise NonFiniteError(f"every step (1-{len(skipped)}) was non-finite and skipped, so "
                             f"the adapter learned nothing and no file is written{kept} "
                             f"(check the model's output, the data and optimizer.lr)")

    def _stop_for(self, streak: NonFiniteStreak) -> None:
        """Act on the watchdog's decision: roll back to the newest checkpoint from
        before the streak, write that state, and raise ``NonFiniteError`` (writing
        nothing when no step was ever finite)."""
        self._refuse_if_nothing_learned()
        found = (self.checkpointer.latest_valid(before=streak.last_good)
                 if self.writes_files else None)
        if found is not None:
            good_step, adapter, state, path = found
            self.restore(adapter, state)
            where = f"rolled back to the checkpoint at step {good_step} ({path})"
        else:
            where = ("no checkpoint to roll back to; the adapter is unchanged since step "
                     f"{streak.last_good}, the last finite one")
        written = ""
        if self.writes_files:
            result = self.finish()
            written = f"; that state is written to {result.path}"
        raise NonFiniteError(f"{streak.length} consecutive non-finite steps "
                             f"({streak.first}-{streak.last}), each skipped; "
                             f"{where}{written}")

    def _interrupted(self, step: int, guard: SignalGuard) -> None:
        """Save a checkpoint and the LoRA so far, the latter beside the final one and
        named for its step: an interrupted run must not replace the finished LoRA of an
        earlier run of the same name with a partial one."""
        saved = ""
        if self.writes_files:
            path = self.save_checkpoint(step)
            result = self.finish(stopped_at=step)
            final = self.output_dir / f"{self.config.output.name}.safetensors"
            kept = f" ({final} is left as it was)" if final.exists() else ""
            saved = (f"; checkpoint {path}, LoRA so far {result.path}{kept}; continue "
                     f"with --resume latest")
        raise TrainingInterrupted(f"{guard.name}: stopped after step {step}{saved}")

    # -- checkpoints and resume -----------------------------------------------------
    def save_checkpoint(self, step: int) -> Path:
        path = self.checkpointer.save(step, self.pipe.network.state_dict(),
                                      self.state.state_dict(), config_to_dict(self.config))
        self._announce("checkpoint", path)
        return path

    def restore(self, adapter: Mapping[str, torch.Tensor], state: dict[str, Any],
                source: Path | None = None, reset_optimizer: bool = False) -> None:
        """Load a checkpoint's adapter weights and state; the run continues after its
        step. With ``reset_optimizer`` the optimizer state is not loaded (it stays
        fresh) and the LR schedule of this config is moved to the checkpoint's step."""
        missing, unexpected = [], []
        own = self.pipe.network.state_dict()
        where = f"checkpoint {source}" if source is not None else "checkpoint"
        changed = self.state.stream.mismatch(state["data"])  # before anything is loaded
        if changed is not None:
            raise DataError(f"{where} does not fit this run's data: {changed}; resume only "
                            f"with the data the run was made with (for a new run, choose "
                            f"another output folder or do not resume)")
        differ = [k for k, v in adapter.items() if k in own and own[k].shape != v.shape]
        if differ:
            k = differ[0]
            raise DataError(f"{where} does not fit this config's adapter: {len(differ)} of "
                            f"{len(own)} tensors differ in shape, e.g. {k} is "
                            f"{list(adapter[k].shape)} there and {list(own[k].shape)} here "
                            f"(adapter.rank or adapter.algorithm changed?)")
        try:
            missing, unexpected = self.pipe.network.load_state_dict(adapter, strict=False)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise DataError(f"{where} does not fit this config's adapter: "
                            f"{first_line(exc)}") from None
        if missing or unexpected:
            raise DataError(f"checkpoint does not fit this config's adapter: missing "
                            f"{missing[:3]}, unexpected {unexpected[:3]}")
        self.state.load_state_dict(state, reset_optimizer=reset_optimizer)
        self.start_step = int(state["step"])
        if reset_optimizer:
            self._schedule_from(state)

    def resume(self, where: str | Path = "latest", reset_optimizer: bool = False
               ) -> Path | None:
        """Continue from a checkpoint: ``latest`` (the newest valid one in this run's
        checkpoint folder), a checkpoints folder, or one ``step_N`` folder. A corrupt
        checkpoint is reported and the previous one used. Returns the one used.

        What a resume may change: ``training.steps``, the device, outputs, validation,
        early stopping and memory strategies freely; a changed ``optimizer.lr`` takes
        effect from the resumed step (the schedule keeps its shape, scaled to the new
        rate) and is recorded in the loss map's ``lr`` and the file's metadata
        (``loraengine.lr_changes``); a changed LR schedule (``lr_scheduler``: its name
        or options) or ``training.steps`` takes effect from the resumed step too: the
        rate of every later step is the one this config's schedule gives at that step,
        as if it had ruled from step 1 (schedule changes are recorded in
        ``loraengine.schedule_changes``); a changed ``optimizer.name`` is refused,
        since an optimizer's state fits only the optimizer that made it, unless
        ``reset_optimizer`` starts a fresh optimizer state (recorded in
        ``loraengine.optimizer_resets``). Other changes are warned about and take
        effect as they are.

        A resume that fails gives the output lock back (the run cannot go on as asked;
        ``run`` takes it again should it still be called)."""
        try:
            found = self.checkpointer.find(where)
            if found is None:
                return None
            _, adapter, state, path = found
            saved = ckpt.saved_config(path)
            if not reset_optimizer:
                self._check_optimizer(saved, path)
            self.restore(adapter, state, path, reset_optimizer=reset_optimizer)
            now = config_to_dict(self.config)
            changed = ckpt.config_changes(path, now)
            first = self.steps_done + 1
            notes: list[str] = []
            if reset_optimizer:
                had = _section(saved, "optimizer").get("name")
                self.state.optimizer_resets.append([first, had, self.config.optimizer.name])
                notes.append(f"fresh optimizer state ({had!r} -> "
                             f"{self.config.optimizer.name!r}) from step {first}; the "
                             f"checkpoint's optimizer state is not used")
            old_sched, new_sched = _section(saved, "lr_scheduler"), _section(now, "lr_scheduler")
            sched_changed = saved is not None and old_sched != new_sched
            steps_changed = saved is not None and _section(saved, "training").get(
                "steps") != self.config.training.steps
            if (sched_changed or steps_changed) and not reset_optimizer:
                self._schedule_from(state)  # (after a reset it already is)
            if sched_changed:
                self.state.schedule_changes.append([first, old_sched, new_sched])
            old_lr = _lr_of(saved)
            new_lr = float(self.config.optimizer.lr)
            if old_lr is not None and old_lr != new_lr:
                if reset_optimizer:  # the fresh optimizer already has the new rate
                    self.state.lr_changes.append([first, old_lr, new_lr])
                else:
                    self._change_lr(old_lr, new_lr)
            changed = [f"{c} (in effect from step {first})"
                       if c.startswith(("optimizer.", "lr_scheduler.")) else c for c in changed]
            if notes:
                warnings.warn(f"resuming {path}: {'; '.join(notes)}", ckpt.CheckpointWarning,
                              stacklevel=2)
            if changed:
                warnings.warn(f"resuming {path} with a changed config: {'; '.join(changed[:6])}"
                              f"{' ...' if len(changed) > 6 else ''}", ckpt.CheckpointWarning,
                              stacklevel=2)
            if self.start_step >= self.total_steps:
                warnings.warn(f"resuming {path}: the checkpoint is at step {self.start_step}, "
                              f"{'past' if self.start_step > self.total_steps else 'at'} "
                              f"training.steps={self.total_steps}, so no step is trained; the "
                              f"result is the checkpoint's adapter (raise training.steps to "
                              f"train on)", ckpt.CheckpointWarning, stacklevel=2)
            return path
        except BaseException:
            self.close()
            raise

    def _schedule_from(self, state: Mapping[str, Any]) -> None:
        """Make this config's LR schedule rule from the checkpoint's step: a fresh one
        is built over the optimizer (whose groups carry their base rates) and stepped to
        the position the checkpoint's schedule had, so each later step gets the rate
        this schedule gives at that step."""
        saved = state.get("lr_scheduler")
        position = (saved.get("last_epoch") if isinstance(saved, Mapping) else None)
        steps = int(position) if isinstance(position, int) else int(state["step"])
        name = self.config.lr_scheduler.name
        registry = self.host.registry
        with warnings.catch_warnings():
            # stepping a schedule with no optimizer step between is the point here
            warnings.simplefilter("ignore", UserWarning)
            with registry.blame("lr_scheduler", name, "factory"):
                fresh = registry.get("lr_scheduler", name).factory(
                    self.pipe.optimizer, self.total_steps, self.config.lr_scheduler)
                check_lr_scheduler(fresh)
            with registry.blame("lr_scheduler", name, "step"):
                for _ in range(steps):
                    fresh.step()
        self.pipe = dataclasses.replace(self.pipe, lr_scheduler=fresh)
        self.state.lr_scheduler = fresh

    def _check_optimizer(self, saved: Mapping[str, Any] | None, path: Path) -> None:
        """An optimizer's state only fits the optimizer that made it."""
        had = _section(saved, "optimizer").get("name")
        now = self.config.optimizer.name
        if had is not None and had != now:
            raise ConfigError(f"optimizer.name: checkpoint {path} holds the state of "
                              f"{had!r}, this config asks for {now!r}; resume with "
                              f"optimizer.name={had}, or add --reset-optimizer to start a "
                              f"fresh optimizer state (an optimizer's state does not carry "
                              f"over to another)")

    def _change_lr(self, old: float, new: float) -> None:
        """Make ``optimizer.lr`` changed since the checkpoint rule from the resumed step:
        every group's learning rate and the schedule's base rates are scaled by
        ``new / old`` (the schedule keeps its shape, only its height changes)."""
        factor = new / old
        for group in self.pipe.optimizer.param_groups:
            group["lr"] = group["lr"] * factor
            if "initial_lr" in group:
                group["initial_lr"] = group["initial_lr"] * factor
        base = getattr(self.pipe.lr_scheduler, "base_lrs", None)
        if isinstance(base, list):
            self.pipe.lr_scheduler.base_lrs = [b * factor for b in base]
        last = getattr(self.pipe.lr_scheduler, "_last_lr", None)
        if isinstance(last, list):
            self.pipe.lr_scheduler._last_lr = [g["lr"] for g in self.pipe.optimizer.param_groups]
        self.state.lr_changes.append([self.steps_done + 1, old, new])

    # -- validation -------------------------------------------------------------------
    def _validation_due(self, step: int) -> bool:
        every = self.config.validation.every
        return self.pipe.validation is not None and every is not None and (
            step % every == 0 or step == self.total_steps)

    def validation_loss(self) -> float:
        """Mean loss over the held-out set with fixed noise and timesteps: the same
        number for the same adapter, whenever and however often it is computed."""
        data = self.pipe.validation
        assert data is not None
        generator = make_generator(self.config.training.seed, "validation")
        batch = self.config.training.batch_size
        total, n = 0.0, len(data)
        with torch.no_grad():
            for start in range(0, n, batch):
                idx = torch.arange(start, min(n, start + batch))
                total += float(micro_step(self.pipe, idx, generator, data)) * len(idx)
        return total / n

    def _validate(self, step: int, metrics: dict[str, float]) -> bool:
        """Record the validation loss (also in ``metrics``); return True when early
        stopping says stop."""
        value = self.validation_loss()
        self.loss_map.setdefault("val_loss", []).append(value)
        self.loss_map.setdefault("val_loss_step", []).append(step)
        metrics["val_loss"] = value
        stop_cfg = self.config.early_stop
        state = self.state
        if state.best_val is None or value < state.best_val - stop_cfg.min_delta:
            state.best_val, state.since_best = value, 0
            if self.config.output.keep_best and self.writes_files:
                meta = self.metadata() | {"loraengine.val_loss": repr(value),
                                          "loraengine.best_step": str(step)}
                parts = dict(self.pipe.loaded.file_parts) or {"": ""}
                for part, prefix in parts.items():  # one file per part, as at the end
                    kind = f"best.{part}" if part else "best"
                    path = self.output_dir / f"{self.config.output.name}.{kind}.safetensors"
                    save_lora(path, self.lora_tensors(prefix), meta)
                    self._announce(kind, path)
        else:
            state.since_best += 1
        return stop_cfg.patience is not None and state.since_best >= stop_cfg.patience

    # -- outputs ----------------------------------------------------------------------
    def lora_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The adapter's file tensors; with ``prefix``, only the adapters under that
        module prefix, named without it (one part of ``LoadedModel.file_parts``)."""
        pipe = self.pipe
        exporter_name = self.config.adapter.exporter or pipe.loaded.default_exporter
        registry = self.host.registry
        exporter = registry.get("exporter", exporter_name)
        modules = pipe.network.file_modules(pipe.save_dtype)
        if prefix:
            modules = {k[len(prefix):]: v for k, v in modules.items() if k.startswith(prefix)}
        with registry.blame("exporter", exporter_name, "to_file"):
            tensors: dict[str, torch.Tensor] = exporter.to_file(
                in_layout(modules, exporter, module_layouts(registry, pipe.loaded.module)))
        return tensors

    def metadata(self) -> dict[str, str]:
        """The file's metadata, from the adapters as trained (a continued file keeps its
        own rank and alpha) and the spec's own notes."""
        cfg = self.config
        spec = self.pipe.adapter_spec
        layers = [layer for _, layer in self.pipe.network.items()]
        ranks = sorted({layer.rank for layer in layers}) or [cfg.adapter.rank]
        alphas = sorted({layer.alpha for layer in layers}) or [
            cfg.adapter.alpha if cfg.adapter.alpha is not None else cfg.adapter.rank]
        extra: dict[str, str] = spec.file_metadata(cfg.adapter) if spec.file_metadata else {}
        return extra | {
            "ss_network_module": spec.network_module or f"loraengine.{spec.name}",
            "ss_network_dim": str(ranks[-1]),
            "ss_network_alpha": f"{alphas[-1]:g}",
            "ss_network_args": json.dumps({"algo": spec.name}),
            "ss_steps": str(self.steps_done),
            "ss_base_model_version": self.pipe.loaded.base_model_version,
            "loraengine.version": __version__,
            "loraengine.algorithm": spec.name,
            "loraengine.steps": str(self.steps_done),
            "loraengine.config": json.dumps(config_to_dict(cfg)),
        } | {f"loraengine.{key}": json.dumps(value) for key, value in (
            ("lr_changes", self.state.lr_changes),
            ("schedule_changes", self.state.schedule_changes),
            ("optimizer_resets", self.state.optimizer_resets)) if value}

    def finish(self, stopped_at: int | None = None) -> TrainResult:
        """The result; when writing files, the LoRA, each recipe's variant (e.g. its
        EMA) and the loss map are all written before any ``on_save`` hook runs, so a
        failing hook cannot cost a file. ``stopped_at`` (the step a stopped run
        reached, as its checkpoint is numbered) names the files for it,
        ``<name>.step_000123.safetensors``, beside the final ones."""
        to_eval = getattr(self.pipe.optimizer, "eval", None)
        if callable(to_eval):  # schedule-free optimizers: save the averaged x
            with self.registry.blame("optimizer", self.config.optimizer.name, "eval"):
                to_eval()
        parts = dict(self.pipe.loaded.file_parts)
        by_part = {part: self.lora_tensors(prefix) for part, prefix in parts.items()}
        # a model of several parts: its parts' tensors, each key under "<part>."
        tensors = {f"{part}.{k}": v for part, t in by_part.items() for k, v in t.items()
                   } if parts else self.lora_tensors()
        result = TrainResult(tensors, {k: list(v) for k, v in self.loss_map.items()},
                             self.steps_done, metadata=self.metadata(),
                             compile_seconds=self.compile_seconds)
        self._files = result.files
        if not self.writes_files:
            return result
        out, name = self.output_dir, self.config.output.name  # save_lora makes the folder
        if stopped_at is not None:
            name = partial_name(name, stopped_at)
        # a model of several parts (two experts) is written as one file per part
        parts = parts or {"": ""}
        written: list[tuple[str, Path]] = []
        for part, prefix in parts.items():
            lora_path = out / (f"{name}.{part}.safetensors" if part else f"{name}.safetensors")
            save_lora(lora_path, by_part[part] if prefix else tensors, self.metadata())
            result.path = result.path or lora_path
            written.append((f"lora.{part}" if part else "lora", lora_path))
        for recipe in self.pipe.recipes:  # other versions of the adapter, e.g. its EMA
            for suffix, swapped in recipe.variants().items():
                with swapped():
                    for part, prefix in parts.items():
                        kind = f"{suffix}.{part}" if part else suffix
                        variant_path = out / f"{name}.{kind}.safetensors"
                        save_lora(variant_path, self.lora_tensors(prefix), self.metadata())
                        written.append((kind, variant_path))
        loss_path = out / f"{name}.loss.json"
        write_text_atomic(loss_path, json.dumps(_finite_or_null(result.loss_map), indent=1))
        written.append(("loss_map", loss_path))
        for kind, path in written:
            result.files[kind] = path
        for kind, path in written:  # the loss plot plugin writes on "loss_map"
            self._announce(kind, path)
        return result


def partial_name(name: str, step: int) -> str:
    """The stem of the files a run stopped at ``step`` writes beside its final ones."""
    return f"{name}.step_{step:06d}"


def _section(config: Mapping[str, Any] | None, name: str) -> dict[str, Any]:
    section = config.get(name) if config is not None else None
    return dict(section) if isinstance(section, Mapping) else {}


def _lr_of(saved: Mapping[str, Any] | None) -> float | None:
    section = saved.get("optimizer") if saved is not None else None
    value = section.get("lr") if isinstance(section, Mapping) else None
    return float(value) if isinstance(value, (int, float)) else None


def _finite_or_null(loss_map: Mapping[str, Sequence[float]]
                    ) -> dict[str, list[float | None]]:
    """The loss map as strict JSON: a skipped step's NaN/inf loss becomes null."""
    return {k: [v if not isinstance(v, float) or math.isfinite(v) else None for v in vals]
            for k, vals in loss_map.items()}

