"""The training loop: micro-batches, accumulation, optimizer steps, outputs."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loraengine.core.build import Pipeline
from loraengine.core.config.root import config_to_dict
from loraengine.core.data import BucketedDataset, BucketStream, IndexStream
from loraengine.core.distributed import average_gradients, guarded
from loraengine.core.files import save_lora, write_text_atomic
from loraengine.core.seeding import make_generator
from loraengine.core.train.safety import SafetyMixin
from loraengine.core.version import __version__


@dataclass
class TrainResult:
    """The node's three outputs: the adapter tensors (file keys), the loss map and the
    total step count (including the steps of ``adapter.existing``)."""

    lora: dict[str, torch.Tensor]
    loss_map: dict[str, list[float]]
    steps: int
    path: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)
    stopped_early: bool = False


STEP_KEYS = ("loss", "lr", "skipped")


class Trainer(SafetyMixin):
    """Runs a built pipeline. Exposes ``config``, ``total_steps``, ``start_step`` and
    ``output_dir`` to lifecycle hooks."""

    def __init__(self, pipeline: Pipeline, *, write_files: bool = True):
        self.pipe = pipeline
        self.config = pipeline.config
        self.host = pipeline.host
        self.total_steps = int(self.config.training.steps)
        self.start_step = 0
        self.output_dir = Path(self.config.output.dir)
        self.dist = pipeline.dist
        self.write_files = write_files and self.dist.is_main
        seed = self.config.training.seed
        data_gen = make_generator(seed, "data")
        dataset = pipeline.dataset
        self.indices: IndexStream | BucketStream = (
            BucketStream(dataset, data_gen) if isinstance(dataset, BucketedDataset)
            else IndexStream(len(dataset), data_gen))
        self.noise_gen = make_generator(seed, "noise")
        self.loss_map: dict[str, list[float]] = {k: [] for k in STEP_KEYS}
        self.scaler = self._make_scaler()
        self.checkpoint_dir = self.output_dir / f"{self.config.output.name}.checkpoints"
        self.bad_streak = 0
        self.best_val: float | None = None
        self.since_best = 0
        self.last_checkpoint: Path | None = None
        self._stop_signal: int | None = None

    def _make_scaler(self) -> Any:
        if self.pipe.compute_dtype != torch.float16:
            return None
        return torch.amp.GradScaler(self.pipe.device.type)

    # -- one micro-batch ------------------------------------------------------------
    def _noise_and_timesteps(self, x0: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample draws, so a batch of k·b sees exactly the draws of k batches of b.
        Returns the target's noise, the timesteps and the noise that makes ``x_t`` (the
        two noises differ only when a recipe such as input perturbation says so)."""
        pipe = self.pipe
        draw_t = pipe.timestep_sampler or pipe.loaded.schedule.sample_timestep
        noises, ts, xt_noises = [], [], []
        for _ in range(x0.shape[0]):  # sample by sample: noise, its timestep, tweaks
            noise = torch.randn(x0.shape[1:], generator=self.noise_gen)
            ts.append(draw_t(self.noise_gen))
            xt_noise = noise
            for recipe in pipe.recipes:
                xt_noise, noise = recipe.perturb_noise(xt_noise, noise, self.noise_gen)
            noises.append(noise)
            xt_noises.append(xt_noise)
        return torch.stack(noises), torch.stack(ts), torch.stack(xt_noises)

    def micro_step(self, indices: torch.Tensor, dataset: Any = None,
                   part: slice | None = None) -> torch.Tensor:
        """Forward one micro-batch and return its (unscaled) mean loss. With ``part``,
        the random draws are made for the whole batch (keeping every rank's streams in
        step) and only those rows are computed."""
        pipe = self.pipe
        schedule = pipe.loaded.schedule
        data = dataset or pipe.dataset
        x0, cond = data.batch(indices[part] if part is not None else indices)
        x0 = x0.float()
        if part is not None:
            full = torch.empty((len(indices), *x0.shape[1:]))
            noise, t, xt_noise = (v[part] for v in self._noise_and_timesteps(full))
        else:
            noise, t, xt_noise = self._noise_and_timesteps(x0)
        x_t = schedule.add_noise(x0, xt_noise, t)
        dev, dt = pipe.device, pipe.compute_dtype
        cond = {k: v.to(dev, dt) if v.is_floating_point() else v.to(dev)
                for k, v in cond.items()}
        model_t = schedule.model_timesteps(t).to(dev)
        if pipe.denoise is not None:
            pred = pipe.denoise(x_t.to(dev, dt), model_t, cond).float()
        else:
            pred = pipe.loaded.predict(pipe.model, x_t.to(dev, dt), model_t, cond).float()
        x0, noise, t, x_t = x0.to(dev), noise.to(dev), t.to(dev), x_t.to(dev)
        if self.config.loss.target == "x0":
            pred, target = schedule.predicted_x0(pred, x_t, t), x0
        else:
            target = schedule.target(x0, noise, t)
        per_sample = pipe.per_sample_loss(pred, target.float(), t)
        return (per_sample * pipe.loss_weights(t).to(per_sample)).mean()

    # -- one optimizer step ---------------------------------------------------------
    def step(self) -> dict[str, float]:
        pipe, tcfg = self.pipe, self.config.training
        accum = tcfg.grad_accumulation_steps
        if callable(getattr(pipe.optimizer, "train", None)):
            pipe.optimizer.train()  # schedule-free optimizers take gradients at y
        pipe.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        finite = True
        part = self.dist.slice_of(tcfg.batch_size) if self.dist.enabled else None
        for i in range(accum):
            with self._no_sync(last=i == accum - 1):
                loss = self.micro_step(self.indices.take(tcfg.batch_size), part=part)
                value = float(loss.detach())
                if not math.isfinite(value):
                    finite = False
                total += value / accum
                scaled = loss / accum
                if self.scaler is not None:
                    scaled = self.scaler.scale(scaled)
                if self.dist.enabled:
                    guarded(scaled.backward, "averaging gradients")
                else:
                    scaled.backward()
        params = pipe.trainable_parameters()
        if self.dist.enabled:
            if pipe.sharded:
                average_gradients(params, self.dist.world_size)
            total = self.dist.mean(total)  # nan on any rank makes the mean nan
            finite = math.isfinite(total)
        if self.scaler is not None:
            self.scaler.unscale_(pipe.optimizer)
        # one fused norm over every gradient: non-finite anywhere makes it non-finite,
        # and clipping reuses it (one device sync per step instead of one per tensor)
        grads = [p.grad for p in params if p.grad is not None]
        total_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        grads_ok = bool(torch.isfinite(total_norm))
        lr = float(pipe.optimizer.param_groups[0]["lr"])
        # A non-finite loss, or non-finite gradients without a scaler, is a bad step. With
        # fp16's scaler, overflowing gradients are its normal way of finding the scale:
        # the step is not applied, but it is not counted against the watchdog.
        skipped = not finite or (self.scaler is None and not grads_ok)
        overflow = self.scaler is not None and not grads_ok
        applied = not skipped and not overflow
        if tcfg.max_grad_norm is not None and applied:
            torch.nn.utils.clip_grads_with_norm_(params, tcfg.max_grad_norm, total_norm)
        if self.scaler is not None:
            if finite:
                self.scaler.step(pipe.optimizer)  # skips overflowing steps itself
            self.scaler.update()
        elif applied:
            pipe.optimizer.step()
        pipe.optimizer.zero_grad(set_to_none=True)
        pipe.lr_scheduler.step()
        if applied:
            for recipe in pipe.recipes:
                recipe.after_optimizer_step()  # e.g. the EMA of the adapter weights
        return {"loss": total, "lr": lr, "skipped": float(skipped)}

    @contextmanager
    def _no_sync(self, last: bool):
        """Skip DDP's gradient exchange on all but the last micro-batch of a step."""
        denoise = self.pipe.denoise
        if denoise is None or last or not hasattr(denoise, "no_sync"):
            yield
        else:
            with denoise.no_sync():
                yield

    # -- the run ----------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Train from ``start_step`` to ``total_steps``: checkpoints, validation, early
        stop, the non-finite watchdog and Ctrl-C handling included."""
        out = self.config.output
        self.host.on_train_start(self)
        self.pipe.network.train()
        stopped_early = False
        result: TrainResult | None = None
        try:
            with self._signals():
                for step in range(self.start_step + 1, self.total_steps + 1):
                    metrics = self.step()
                    for k in STEP_KEYS:
                        self.loss_map[k].append(metrics[k])
                    self._watch(step, bool(metrics["skipped"]))
                    if self._validation_due(step):
                        stopped_early = self._validate(step, metrics)
                    self.host.on_step_end(self, step, metrics)
                    if self.write_files and out.save_every and step % out.save_every == 0:
                        self.save_checkpoint(step)
                    if stopped_early:
                        break
                    if self._stop_signal is not None:
                        self._interrupted(step)
            result = self.finish()
            result.stopped_early = stopped_early
        finally:
            # also when training stops with an error: loggers close, displays stop
            self.host.on_train_end(self, result)
        return result

    # -- validation -------------------------------------------------------------------
    def _validation_due(self, step: int) -> bool:
        every = self.config.validation.every
        return self.pipe.validation is not None and every is not None and (
            step % every == 0 or step == self.total_steps)

    def validation_loss(self) -> float:
        """Mean loss over the held-out set with fixed noise and timesteps: the same
        number for the same adapter, whenever and however often it is computed."""
        data = self.pipe.validation
        saved = self.noise_gen
        self.noise_gen = make_generator(self.config.training.seed, "validation")
        total, n = 0.0, len(data)
        try:
            with torch.no_grad():
                for start in range(0, n, self.config.training.batch_size):
                    idx = torch.arange(start, min(n, start + self.config.training.batch_size))
                    total += float(self.micro_step(idx, data)) * len(idx)
        finally:
            self.noise_gen = saved
        return total / n

    def _validate(self, step: int, metrics: dict[str, float]) -> bool:
        """Record the validation loss (also in ``metrics``); return True when early
        stopping says stop."""
        value = self.validation_loss()
        self.loss_map.setdefault("val_loss", []).append(value)
        self.loss_map.setdefault("val_loss_step", []).append(step)
        metrics["val_loss"] = value
        stop_cfg = self.config.early_stop
        if self.best_val is None or value < self.best_val - stop_cfg.min_delta:
            self.best_val, self.since_best = value, 0
            if self.config.output.keep_best and self.write_files:
                path = self.output_dir / f"{self.config.output.name}.best.safetensors"
                meta = self.metadata() | {"loraengine.val_loss": repr(value),
                                          "loraengine.best_step": str(step)}
                save_lora(path, self.lora_tensors(), meta)
                self.host.on_save(self, str(path), "best")
        else:
            self.since_best += 1
        return stop_cfg.patience is not None and self.since_best >= stop_cfg.patience

    @property
    def steps_done(self) -> int:
        return self.pipe.previous_steps + len(self.loss_map["loss"])

    def lora_tensors(self) -> dict[str, torch.Tensor]:
        pipe = self.pipe
        exporter_name = self.config.adapter.exporter or pipe.loaded.default_exporter
        exporter = self.host.registry.get("exporter", exporter_name)
        return exporter.to_file(pipe.network.file_modules(pipe.save_dtype))

    def metadata(self) -> dict[str, str]:
        """The file's metadata, from the adapters as trained (a continued file keeps its
        own rank and alpha) and the spec's own notes."""
        cfg = self.config
        spec = self.pipe.adapter_spec
        layers = [layer for _, layer in self.pipe.network.items()]
        ranks = sorted({layer.rank for layer in layers}) or [cfg.adapter.rank]
        alphas = sorted({layer.alpha for layer in layers}) or [
            cfg.adapter.alpha if cfg.adapter.alpha is not None else cfg.adapter.rank]
        extra = spec.file_metadata(cfg.adapter) if spec.file_metadata else {}
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
        }

    def finish(self) -> TrainResult:
        if callable(getattr(self.pipe.optimizer, "eval", None)):
            self.pipe.optimizer.eval()  # schedule-free optimizers: save the averaged x
        tensors = self.lora_tensors()
        result = TrainResult(tensors, {k: list(v) for k, v in self.loss_map.items()},
                             self.steps_done)
        if not self.write_files:
            return result
        out, name = self.output_dir, self.config.output.name
        out.mkdir(parents=True, exist_ok=True)
        lora_path = out / f"{name}.safetensors"
        save_lora(lora_path, tensors, self.metadata())
        result.path = lora_path
        result.files["lora"] = lora_path
        self.host.on_save(self, str(lora_path), "lora")
        for recipe in self.pipe.recipes:  # other versions of the adapter, e.g. its EMA
            for suffix, swapped in recipe.variants().items():
                with swapped():
                    variant_path = out / f"{name}.{suffix}.safetensors"
                    save_lora(variant_path, self.lora_tensors(), self.metadata())
                result.files[suffix] = variant_path
                self.host.on_save(self, str(variant_path), suffix)
        loss_path = out / f"{name}.loss.json"
        write_text_atomic(loss_path, json.dumps(_finite_or_null(result.loss_map), indent=1))
        result.files["loss_map"] = loss_path
        self.host.on_save(self, str(loss_path), "loss_map")
        if self.config.output.plot:
            from loraengine.plugins.outputs.plot import plot_loss

            plot_path = out / f"{name}.loss.png"
            plot_loss(result.loss_map, plot_path, title=name)
            result.files["plot"] = plot_path
            self.host.on_save(self, str(plot_path), "plot")
        return result



def _finite_or_null(loss_map: dict[str, list[float]]) -> dict[str, list[float | None]]:
    """The loss map as strict JSON: a skipped step's NaN/inf loss becomes null."""
    return {k: [v if not isinstance(v, float) or math.isfinite(v) else None for v in vals]
            for k, vals in loss_map.items()}
