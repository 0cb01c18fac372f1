"""Render images from a model: prompts' conditioning in, a PNG grid out.

Used by the training previews (``output.samples``) and ``loraengine sample`` (whose
model loading, prompt reading and folder writing are at the end of this module). Each
image's starting noise comes from its own generator, derived from the seed and the
image's index, so the same seed gives the same images whatever else runs, and grids
from different training steps show the same noise. Latents are decoded with the
model's VAE when it has one; otherwise their first three channels are shown as RGB
(values in [-1, 1], as pixel-space models produce).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from loraengine.core.data import stack_padded
from loraengine.core.devices import DTYPES, resolve_device
from loraengine.core.errors import ConfigError, DataError
from loraengine.core.files import read_text, write_atomic
from loraengine.core.model import LoadedModel
from loraengine.core.options import MAX_LATENT_SIDE
from loraengine.core.samplers import resolve_sampler
from loraengine.core.schedule import NoiseSchedule
from loraengine.core.seeding import make_generator

if TYPE_CHECKING:
    from loraengine.inference import ApplyMode

#: Conditioning tensors an "empty" negative zeroes; others (ids, sizes) are kept.
TEXT_KEYS = ("cond", "pooled", "text_embeds")


@dataclass
class SampleSettings:
    """How to sample. ``sampler`` is a plugin name or ``auto``."""

    steps: int = 20
    guidance: float = 1.0
    seed: int = 0
    sampler: str = "auto"
    sampler_options: Mapping[str, Any] | None = None
    batch_size: int = 16
    #: How errors name these settings: config keys here, option names in the CLI.
    sampler_key: str = "output.samples.sampler"
    options_key: str = "output.samples.sampler_options"
    steps_key: str = "output.samples.steps"


# -- conditioning -------------------------------------------------------------------------

def read_conditioning(path: Path, loaded: LoadedModel, what: str) -> dict[str, torch.Tensor]:
    """A conditioning file's tensors, checked for the family's keys."""
    from loraengine.core.data import read_safetensors

    tensors = read_safetensors(Path(path), what)
    missing = [k for k in loaded.cond_keys if k not in tensors]
    if missing:
        raise DataError(f"{what} file {path}: no tensor named {missing[0]!r} (found: "
                        f"{', '.join(sorted(tensors)) or 'none'})")
    return tensors


def distinct_entries(cond: Mapping[str, torch.Tensor], limit: int) -> dict[str, torch.Tensor]:
    """The first ``limit`` distinct entries of a conditioning set, in order."""
    n = int(next(iter(cond.values())).shape[0])
    seen: set[bytes] = set()
    keep: list[int] = []
    for i in range(n):
        sig = b"".join(v[i].detach().cpu().contiguous().numpy().tobytes()
                       for _, v in sorted(cond.items()))
        if sig not in seen:
            seen.add(sig)
            keep.append(i)
            if len(keep) == limit:
                break
    index = torch.tensor(keep)
    return {k: v[index] for k, v in cond.items()}


def empty_like(cond: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One "empty" conditioning: text embeddings zeroed, other tensors as the first
    prompt's."""
    return {k: (torch.zeros_like(v[:1]) if k in TEXT_KEYS else v[:1].clone())
            for k, v in cond.items()}


