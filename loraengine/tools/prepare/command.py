"""``loraengine prepare``: images + captions -> latents and conditioning files, encoded
with the model's own VAE and text encoders (see ``loraengine.tools.prepare.logic``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from loraengine.cli.common import path_option
from loraengine.cli.progress import TaskBars
from loraengine.core.errors import ConfigError, DataError


def pick_family(host: Any, model: Path, name: str) -> Any:
    """The model-family spec to prepare with: ``name``, or the one that recognises the
    pipeline folder when ``name`` is ``auto``."""
    able = {s.name: s for s in host.registry.specs("model") if s.make_encoder is not None}
    if name != "auto":
        if name not in able:
            raise ConfigError(f"--family: {name!r} cannot prepare data; choose from "
                              f"{', '.join(sorted(able))}")
        return able[name]
    if not (model / "model_index.json").exists():
        raise DataError(f"--model: {model} is not a diffusers pipeline folder (no "
                        f"model_index.json); prepare needs its VAE and text encoders")
    matches = [s for s in able.values() if s.detect is not None and s.detect(model)]
    if len(matches) != 1:
        found = ", ".join(s.name for s in matches) or "none"
        raise ConfigError(f"--family: cannot tell the family of {model} (matches: {found}); "
                          f"pass --family with one of {', '.join(sorted(able))}")
    return matches[0]


def resize_lines(resized: list[tuple[str, tuple[int, int], tuple[int, int], bool]],
                 resolution: int, multiple: int, shown: int = 5) -> list[str]:
    """What prepare did to images it did not encode at their own size, and why: one
    line each for enlarged, scaled-down and only cropped images."""
    groups: dict[str, list[str]] = {"up": [], "down": [], "crop": []}
    for name, (w, h), (bw, bh), crop_only in resized:
        scale = max(bw / w, bh / h)
        kind = "crop" if crop_only or scale == 1 else "up" if scale > 1 else "down"
        groups[kind].append(f"{name} {w}x{h} -> {bw}x{bh}")
    why = {"up": "enlarged to the --resolution {r} buckets (--upscale)",
           "down": "scaled down to fit --resolution {r}",
           "crop": "cropped to multiples of the family's size step {m}"}
    out = []
    for kind, names in groups.items():
        if names:
            more = f" ... and {len(names) - shown} more" if len(names) > shown else ""
            out.append(f"{len(names)} image(s) {why[kind].format(r=resolution, m=multiple)}: "
                       f"{', '.join(names[:shown])}{more}")
    return out


@click.command("prepare")
@path_option("--model", "model", required=True,
             help="A local diffusers pipeline folder (its VAE and text encoders are used).")
@path_option("--images", required=True,
             help="Folder of images (video families: of clips, video files or folders of "
             "frames); captions in NAME.txt beside each, or --captions.")
@path_option("--out", required=True,
             help="Where latents.safetensors and conditioning.safetensors go. Those of an "
             "earlier run there are replaced (a rerun reuses OUT/.cache): both are "
             "written whole beside them first, so a failed run leaves both as they were.")
@click.option("--family", default="auto", show_default=True,
              help="Model family (sd15, sd2, sdxl, sd3, flux...); auto reads the folder.")
@path_option("--captions", "captions_file",
             help="Captions file: a JSON object {file: caption} or metadata.jsonl lines "
             "with file_name and text.")
@path_option("--references",
             help="Edit training (flux2): a folder with each image's "
             "reference image under the same name, encoded as its 'reference' latents.")
@click.option("--caption-ext", default=".txt", show_default=True,
              help="Extension of the caption file beside each image.")
@click.option("--resolution", type=click.IntRange(1), default=None,
              help="Largest bucket area, as the side of a square in pixels (default: the "
              "family's); larger images are scaled down to it.")
@click.option("--upscale", is_flag=True,
              help="Enlarge images smaller than --resolution to its buckets (default: "
              "each image keeps its own size, rounded down to the family's size step).")
@click.option("--batch-size", type=click.IntRange(1), default=4, show_default=True,
              help="Images encoded at once; lower it when the encoders run out of memory.")
@click.option("--device", default="auto", show_default=True,
              help="Where the encoders run: auto (cuda when available), cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
              show_default=True, help="Encoder dtype (auto: bf16 on CUDA, else fp32).")
@click.option("--max-sequence-length", type=click.IntRange(1), default=None,
              help="Text tokens per caption where the pipeline pads to a length (SD3, "
              "Flux, Flux.2, Chroma, Lumina 2...; default: the pipeline's).")
@path_option("--cache", "cache_dir",
             help="Encoding cache folder (default: OUT/.cache).")
@click.option("--frames", type=click.IntRange(1), default=81, show_default=True,
              help="Video families: frames per clip at most, rounded down to what the VAE "
              "compresses whole (1 + 4k for Wan).")
@click.option("--frame-sampling", type=click.Choice(["uniform", "head", "tail", "random"]),
              default="uniform", show_default=True,
              help="Video families: which frames: spread evenly, the first, the last, or a "
              "window from a seeded random start.")
@click.option("--skip-first-frames", type=click.IntRange(0), default=0, show_default=True,
              help="Video families: frames dropped from the start of each clip first.")
@click.option("--every-nth-frame", type=click.IntRange(1), default=1, show_default=True,
              help="Video families: keep every n-th frame (after skipping).")
@click.option("--frame-seed", type=click.IntRange(0), default=0, show_default=True,
              help="Video families: seed of --frame-sampling random.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")
@click.pass_context
def prepare(ctx: click.Context, **options: Any) -> None:
    """Encode a folder of images and captions into training files."""
    from loraengine.cli.common import reports_errors

    reports_errors(_run)(ctx.obj, **options)


def _run(state: Any, model: Path, images: Path, out: Path, family: str,
         captions_file: Path | None, references: Path | None, caption_ext: str,
         resolution: int | None,
         upscale: bool, batch_size: int, device: str, dtype: str,
         max_sequence_length: int | None, cache_dir: Path | None, quiet: bool,
         frames: int, frame_sampling: str, skip_first_frames: int, every_nth_frame: int,
         frame_seed: int) -> None:
    from loraengine.tools.prepare.logic import collect, find_references, read_captions_file
    from loraengine.tools.prepare.logic import prepare as run_prepare
    from loraengine.tools.prepare.video import (
        FrameSampling,
        check_sampling,
        find_clips,
        looks_like_clips,
        prepare_video,
    )

    if len(caption_ext) < 2 or not caption_ext.startswith(".") or "/" in caption_ext:
        raise DataError(f"--caption-ext: expected an extension such as .txt, got "
                        f"{caption_ext!r}")
    # The images and captions are checked before the model is looked at, let alone
    # loaded: a wrong folder fails in a moment.
    items = None
    sampling = FrameSampling(frames, frame_sampling,  # type: ignore[arg-type]
                             skip_first_frames, every_nth_frame, frame_seed)
    if looks_like_clips(images):  # video files or folders of frames: a video family's
        check_sampling(find_clips(images), sampling)
        if captions_file is not None:
            read_captions_file(captions_file)
        if references is not None:
            raise DataError("--references: for image families; clips have no references")
    else:
        items = collect(images, captions_file, caption_ext)
        if references is not None:
            find_references(references, images, items)
    if not model.exists():
        raise DataError(f"--model: {model} does not exist")
    spec = pick_family(state.host, model, family)
    encoder = spec.make_encoder(model, {"device": device, "dtype": dtype,
                                        "max_sequence_length": max_sequence_length})
    with TaskBars(not quiet, label="encoding {}") as bar:
        if getattr(encoder, "video", False):
            report = prepare_video(encoder, images, out, sampling=sampling,
                                   captions_file=captions_file, caption_ext=caption_ext,
                                   resolution=resolution, cache_dir=cache_dir, progress=bar)
        else:
            report = run_prepare(encoder, images, out, captions_file=captions_file,
                                 caption_ext=caption_ext, resolution=resolution,
                                 batch_size=batch_size, cache_dir=cache_dir, progress=bar,
                                 upscale=upscale, items=items, references=references)
    if quiet:
        return
    sizes = ", ".join(f"{w}x{h}: {n}" for w, h, n in report.buckets)
    click.echo(f"prepared {report.images} image(s) for {spec.name} in "
               f"{len(report.buckets)} bucket(s) ({sizes})")
    for line in resize_lines(report.resized, int(resolution or encoder.default_resolution),
                             int(encoder.bucket_multiple)):
        click.echo(f"  {line}")
    click.echo(f"  encoded {report.encoded_images} image(s) and {report.encoded_captions} "
               f"caption(s); reused {report.cached_images} image(s) and "
               f"{report.cached_captions} caption(s) from the cache")
    click.echo(f"  latents: {report.latents_path}")
    click.echo(f"  conditioning: {report.conditioning_path}")
    if len(report.buckets) > 1:
        click.echo("  several buckets: train with data.bucket_mode: true")
