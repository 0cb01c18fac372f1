"""LoRA files: atomic writes, metadata, and reading files back into module tensors."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from loraengine.core.data import read_safetensors
from loraengine.core.errors import DataError, NonFiniteError

# ComfyUI names trained files ``<prefix>_<N>_steps_<counter>_``; others use ``_steps_<N>_``
_STEPS_IN_NAME = (re.compile(r"_(\d+)_steps_"), re.compile(r"_steps_(\d+)_"))


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path in ``path``'s folder; on success fsync and rename it over
    ``path``. On failure the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: umask() can only be read by setting it


def _umask() -> int:
    return _UMASK


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, writer: Callable[[Path], None]) -> None:
    with atomic_path(path) as tmp:
        writer(tmp)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda p: p.write_text(text, encoding="utf-8"))


def save_lora(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]
              ) -> None:
    """Write a LoRA file atomically. Refuses non-finite tensors (nothing is written)."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not
           bool(torch.isfinite(v).all())]
    if bad:
        raise NonFiniteError(f"refusing to write {path}: non-finite values in "
                             f"{', '.join(sorted(bad)[:5])}{' ...' if len(bad) > 5 else ''}")
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    data = {k: v.contiguous() for k, v in tensors.items()}
    write_atomic(path, lambda p: save_file(data, str(p), metadata=meta))


def read_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:
        raise DataError(f"{path}: not a readable safetensors file ({exc})") from None


def load_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = read_safetensors(Path(path), "LoRA")
    return tensors, read_metadata(path)


def steps_of(path: Path, metadata: Mapping[str, str]) -> int:
    """Steps already trained into a file: metadata first, then the name (ComfyUI's
    ``..._<N>_steps_...`` or ``..._steps_<N>_...``)."""
    for key in ("loraengine.steps", "ss_steps"):
        if key in metadata:
            try:
                return int(metadata[key])
            except ValueError:
                pass
    name = Path(path).name + "_"
    for pattern in _STEPS_IN_NAME:
        m = pattern.search(name)
        if m:
            return int(m.group(1))
    return 0


def split_modules(tensors: Mapping[str, torch.Tensor], exporters: Iterable[Any],
                  module_paths: Iterable[str]) -> tuple[str, dict[str, dict[str, torch.Tensor]]]:
    """Find the exporter whose key format the file is in and group tensors per module."""
    paths = list(module_paths)
    for exporter in exporters:
        grouped = exporter.from_file(tensors, paths)
        if grouped:
            return exporter.name, grouped
    sample = ", ".join(sorted(tensors)[:3])
    raise DataError(f"no key format matches this file's tensors (e.g. {sample}) against "
                    f"the model's layers")