def _take(cond: Mapping[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: (v.expand(len(index), *v.shape[1:]) if v.shape[0] == 1 else v[index])
            for k, v in cond.items()}


# -- sampling -----------------------------------------------------------------------------

def _model_timesteps(schedule: NoiseSchedule, t: torch.Tensor, n: int) -> torch.Tensor:
    t = t.reshape(1).expand(n)
    if schedule.is_flow:
        return schedule.model_timesteps(t)
    if bool((t == t.round()).all()):
        return t.long()
    return t.float()  # a fractional DDPM timestep (e.g. Karras spacing)


def guided_model_fn(loaded: LoadedModel, cond: Mapping[str, torch.Tensor],
                    negative: Mapping[str, torch.Tensor] | None, guidance: float,
                    device: torch.device, dtype: torch.dtype
                    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``model_fn(x_t, t)`` for a sampler: the model's prediction for ``cond``, with
    classifier-free guidance ``uncond + g·(cond − uncond)`` when ``guidance != 1``."""
    def to(v: torch.Tensor) -> torch.Tensor:
        return v.to(device, dtype) if v.is_floating_point() else v.to(device)

    cond = {k: to(v) for k, v in cond.items()}
    guided = guidance != 1.0
    if guided:
        if negative is None:
            raise ValueError("guidance needs a negative conditioning")
        neg = {k: to(v) for k, v in negative.items()}
        # keys the negative lacks (SDXL's time_ids...) are the prompt's own; text of
        # another token count is zero-padded, with its mask (Qwen-Image, Z-Image)
        both = {k: stack_padded([neg.get(k, cond[k]), cond[k]], dim=1)
                if cond[k].ndim > 1 else torch.cat([neg.get(k, cond[k]), cond[k]])
                for k in cond}
    schedule = loaded.schedule

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        xin = x.to(device, dtype)
        if not guided:
            mt = _model_timesteps(schedule, t, n).to(device)
            return loaded.predict(loaded.module, xin, mt, cond).float().to(x.device)
        mt = _model_timesteps(schedule, t, 2 * n).to(device)
        out = loaded.predict(loaded.module, torch.cat([xin, xin]), mt, both).float()
        uncond, conditional = out.chunk(2)
        return (uncond + guidance * (conditional - uncond)).to(x.device)

    return model_fn


def start_noise(shape: Sequence[int], seed: int, count: int, first: int = 0
                ) -> torch.Tensor:
    """Unit noise ``[count, *shape]``; image ``i`` from its own generator."""
    return torch.stack([torch.randn(tuple(shape), generator=make_generator(seed, f"sample.{i}"))
                        for i in range(first, first + count)])


@torch.no_grad()
def sample_latents(loaded: LoadedModel, cond: Mapping[str, torch.Tensor], shape: Sequence[int],
                   settings: SampleSettings, registry: Any, *,
                   negative: Mapping[str, torch.Tensor] | None = None, per_prompt: int = 1,
                   device: torch.device | None = None, dtype: torch.dtype | None = None,
                   progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Sample ``per_prompt`` latents for each of the P prompts in ``cond`` (first
    dimension P): ``[P·per_prompt, *shape]`` in prompt-major order, float32 on the CPU.

    ``negative`` (one entry, or P) is the guidance's unconditional input; by default an
    empty conditioning. ``progress(done, total)`` is called after each model step."""
    sample = resolve_sampler(registry, settings.sampler, settings.sampler_options,
                             loaded.schedule, settings.sampler_key, settings.options_key)
    if not loaded.schedule.is_flow and settings.steps > loaded.schedule.num_timesteps:
        raise ConfigError(f"{settings.steps_key}: at most {loaded.schedule.num_timesteps} "
                          f"for this schedule, got {settings.steps}")
    params = [p for p in loaded.module.parameters() if p.is_floating_point()]
    device = device or (params[0].device if params else torch.device("cpu"))
    dtype = dtype or (params[0].dtype if params else torch.float32)
    n_prompts = int(next(iter(cond.values())).shape[0])
    if negative is None and settings.guidance != 1.0:
        negative = empty_like(cond)
    total = n_prompts * per_prompt
    prompt_of = torch.arange(total) // per_prompt
    chunks = range(0, total, max(1, settings.batch_size))
    n_steps = settings.steps * len(chunks)
    done = 0
    out = []
    for start in chunks:
        idx = torch.arange(start, min(total, start + settings.batch_size))
        fn = guided_model_fn(loaded, _take(cond, prompt_of[idx]),
                             None if negative is None else _take(negative, prompt_of[idx]),
                             settings.guidance, device, dtype)

        def counted(x: torch.Tensor, t: torch.Tensor, fn: Any = fn) -> torch.Tensor:
            nonlocal done
            result = fn(x, t)
            done += 1
            if progress is not None:
                progress(done, n_steps)
            return result

        noise = start_noise(shape, settings.seed, len(idx), start)
        # stochastic samplers draw each image's noise from that image's own generator
        gens = [make_generator(settings.seed, f"sampler.{int(i)}") for i in idx]
        out.append(sample(counted, noise, loaded.schedule, settings.steps, gens).float().cpu())
    return torch.cat(out)


# -- decoding and grids -------------------------------------------------------------------

def find_vae(loaded: LoadedModel) -> Any | None:
    """The model's VAE: one the family attached (``loaded.vae``, a module or a loader), else the ``vae/`` folder of its pipeline, loaded from local
    files. ``None`` when there is none."""
    vae = loaded.vae
    if vae is not None and not hasattr(vae, "decode") and callable(vae):
        vae = vae()
        loaded.vae = vae  # load once per model
    if vae is None:
        root = loaded.pipeline_root
        folder = Path(root) / "vae" if root else None
        if folder is None or not (folder / "config.json").exists():
            return None
        import diffusers

        try:
            vae = diffusers.AutoencoderKL.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:  # a broken VAE folder should name itself
            raise DataError(f"{folder}: cannot load the VAE: {exc}") from None
        vae.eval().requires_grad_(False)
        loaded.vae = vae  # load once per model
    return vae


#: Frames a video preview's strip shows at most (evenly spaced, first and last kept).
STRIP_FRAMES = 8


@torch.no_grad()
def decode(loaded: LoadedModel, latents: torch.Tensor, vae: Any | None = None) -> torch.Tensor:
    """Latents -> RGB images ``[N,3,H,W]`` in [0, 1]. Video latents ``[N,C,T,H,W]``
    become frame strips, each sample's frames side by side: ``[N,3,H,F·W]``."""
    if vae is not None:
        p = next(vae.parameters())
        z = latents / loaded.vae_scale + loaded.vae_shift
        frames = 0
        if z.ndim == 5 and not getattr(vae, "decodes_video", False):
            # an image VAE decodes each frame on its own
            frames = int(z.shape[2])
            z = z.transpose(1, 2).reshape(-1, *z.shape[1:2], *z.shape[3:])
        pixels = torch.cat([vae.decode(z[i:i + 8].to(p.device, p.dtype)).sample.float().cpu()
                            for i in range(0, z.shape[0], 8)])
        if frames:
            pixels = pixels.reshape(-1, frames, *pixels.shape[1:]).transpose(1, 2)
    else:
        pixels = latents[:, :3]
        if pixels.shape[1] < 3:
            pixels = pixels[:, :1].expand(-1, 3, *pixels.shape[2:])
    if pixels.ndim == 5:
        pixels = frame_strip(pixels)
    return ((pixels.float() + 1) / 2).clamp(0, 1)


def frame_strip(video: torch.Tensor, limit: int = STRIP_FRAMES) -> torch.Tensor:
    """``[N,3,T,H,W]`` -> ``[N,3,H,F·W]``: at most ``limit`` evenly spaced frames of
    each sample, left to right."""
    t = int(video.shape[2])
    if t > limit:
        keep = torch.linspace(0, t - 1, limit).round().long()
        video = video[:, :, keep]
    n, c, f, h, w = video.shape
    return video.permute(0, 1, 3, 2, 4).reshape(n, c, h, f * w)


def grid_image(images: torch.Tensor, columns: int, *, pad: int = 2, min_tile: int = 64,
               row_labels: Sequence[str] | None = None) -> Any:
    """A PIL image of ``images`` ``[N,3,H,W]`` in [0, 1], ``columns`` per row, small
    images scaled up (nearest neighbour) to at least ``min_tile`` pixels."""
    from PIL import Image, ImageDraw

    n, _, h, w = images.shape
    scale = max(1, -(-min_tile // max(h, w)))
    th, tw = h * scale, w * scale
    rows = -(-n // columns)
    label_w = 0
    if row_labels:
        label_w = 8 + 6 * max(len(s) for s in row_labels)
    canvas = Image.new("RGB", (label_w + columns * (tw + pad) + pad, rows * (th + pad) + pad),
                       (255, 255, 255))
    tiles = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, c = divmod(i, columns)
        tile = Image.fromarray(tiles[i], "RGB").resize((tw, th), Image.Resampling.NEAREST)
        canvas.paste(tile, (label_w + pad + c * (tw + pad), pad + r * (th + pad)))
    if row_labels:
        draw = ImageDraw.Draw(canvas)
        for r, text in enumerate(row_labels):
            draw.text((4, pad + r * (th + pad) + th // 2 - 5), text, fill=(0, 0, 0))
    return canvas


def side_by_side(left: Any, right: Any, titles: tuple[str, str] = ("base", "adapted"),
                 gap: int = 12) -> Any:
    """Two grids next to each other under their titles."""
    from PIL import Image, ImageDraw

    top = 16
    width = left.width + gap + right.width
    canvas = Image.new("RGB", (width, top + max(left.height, right.height)), (255, 255, 255))
    canvas.paste(left, (0, top))
    canvas.paste(right, (left.width + gap, top))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), titles[0], fill=(0, 0, 0))
    draw.text((left.width + gap + 4, 2), titles[1], fill=(0, 0, 0))
    return canvas


def save_png(image: Any, path: Path) -> Path:
    """Write a PIL image as PNG atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda p: image.save(p, format="PNG"))
    return path


# -- adapters on and off --------------------------------------------------------------------

@contextmanager
def adapters_off(network: Any) -> Iterator[None]:
    """Run the base model: every adapter's multiplier is 0 (each algorithm scales its
    change linearly by it, so the layers compute exactly W), restored after. Unlike
    detaching, this leaves alone whatever other strategies wrapped around the layers."""
    saved = [(layer, layer.multiplier) for _, layer in network.items()]
    for layer, _ in saved:
        layer.multiplier = 0.0
    try:
        yield
    finally:
        for layer, value in saved:
            layer.multiplier = value


@contextmanager
def eval_mode(*modules: Any) -> Iterator[None]:
    """Modules in eval mode for sampling, their training flags restored after."""
    flags = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, flag in zip(modules, flags, strict=True):
            m.train(flag)


# -- loraengine sample: a model folder and prompts to images --------------------------------

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
    from loraengine.core.build import load_model
    from loraengine.core.config.root import parse_config
    from loraengine.core.config.source import read_yaml

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
    # before the config, whose errors would name training.device
    dev = resolve_device(device, key="--device", allow_meta=False)
    # the model is loaded in the dtype it samples in (not training.dtype's default)
    cfg = parse_config({"model": section, "training": {"device": device, "dtype": dtype}},
                       host.registry,
                       base_dir=base_dir)
    loaded = load_model(cfg, host, base_dir=base_dir)
    loaded.module.requires_grad_(False).eval().to(dev, DTYPES[dtype])
    return loaded, cfg


def read_prompts(path: Path, loaded: Any, host: Any, what: str = "--prompts"
                 ) -> dict[str, torch.Tensor]:
    """Conditioning from a ``.safetensors`` file, or encoded from a ``.txt`` file."""
    path = Path(path)
    if path.suffix.lower() != ".txt":
        cond = read_conditioning(path, loaded, what)
        n = int(cond[loaded.cond_keys[0]].shape[0])
        return {k: v for k, v in cond.items() if v.ndim and v.shape[0] == n}
    prompts = prompt_lines(path, what)
    spec = host.registry.get("model", loaded.family)
    root = loaded.pipeline_root
    if spec.make_encoder is None or not root:
        raise ConfigError(f"{what}: the {loaded.family} model has no text encoders to "
                          f"read {path.name}; give a conditioning .safetensors instead "
                          f"(loraengine prepare writes one)")
    check_text_encoders(Path(root), path, what)
    encoder = spec.make_encoder(Path(root), {"device": "cpu", "dtype": "fp32"})
    return {k: v.float() if v.is_floating_point() else v
            for k, v in encoder.encode_captions(prompts).items()}


def prompt_lines(path: Path, what: str = "--prompts") -> list[str]:
    """The prompts of a ``.txt`` file, one a line (blank lines skipped); a file that is
    not UTF-8 text is one line naming the byte offset and line of the first bad byte."""
    text = read_text(Path(path), what)
    return [line.strip() for line in text.splitlines() if line.strip()] or [""]


#: Pipeline components that turn a prompt into conditioning (by name prefix).
TEXT_COMPONENTS = ("text_encoder", "tokenizer")


def pipeline_folder(model: Path) -> Path | None:
    """The diffusers pipeline folder ``--model`` is or is a component folder of (as
    the families locate it), or ``None`` for a single file, a config or another folder."""
    model = Path(model)
    for folder in (model, model.parent):
        if model.is_dir() and (folder / "model_index.json").is_file():
            return folder
    return None


def missing_text_components(root: Path) -> list[str]:
    """The text encoders and tokenizers the pipeline at ``root`` needs to encode
    prompts that have no folder there: those its ``model_index.json`` lists (an entry
    saved as ``null``, such as an SDXL refiner's first text encoder, is not needed);
    an index that lists none misses the first text encoder and tokenizer."""
    import json

    try:
        index = json.loads((root / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []  # unreadable: the loader names what is wrong with it
    if not isinstance(index, dict):
        return []
    text = [name for name in sorted(index) if name.startswith(TEXT_COMPONENTS)]
    if not text:
        return [name for name in ("text_encoder", "tokenizer") if not (root / name).is_dir()]
    needed = [name for name in text
              if not (isinstance(index[name], list) and index[name][:1] == [None])]
    return [name for name in needed if not (root / name).is_dir()]


def check_text_encoders(root: Path, prompts: Path, what: str = "--prompts") -> None:
    """Refuse text ``prompts`` for the pipeline at ``root`` when the text encoders or
    tokenizers that encode them are not there: one line naming the folders, instead of
    what diffusers says when it fails to load them."""
    missing = missing_text_components(root)
    if missing:
        folders = ", ".join(f"{name}/" for name in missing)
        raise ConfigError(f"{what}: {prompts.name} holds text prompts, which need the "
                          f"model's text encoders, but {root} has no {folders}; give "
                          f"{what} a conditioning .safetensors instead (loraengine prepare "
                          f"writes one with a pipeline folder that has them)")


#: What ``sample_to_folder`` writes into its folder.
SAMPLE_FILES = re.compile(r"^(grid|compare|image_\d+_\d+)\.png$")


def check_out_folder(out: Path, overwrite: bool = False) -> None:
    """Before anything is loaded or rendered: ``--out`` is a folder that can be made or
    written, and holds no images of an earlier sample unless ``overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder (sample writes "
                          f"grid.png and the single images into a folder)")
    if out.is_dir():
        earlier = sorted(p.name for p in out.iterdir() if SAMPLE_FILES.match(p.name))
        if earlier and not overwrite:
            raise ConfigError(f"--out {out}: holds the images of an earlier sample "
                              f"({', '.join(earlier[:3])}{' ...' if len(earlier) > 3 else ''}"
                              f"); add --overwrite to replace them, or give another folder")
        if not os.access(out, os.W_OK | os.X_OK):
            raise ConfigError(f"--out {out}: the folder is not writable")
        return
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"--out {out}: {parent} is a file, so the folder cannot be made")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: cannot be made ({parent} is not writable)")


#: The largest latents ``loraengine sample`` renders: a side of ``--size``, ``--frames``,
#: and the values of one sample (1 GiB in fp32); beyond them the starting noise alone
#: would exhaust the memory.
MAX_SIDE, MAX_FRAMES, MAX_VALUES = MAX_LATENT_SIDE, 1024, 1 << 28


def check_size(size: tuple[int, int] | None, frames: int | None = None) -> None:
    """Refuse a ``--size`` or ``--frames`` out of range, before anything loads."""
    if size is not None and not 1 <= min(size) <= max(size) <= MAX_SIDE:
        raise ConfigError(f"--size: height and width must be 1 to {MAX_SIDE} (latent "
                          f"pixels), got {list(size)}")
    if frames is not None and not 1 <= frames <= MAX_FRAMES:
        raise ConfigError(f"--frames: must be 1 to {MAX_FRAMES} (latent frames), got {frames}")


def latent_shape(loaded: Any, size: tuple[int, int] | None, vae: Any,
                 frames: int | None = None) -> tuple[int, ...]:
    """(channels, height, width) of the latents to sample; (channels, frames, height,
    width) for a video model (``latent_ndim`` 5), one latent frame unless ``frames``."""
    config = getattr(loaded.module, "config", None)
    channels = None
    if vae is not None:
        channels = getattr(getattr(vae, "config", None), "latent_channels", None)
    if channels is None and config is not None:
        channels = getattr(config, "in_channels", None)
    if channels is None:
        raise ConfigError("--channels: cannot tell the latent channels of this model")
    if size is None and config is not None:
        side = getattr(config, "sample_size", None)
        if side is not None:
            size = (side, side) if isinstance(side, int) else (int(side[0]), int(side[1]))
    if size is None:
        raise ConfigError("--size: required for this model (latent height and width)")
    check_size(size, frames)
    shape: tuple[int, ...] = (int(channels), int(size[0]), int(size[1]))
    if getattr(loaded, "latent_ndim", 4) == 5:
        shape = (shape[0], int(frames or 1), *shape[1:])
    elif frames is not None:
        raise ConfigError(f"--frames: the {loaded.family} model makes images, not video")
    if math.prod(shape) > MAX_VALUES:
        raise ConfigError(f"--size/--frames: a latent of {'x'.join(map(str, shape))} holds "
                          f"{math.prod(shape):,} values, more than the {MAX_VALUES:,} one "
                          f"sample may hold")
    return shape


def sample_to_folder(model: Path, prompts: Path, out: Path, *, host: Any,
                     lora: Path | None = None, family: str | None = None,
                     strength: float = 1.0, mode: ApplyMode = "bypass",
                     negative: Path | None = None, settings: SampleSettings | None = None,
                     per_prompt: int = 1, size: tuple[int, int] | None = None,
                     compare: bool = True, device: str = "auto", dtype: str = "fp32",
                     progress: Callable[[int, int], None] | None = None,
                     overwrite: bool = False, frames: int | None = None) -> dict[str, Any]:
    """Everything ``loraengine sample`` does; returns what was written. The output
    folder and text prompts are checked before the model is loaded."""
    from loraengine.core.adapter.network import check_strength
    from loraengine.inference import apply

    settings = settings or SampleSettings()
    check_strength(strength)
    check_size(size, frames)
    check_out_folder(out, overwrite)
    for path, what in ((prompts, "--prompts"), (negative, "--negative")):
        if path is not None and Path(path).suffix.lower() == ".txt":
            prompt_lines(Path(path), what)
            root = pipeline_folder(model)
            if root is not None:  # else known once the model is loaded
                check_text_encoders(root, Path(path), what)
    loaded, _ = load_model_for_sampling(model, family, host, device, dtype)
    cond = read_prompts(prompts, loaded, host)
    neg = None
    if negative is not None:
        neg = read_prompts(negative, loaded, host, "--negative")
        neg = {k: v[:1] for k, v in neg.items() if k in cond}
    vae = find_vae(loaded)
    shape = latent_shape(loaded, size, vae, frames)

    def render(adapted: bool = False) -> torch.Tensor:
        latents = sample_latents(loaded, cond, shape, settings, host.registry,
                                   negative=neg, per_prompt=per_prompt, progress=progress)
        if not bool(torch.isfinite(latents).all()):  # they would be written as black images
            cause = (f"with --lora {lora} at --strength {strength:g}" if adapted
                     else "without an adapter")
            raise DataError(f"the model's samples {cause} hold NaN or inf values; no image "
                            f"is written")
        return decode(loaded, latents, vae)

    out = Path(out)
    written: dict[str, Any] = {"family": loaded.family, "shape": list(shape)}
    base = render() if lora is not None and compare else None
    if lora is not None:
        handle = apply(loaded.module, lora, strength=strength, mode=mode, host=host)
        written["modules"] = len(handle.modules)
    images = render(adapted=lora is not None) if lora is not None or base is None else base
    written["grid"] = save_png(grid_image(images, per_prompt), out / "grid.png")
    for i in range(images.shape[0]):
        p, j = divmod(i, per_prompt)
        save_png(grid_image(images[i:i + 1], 1, pad=0, min_tile=1),
                   out / f"image_{p}_{j}.png")
    written["images"] = int(images.shape[0])
    if base is not None:
        pair = side_by_side(grid_image(base, per_prompt), grid_image(images, per_prompt))
        written["compare"] = save_png(pair, out / "compare.png")
    return written
