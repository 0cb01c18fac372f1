"""Turn a folder of images and captions into training files (``loraengine prepare``).

Images are sorted into resolution buckets whose sides are multiples of what the model
family needs (its VAE factor times the denoiser's own step). By default an image keeps
its own size: an image of at most ``resolution²`` pixels goes to its own size rounded
down to that step and is centre-cropped to it, without resampling; a larger one is
scaled down to the bucket of area at most ``resolution²`` (inside the image) whose
aspect ratio is closest to its own. Nothing is enlarged unless ``upscale``, which sends
every image to the buckets of area ``resolution²`` as training at one resolution wants.
A resampled image is resized to cover its bucket and centre-cropped. The encoded pixels
go through the family's ``DataEncoder``; the report lists every image that was not
encoded at its own size.
Every encoded image and caption is cached under a key made of its content hash and the
encoder's fingerprint, so a rerun only encodes what changed. All problems with the
input (unreadable images, missing captions) are reported together before anything is
encoded, and the two output files are renamed into place together at the end, over
those of an earlier run in the same folder only once both are written whole
(``write_pair``): a failed run leaves the earlier pair as it was.

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

from loraengine.core.data import stack_padded
from loraengine.core.errors import DataError
from loraengine.core.files import read_text, write_atomic, write_pair

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
    #: centre-cropped to the bucket without resampling (its own size rounded down)
    crop_only: bool = False


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
    #: (image, its (width, height), its bucket's, only cropped) for every image not
    #: encoded at its own size, in name order
    resized: list[tuple[str, tuple[int, int], tuple[int, int], bool]] = field(
        default_factory=list)


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


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def _loads(text: str, path: Path, where: str) -> Any:
    """``json.loads`` with every way a hostile file can fail as one ``DataError`` line."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        raise DataError(f"--captions: {where}: the key {str(exc)[:80]!r} appears twice") \
            from None
    except json.JSONDecodeError as exc:
        raise DataError(f"--captions: {where}: not valid JSON: {exc}") from None
    except RecursionError:
        raise DataError(f"--captions: {where}: nested too deeply (captions are a flat "
                        f"object of strings)") from None
    except ValueError as exc:  # e.g. an integer over Python's digit limit
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"--captions: {where}: not valid JSON: {first[:120]}") from None


def read_captions_file(path: Path) -> dict[str, str]:
    """Captions by file name from a ``.json`` object (``{"name.png": "caption"}``) or a
    ``.jsonl`` file of ``{"file_name": ..., "text": ...}`` lines (the Hugging Face
    image-folder convention; ``file``/``caption`` are accepted too). Anything else
    (not a regular file, not UTF-8, invalid or deeply nested JSON, a name given twice)
    is one ``DataError`` line naming the file."""
    path = Path(path)
    text = read_text(path, "--captions")
    out: dict[str, str] = {}
    if path.suffix.lower() == ".jsonl":
        first_line: dict[str, int] = {}
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            row = _loads(line, path, f"{path}:{n}")
            if not isinstance(row, dict):
                raise DataError(f"--captions: {path}:{n}: expected a JSON object")
            name = row.get("file_name", row.get("file"))
            cap = row.get("text", row.get("caption"))
            if not isinstance(name, str) or not isinstance(cap, str):
                raise DataError(f"--captions: {path}:{n}: expected \"file_name\" and "
                                f"\"text\" strings")
            if name in first_line:
                raise DataError(f"--captions: {path}:{n}: {name[:80]!r} has a caption on "
                                f"line {first_line[name]} already")
            first_line[name] = n
            out[name] = cap
    else:
        data = _loads(text, path, str(path))
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in
                                                 data.values()):
            raise DataError(f"--captions: {path}: expected a JSON object mapping file "
                            f"names to captions")
        out = dict(data)
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


def side_caption(side: Path) -> tuple[str | None, str | None]:
    """The caption in the file ``side`` beside an image or clip (``None`` when there is
    none), or else why it cannot be used, e.g. "is a folder" or "cannot be read
    (Permission denied)"."""
    if not side.exists():
        return None, None
    if side.is_dir():
        return None, "is a folder"
    if not side.is_file():
        return None, "is not a regular file"
    try:
        return side.read_bytes().decode("utf-8").strip(), None
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror or exc})"
    except UnicodeDecodeError:
        return None, "is not UTF-8 text"


