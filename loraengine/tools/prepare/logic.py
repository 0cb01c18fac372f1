"""Turn a folder of images and captions into training files (``loraengine prepare``).

Images are sorted into resolution buckets (sides multiples of what the model family
needs, area close to ``resolution²``, aspect ratio closest to the image's), resized to
cover their bucket and centre-cropped, then encoded by the family's ``DataEncoder``.
Every encoded image and caption is cached under a key made of its content hash and the
encoder's fingerprint, so a rerun only encodes what changed. All problems with the
input (unreadable images, missing captions) are reported together before anything is
encoded, and the two output files are renamed into place together at the end.

Output (DESIGN.md "Files"): ``latents.safetensors`` with ``latents`` and
``conditioning.safetensors`` with ``cond`` plus the family's extras; with more than one
bucket every key gets the bucket's index (``latents.0``, ``cond.0``, ``pooled.0``...).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from loraengine.core.errors import DataError
from loraengine.core.files import atomic_path, write_atomic

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif",
                            ".tiff"})
LATENTS_FILE = "latents.safetensors"
CONDITIONING_FILE = "conditioning.safetensors"
#: How many names an error lists before summarising the rest.
MAX_LISTED = 20

#: progress(stage, done, total): ``stage`` is "images" or "captions".
Progress = Callable[[str, int, int], None]


@dataclass
class ImageItem:
    """One training image: where it is, its caption and where it goes."""

    path: Path
    caption: str
    digest: str
    size: tuple[int, int]            # (width, height), upright
    bucket: tuple[int, int] = (0, 0)  # (width, height)


@dataclass
class PrepareReport:
    """What a prepare run did."""

    images: int
    buckets: list[tuple[int, int, int]]  # (width, height, count) in file order
    encoded_images: int
    cached_images: int
    encoded_captions: int
    cached_captions: int
    latents_path: Path
    conditioning_path: Path
    files: list[list[str]] = field(default_factory=list)


# -- finding images and captions -------------------------------------------------------

def find_images(folder: Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"--images: {folder} is not a folder")
    found = sorted(p for p in folder.iterdir() if p.is_file() and
                   p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise DataError(f"--images: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in "
                        f"{folder}")
    return found


def read_captions_file(path: Path) -> dict[str, str]:
    """Captions by file name from a ``.json`` object (``{"name.png": "caption"}``) or a
    ``.jsonl`` file of ``{"file_name": ..., "text": ...}`` lines (the Hugging Face
    image-folder convention; ``file``/``caption`` are accepted too)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"--captions: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"--captions: {path} is not UTF-8 text (byte {exc.start})") from None
    out: dict[str, str] = {}
    try:
        if path.suffix.lower() == ".jsonl":
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise DataError(f"--captions: {path}:{n}: expected a JSON object")
                name = row.get("file_name", row.get("file"))
                cap = row.get("text", row.get("caption"))
                if not isinstance(name, str) or not isinstance(cap, str):
                    raise DataError(f"--captions: {path}:{n}: expected \"file_name\" and "
                                    f"\"text\" strings")
                out[name] = cap
        else:
            data = json.loads(text)
            if not isinstance(data, dict) or not all(isinstance(v, str) for v in
                                                     data.values()):
                raise DataError(f"--captions: {path}: expected a JSON object mapping file "
                                f"names to captions")
            out = dict(data)
    except json.JSONDecodeError as exc:
        raise DataError(f"--captions: {path}: not valid JSON: {exc}") from None
    return out


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    more = len(names) - MAX_LISTED
    return shown + (f" ... and {more} more" if more > 0 else "")


def _upright_size(img: Any) -> tuple[int, int]:
    w, h = img.size
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block does not make the image unreadable
        orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def scan(images: Iterable[Path], captions: Mapping[str, str] | None, caption_ext: str,
         root: Path) -> list[ImageItem]:
    """Hash, size-check and caption every image; report every problem at once."""
    from PIL import Image, UnidentifiedImageError

    items: list[ImageItem] = []
    unreadable: list[str] = []
    missing: list[str] = []
    for path in images:
        rel = path.relative_to(root).as_posix()
        try:
            data = path.read_bytes()
            with Image.open(io.BytesIO(data)) as img:
                img.verify()  # structure check without decoding every pixel
            with Image.open(io.BytesIO(data)) as img:
                size = _upright_size(img)
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError,
                ValueError) as exc:
            unreadable.append(f"{rel} ({str(exc).splitlines()[0] if str(exc) else 'unreadable'})")
            continue
        if captions is not None:
            caption = captions.get(rel, captions.get(path.name))
        else:
            side = path.with_suffix(caption_ext)
            try:
                caption = side.read_text(encoding="utf-8").strip() if side.is_file() else None
            except UnicodeDecodeError:
                unreadable.append(f"{side.name} (caption is not UTF-8 text)")
                continue
        if caption is None:
            missing.append(rel)
            continue
        items.append(ImageItem(path, caption, hashlib.sha256(data).hexdigest(), size))
    problems = []
    if unreadable:
        problems.append(f"{len(unreadable)} unreadable image(s) in {root}: "
                        f"{_listing(unreadable)}")
    if missing:
        where = "the captions file" if captions is not None else \
            f"a {caption_ext} file beside the image"
        problems.append(f"{len(missing)} image(s) without a caption (looked for {where}): "
                        f"{_listing(missing)}")
    if problems:
        raise DataError("\n".join(problems))
    return items


