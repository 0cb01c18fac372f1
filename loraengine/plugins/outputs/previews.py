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
import weakref
from pathlib import Path
from typing import Any

import torch

from loraengine.core.plugins.hookspecs import hookimpl
from loraengine.tools.sample import logic as S

#: Preview state per running trainer.
_ACTIVE: weakref.WeakKeyDictionary[Any, Preview] = weakref.WeakKeyDictionary()


class Preview:
    """Renders one run's preview grids."""

    def __init__(self, run: Any, samples: Any):
        self.run = run
        self.samples = samples
        pipe = run.pipe
        self.pipe = pipe
        self.loaded = pipe.loaded
        self.folder = Path(run.output_dir) / f"{run.config.output.name}.samples"
        self.settings = S.SampleSettings(
            steps=samples.steps, guidance=samples.guidance, seed=samples.seed,
            sampler=samples.sampler, sampler_options=samples.sampler_options)
        # Fails here, before the first step, when the sampler does not fit the model.
        S.resolve_sampler(run.host.registry, samples.sampler, samples.sampler_options,
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
        return S.distinct_entries(self.pipe.dataset.cond, samples.count)

    def _shape(self) -> tuple[int, ...]:
        shape = tuple(int(s) for s in self.pipe.dataset.latents.shape[1:])
        if self.samples.size is not None:
            shape = (*shape[:-2], *self.samples.size)
        return shape

    def render(self) -> torch.Tensor:
        """Images ``[P·per_prompt, 3, H, W]`` in [0, 1] from the model as it is now."""
        t0 = time.perf_counter()
        with S.eval_mode(self.pipe.network):
            latents = S.sample_latents(
                self.loaded, self.cond, self.shape, self.settings, self.run.host.registry,
                negative=self.negative, per_prompt=self.samples.per_prompt,
                device=self.pipe.device, dtype=self.pipe.compute_dtype)
        images = S.decode(self.loaded, latents, S.find_vae(self.loaded))
        self.seconds += time.perf_counter() - t0
        return images

    def grid(self, images: torch.Tensor) -> Any:
        return S.grid_image(images, self.samples.per_prompt)

    def write_step(self, step: int) -> Path:
        images = self.render()
        path = S.save_png(self.grid(images), self.folder / f"step_{step}.png")
        self.last_step, self.last_images = step, images
        self.run.host.on_save(self.run, str(path), "samples")
        return path

    def write_compare(self) -> Path:
        if self.base is None:
            with S.adapters_off(self.pipe.network):
                self.base = self.render()
        assert self.last_images is not None
        image = S.side_by_side(self.grid(self.base), self.grid(self.last_images))
        path = S.save_png(image, self.folder / "compare.png")
        self.run.host.on_save(self.run, str(path), "samples")
        return path


def _steps_done(run: Any) -> int:
    return len(run.loss_map["loss"])


@hookimpl
def loraengine_on_train_start(run: Any) -> None:
    samples = getattr(run.config.output, "samples", None)
    if samples is None or not getattr(run, "write_files", False) or not hasattr(run, "pipe"):
        return
    _ACTIVE[run] = Preview(run, samples)


@hookimpl
def loraengine_on_step_end(run: Any, step: int, metrics: dict[str, float]) -> None:
    preview = _ACTIVE.get(run)
    if preview is None or "loss" not in metrics:  # validation reports come without loss
        return
    every = preview.samples.every
    if every is not None and step % every == 0:
        preview.write_step(step)


@hookimpl
def loraengine_on_train_end(run: Any, result: Any) -> None:
    preview = _ACTIVE.pop(run, None)
    if preview is None or result is None:  # nothing to render after a failed run
        return
    final = _steps_done(run)
    if preview.last_step != final:
        preview.write_step(final)
    if preview.samples.compare:
        preview.write_compare()
    files = getattr(result, "files", None)
    if isinstance(files, dict):
        files["samples"] = preview.folder
