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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file

from loraengine.core.errors import DataError, OutputError
from loraengine.core.files import write_failure
from loraengine.core.train.state import first_line, state_problem

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# What ``save_checkpoint`` builds a checkpoint under (``mkdtemp``'s random suffix) and
# where it moves the previous one of the same step while replacing it.
_TMP_DIR = re.compile(r"^\.step_(\d+)\.[A-Za-z0-9_]+$")
_OLD_DIR = re.compile(r"^\.(step_\d+)\.old$")


#: The files of a checkpoint, each with its hash in the manifest.
CHECKPOINT_FILES = ("adapter.safetensors", "state.pt", "config.json")

#: (step, adapter tensors, state, folder) of a checkpoint found.
Found = tuple[int, dict[str, torch.Tensor], dict[str, Any], Path]

T = TypeVar("T")


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
        for name in CHECKPOINT_FILES:
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


def _manifest(path: Path) -> tuple[int, dict[str, str]]:
    """The step and the file hashes of a checkpoint's manifest, checked to be those
    ``save_checkpoint`` writes; ``DataError`` naming the folder and what is wrong."""
    where = f"checkpoint {path}: {MANIFEST}"
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except OSError as exc:
        raise DataError(f"checkpoint {path}: missing or unreadable {MANIFEST} "
                        f"({exc.strerror or first_line(exc)})") from None
    except ValueError:  # not JSON, or not UTF-8
        raise DataError(f"{where} is not valid JSON") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{where} holds {_kind(manifest)}, not a mapping")
    step, files = manifest.get("step"), manifest.get("files")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise DataError(f"{where}: 'step' is {step!r}, not a step number")
    if not isinstance(files, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise DataError(f"{where}: 'files' is {_kind(files)}, not a mapping of file "
                        f"names to SHA-256 hashes")
    unlisted = [name for name in CHECKPOINT_FILES if name not in files]
    if unlisted:
        raise DataError(f"{where} lists no hash for {', '.join(unlisted)}")
    return step, files


def _kind(value: Any) -> str:
    """What a JSON or pickled value is, for errors: "a list", "None"."""
    if value is None:
        return "None"
    name = type(value).__name__
    return f"an {name}" if name[:1] in "aeiou" else f"a {name}"


def verify(path: Path) -> None:
    """Raise ``DataError`` unless the checkpoint's files match its manifest."""
    path = Path(path)
    _, files = _manifest(path)
    for name, digest in files.items():
        f = path / name
        if not f.exists():
            raise DataError(f"checkpoint {path}: {name} is missing")
        try:
            actual = _sha256(f)
        except OSError as exc:
            raise DataError(f"checkpoint {path}: {name} cannot be read "
                            f"({exc.strerror or first_line(exc)})") from None
        if actual != digest:
            raise DataError(f"checkpoint {path}: {name} does not match its hash "
                            f"(truncated or corrupted)")


def load_checkpoint(path: Path) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]:
    """Verify and read one checkpoint: (step, adapter tensors, state). Whatever is
    wrong with it (a manifest, adapter or state that is not what ``save_checkpoint``
    writes) is a ``DataError`` naming the folder and the file."""
    path = Path(path)
    verify(path)
    step, _ = _manifest(path)
    adapter = _read(path, "adapter.safetensors", lambda f: load_file(str(f)))
    with warnings.catch_warnings():  # junk read as a pickle may warn of its "protocol"
        warnings.simplefilter("ignore")
        state = _read(path, "state.pt", lambda f: torch.load(f, map_location="cpu",
                                                             weights_only=True))
    if not isinstance(state, dict):
        raise DataError(f"checkpoint {path}: state.pt holds {_kind(state)}, not the "
                        f"state of a run")
    problem = state_problem(state)
    if problem:
        raise DataError(f"checkpoint {path}: state.pt {problem}")
    return step, adapter, state


def _read(path: Path, name: str, read: Callable[[Path], T]) -> T:
    """``read(path / name)``; a file that does not parse is a ``DataError``."""
    try:
        return read(path / name)
    except MemoryError:
        raise
    except Exception as exc:  # a parser of damaged bytes may raise any kind
        kind = "safetensors file" if name.endswith(".safetensors") else "saved state"
        raise DataError(f"checkpoint {path}: {name} is not a readable {kind} "
                        f"({type(exc).__name__}: {first_line(exc)})") from None


def load_latest_valid(folder: Path, before: int | None = None) -> Found | None:
    """The newest checkpoint that verifies; corrupt ones are reported and skipped."""
    return _newest_valid(folder, before)[0]


def _newest_valid(folder: Path, before: int | None = None
                  ) -> tuple[Found | None, list[DataError]]:
    """The newest checkpoint at or before ``before`` that loads, and the errors of the
    newer ones that did not (each also warned about)."""
    failed: list[DataError] = []
    for step, path in reversed(list_checkpoints(folder)):
        if before is not None and step > before:
            continue
        try:
            s, adapter, state = load_checkpoint(path)
        except DataError as exc:
            failed.append(exc)
            warnings.warn(f"{exc}; trying the previous checkpoint", CheckpointWarning,
                          stacklevel=3)
            continue
        return (s, adapter, state, path), failed
    return None, failed


def prune(folder: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints."""
    found = list_checkpoints(folder)
    for _, path in found[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


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
        found, failed = _newest_valid(folder, before)
        if found is None and failed:  # every one damaged: starting over would mix runs
            newest = str(failed[0]).removeprefix(f"checkpoint {folder}{os.sep}")
            raise DataError(f"--resume: no usable checkpoint in {folder} ({len(failed)} "
                            f"damaged; the newest, {newest})")
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