# -- buckets ---------------------------------------------------------------------------

def bucket_sizes(resolution: int, multiple: int, max_aspect: float = 4.0
                 ) -> list[tuple[int, int]]:
    """(width, height) pairs, sides multiples of ``multiple``, area at most
    ``resolution²`` and as large as the multiple allows, aspect ratio up to
    ``max_aspect``."""
    if resolution < multiple:
        raise DataError(f"--resolution: {resolution} is smaller than the family's size "
                        f"step {multiple}")
    area = resolution * resolution
    out: set[tuple[int, int]] = set()
    w = multiple
    while w <= resolution * max_aspect:
        h = (area // w) // multiple * multiple
        if h >= multiple and max(w, h) / min(w, h) <= max_aspect:
            out.add((w, h))
            out.add((h, w))
        w += multiple
    return sorted(out)


def choose_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]
                  ) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (larger area wins ties)."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - ratio), 9),
                                       -b[0] * b[1]))


def load_pixels(path: Path, bucket: tuple[int, int]
                ) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """The image resized to cover ``bucket`` and centre-cropped: ``[3,H,W]`` in
    [-1, 1], plus the crop's top-left corner and the original (height, width)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img).convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot decode image: {exc}") from None
    return fit_image(img, bucket)


def fit_image(img: Any, bucket: tuple[int, int]
              ) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """A PIL RGB image resized to cover ``bucket`` and centre-cropped (see
    :func:`load_pixels`)."""
    from PIL import Image

    w, h = img.size
    bw, bh = bucket
    scale = max(bw / w, bh / h)
    nw, nh = max(bw, round(w * scale)), max(bh, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - bw) // 2, (nh - bh) // 2
    img = img.crop((left, top, left + bw, top + bh))
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    pixels = data.reshape(bh, bw, 3).permute(2, 0, 1).float() / 127.5 - 1.0
    return pixels, (top, left), (h, w)


# -- the cache -------------------------------------------------------------------------

class EncodeCache:
    """Encoded tensors by key, one small safetensors file each, written atomically."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def path(self, kind: str, key: str) -> Path:
        return self.folder / f"{kind}-{key}.safetensors"

    def get(self, kind: str, key: str) -> dict[str, torch.Tensor] | None:
        p = self.path(kind, key)
        if not p.is_file():
            return None
        try:
            return load_file(str(p))
        except Exception:  # a damaged entry is re-encoded, never trusted
            return None

    def put(self, kind: str, key: str, tensors: Mapping[str, torch.Tensor]) -> None:
        data = {k: v.contiguous() for k, v in tensors.items()}
        write_atomic(self.path(kind, key), lambda p: save_file(data, str(p)))


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:40]


# -- the run ---------------------------------------------------------------------------

