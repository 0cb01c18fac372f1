"""Turn a folder of clips and captions into training files for a video family.

A clip is a video file (read with PyAV, the ``[video]`` extra) or a folder of frame
images (frames in name order). Frames are picked as ComfyUI's video loaders pick them:
skip the first ``skip_first`` frames, keep every ``every_nth``, then take ``frames`` of
what is left — evenly spread (``uniform``), the first (``head``), the last (``tail``)
or a window starting at a seeded random frame (``random``). The count is rounded down
to what the VAE compresses whole (``1 + k·step`` frames, step 4 for Wan). Every frame
is resized to cover the clip's spatial bucket and centre-cropped. Settings no clip can
follow (:func:`check_sampling`) are refused before any clip is encoded. Clips are bucketed by
frames × height × width, encoded with the family's encoder and cached by content hash
like images (:mod:`logic`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from loraengine.core.errors import ConfigError, DataError
from loraengine.core.files import write_pair
from loraengine.tools.prepare.logic import (
    CONDITIONING_FILE,
    IMAGE_SUFFIXES,
    LATENTS_FILE,
    EncodeCache,
    PrepareReport,
    Progress,
    _key,
    _listing,
    bucket_sizes,
    choose_bucket,
    encode_captions,
    fit_image,
    read_captions_file,
    side_caption,
    to_rgb,
)

VIDEO_SUFFIXES = frozenset({".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v"})
FrameMode = Literal["uniform", "head", "tail", "random"]


@dataclass(frozen=True)
class FrameSampling:
    """Which frames of a clip are used (see the module docstring)."""

    frames: int = 81
    mode: FrameMode = "uniform"
    skip_first: int = 0
    every_nth: int = 1
    seed: int = 0

    def key(self) -> str:
        return json.dumps([self.frames, self.mode, self.skip_first, self.every_nth,
                           self.seed])


def looks_like_clips(folder: Path) -> bool:
    """Whether ``folder`` holds clips (video files or folders of frames) rather than
    images: said from the names alone, before any model is loaded."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    entries = list(folder.iterdir())
    if any(p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES for p in entries):
        return True
    has_images = any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in entries)
    return not has_images and any(p.is_dir() for p in entries)


