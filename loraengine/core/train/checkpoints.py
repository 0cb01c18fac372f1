"""Training checkpoints: one folder per saved step, written atomically and verified.

A checkpoint folder ``step_<N>`` holds ``adapter.safetensors`` (the adapter's own
parameters, in their master dtype), ``state.pt`` (optimizer, LR schedule, grad scaler,
every random stream and the data position, the loss map), ``config.json`` and, written
last, ``manifest.json`` with the SHA-256 of each file. The folder is built under a
temporary name, every file fsynced, and renamed into place: a crash leaves either the
previous checkpoint set or the new one, never half a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from loraengine.core.errors import DataError, OutputError
from loraengine.core.files import write_failure

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# What ``save_checkpoint`` builds a checkpoint under (``mkdtemp``'s random suffix) and
# where it moves the previous one of the same step while replacing it.
_TMP_DIR = re.compile(r"^\.step_(\d+)\.[A-Za-z0-9_]+$")
_OLD_DIR = re.compile(r"^\.(step_\d+)\.old$")


class CheckpointWarning(UserWarning):
    """A checkpoint was unusable and an older one is used instead."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(folder: Path, step: int, adapter: Mapping[str, torch.Tensor],
                    state: Mapping[str, Any], config: Mapping[str, Any]) -> Path:
    """Write ``folder/step_<step>`` atomically and return its path."""
    folder = Path(folder)
    final = folder / f"step_{step:08d}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".step_{step:08d}.", dir=folder))
    except OSError as exc:
        raise OutputError(f"checkpoint {final}: cannot write ({write_failure(exc)}); "
                          f"{_kept_checkpoints(folder)}") from None
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in adapter.items()},
                  str(tmp / "adapter.safetensors"))
        torch.save(dict(state), tmp / "state.pt")
        (tmp / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
        files = {}
        for name in ("adapter.safetensors", "state.pt", "config.json"):
            _fsync(tmp / name)
            files[name] = _sha256(tmp / name)
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1),
                                    encoding="utf-8")
        _fsync(tmp / MANIFEST)
        _fsync(tmp)  # the folder's entries, before it is renamed into place
        if final.exists():  # the same step saved again (after a resume): replace it
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)  # from a crash between the renames
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync(folder)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = write_failure(exc)
        if reason is None:
            raise
        raise OutputError(f"checkpoint {final}: cannot write ({reason}); "
                          f"{_kept_checkpoints(folder)}, nothing half-written is left"
                          ) from None
    return final


def _kept_checkpoints(folder: Path) -> str:
    kept = list_checkpoints(folder)
    return (f"the checkpoints up to {kept[-1][1].name} are kept" if kept
            else "no checkpoint was kept")


def clean_debris(folder: Path) -> list[Path]:
    """Remove what a run killed inside ``save_checkpoint`` left in ``folder``: its
    temporary ``.step_N.<random>`` folders, and ``.step_N.old`` (the previous copy of a
    step being replaced), which is put back when the new one never got in place.
    Returns what was removed; nothing else in the folder is touched."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for child in sorted(folder.iterdir()):
        if not child.is_dir() or child.is_symlink():
            continue
        old = _OLD_DIR.match(child.name)
        if old and not (folder / old.group(1)).exists():
            os.replace(child, folder / old.group(1))  # killed between the two renames
            continue
        if old or _TMP_DIR.match(child.name):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Finished checkpoint folders under ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    return sorted(found)


def verify(path: Path) -> None:
    """Raise ``DataError`` unless the checkpoint's files match its manifest."""
    path = Path(path)
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"checkpoint {path}: missing or unreadable {MANIFEST}") from None
    for name, digest in files.items():
        f = path / name
        if not f.exists():
            raise DataError(f"checkpoint {path}: {name} is missing")
        if _sha256(f) != digest:
            raise DataError(f"checkpoint {path}: {name} does not match its hash "
                            f"(truncated or corrupted)")


