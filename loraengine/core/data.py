"""Training data: latents and conditioning from safetensors files or tensors, and a
seeded, resumable stream of sample indices."""

from __future__ import annotations

import os
import stat
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from loraengine.core.errors import DataError

#: What a file that is not a regular file is, for the error that refuses it.
_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


class DataWarning(UserWarning):
    """Training data was accepted with a change (e.g. samples skipped)."""


def open_regular(path: Path, what: str) -> BinaryIO:
    """``path`` opened for reading, unbuffered, once its ``stat`` shows a regular file:
    a FIFO or a device would block or stream forever. Anything else is a ``DataError``
    naming ``what`` and the file, with the system's reason where one did not open.
    safetensors reports every file it cannot open as missing, so a reader opens the file
    here first to say why."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"{what} file not found: {path}") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the name
        raise unreadable(path, what, exc) from None
    if stat.S_ISDIR(info.st_mode):
        raise DataError(f"{what} path is a folder, not a safetensors file: {path}")
    if not stat.S_ISREG(info.st_mode):
        kind = next((k for test, k in _FILE_KINDS if test(info.st_mode)), "not a regular file")
        raise DataError(f"{what} path {path} is {kind}, not a safetensors file")
    try:
        return open(path, "rb", buffering=0)
    except OSError as exc:
        raise unreadable(path, what, exc) from None


def unreadable(path: Path, what: str, exc: BaseException) -> DataError:
    """The error for a file that does not open, with the system's reason."""
    return DataError(f"{what}: cannot read {path}: "
                     f"{getattr(exc, 'strerror', None) or exc}")


def _check_regular_file(path: Path, what: str) -> None:
    """:func:`open_regular`, for a reader that opens the file by name afterwards."""
    with open_regular(path, what):
        pass


def read_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Load a safetensors file, naming ``what`` and the file in any error. Only a
    regular file is opened."""
    path = Path(path)
    _check_regular_file(path, what)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise DataError(f"{what} file {path} is not a readable safetensors file: "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                        ) from None


#: safetensors' dtype names -> torch dtypes (those a data file can hold).
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
    "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
    "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def read_safetensors_layout(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors as ``meta`` tensors: names, shapes and dtypes from
    its header alone, no data read. The checks of ``make_dataset`` run on them as on
    the loaded tensors (all but the NaN/inf scan, which needs the values)."""
    path = Path(path)
    _check_regular_file(path, what)
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118  # a safe_open handle is not a mapping
                part = fh.get_slice(key)
                dtype = _SAFETENSORS_DTYPES.get(str(part.get_dtype()))
                if dtype is None:
                    raise DataError(f"{what} file {path}: tensor {key!r} has the dtype "
                                    f"{part.get_dtype()}, which the engine cannot train on")
                out[key] = torch.empty(list(part.get_shape()), dtype=dtype, device="meta")
    except DataError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise DataError(f"{what} file {path} is not a readable safetensors file: "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                        ) from None
    return out


@dataclass(frozen=True)
class DataExpectations:
    """What the model takes, checked against the data when it is loaded; ``None`` or
    an empty mapping leaves that property unchecked (see ``LoadedModel``)."""

    latent_ndim: int | None = None
    latent_channels: int | None = None
    cond_widths: Mapping[str, int] = field(default_factory=dict)
    #: Skip samples holding NaN or inf (with a warning) instead of refusing the data.
    allow_nonfinite: bool = False


@dataclass
class Dataset:
    """N latents, each with its own conditioning tensors (first dimension N)."""

    latents: torch.Tensor
    cond: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.latents[indices], {k: v[indices] for k, v in self.cond.items()}


class _NoSampleLeft(DataError):
    """Every sample of a tensor pair held NaN or inf and was skipped."""


