"""What makes a run safe to trust: checkpoints and exact resume, the non-finite
watchdog, and Ctrl-C handling. A mixin of ``Trainer``; it uses the trainer's pipeline,
random streams and loss map."""

from __future__ import annotations

import json
import signal
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from loraengine.core.config.root import config_to_dict
from loraengine.core.errors import DataError, LoraEngineError, NonFiniteError
from loraengine.core.train import checkpoints as ckpt


class TrainingInterrupted(LoraEngineError):
    """SIGINT/SIGTERM: the current step finished, a checkpoint and the LoRA so far were
    written."""

    exit_code = 130


class SafetyMixin:
    """Checkpoint, resume, watchdog and signal handling for ``Trainer``."""

    pipe: Any
    config: Any
    host: Any

    # -- the non-finite watchdog ----------------------------------------------------
    def _watch(self, step: int, skipped: bool) -> None:
        self.bad_streak = self.bad_streak + 1 if skipped else 0
        limit = self.config.training.max_bad_steps
        if self.bad_streak < limit:
            return
        streak, first = self.bad_streak, step - self.bad_streak + 1
        # the newest checkpoint from before the streak began
        found = (ckpt.load_latest_valid(self.checkpoint_dir, before=first - 1)
                 if self.write_files else None)
        if found is not None:
            good_step, adapter, state, path = found
            self.load_state(adapter, state)
            where = f"rolled back to the checkpoint at step {good_step} ({path})"
        else:
            where = ("no checkpoint to roll back to; the adapter is unchanged since step "
                     f"{first - 1}, the last finite one")
        written = ""
        if self.write_files:
            result = self.finish()
            written = f"; that state is written to {result.path}"
        raise NonFiniteError(f"{streak} consecutive non-finite steps "
                             f"({first}-{step}), each skipped; {where}{written}")

    # -- checkpoints and resume -----------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything besides the adapter weights that a resume needs."""
        return {
            "step": len(self.loss_map["loss"]),
            "optimizer": self.pipe.optimizer.state_dict(),
            "lr_scheduler": self.pipe.lr_scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "noise_gen": self.noise_gen.get_state(),
            "data": self.indices.state(),
            "loss_map": self.loss_map,
            "watch": {"bad_streak": self.bad_streak, "best_val": self.best_val,
                      "since_best": self.since_best},
            "recipes": [r.state_dict() if hasattr(r, "state_dict") else None
                        for r in self.pipe.recipes],
        }

    def load_state(self, adapter: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        pipe = self.pipe
        try:
            missing, unexpected = pipe.network.load_state_dict(adapter, strict=False)
            if missing or unexpected:
                raise RuntimeError(f"missing {missing[:3]}, unexpected {unexpected[:3]}")
            pipe.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise DataError(f"checkpoint does not fit this config's adapter: {exc}") from None
        pipe.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.noise_gen.set_state(state["noise_gen"])
        self.indices.load_state(state["data"])
        self.loss_map = {k: list(v) for k, v in state["loss_map"].items()}
        watch = state.get("watch", {})
        self.bad_streak = int(watch.get("bad_streak", 0))
        self.best_val = watch.get("best_val")
        self.since_best = int(watch.get("since_best", 0))
        for recipe, rstate in zip(pipe.recipes, state.get("recipes", []), strict=False):
            if rstate is not None and hasattr(recipe, "load_state_dict"):
                recipe.load_state_dict(rstate)
        self.start_step = int(state["step"])

    def save_checkpoint(self, step: int) -> Path:
        state = self.state()
        path = ckpt.save_checkpoint(self.checkpoint_dir, step, self.pipe.network.state_dict(),
                                    state, config_to_dict(self.config))
        if self.config.output.keep_last:
            ckpt.prune(self.checkpoint_dir, self.config.output.keep_last)
        self.last_checkpoint = path
        self.host.on_save(self, str(path), "checkpoint")
        return path

    def resume(self, where: str | Path = "latest") -> Path | None:
        """Continue from a checkpoint: ``latest`` (the newest valid one in this run's
        checkpoint folder), a checkpoints folder, or one ``step_N`` folder. A corrupt
        checkpoint is reported and the previous one used. Returns the one used."""
        folder, before = self.checkpoint_dir, None
        if str(where) != "latest":
            path = Path(where)
            if (path / ckpt.MANIFEST).exists() or path.name.startswith("step_"):
                folder = path.parent
                before = int(path.name.split("_")[-1]) if path.name[5:].isdigit() else None
            else:
                folder = path
            if not folder.exists():
                raise DataError(f"--resume: {where} does not exist")
        found = ckpt.load_latest_valid(folder, before)
        if found is None:
            if str(where) != "latest":
                raise DataError(f"--resume: no usable checkpoint in {folder}")
            warnings.warn(f"no checkpoint in {folder}; starting from step 0",
                          ckpt.CheckpointWarning, stacklevel=2)
            return None
        _, adapter, state, path = found
        self.load_state(adapter, state)
        self.last_checkpoint = path
        changed = config_changes(path, config_to_dict(self.config))
        if changed:
            warnings.warn(f"resuming {path} with a changed config: {'; '.join(changed[:6])}"
                          f"{' ...' if len(changed) > 6 else ''}", ckpt.CheckpointWarning,
                          stacklevel=2)
        return path

    # -- Ctrl-C -----------------------------------------------------------------------
    @contextmanager
    def _signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self._stop_signal is not None:  # a second Ctrl-C: stop at once
                raise KeyboardInterrupt
            self._stop_signal = signum

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _interrupted(self, step: int) -> None:
        saved = ""
        if self.write_files:
            path = self.save_checkpoint(step)
            result = self.finish()
            saved = (f"; checkpoint {path}, LoRA so far {result.path}; continue with "
                     f"--resume latest")
        name = signal.Signals(self._stop_signal).name if self._stop_signal else "signal"
        raise TrainingInterrupted(f"{name}: stopped after step {step}{saved}")


#: Keys that may change between a run and its resume without changing what is trained.
_RESUMABLE_CHANGES = ("training.steps", "training.device", "training.dist_timeout",
                      "output.", "validation.", "early_stop.", "memory.")


def config_changes(checkpoint: Path, current: dict[str, Any]) -> list[str]:
    """``key: saved -> now`` for every config value that differs from the checkpoint's,
    except those a resume may change freely (steps, device, outputs, memory...)."""
    try:
        saved = json.loads((Path(checkpoint) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix[:-1]: d}
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out

    a, b = flat(saved), flat(current)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not k.startswith(_RESUMABLE_CHANGES)]