def load_checkpoint(path: Path) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]:
    """Verify and read one checkpoint: (step, adapter tensors, state)."""
    verify(path)
    step = int(json.loads((Path(path) / MANIFEST).read_text())["step"])
    adapter = load_file(str(Path(path) / "adapter.safetensors"))
    state = torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=True)
    return step, adapter, state


def load_latest_valid(folder: Path, before: int | None = None
                      ) -> tuple[int, dict[str, torch.Tensor], dict[str, Any], Path] | None:
    """The newest checkpoint that verifies; corrupt ones are reported and skipped."""
    for step, path in reversed(list_checkpoints(folder)):
        if before is not None and step > before:
            continue
        try:
            s, adapter, state = load_checkpoint(path)
        except (DataError, RuntimeError, OSError, ValueError) as exc:
            warnings.warn(f"{exc}; trying the previous checkpoint", CheckpointWarning,
                          stacklevel=2)
            continue
        return s, adapter, state, path
    return None


def prune(folder: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints."""
    found = list_checkpoints(folder)
    for _, path in found[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


Found = tuple[int, dict[str, torch.Tensor], dict[str, Any], Path]


class Checkpointer:
    """The checkpoint folder of one run (``<output.name>.checkpoints``): saves, prunes
    to ``keep_last`` and finds the checkpoint to resume or roll back to."""

    def __init__(self, folder: Path, keep_last: int | None = None):
        self.folder = Path(folder)
        self.keep_last = keep_last

    def clean_debris(self) -> list[Path]:
        """Remove the temporary folders a killed save left (see ``clean_debris``)."""
        return clean_debris(self.folder)

    def save(self, step: int, adapter: Mapping[str, torch.Tensor],
             state: Mapping[str, Any], config: Mapping[str, Any]) -> Path:
        """Write ``step_<step>`` and drop all but the newest ``keep_last``."""
        path = save_checkpoint(self.folder, step, adapter, state, config)
        if self.keep_last:
            prune(self.folder, self.keep_last)
        return path

    def latest_valid(self, before: int | None = None) -> Found | None:
        """The newest checkpoint at or before step ``before`` that verifies."""
        return load_latest_valid(self.folder, before)

    def find(self, where: str | Path = "latest") -> Found | None:
        """The checkpoint to resume from: ``latest`` (the newest valid one in this
        run's folder), a checkpoints folder, or one ``step_N`` folder. A corrupt
        checkpoint is reported and the previous one used; ``None`` (with a warning)
        when ``latest`` finds none."""
        folder, before = self.folder, None
        if str(where) != "latest":
            path = Path(where)
            if (path / MANIFEST).exists() or path.name.startswith("step_"):
                folder = path.parent
                before = int(path.name.split("_")[-1]) if path.name[5:].isdigit() else None
            else:
                folder = path
            if not folder.exists():
                raise DataError(f"--resume: {where} does not exist")
        found = load_latest_valid(folder, before)
        if found is None:
            if str(where) != "latest":
                raise DataError(f"--resume: no usable checkpoint in {folder}")
            warnings.warn(f"no checkpoint in {folder}; starting from step 0",
                          CheckpointWarning, stacklevel=3)
        return found


#: Keys that may change between a run and its resume without changing what is trained.
_RESUMABLE_CHANGES = ("training.steps", "training.device", "training.dist_timeout",
                      "output.", "validation.", "early_stop.", "memory.")


def saved_config(checkpoint: Path) -> dict[str, Any] | None:
    """The config a checkpoint was saved with (``None`` when unreadable)."""
    try:
        saved = json.loads((Path(checkpoint) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None


def config_changes(checkpoint: Path, current: dict[str, Any]) -> list[str]:
    """``key: saved -> now`` for every config value that differs from the checkpoint's,
    except those a resume may change freely (steps, device, outputs, memory...)."""
    try:
        saved = json.loads((Path(checkpoint) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix[:-1]: d}
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out

    a, b = flat(saved), flat(current)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not k.startswith(_RESUMABLE_CHANGES)]