def stack_padded(rows: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """``rows`` stacked (``dim`` 0) or concatenated (``dim`` 1, batches ``[n, L, ...]``)
    after zero-padding their sequence axis (``dim``) to the longest: captions whose
    token count varies come with a ``mask`` whose padding is zero too."""
    if len({tuple(r.shape) for r in rows}) == 1:
        return torch.stack(rows) if dim == 0 else torch.cat(rows)
    length = max(int(r.shape[dim]) for r in rows)
    padded = []
    for r in rows:
        if r.shape[dim] < length:
            shape = list(r.shape)
            shape[dim] = length - int(r.shape[dim])
            r = torch.cat([r, r.new_zeros(shape)], dim=dim)
        padded.append(r)
    return torch.stack(padded) if dim == 0 else torch.cat(padded)


def make_dataset(latents: torch.Tensor | Mapping[str, torch.Tensor],
                 conditioning: torch.Tensor | Mapping[str, torch.Tensor],
                 *, required: tuple[str, ...] = ("cond",), latents_name: str = "latents",
                 cond_name: str = "conditioning",
                 expect: DataExpectations | None = None) -> Dataset:
    """Check shapes, dtypes and values and pair each latent with its conditioning.

    One conditioning entry is repeated for every latent; any other count mismatch is
    an error naming the tensor. ``expect`` says what the model takes (rank, channels,
    conditioning widths); NaN or inf in a sample is an error naming its index unless
    ``expect.allow_nonfinite``, which skips such samples.
    """
    expect = expect or DataExpectations()
    if isinstance(latents, Mapping):
        if "latents" not in latents:
            bucketed = any(_bucket_suffix(k) and k.startswith("latents.") for k in latents)
            hint = ("; it holds buckets (latents.<i>): set data.bucket_mode: true"
                    if bucketed else "")
            raise DataError(f"{latents_name}: no tensor named 'latents' (found: "
                            f"{_listed(latents)}){hint}")
        latents = latents["latents"]
    if not isinstance(latents, torch.Tensor):
        raise DataError(f"{latents_name}: expected a tensor, got {type(latents).__name__}")
    _check_latents(latents, latents_name, expect)
    n = int(latents.shape[0])
    cond = {"cond": conditioning} if isinstance(conditioning, torch.Tensor) else dict(
        conditioning)
    for key in required:
        if key not in cond:
            raise DataError(f"{cond_name}: no tensor named {key!r} (found: "
                            f"{', '.join(sorted(cond)) or 'none'})")
    out: dict[str, torch.Tensor] = {}
    bad = _nonfinite_rows(latents, latents_name, "latents", expect.allow_nonfinite)
    for key, t in cond.items():
        if not isinstance(t, torch.Tensor):
            raise DataError(f"{cond_name}: {key!r} is not a tensor")
        if key == "cond" and t.ndim == 2:
            if t.shape[0] == n and n > 1:  # as many rows as latents: one vector each?
                warnings.warn(f"{cond_name}: tensor 'cond' {list(t.shape)} is 2-D, read as "
                              f"one sequence of {t.shape[0]} tokens shared by every latent; "
                              f"for one embedding per latent give [N,1,D]", DataWarning,
                              stacklevel=3)
            t = t.unsqueeze(0)  # one [L, D] entry
        if key == "cond" and t.ndim != 3:
            raise DataError(f"{cond_name}: tensor 'cond' must be [N,L,D] or [1,L,D]; "
                            f"got shape {list(t.shape)}")
        _check_cond(t, key, cond_name, expect)
        if t.shape[0] != 1 and t.shape[0] != n:
            raise DataError(f"{cond_name}: tensor {key!r} has {t.shape[0]} entries but "
                            f"there are {n} latents; give one entry (used for all) or "
                            f"one per latent")
        if t.is_floating_point():
            rows = _nonfinite_rows(t, cond_name, key, expect.allow_nonfinite)
            bad = bad | (rows.expand(n) if rows.shape[0] == 1 else rows)
        if t.shape[0] == 1 and n != 1:
            t = t.expand(n, *t.shape[1:])
        out[key] = t
    if bool(bad.any()):
        keep = ~bad
        kept = int(keep.sum())
        if kept == 0:
            raise _NoSampleLeft(f"{latents_name}: every one of the {n} samples holds NaN "
                                f"or inf values in its latents or conditioning")
        warnings.warn(f"{latents_name}: skipped {n - kept} of {n} samples holding NaN or "
                      f"inf values (data.allow_nonfinite); the first is sample "
                      f"{int(bad.nonzero()[0])}", DataWarning, stacklevel=2)
        latents = latents[keep]
        out = {k: v[keep] for k, v in out.items()}
    return Dataset(latents, out)


def _listed(tensors: Mapping[str, Any], most: int = 8) -> str:
    names = sorted(tensors)
    more = f", ... ({len(names)} in all)" if len(names) > most else ""
    return (", ".join(names[:most]) + more) or "none"


def _check_latents(latents: torch.Tensor, name: str, expect: DataExpectations) -> None:
    """Rank, dtype, sample count, empty dimensions and channels of a latents tensor."""
    shape = list(latents.shape)
    if latents.ndim not in (4, 5):
        raise DataError(f"{name}: tensor 'latents' must be [N,C,H,W] or "
                        f"[N,C,T,H,W]; got shape {shape}")
    if expect.latent_ndim is not None and latents.ndim != expect.latent_ndim:
        layout = "[N,C,H,W]" if expect.latent_ndim == 4 else "[N,C,T,H,W]"
        raise DataError(f"{name}: tensor 'latents' is {latents.ndim}-D (shape {shape}), "
                        f"but the model takes {expect.latent_ndim}-D latents {layout}")
    if not latents.is_floating_point():
        raise DataError(f"{name}: tensor 'latents' must be floating point, "
                        f"got {latents.dtype}")
    if shape[0] == 0:
        raise DataError(f"{name}: tensor 'latents' holds no samples")
    if 0 in shape[1:]:
        raise DataError(f"{name}: tensor 'latents' has an empty dimension: shape {shape}")
    if expect.latent_channels is not None and shape[1] != expect.latent_channels:
        raise DataError(f"{name}: tensor 'latents' has {shape[1]} channels (shape {shape}), "
                        f"but the model takes {expect.latent_channels}")


def _check_cond(t: torch.Tensor, key: str, name: str, expect: DataExpectations) -> None:
    """Dtype, empty dimensions and width of one conditioning tensor. A tensor whose
    width the model states is an embedding and must be floating point; what the model
    says nothing about (size ids, a custom module's extras) may be of any dtype."""
    shape = list(t.shape)
    width = expect.cond_widths.get(key)
    if width is not None and not t.is_floating_point():
        raise DataError(f"{name}: tensor {key!r} must be floating point, got {t.dtype}")
    if t.ndim == 0:
        raise DataError(f"{name}: tensor {key!r} is a scalar; it needs one entry per "
                        f"latent (or one for all)")
    if 0 in shape:
        raise DataError(f"{name}: tensor {key!r} has an empty dimension: shape {shape}")
    if width is not None and shape[-1] != width:
        raise DataError(f"{name}: tensor {key!r} is {shape[-1]} wide (shape {shape}), "
                        f"but the model takes {width}")


def first_nonfinite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The first name (sorted) of a floating tensor holding NaN or inf, or ``None``."""
    for key in sorted(tensors):
        t = tensors[key]
        if t.is_floating_point() and not t.is_meta:
            if t.element_size() < 2:
                t = t.float()  # 8-bit floats have no isfinite kernel everywhere
            if not bool(torch.isfinite(t).all()):
                return key
    return None


#: Samples checked for NaN/inf at once (bounds the temporary mask's memory).
_FINITE_CHUNK = 256


def _nonfinite_rows(t: torch.Tensor, name: str, key: str, allow: bool) -> torch.Tensor:
    """``[N]`` bools: which samples of ``t`` hold NaN or inf. Unless ``allow``, the
    first such sample is a ``DataError`` naming the file, tensor and index."""
    if t.is_meta:  # a file's layout only (``read_safetensors_layout``): no values
        return torch.zeros(int(t.shape[0]), dtype=torch.bool)
    rows = []
    for start in range(0, int(t.shape[0]), _FINITE_CHUNK):
        part = t[start:start + _FINITE_CHUNK]
        if part.element_size() < 2:
            part = part.float()  # 8-bit floats have no isfinite kernel everywhere
        rows.append(~torch.isfinite(part).reshape(part.shape[0], -1).all(dim=1))
    bad = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.bool)
    if not allow and bool(bad.any()):
        first = int(bad.nonzero()[0])
        raise DataError(f"{name}: tensor {key!r} sample {first} holds NaN or inf values "
                        f"(data.allow_nonfinite: true skips such samples)")
    return bad.cpu()


class IndexStream:
    """An endless stream of sample indices: a fresh seeded permutation each epoch.

    Drawing ``k·b`` indices at once gives the same indices as ``k`` draws of ``b``, so
    gradient accumulation sees the same samples as one large batch. ``state()`` /
    ``load_state()`` make the position resumable.
    """

    def __init__(self, n: int, generator: torch.Generator):
        self.n = n
        self.generator = generator
        self.epoch = 0
        self.pos = 0
        self._perm = torch.randperm(n, generator=generator)

    def take(self, count: int) -> torch.Tensor:
        out = []
        while count > 0:
            if self.pos >= self.n:
                self._perm = torch.randperm(self.n, generator=self.generator)
                self.epoch += 1
                self.pos = 0
            k = min(count, self.n - self.pos)
            out.append(self._perm[self.pos:self.pos + k])
            self.pos += k
            count -= k
        return torch.cat(out)

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos, "perm": self._perm.clone(),
                "generator": self.generator.get_state()}

    def mismatch(self, state: Mapping[str, Any]) -> str | None:
        """Why ``state`` (of ``state()``) cannot continue this stream, or ``None``: it
        was a stream over another number of samples (the data changed)."""
        made_on = int(state["perm"].numel())
        if made_on != self.n:
            return f"it was made on {made_on} samples and the data now has {self.n}"
        return None

    def load_state(self, state: Mapping[str, Any]) -> None:
        problem = self.mismatch(state)
        if problem is not None:
            raise DataError(problem)
        self.epoch = int(state["epoch"])
        self.pos = int(state["pos"])
        self._perm = state["perm"].clone()
        self.generator.set_state(state["generator"])


class BucketedDataset(Dataset):
    """Several same-resolution groups behind one global index space: bucket ``i`` holds
    global indices ``offsets[i] .. offsets[i] + len(bucket i) - 1``. A batch must come
    from one bucket."""

    def __init__(self, buckets: list[Dataset]):
        self.buckets = buckets
        self.offsets = []
        total = 0
        for b in buckets:
            self.offsets.append(total)
            total += len(b)
        self.total = total
        self.latents = buckets[0].latents  # for shape/dtype queries
        self.cond = buckets[0].cond

    def __len__(self) -> int:
        return self.total

    def locate(self, index: int) -> int:
        for i in range(len(self.buckets) - 1, -1, -1):
            if index >= self.offsets[i]:
                return i
        raise IndexError(index)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        i = self.locate(int(indices[0]))
        local = indices - self.offsets[i]
        if bool((local < 0).any()) or bool((local >= len(self.buckets[i])).any()):
            raise ValueError("a batch must come from a single bucket")
        return self.buckets[i].batch(local)


def make_bucketed_dataset(latents: Mapping[str, torch.Tensor], conditioning:
                          Mapping[str, torch.Tensor], *, required: tuple[str, ...] = ("cond",),
                          latents_name: str = "latents", cond_name: str = "conditioning",
                          expect: DataExpectations | None = None) -> BucketedDataset:
    """Pair ``latents.<i>`` with ``cond.<i>`` (and ``<extra>.<i>``) for every bucket i,
    each checked as ``make_dataset`` checks it; a bucket whose every sample was skipped
    for NaN/inf values is left out."""
    ids = sorted(int(k.split(".", 1)[1]) for k in latents
                 if k.startswith("latents.") and k.split(".", 1)[1].isdigit())
    if not ids:
        raise DataError(f"{latents_name}: bucket mode needs tensors named latents.<i> "
                        f"(found: {', '.join(sorted(latents)) or 'none'})")
    buckets = []
    for i in ids:
        # shared entries (no suffix) apply to every bucket; ``<key>.<i>`` to bucket i
        cond_i = {k: v for k, v in conditioning.items() if not _bucket_suffix(k)}
        cond_i.update({k.rsplit(".", 1)[0]: v for k, v in conditioning.items()
                       if _bucket_suffix(k) == str(i)})
        missing = [k for k in required if k not in cond_i]
        if missing:
            raise DataError(f"{cond_name}: bucket {i} has no tensor "
                            f"{', '.join(f'{m}.{i}' for m in missing)}")
        try:
            buckets.append(make_dataset(latents[f"latents.{i}"], cond_i, required=required,
                                        latents_name=f"{latents_name} (latents.{i})",
                                        cond_name=f"{cond_name} (bucket {i})",
                                        expect=expect))
        except _NoSampleLeft as exc:
            warnings.warn(f"{exc}; bucket {i} is skipped", DataWarning, stacklevel=2)
    if not buckets:
        raise DataError(f"{latents_name}: no bucket has a sample without NaN or inf values")
    return BucketedDataset(buckets)


def _bucket_suffix(key: str) -> str:
    tail = key.rsplit(".", 1)[-1] if "." in key else ""
    return tail if tail.isdigit() else ""


class BucketStream:
    """Draws a bucket in proportion to its size, then a batch from that bucket's own
    seeded index stream. Same interface as ``IndexStream`` (global indices)."""

    def __init__(self, dataset: BucketedDataset, generator: torch.Generator):
        self.dataset = dataset
        self.generator = generator
        self.sizes = torch.tensor([len(b) for b in dataset.buckets], dtype=torch.float64)
        seeds = torch.randint(0, 2**62, (len(dataset.buckets),), generator=generator)
        self.streams = [IndexStream(len(b), torch.Generator().manual_seed(int(s)))
                        for b, s in zip(dataset.buckets, seeds, strict=True)]

    def take(self, count: int) -> torch.Tensor:
        i = int(torch.multinomial(self.sizes, 1, generator=self.generator))
        return self.streams[i].take(count) + self.dataset.offsets[i]

    def state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(),
                "streams": [s.state() for s in self.streams]}

    def mismatch(self, state: Mapping[str, Any]) -> str | None:
        """As ``IndexStream.mismatch``, for the buckets and each one's stream."""
        if len(state["streams"]) != len(self.streams):
            return (f"it was made on {len(state['streams'])} buckets and the data now has "
                    f"{len(self.streams)}")
        for i, (s, st) in enumerate(zip(self.streams, state["streams"], strict=True)):
            problem = s.mismatch(st)
            if problem is not None:
                return f"bucket {i}: {problem}"
        return None

    def load_state(self, state: Mapping[str, Any]) -> None:
        problem = self.mismatch(state)
        if problem is not None:
            raise DataError(problem)
        self.generator.set_state(state["generator"])
        for s, st in zip(self.streams, state["streams"], strict=True):
            s.load_state(st)


def group_into_buckets(latents: Mapping[str, torch.Tensor], conditioning:
                       Mapping[str, torch.Tensor], *, video: bool | None = None
                       ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Group mixed-size latents into same-shape buckets.

    Input: tensors named ``latents.<k>`` (each ``[C,H,W]`` or ``[n,C,H,W]``; video:
    ``[C,T,H,W]`` or ``[n,C,T,H,W]``) and the matching ``<key>.<k>`` conditioning
    entries (``cond.<k>``, ``pooled.<k>``...). ``video`` says which; ``None`` decides
    from the tensors (video when a latent is 5-D, or 4-D with one ``[L,D]`` ``cond``). Video buckets by frames × height × width.
    Output: ``latents.<i>`` / ``<key>.<i>`` per bucket, buckets ordered by shape, samples
    in input order within a bucket.
    """
    items = sorted(((k.split(".", 1)[1], v) for k, v in latents.items()
                    if k.startswith("latents.")),
                   key=lambda kv: (not kv[0].isdigit(), int(kv[0]) if kv[0].isdigit()
                                   else 0, kv[0]))
    if not items:
        raise DataError("no tensors named latents.<k> to group")
    if video is None:  # a 4-D latent whose text is one [L,D] entry is one clip
        video = any(v.ndim == 5 or (v.ndim == 4 and getattr(
            conditioning.get(f"cond.{k}"), "ndim", 0) == 2) for k, v in items)
    rank = 4 if video else 3  # of one sample: [C,T,H,W] or [C,H,W]
    groups: dict[tuple[int, ...], list[tuple[str, torch.Tensor, bool]]] = {}
    for k, v in items:
        if v.ndim not in (rank, rank + 1):
            layout = "[C,T,H,W] or [n,C,T,H,W]" if video else "[C,H,W] or [n,C,H,W]"
            raise DataError(f"latents.{k}: expected {layout}; got shape {list(v.shape)}")
        single = v.ndim == rank  # one latent: its conditioning has no batch dim
        v = v.unsqueeze(0) if single else v
        groups.setdefault(tuple(v.shape[1:]), []).append((k, v, single))
    cond_keys = sorted({c.rsplit(".", 1)[0] for c in conditioning if "." in c})
    out_lat: dict[str, torch.Tensor] = {}
    out_cond: dict[str, torch.Tensor] = {}
    for i, shape in enumerate(sorted(groups)):
        members = groups[shape]
        out_lat[f"latents.{i}"] = torch.cat([v for _, v, _ in members])
        for ck in cond_keys:
            parts = []
            for k, v, single in members:
                c = conditioning.get(f"{ck}.{k}")
                if c is None:
                    raise DataError(f"conditioning: no tensor {ck}.{k} for latents.{k}")
                c = c.unsqueeze(0) if single else c
                if c.shape[0] not in (1, v.shape[0]):
                    raise DataError(f"conditioning: {ck}.{k} has {c.shape[0]} entries for "
                                    f"{v.shape[0]} latents")
                parts.append(c.expand(v.shape[0], *c.shape[1:]))
            out_cond[f"{ck}.{i}"] = torch.cat(parts)
    return out_lat, out_cond
