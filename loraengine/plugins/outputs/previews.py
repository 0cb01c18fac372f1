"""Preview images while training: the lifecycle-hook plugin behind ``output.samples``.

Every ``every`` steps and after the last one it renders the same prompts from the same
noise with the adapter as it is then, and writes ``<dir>/<name>.samples/step_<n>.png``
(rows: prompts, columns: seeds). At the end, ``compare.png`` puts the base model
(adapters at multiplier 0) beside the adapted one. Sampling runs under ``no_grad``
from its own generators, so it never changes what is trained. Nothing happens when
``output.samples`` is unset or the run writes no files.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from loraengine.core.plugins.hookspecs import hookimpl
from loraengine.core.plugins.run import RunResult, RunView
from loraengine.tools.sample import logic as S


class Preview:
    """Renders one run's preview grids. Registered as a plugin of its own for the
    length of the run, so the per-run state lives here and nowhere else."""

    def __init__(self, run: RunView, samples: Any):
        self.run = run
        self.samples = samples
        self.loaded = run.loaded
        self.folder = Path(run.output_dir) / f"{run.config.output.name}.samples"
        self.settings = S.SampleSettings(
            steps=samples.steps, guidance=samples.guidance, seed=samples.seed,
            sampler=samples.sampler, sampler_options=samples.sampler_options)
        # Fails here, before the first step, when the sampler does not fit the model.
        S.resolve_sampler(run.registry, samples.sampler, samples.sampler_options,
                          self.loaded.schedule)
        self.cond = self._prompts()
        self.negative = None
        if samples.negative is not None:
            self.negative = S.read_conditioning(samples.negative, self.loaded,
                                                "output.samples.negative")
            self.negative = {k: v[:1] for k, v in self.negative.items() if k in self.cond}
        self.shape = self._shape()
        self.base: torch.Tensor | None = None
        self.last_step: int | None = None
        self.last_images: torch.Tensor | None = None
        self.seconds = 0.0

    def _prompts(self) -> dict[str, torch.Tensor]:
        samples = self.samples
        if samples.conditioning is not None:
            cond = S.read_conditioning(samples.conditioning, self.loaded,
                                       "output.samples.conditioning")
            n = int(cond[self.loaded.cond_keys[0]].shape[0])
            return {k: v[:samples.count] for k, v in cond.items()
                    if v.ndim and v.shape[0] == n}
        return S.distinct_entries(self.run.dataset.cond, samples.count)

    def _shape(self) -> tuple[int, ...]:
        shape = tuple(int(s) for s in self.run.dataset.latents.shape[1:])
        if self.samples.size is not None:
            shape = (*shape[:-2], *self.samples.size)
        return shape

    def render(self) -> torch.Tensor:
        """Images ``[P·per_prompt, 3, H, W]`` in [0, 1] from the model as it is now."""
        t0 = time.perf_counter()
        run = self.run
        with S.eval_mode(run.network):
            latents = S.sample_latents(
                self.loaded, self.cond, self.shape, self.settings, run.registry,
                negative=self.negative, per_prompt=self.samples.per_prompt,
                device=run.device, dtype=run.compute_dtype)
        images = S.decode(self.loaded, latents, S.find_vae(self.loaded))
        self.seconds += time.perf_counter() - t0
        return images

    def grid(self, images: torch.Tensor) -> Any:
        return S.grid_image(images, self.samples.per_prompt)

    def write_step(self, step: int) -> Path:
        images = self.render()
        path = S.save_png(self.grid(images), self.folder / f"step_{step}.png")
        self.last_step, self.last_images = step, images
        self.run.record_file("samples", path)
        return path

    def write_compare(self) -> Path:
        if self.base is None:
            with S.adapters_off(self.run.network):
                self.base = self.render()
        assert self.last_images is not None
        image = S.side_by_side(self.grid(self.base), self.grid(self.last_images))
        path = S.save_png(image, self.folder / "compare.png")
        self.run.record_file("samples", path)
        return path

    # -- this run's hooks ---------------------------------------------------------------
    # After every other plugin's step end (a logger has taken the step's number when
    # the grid it is shown is announced), but before every other plugin's train end:
    # the last grid and compare.png are announced while the loggers are still open.
    @hookimpl(trylast=True)
    def loraengine_on_step_end(self, run: RunView, step: int, metrics: dict[str, float]
                               ) -> None:
        if run is not self.run or "loss" not in metrics:  # validation comes without loss
            return
        every = self.samples.every
        if every is not None and step % every == 0:
            self.write_step(step)

    @hookimpl(tryfirst=True)
    def loraengine_on_train_end(self, run: RunView, result: RunResult | None) -> None:
        if run is not self.run or result is None:  # nothing to render after a failure
            return
        final = len(run.loss_map["loss"])
        if self.last_step != final:
            self.write_step(final)
        if self.samples.compare:
            self.write_compare()
        result.files["samples"] = self.folder


@hookimpl
def loraengine_on_train_start(run: RunView) -> None:
    samples = getattr(run.config.output, "samples", None)
    if samples is None or not run.writes_files:
        return
    run.register(Preview(run, samples))
