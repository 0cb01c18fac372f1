"""The training loop: micro-batches, accumulation, optimizer steps, outputs."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loraengine import __version__
from loraengine.core.config import config_to_dict
from loraengine.core.lora_io import save_lora, write_text_atomic
from loraengine.core.orchestrator import Pipeline
from loraengine.core.seeding import make_generator


@dataclass
class TrainResult:
    """The node's three outputs: the adapter tensors (file keys), the loss map and the
    total step count (including the steps of ``adapter.existing``)."""

    lora: dict[str, torch.Tensor]
    loss_map: dict[str, list[float]]
    steps: int
    path: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)


class Trainer:
    """Runs a built pipeline. Exposes ``config``, ``total_steps``, ``start_step`` and
    ``output_dir`` to lifecycle hooks."""

    def __init__(self, pipeline: Pipeline, *, write_files: bool = True):
        self.pipe = pipeline
        self.config = pipeline.config
        self.host = pipeline.host
        self.total_steps = int(self.config.training.steps)
        self.start_step = 0
        self.output_dir = Path(self.config.output.dir)
        self.write_files = write_files
        seed = self.config.training.seed
        from loraengine.core.data import IndexStream

        self.indices = IndexStream(len(pipeline.dataset), make_generator(seed, "data"))
        self.noise_gen = make_generator(seed, "noise")
        self.loss_map: dict[str, list[float]] = {"loss": [], "lr": [], "skipped": []}
        self.scaler = self._make_scaler()

    def _make_scaler(self) -> Any:
        if self.pipe.compute_dtype != torch.float16:
            return None
        return torch.amp.GradScaler(self.pipe.device.type)

    # -- one micro-batch ------------------------------------------------------------
    def _noise_and_timesteps(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample draws, so a batch of k·b sees exactly the draws of k batches of b."""
        schedule = self.pipe.loaded.schedule
        noise = torch.stack([torch.randn(x0.shape[1:], generator=self.noise_gen)
                             for _ in range(x0.shape[0])])
        t = torch.stack([schedule.sample_timestep(self.noise_gen) for _ in range(x0.shape[0])])
        return noise, t

    def micro_step(self, indices: torch.Tensor) -> torch.Tensor:
        """Forward one micro-batch and return its (unscaled) mean loss."""
        pipe = self.pipe
        schedule = pipe.loaded.schedule
        x0, cond = pipe.dataset.batch(indices)
        x0 = x0.float()
        noise, t = self._noise_and_timesteps(x0)
        x_t = schedule.add_noise(x0, noise, t)
        dev, dt = pipe.device, pipe.compute_dtype
        cond = {k: v.to(dev, dt) if v.is_floating_point() else v.to(dev)
                for k, v in cond.items()}
        pred = pipe.loaded.predict(pipe.model, x_t.to(dev, dt),
                                   schedule.model_timesteps(t).to(dev), cond).float()
        x0, noise, t, x_t = x0.to(dev), noise.to(dev), t.to(dev), x_t.to(dev)
        if self.config.loss.target == "x0":
            pred, target = schedule.predicted_x0(pred, x_t, t), x0
        else:
            target = schedule.target(x0, noise, t)
        return pipe.loss_fn(pred, target.float()).mean()

    # -- one optimizer step ---------------------------------------------------------
    def step(self) -> dict[str, float]:
        pipe, tcfg = self.pipe, self.config.training
        accum = tcfg.grad_accumulation_steps
        pipe.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        finite = True
        for _ in range(accum):
            loss = self.micro_step(self.indices.take(tcfg.batch_size))
            value = float(loss.detach())
            if not math.isfinite(value):
                finite = False
            total += value / accum
            scaled = loss / accum
            if self.scaler is not None:
                scaled = self.scaler.scale(scaled)
            scaled.backward()
        params = pipe.trainable_parameters()
        if self.scaler is not None:
            self.scaler.unscale_(pipe.optimizer)
        grads_ok = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)
        lr = float(pipe.optimizer.param_groups[0]["lr"])
        skipped = not (finite and grads_ok)
        if tcfg.max_grad_norm is not None and not skipped:
            torch.nn.utils.clip_grad_norm_(params, tcfg.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(pipe.optimizer)  # the scaler skips non-finite steps itself
            self.scaler.update()
        elif not skipped:
            pipe.optimizer.step()
        pipe.optimizer.zero_grad(set_to_none=True)
        pipe.lr_scheduler.step()
        return {"loss": total, "lr": lr, "skipped": float(skipped)}

    # -- the run ----------------------------------------------------------------------
    def run(self) -> TrainResult:
        self.host.on_train_start(self)
        self.pipe.network.train()
        for step in range(self.start_step, self.total_steps):
            metrics = self.step()
            for k in self.loss_map:
                self.loss_map[k].append(metrics[k])
            self.host.on_step_end(self, step + 1, metrics)
        result = self.finish()
        self.host.on_train_end(self, result)
        return result

    @property
    def steps_done(self) -> int:
        return self.pipe.previous_steps + len(self.loss_map["loss"])

    def lora_tensors(self) -> dict[str, torch.Tensor]:
        pipe = self.pipe
        exporter_name = self.config.adapter.exporter or pipe.loaded.default_exporter
        exporter = self.host.registry.get("exporter", exporter_name)
        return exporter.to_file(pipe.network.file_modules(pipe.save_dtype))

    def metadata(self) -> dict[str, str]:
        cfg = self.config
        alpha = cfg.adapter.alpha if cfg.adapter.alpha is not None else cfg.adapter.rank
        spec = self.pipe.adapter_spec
        return {
            "ss_network_module": spec.network_module or f"loraengine.{spec.name}",
            "ss_network_dim": str(cfg.adapter.rank),
            "ss_network_alpha": str(alpha),
            "ss_network_args": json.dumps({"algo": spec.name}),
            "ss_steps": str(self.steps_done),
            "ss_base_model_version": self.pipe.loaded.base_model_version,
            "loraengine.version": __version__,
            "loraengine.algorithm": spec.name,
            "loraengine.steps": str(self.steps_done),
            "loraengine.config": json.dumps(config_to_dict(cfg)),
        }

    def finish(self) -> TrainResult:
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
        loss_path = out / f"{name}.loss.json"
        write_text_atomic(loss_path, json.dumps(result.loss_map, indent=1))
        result.files["loss_map"] = loss_path
        self.host.on_save(self, str(loss_path), "loss_map")
        if self.config.output.plot:
            from loraengine.core.plot import plot_loss

            plot_path = out / f"{name}.loss.png"
            plot_loss(result.loss_map, plot_path, title=name)
            result.files["plot"] = plot_path
            self.host.on_save(self, str(plot_path), "plot")
        return result

