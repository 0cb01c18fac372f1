"""``loraengine sample``: render images from a model with an adapter file applied.

The model is a local diffusers pipeline or model folder, a single-file checkpoint (with
``--family``), or a training config whose ``model`` section says what to load. Prompts
are a conditioning ``.safetensors`` (``cond`` plus family extras, as ``loraengine
prepare`` writes) or a ``.txt`` file with one prompt per line, encoded with the model's
own text encoders. The adapter goes on with ``loraengine.apply``; images are decoded by
the pipeline's VAE when it has one. Written to ``--out``: ``grid.png`` (rows: prompts,
columns: seeds), ``image_<p>_<j>.png`` per image and, with ``--lora``, ``compare.png``
(base beside adapted, same noise).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import torch

from loraengine.core.errors import ConfigError, DataError
from loraengine.tools.sample import logic as S

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def detect_family(path: Path, registry: Any) -> str:
    """The model family of a local folder: the first family that recognises it, else
    ``diffusers`` for any diffusers model folder."""
    for spec in registry.specs("model"):
        if spec.detect is not None and path.is_dir():
            try:
                if spec.detect(path):
                    return spec.name
            except Exception:  # a family's probe must not stop the others
                continue
    if (path / "model_index.json").exists() or (path / "config.json").exists():
        return "diffusers"
    raise ConfigError(f"--family: cannot tell the model family of {path}; pass --family "
                      f"(installed: {', '.join(registry.names('model'))})")


def load_model_for_sampling(model: Path, family: str | None, host: Any, device: str,
                            dtype: str) -> tuple[Any, Any]:
    """(LoadedModel ready for inference, its validated config)."""
    from loraengine.core.build import load_model, resolve_device
    from loraengine.core.config.root import parse_config, read_yaml

    model = Path(model)
    if model.suffix.lower() in (".yaml", ".yml"):
        raw, _ = read_yaml(model)
        if "model" not in raw:
            raise ConfigError(f"--model: {model} has no model section")
        section, base_dir = dict(raw["model"]), model.resolve().parent
        if family is not None:
            section["family"] = family
    else:
        if not model.exists():
            raise DataError(f"--model: {model} does not exist")
        section = {"family": family or detect_family(model, host.registry),
                   "path": str(model.resolve())}
        base_dir = Path.cwd()
    cfg = parse_config({"model": section, "training": {"device": device}}, host.registry,
                       base_dir=base_dir)
    loaded = load_model(cfg, host, base_dir=base_dir)
    dev = resolve_device(device)
    loaded.module.requires_grad_(False).eval().to(dev, DTYPES[dtype])
    return loaded, cfg


def read_prompts(path: Path, loaded: Any, host: Any, what: str = "--prompts"
                 ) -> dict[str, torch.Tensor]:
    """Conditioning from a ``.safetensors`` file, or encoded from a ``.txt`` file."""
    path = Path(path)
    if path.suffix.lower() != ".txt":
        cond = S.read_conditioning(path, loaded, what)
        n = int(cond[loaded.cond_keys[0]].shape[0])
        return {k: v for k, v in cond.items() if v.ndim and v.shape[0] == n}
    if not path.exists():
        raise DataError(f"{what} file not found: {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    prompts = [line.strip() for line in lines if line.strip()] or [""]
    spec = host.registry.get("model", loaded.family)
    root = loaded.pipeline_root
    if spec.make_encoder is None or not root:
        raise ConfigError(f"{what}: the {loaded.family} model has no text encoders to "
                          f"read {path.name}; give a conditioning .safetensors instead "
                          f"(loraengine prepare writes one)")
    encoder = spec.make_encoder(Path(root), {"device": "cpu", "dtype": "fp32"})
    return {k: v.float() if v.is_floating_point() else v
            for k, v in encoder.encode_captions(prompts).items()}


def latent_shape(loaded: Any, size: tuple[int, int] | None, vae: Any) -> tuple[int, int, int]:
    """(channels, height, width) of the latents to sample."""
    config = getattr(loaded.module, "config", None)
    channels = None
    if vae is not None:
        channels = getattr(vae.config, "latent_channels", None)
    if channels is None and config is not None:
        channels = getattr(config, "in_channels", None)
    if channels is None:
        raise ConfigError("--channels: cannot tell the latent channels of this model")
    if size is None and config is not None:
        side = getattr(config, "sample_size", None)
        if side is not None:
            size = (side, side) if isinstance(side, int) else tuple(side)  # type: ignore[assignment]
    if size is None:
        raise ConfigError("--size: required for this model (latent height and width)")
    if min(size) < 1:
        raise ConfigError(f"--size: height and width must be positive, got {list(size)}")
    return int(channels), int(size[0]), int(size[1])


def sample_to_folder(model: Path, prompts: Path, out: Path, *, host: Any,
                     lora: Path | None = None, family: str | None = None,
                     strength: float = 1.0, mode: str = "bypass",
                     negative: Path | None = None, settings: S.SampleSettings | None = None,
                     per_prompt: int = 1, size: tuple[int, int] | None = None,
                     compare: bool = True, device: str = "auto", dtype: str = "fp32",
                     progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Everything ``loraengine sample`` does; returns what was written."""
    from loraengine.inference import apply

    settings = settings or S.SampleSettings()
    loaded, _ = load_model_for_sampling(model, family, host, device, dtype)
    cond = read_prompts(prompts, loaded, host)
    neg = None
    if negative is not None:
        neg = read_prompts(negative, loaded, host, "--negative")
        neg = {k: v[:1] for k, v in neg.items() if k in cond}
    vae = S.find_vae(loaded)
    shape = latent_shape(loaded, size, vae)

    def render() -> torch.Tensor:
        latents = S.sample_latents(loaded, cond, shape, settings, host.registry,
                                   negative=neg, per_prompt=per_prompt, progress=progress)
        return S.decode(loaded, latents, vae)

    out = Path(out)
    written: dict[str, Any] = {"family": loaded.family, "shape": list(shape)}
    base = render() if lora is not None and compare else None
    if lora is not None:
        handle = apply(loaded.module, lora, strength=strength, mode=mode,  # type: ignore[arg-type]
                       host=host)
        written["modules"] = len(handle.modules)
    images = render() if lora is not None or base is None else base
    written["grid"] = S.save_png(S.grid_image(images, per_prompt), out / "grid.png")
    for i in range(images.shape[0]):
        p, j = divmod(i, per_prompt)
        S.save_png(S.grid_image(images[i:i + 1], 1, pad=0, min_tile=1),
                   out / f"image_{p}_{j}.png")
    written["images"] = int(images.shape[0])
    if base is not None:
        pair = S.side_by_side(S.grid_image(base, per_prompt), S.grid_image(images, per_prompt))
        written["compare"] = S.save_png(pair, out / "compare.png")
    return written