def find_clips(folder: Path) -> list[Path]:
    """Video files and frame folders directly inside ``folder``, in name order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"--images: {folder} is not a folder of clips")
    clips = [p for p in sorted(folder.iterdir()) if
             (p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES) or
             (p.is_dir() and not p.name.startswith(".") and _frame_files(p))]
    if not clips:
        raise DataError(f"--images: no clips in {folder} (video files "
                        f"{', '.join(sorted(VIDEO_SUFFIXES))}, or folders of frames)")
    return clips


def _frame_files(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.iterdir())
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]


def count_frames(clip: Path) -> int:
    """How many frames a clip has, without decoding them where the file says (the video
    stream's frame count; else its packets are counted)."""
    if clip.is_dir():
        return len(_frame_files(clip))
    try:
        import av
    except ImportError:
        raise DataError(f"{clip}: reading video files needs PyAV (pip install "
                        f"'loraengine[video]'), or give a folder of frames") from None
    try:
        with av.open(str(clip)) as container:
            if not container.streams.video:
                raise DataError(f"{clip}: no video stream")
            stream = container.streams.video[0]
            if stream.frames:
                return int(stream.frames)
            return sum(1 for packet in container.demux(stream) if packet.size)
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise DataError(f"{clip}: cannot decode video: {exc}") from None


def check_sampling(clips: list[Path], sampling: FrameSampling) -> None:
    """Refuse frame sampling settings no clip can follow, naming the option, before any
    frame is decoded or encoded: counts below their minimum, an unknown mode, and a
    ``skip_first`` that leaves a clip without frames."""
    for option, value, least in (("--frames", sampling.frames, 1),
                                 ("--skip-first-frames", sampling.skip_first, 0),
                                 ("--every-nth-frame", sampling.every_nth, 1),
                                 ("--frame-seed", sampling.seed, 0)):
        if value < least:
            raise ConfigError(f"{option}: expected at least {least}, got {value}")
    if sampling.mode not in get_args(FrameMode):
        raise ConfigError(f"--frame-sampling: expected one of "
                          f"{', '.join(get_args(FrameMode))}, got {sampling.mode!r}")
    if sampling.skip_first:
        short = [f"{c.name} ({n})" for c in clips
                 if (n := count_frames(c)) <= sampling.skip_first]
        if short:
            raise ConfigError(f"--skip-first-frames {sampling.skip_first}: leaves no frame "
                              f"of {len(short)} clip(s) (frames they have): "
                              f"{_listing(short)}")


def pick_frames(available: int, sampling: FrameSampling, step: int, name: str) -> list[int]:
    """Indices into the ``available`` frames left after skipping and thinning."""
    count = min(sampling.frames, available)
    count = 1 + (count - 1) // step * step if count >= 1 else 0
    if count < 1:
        raise DataError(f"{name}: no frames left after skipping {sampling.skip_first} "
                        f"and keeping every {sampling.every_nth}")
    if sampling.mode == "head":
        return list(range(count))
    if sampling.mode == "tail":
        return list(range(available - count, available))
    if sampling.mode == "random":
        g = torch.Generator().manual_seed(int(hashlib.sha256(
            f"{sampling.seed}\0{name}".encode()).hexdigest()[:15], 16))
        start = int(torch.randint(0, available - count + 1, (), generator=g))
        return list(range(start, start + count))
    if count == 1:
        return [0]
    return [round(i * (available - 1) / (count - 1)) for i in range(count)]


def read_frames(clip: Path) -> tuple[list[Any], str]:
    """Every frame of a clip as a PIL RGB image, and the digest of its files."""
    from PIL import Image, ImageOps

    h = hashlib.sha256()
    if clip.is_dir():
        frames = []
        for f in _frame_files(clip):
            data = f.read_bytes()
            h.update(f.name.encode() + b"\0" + data)
            try:
                with Image.open(f) as img:
                    frames.append(to_rgb(ImageOps.exif_transpose(img)))
            except (OSError, SyntaxError, ValueError) as exc:
                raise DataError(f"{f}: cannot decode frame: {exc}") from None
        return frames, h.hexdigest()
    try:
        import av
    except ImportError:
        raise DataError(f"{clip}: reading video files needs PyAV (pip install "
                        f"'loraengine[video]'), or give a folder of frames") from None
    h.update(clip.read_bytes())
    try:
        with av.open(str(clip)) as container:
            frames = [f.to_image().convert("RGB") for f in container.decode(video=0)]
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise DataError(f"{clip}: cannot decode video: {exc}") from None
    return frames, h.hexdigest()


def _caption(clip: Path, captions: Mapping[str, str] | None, caption_ext: str,
             root: Path) -> str | None:
    if captions is not None:
        rel = clip.relative_to(root).as_posix()
        return captions.get(rel, captions.get(clip.name))
    side = clip.with_suffix(caption_ext) if clip.is_file() else \
        clip.parent / (clip.name + caption_ext)
    caption, problem = side_caption(side)
    if problem is not None:
        raise DataError(f"{side}: caption {problem}")
    return caption


def prepare_video(encoder: Any, clips_folder: Path, out: Path, *,
                  sampling: FrameSampling = FrameSampling(),
                  captions_file: Path | None = None, caption_ext: str = ".txt",
                  resolution: int | None = None, cache_dir: Path | None = None,
                  progress: Progress | None = None) -> PrepareReport:
    """Encode the clips of ``clips_folder`` (and their captions) into ``out``."""
    root, out = Path(clips_folder), Path(out)
    if not caption_ext.startswith("."):
        caption_ext = "." + caption_ext
    captions = read_captions_file(captions_file) if captions_file is not None else None
    clips = find_clips(root)
    texts = {clip: _caption(clip, captions, caption_ext, root) for clip in clips}
    missing = [c.name for c, t in texts.items() if t is None]
    if missing:
        raise DataError(f"{len(missing)} clip(s) without a caption (looked for "
                        f"{'the captions file' if captions is not None else caption_ext + ' beside each'}"
                        f"): {_listing(missing)}")
    res = int(resolution or encoder.default_resolution)
    sizes = bucket_sizes(res, int(encoder.bucket_multiple))
    cache = EncodeCache(cache_dir if cache_dir is not None else out / ".cache")
    fp = str(encoder.fingerprint)
    report = progress or (lambda stage, done, total: None)
    step = int(getattr(encoder, "frame_step", 1))
    check_sampling(clips, sampling)

    latents: dict[Path, torch.Tensor] = {}
    shapes: dict[Path, tuple[int, int, int]] = {}  # (frames, width, height)
    encoded = 0
    for n, clip in enumerate(clips):
        frames, digest = read_frames(clip)
        kept = frames[sampling.skip_first::sampling.every_nth]
        idx = pick_frames(len(kept), sampling, step, clip.name)
        bucket = choose_bucket(kept[0].size if kept else (1, 1), sizes)
        key = _key(fp, digest, sampling.key(), f"{bucket[0]}x{bucket[1]}")
        hit = cache.get("clip", key)
        if hit is not None and "latent" in hit:
            latents[clip] = hit["latent"]
        else:
            pixels = torch.stack([fit_image(kept[i], bucket)[0] for i in idx], dim=1)
            lat = encoder.encode_videos(pixels[None])[0]
            if not bool(torch.isfinite(lat).all()):
                raise DataError(f"the VAE gave non-finite latents for {clip.name}; try "
                                f"--dtype fp32")
            latents[clip] = lat.float().contiguous()
            cache.put("clip", key, {"latent": latents[clip]})
            encoded += 1
        shapes[clip] = (len(idx), *bucket)
        report("images", n + 1, len(clips))

    # all captions in one batch: a video family's clips are few
    conds, todo, cached_captions = encode_captions(
        encoder, cache, fp, {t for t in texts.values() if t is not None},
        max(1, len(texts)), report)

    order = sorted(set(shapes.values()))
    multi = len(order) > 1
    lat_out: dict[str, torch.Tensor] = {}
    cond_out: dict[str, torch.Tensor] = {}
    files: list[list[str]] = []
    summary: list[tuple[int, int, int]] = []
    for b, shape in enumerate(order):
        members = [c for c in clips if shapes[c] == shape]
        suffix = f".{b}" if multi else ""
        lat_out["latents" + suffix] = torch.stack([latents[c] for c in members])
        for k in conds[str(texts[members[0]])]:
            cond_out[k + suffix] = torch.stack([conds[str(texts[c])][k] for c in members])
        files.append([c.relative_to(root).as_posix() for c in members])
        summary.append((shape[1], shape[2], len(members)))
    meta = {"loraengine.family": str(encoder.family), "loraengine.resolution": str(res),
            "loraengine.buckets": json.dumps([[*s, len(f)] for s, f in zip(order, files,
                                                                           strict=True)]),
            "loraengine.images": json.dumps(files),
            "loraengine.frames": sampling.key()}
    lat_path, cond_path = out / LATENTS_FILE, out / CONDITIONING_FILE
    write_pair(lat_path, cond_path, lat_out, cond_out, meta)
    return PrepareReport(len(clips), summary, encoded, len(clips) - encoded, len(todo),
                         cached_captions, lat_path, cond_path, files)