def scan(images: Iterable[Path], captions: Mapping[str, str] | None, caption_ext: str,
         root: Path) -> list[ImageItem]:
    """Hash, size-check and caption every image; report every problem at once."""
    from PIL import Image, UnidentifiedImageError

    items: list[ImageItem] = []
    unreadable: list[str] = []
    bad_captions: list[str] = []
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
            caption, problem = side_caption(side)
            if problem is not None:
                bad_captions.append(f"{side.relative_to(root).as_posix()} {problem}")
                continue
        if caption is None:
            missing.append(rel)
            continue
        items.append(ImageItem(path, caption, hashlib.sha256(data).hexdigest(), size))
    problems = []
    if unreadable:
        problems.append(f"{len(unreadable)} unreadable image(s) in {root}: "
                        f"{_listing(unreadable)}")
    if bad_captions:
        problems.append(f"{len(bad_captions)} unusable caption file(s) in {root}: "
                        f"{_listing(bad_captions)}")
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


def own_size_buckets(size: tuple[int, int], resolution: int, multiple: int,
                     max_aspect: float = 4.0) -> list[tuple[int, int]]:
    """The buckets an image of ``size`` (width, height) fits without being enlarged:
    sides multiples of ``multiple`` and at most the image's, area at most
    ``resolution²``; for each width the tallest such height, for each height the widest
    width (aspect ratio up to ``max_aspect`` where any such bucket has one)."""
    w, h = size
    area = resolution * resolution
    out: set[tuple[int, int]] = set()
    for bw in range(multiple, w + 1, multiple):
        bh = min(h, area // bw) // multiple * multiple
        if bh >= multiple:
            out.add((bw, bh))
    for bh in range(multiple, h + 1, multiple):
        bw = min(w, area // bh) // multiple * multiple
        if bw >= multiple:
            out.add((bw, bh))
    shaped = {b for b in out if max(b) / min(b) <= max_aspect}
    return sorted(shaped or out)


def own_bucket(size: tuple[int, int], resolution: int, multiple: int
               ) -> tuple[tuple[int, int], bool] | None:
    """The bucket of an image of ``size`` that is not enlarged, and whether it is only a
    crop (the image's own size rounded down to ``multiple``, for an image of at most
    ``resolution²`` pixels); ``None`` when a side is smaller than ``multiple``."""
    w, h = size
    if min(w, h) < multiple:
        return None
    if w * h <= resolution * resolution:
        return (w // multiple * multiple, h // multiple * multiple), True
    fits = own_size_buckets(size, resolution, multiple)
    return (choose_bucket(size, fits), False) if fits else None


def assign_buckets(items: Sequence[ImageItem], resolution: int, multiple: int,
                   upscale: bool = False) -> None:
    """Set each item's bucket (see the module docstring); an image with a side smaller
    than ``multiple`` cannot keep its size, and is an error unless ``upscale``."""
    if resolution < multiple:
        raise DataError(f"--resolution: {resolution} is smaller than the family's size "
                        f"step {multiple}")
    fixed = bucket_sizes(resolution, multiple) if upscale else None
    small: list[str] = []
    for item in items:
        if fixed is not None:
            item.bucket, item.crop_only = choose_bucket(item.size, fixed), False
            continue
        found = own_bucket(item.size, resolution, multiple)
        if found is None:
            small.append(f"{item.path.name} ({item.size[0]}x{item.size[1]})")
            continue
        item.bucket, item.crop_only = found
    if small:
        raise DataError(f"{len(small)} image(s) smaller than the family's size step "
                        f"{multiple} px on a side, which prepare does not enlarge unless "
                        f"asked (--upscale): {_listing(small)}")


def collect(images: Path, captions_file: Path | None = None, caption_ext: str = ".txt"
            ) -> list[ImageItem]:
    """Every image of the ``images`` folder with its caption, checked (readable, a
    caption for each) without any model: what ``prepare`` encodes."""
    if not caption_ext.startswith("."):
        caption_ext = "." + caption_ext
    captions = read_captions_file(captions_file) if captions_file is not None else None
    return scan(find_images(Path(images)), captions, caption_ext, Path(images))


def to_rgb(img: Any) -> Any:
    """A PIL image as 8-bit RGB. 16-bit and 32-bit integer and float greyscale images
    are scaled to 8 bits first (PIL's own conversion clips them: a 16-bit image turns
    almost white, a float one in [0, 1] black): 16-bit (and 32-bit ones whose values fit
    in 16 bits) by 257, float ones in [0, 1] by 255."""
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        import numpy as np

        values = np.asarray(img, dtype=np.float64)
        top = float(values.max()) if values.size else 0.0
        if img.mode == "F":
            scale = 255.0 if top <= 1.0 else 1.0
        else:
            scale = 1 / 257 if top <= 65535 else 255 / max(top, 1.0)
        eight = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(eight, mode="L").convert("RGB")
    return img.convert("RGB")


def load_pixels(path: Path, bucket: tuple[int, int], crop_only: bool = False
                ) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """The image resized to cover ``bucket`` (kept as it is with ``crop_only``) and
    centre-cropped: ``[3,H,W]`` in [-1, 1], plus the crop's top-left corner and the
    original (height, width)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as opened:
            rgb = to_rgb(ImageOps.exif_transpose(opened))
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot decode image: {exc}") from None
    return fit_image(rgb, bucket, crop_only)


def fit_image(img: Any, bucket: tuple[int, int], crop_only: bool = False
              ) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """A PIL RGB image resized to cover ``bucket`` (kept as it is with ``crop_only``
    when it covers the bucket already) and centre-cropped (see :func:`load_pixels`)."""
    img, crop, original = fit_picture(img, bucket, crop_only)
    bw, bh = bucket
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    pixels = data.reshape(bh, bw, 3).permute(2, 0, 1).float() / 127.5 - 1.0
    return pixels, crop, original


def fit_picture(img: Any, bucket: tuple[int, int], crop_only: bool = False
                ) -> tuple[Any, tuple[int, int], tuple[int, int]]:
    """What :func:`fit_image` encodes, as a PIL image of the bucket's size, with the
    crop's top-left corner and the original (height, width)."""
    from PIL import Image

    w, h = img.size
    bw, bh = bucket
    if crop_only and bw <= w and bh <= h:
        nw, nh = w, h
    else:
        scale = max(bw / w, bh / h)
        nw, nh = max(bw, round(w * scale)), max(bh, round(h * scale))
        img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - bw) // 2, (nh - bh) // 2
    return img.crop((left, top, left + bw, top + bh)), (top, left), (h, w)


def load_picture(path: Path, bucket: tuple[int, int]) -> Any:
    """The image as :func:`load_pixels` fits it, as a PIL image."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as opened:
            rgb = to_rgb(ImageOps.exif_transpose(opened))
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot decode image: {exc}") from None
    return fit_picture(rgb, bucket)[0]


def encode_captions(encoder: Any, cache: EncodeCache, fp: str, captions: Iterable[str],
                    batch_size: int, progress: Progress
                    ) -> tuple[dict[str, dict[str, torch.Tensor]], list[str], int]:
    """Each distinct caption's conditioning, from the cache where it holds it (keyed by
    the encoder's fingerprint ``fp``), else encoded ``batch_size`` at a time and cached.
    Returns the conditioning by caption, the captions encoded now and how many came from
    the cache."""
    unique = sorted(set(captions))
    conds: dict[str, dict[str, torch.Tensor]] = {}
    missing = []
    for cap in unique:
        hit = cache.get("txt", _key(fp, cap))
        if hit is not None:
            conds[cap] = hit
        else:
            missing.append(cap)
    cached = len(conds)
    progress("captions", cached, len(unique))
    for start in range(0, len(missing), max(1, batch_size)):
        batch = missing[start:start + max(1, batch_size)]
        by_key = encoder.encode_captions(batch)
        for j, cap in enumerate(batch):
            conds[cap] = {k: v[j].contiguous() for k, v in by_key.items()}
            cache.put("txt", _key(fp, cap), conds[cap])
        progress("captions", cached + start + len(batch), len(unique))
    return conds, missing, cached


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


def _geometry(item: ImageItem) -> str:
    """What an image's pixels went through, for its cache key."""
    return f"{item.bucket[0]}x{item.bucket[1]}" + (" crop" if item.crop_only else "")


# -- reference images (edit training) --------------------------------------------------

def find_references(references: Path, images: Path, items: Sequence[ImageItem]
                    ) -> dict[int, Path]:
    """Each image's reference image: the file of the same relative name in
    ``references`` (any image extension); every image without one is listed."""
    references = Path(references)
    if not references.is_dir():
        raise DataError(f"--references: {references} is not a folder")
    found: dict[int, Path] = {}
    missing = []
    for i, item in enumerate(items):
        rel = item.path.relative_to(images)
        same = [references / rel] + [(references / rel).with_suffix(s)
                                     for s in sorted(IMAGE_SUFFIXES)]
        hit = next((c for c in same if c.is_file()), None)
        if hit is None:
            missing.append(rel.as_posix())
        else:
            found[i] = hit
    if missing:
        raise DataError(f"--references: {len(missing)} image(s) without a reference image "
                        f"of the same name in {references}: {_listing(missing)}")
    return found


def encode_references(encoder: Any, cache: EncodeCache, fp: str,
                      items: Sequence[ImageItem], refs: Mapping[int, Path],
                      batch_size: int) -> dict[int, torch.Tensor]:
    """Each reference image's latents, fitted to its image's bucket, from the cache
    (keyed by the reference's content) or encoded a batch at a time."""
    out: dict[int, torch.Tensor] = {}
    keys: dict[int, str] = {}
    todo: dict[tuple[int, int], list[int]] = {}
    for i, path in refs.items():
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        keys[i] = _key(fp, digest, _geometry(items[i]))
        hit = cache.get("ref", keys[i])
        if hit is not None and "latent" in hit:
            out[i] = hit["latent"]
        else:
            todo.setdefault(items[i].bucket, []).append(i)
    for bucket, idxs in sorted(todo.items()):
        for start in range(0, len(idxs), batch_size):
            chunk = idxs[start:start + batch_size]
            pixels = torch.stack([load_pixels(refs[i], bucket)[0] for i in chunk])
            for i, lat in zip(chunk, encoder.encode_images(pixels), strict=True):
                out[i] = lat.float().contiguous()
                cache.put("ref", keys[i], {"latent": out[i]})
    return out


def encode_paired_captions(encoder: Any, cache: EncodeCache, fp: str,
                           items: Sequence[ImageItem], refs: Mapping[int, Path],
                           progress: Progress) -> tuple[dict[int, dict[str, torch.Tensor]],
                                                        int, int]:
    """Each image's conditioning where the text encoder reads its caption together with
    the reference image (``encoder.captions_see_references``, Qwen-Image-Edit): one
    entry per (caption, reference as fitted to the image's bucket), from the cache or
    encoded now, one pair at a time. Returns the conditioning by item, how many were
    encoded and how many came from the cache."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    keys: dict[int, str] = {}
    todo = []
    for i, path in refs.items():
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        keys[i] = _key(fp, "with-reference", items[i].caption, digest, _geometry(items[i]))
        hit = cache.get("txt", keys[i])
        if hit is not None:
            out[i] = hit
        else:
            todo.append(i)
    cached = len(out)
    progress("captions", cached, len(refs))
    for n, i in enumerate(todo, 1):
        picture = load_picture(refs[i], items[i].bucket)
        row = encoder.encode_captions_with([items[i].caption], [picture])
        out[i] = {k: v[0].contiguous() for k, v in row.items()}
        cache.put("txt", keys[i], out[i])
        progress("captions", cached + n, len(refs))
    return out, len(todo), cached


# -- the run ---------------------------------------------------------------------------

def prepare(encoder: Any, images: Path, out: Path, *, captions_file: Path | None = None,
            caption_ext: str = ".txt", resolution: int | None = None, batch_size: int = 4,
            cache_dir: Path | None = None, progress: Progress | None = None,
            upscale: bool = False, items: list[ImageItem] | None = None,
            references: Path | None = None) -> PrepareReport:
    """Encode ``images`` (and their captions) with ``encoder`` into ``out``; ``items``:
    what :func:`collect` found there, when the caller checked the folder first. With
    ``references``, each image's reference image there (same name) is encoded too, to
    the image's bucket, as the ``reference`` conditioning of edit models."""
    images, out = Path(images), Path(out)
    if items is None:
        items = collect(images, captions_file, caption_ext)
    paired = bool(getattr(encoder, "captions_see_references", False))
    if paired and references is None:
        raise DataError(f"--references: the {encoder.family} model given "
                        f"({getattr(encoder, 'pipeline_class', 'an edit pipeline')}) encodes "
                        f"each caption together with its reference image; give "
                        f"--references FOLDER (each image's reference under the same name)")
    refs = find_references(references, images, items) if references is not None else {}
    res = int(resolution or encoder.default_resolution)
    assign_buckets(items, res, int(encoder.bucket_multiple), upscale)
    cache = EncodeCache(cache_dir if cache_dir is not None else out / ".cache")
    fp = str(encoder.fingerprint)
    report_progress = progress or (lambda stage, done, total: None)

    # Images: cached latents, or encode the rest a batch at a time (one bucket per batch).
    latents: dict[int, torch.Tensor] = {}
    geometry: dict[int, tuple[tuple[int, int], tuple[int, int]]] = {}
    todo: dict[tuple[int, int], list[int]] = {}  # by bucket
    for i, item in enumerate(items):
        hit = cache.get("img", _key(fp, item.digest, _geometry(item)))
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
            loaded = [load_pixels(items[i].path, bucket, items[i].crop_only) for i in chunk]
            encoded = encoder.encode_images(torch.stack([p for p, _, _ in loaded]))
            if not bool(torch.isfinite(encoded).all()):
                names = ", ".join(items[i].path.name for i in chunk)
                raise DataError(f"the VAE gave non-finite latents for {names}; try "
                                f"--dtype fp32")
            for i, lat, (_, crop, orig) in zip(chunk, encoded, loaded, strict=True):
                item = items[i]
                latents[i], geometry[i] = lat.float().contiguous(), (crop, orig)
                cache.put("img", _key(fp, item.digest, _geometry(item)),
                          {"latent": latents[i], "crop": torch.tensor(crop),
                           "original": torch.tensor(orig)})
            done += len(chunk)
            report_progress("images", done, len(items))

    ref_latents = encode_references(encoder, cache, fp, items, refs, batch_size)

    # Captions: each distinct caption once, or each (caption, reference) pair once.
    by_item: dict[int, dict[str, torch.Tensor]] = {}
    if paired:
        conds: dict[str, dict[str, torch.Tensor]] = {}
        by_item, encoded_captions, cached_captions = encode_paired_captions(
            encoder, cache, fp, items, refs, report_progress)
    else:
        conds, missing, cached_captions = encode_captions(
            encoder, cache, fp, {item.caption for item in items}, batch_size,
            report_progress)
        encoded_captions = len(missing)

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
            if i in ref_latents:
                extra = {**extra, "reference": ref_latents[i]}
            text = by_item[i] if paired else conds[items[i].caption]
            for k, v in {**text, **extra}.items():
                rows.setdefault(k, []).append(v)
        for k, vs in rows.items():
            cond_out[k + suffix] = stack_padded(vs).contiguous()
        files.append([items[i].path.relative_to(images).as_posix() for i in idxs])
        summary.append((bucket[0], bucket[1], len(idxs)))
    meta = {"loraengine.family": str(encoder.family), "loraengine.resolution": str(res),
            "loraengine.buckets": json.dumps(summary), "loraengine.images": json.dumps(files)}
    lat_path, cond_path = out / LATENTS_FILE, out / CONDITIONING_FILE
    # The files of an earlier run are replaced, both together or neither.
    write_pair(lat_path, cond_path, lat_out, cond_out, meta)
    resized = sorted((item.path.relative_to(images).as_posix(), item.size, item.bucket,
                      item.crop_only) for item in items if item.bucket != item.size)
    return PrepareReport(len(items), summary, len(items) - cached_images, cached_images,
                         encoded_captions, cached_captions, lat_path, cond_path, files,
                         resized)