def _parse_options(items: tuple[str, ...]) -> dict[str, Any]:
    import yaml

    options: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--sampler-option {item!r}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        options[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return options


@click.command("sample")
@click.option("--model", "model_path", required=True, type=click.Path(path_type=Path),
              help="A diffusers pipeline or model folder, a single-file checkpoint (with "
              "--family) or a training config whose model section is used.")
@click.option("--lora", type=click.Path(path_type=Path), default=None,
              help="The adapter file to apply (omit to sample the base model).")
@click.option("--prompts", required=True, type=click.Path(path_type=Path),
              help="Conditioning .safetensors (cond [P,L,D] + family extras) or a .txt "
              "file, one prompt per line.")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder for grid.png, compare.png and the single images.")
@click.option("--family", default=None, help="Model family (default: detected).")
@click.option("--negative", type=click.Path(path_type=Path), default=None,
              help="Negative conditioning for guidance (.safetensors or .txt); default: "
              "an empty conditioning.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--steps", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--guidance", type=click.FloatRange(0, 100), default=1.0, show_default=True,
              help="Classifier-free guidance scale (1: none).")
@click.option("--sampler", default="auto", show_default=True,
              help="ddim, euler or a plugin's; auto picks by the model's prediction type.")
@click.option("--sampler-option", "sampler_options", multiple=True, metavar="KEY=VALUE",
              help="A sampler option, e.g. eta=0.5 or karras=true.")
@click.option("--per-prompt", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Images per prompt (one seed each).")
@click.option("--size", type=(int, int), default=None, metavar="H W",
              help="Latent height and width (default: the model's sample size).")
@click.option("--strength", type=float, default=1.0, show_default=True)
@click.option("--mode", type=click.Choice(["bypass", "merge"]), default="bypass",
              show_default=True, help="How the adapter goes on the model.")
@click.option("--compare/--no-compare", default=True, show_default=True,
              help="With --lora, also render the base model to compare.png.")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="fp32", show_default=True)
@click.pass_obj
def sample(state: Any, model_path: Path, lora: Path | None, prompts: Path, out: Path,
           family: str | None, negative: Path | None, seed: int, steps: int, guidance: float,
           sampler: str, sampler_options: tuple[str, ...], per_prompt: int,
           size: tuple[int, int] | None, strength: float, mode: str, compare: bool,
           device: str, dtype: str) -> None:
    """Render prompts with a model and (optionally) an adapter file."""
    from loraengine.cli.common import reports_errors

    def run() -> dict[str, Any]:
        settings = S.SampleSettings(steps=steps, guidance=guidance, seed=seed,
                                    sampler=sampler,
                                    sampler_options=_parse_options(sampler_options),
                                    sampler_key="--sampler", options_key="--sampler-option",
                                    steps_key="--steps")
        bar = _progress_bar()
        try:
            return sample_to_folder(
                model_path, prompts, out, host=state.host, lora=lora, family=family,
                strength=strength, mode=mode, negative=negative, settings=settings,
                per_prompt=per_prompt, size=size, compare=compare, device=device,
                dtype=dtype, progress=bar.update if bar else None)
        finally:
            if bar is not None:
                bar.close()

    info = reports_errors(run)()
    click.echo(f"{info['images']} image(s) of a {info['family']} model "
               f"(latents {'x'.join(map(str, info['shape']))}) -> {info['grid']}")
    if "compare" in info:
        click.echo(f"base vs adapted ({info['modules']} adapted modules) -> {info['compare']}")


class _Bar:
    """A rich progress bar over sampler steps (only on a terminal)."""

    def __init__(self) -> None:
        from rich.progress import Progress

        self.progress = Progress(transient=True)
        self.task = self.progress.add_task("sampling", total=None)
        self.progress.start()

    def update(self, done: int, total: int) -> None:
        self.progress.update(self.task, completed=done, total=total)

    def close(self) -> None:
        self.progress.stop()


def _progress_bar() -> _Bar | None:
    import sys

    return _Bar() if sys.stderr.isatty() else None