def prepare(encoder: Any, images: Path, out: Path, *, captions_file: Path | None = None,
            caption_ext: str = ".txt", resolution: int | None = None, batch_size: int = 4,
            cache_dir: Path | None = None, progress: Progress | None = None
            ) -> PrepareReport:
    """Encode ``images`` (and their captions) with ``encoder`` into ``out``."""
    images, out = Path(images), Path(out)
    if not caption_ext.startswith("."):
        caption_ext = "." + caption_ext
    captions = read_captions_file(captions_file) if captions_file is not None else None
    items = scan(find_images(images), captions, caption_ext, images)
    res = int(resolution or encoder.default_resolution)
    sizes = bucket_sizes(res, int(encoder.bucket_multiple))
    for item in items:
        item.bucket = choose_bucket(item.size, sizes)
    cache = EncodeCache(cache_dir if cache_dir is not None else out / ".cache")
    fp = str(encoder.fingerprint)
    report_progress = progress or (lambda stage, done, total: None)

    # Images: cached latents, or encode the rest a batch at a time (one bucket per batch).
    latents: dict[int, torch.Tensor] = {}
    geometry: dict[int, tuple[tuple[int, int], tuple[int, int]]] = {}
    todo: dict[tuple[int, int], list[int]] = {}
    for i, item in enumerate(items):
        hit = cache.get("img", _key(fp, item.digest, f"{item.bucket[0]}x{item.bucket[1]}"))
        if hit is not None and "latent" in hit and "crop" in hit:
            latents[i] = hit["latent"]
            c, o = hit["crop"].tolist(), hit["original"].tolist()
            geometry[i] = ((int(c[0]), int(c[1])), (int(o[0]), int(o[1])))
        else:
            todo.setdefault(item.bucket, []).append(i)
    cached_images = len(latents)
    done = cached_images
    report_progress("images", done, len(items))
    for bucket, idxs in sorted(todo.items()):
        for start in range(0, len(idxs), batch_size):
            chunk = idxs[start:start + batch_size]
            loaded = [load_pixels(items[i].path, bucket) for i in chunk]
            encoded = encoder.encode_images(torch.stack([p for p, _, _ in loaded]))
            if not bool(torch.isfinite(encoded).all()):
                names = ", ".join(items[i].path.name for i in chunk)
                raise DataError(f"the VAE gave non-finite latents for {names}; try "
                                f"--dtype fp32")
            for i, lat, (_, crop, orig) in zip(chunk, encoded, loaded, strict=True):
                item = items[i]
                latents[i], geometry[i] = lat.float().contiguous(), (crop, orig)
                cache.put("img", _key(fp, item.digest, f"{bucket[0]}x{bucket[1]}"),
                          {"latent": latents[i], "crop": torch.tensor(crop),
                           "original": torch.tensor(orig)})
            done += len(chunk)
            report_progress("images", done, len(items))

    # Captions: each distinct caption once.
    unique = sorted({item.caption for item in items})
    conds: dict[str, dict[str, torch.Tensor]] = {}
    missing = []
    for cap in unique:
        hit = cache.get("txt", _key(fp, cap))
        if hit is not None:
            conds[cap] = hit
        else:
            missing.append(cap)
    cached_captions = len(conds)
    report_progress("captions", cached_captions, len(unique))
    for start in range(0, len(missing), batch_size):
        batch = missing[start:start + batch_size]
        by_key = encoder.encode_captions(batch)
        for j, cap in enumerate(batch):
            conds[cap] = {k: v[j].contiguous() for k, v in by_key.items()}
            cache.put("txt", _key(fp, cap), conds[cap])
        report_progress("captions", cached_captions + start + len(batch), len(unique))

    # Assemble the buckets in (width, height) order, images in name order within each.
    order = sorted({item.bucket for item in items})
    multi = len(order) > 1
    lat_out: dict[str, torch.Tensor] = {}
    cond_out: dict[str, torch.Tensor] = {}
    files: list[list[str]] = []
    summary: list[tuple[int, int, int]] = []
    for b, bucket in enumerate(order):
        idxs = [i for i, item in enumerate(items) if item.bucket == bucket]
        suffix = f".{b}" if multi else ""
        lat_out["latents" + suffix] = torch.stack([latents[i] for i in idxs])
        rows: dict[str, list[torch.Tensor]] = {}
        for i in idxs:
            crop, orig = geometry[i]
            extra = encoder.image_conditioning(orig, crop, (bucket[1], bucket[0]))
            for k, v in {**conds[items[i].caption], **extra}.items():
                rows.setdefault(k, []).append(v)
        for k, vs in rows.items():
            cond_out[k + suffix] = torch.stack(vs).contiguous()
        files.append([items[i].path.relative_to(images).as_posix() for i in idxs])
        summary.append((bucket[0], bucket[1], len(idxs)))
    meta = {"loraengine.family": str(encoder.family), "loraengine.resolution": str(res),
            "loraengine.buckets": json.dumps(summary), "loraengine.images": json.dumps(files)}
    lat_path, cond_path = out / LATENTS_FILE, out / CONDITIONING_FILE
    # Both files appear together or not at all.
    with atomic_path(lat_path) as tmp_lat, atomic_path(cond_path) as tmp_cond:
        save_file(lat_out, str(tmp_lat), metadata=meta)
        save_file(cond_out, str(tmp_cond), metadata=meta)
    return PrepareReport(len(items), summary, len(items) - cached_images, cached_images,
                         len(missing), cached_captions, lat_path, cond_path, files)
