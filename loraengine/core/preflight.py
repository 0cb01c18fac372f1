"""Checks a run's outputs before any model is loaded or step taken.

A run that cannot write its LoRA should fail in the first second, not after hours of
training: every output path is proven usable (created where that is harmless, else its
nearest existing folder probed with a file that is removed again), names are checked
for bytes a file system or a terminal will not take, and free disk is compared with
what one checkpoint plus the LoRA will take. Each problem is a ``ConfigError`` naming
the key.

It also removes the temporary files and folders an earlier, killed run of the same
name left behind (only the names the engine itself gives them).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from safetensors import safe_open

from loraengine.core.errors import ConfigError
from loraengine.core.files import path_overlap

#: What a checkpoint holds per adapter parameter byte: the weights plus an optimizer
#: state of about twice their size (Adam's two moments); the basis of the disk estimate.
CHECKPOINT_FACTOR = 3

#: The longest thing the engine adds around ``output.name`` in a file name: the
#: temporary copy ``.<name>.best.safetensors.<8 random>.tmp`` of ``atomic_path``.
_LONGEST_SUFFIX = len(".") + len(".best.safetensors") + len(".abcdefgh.tmp")

# Control bytes (C0, DEL, C1): a terminal acts on them when a file name is printed.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def _existing_ancestor(path: Path) -> Path:
    """``path`` or the nearest folder above it that exists."""
    current = path
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def _dangling_link(path: Path) -> Path | None:
    """``path`` or the folder above it that is a symbolic link leading nowhere (to a
    missing target, or round a loop), which no folder can be made at."""
    for current in (path, *path.parents):
        if current.exists():
            return None
        if os.path.islink(current):
            return current
    return None


def _describe(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _probe(folder: Path, key: str, shown: Path) -> None:
    """Create and remove a file in ``folder``; ``ConfigError`` naming ``key`` when the
    folder does not take one."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".loraengine-probe.", dir=folder)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot write in {shown} ({_describe(exc)})") from None
    os.close(fd)
    os.unlink(probe)


def check_name(name: str, key: str = "output.name") -> None:
    """Refuse characters no file system takes (NUL, a path separator) and control bytes
    (ANSI escapes) that would end up in file names and printed paths."""
    if "\x00" in name:
        raise ConfigError(f"{key}: contains a NUL byte, which no file name can hold")
    bad = _CONTROL.search(name)
    if bad:
        raise ConfigError(f"{key}: contains the control character {bad.group()!r} "
                          f"(at {bad.start()}); file names take printable characters only")


def _check_folder(folder: Path, key: str, *, create: bool) -> None:
    """``folder`` is a writable folder, or can become one."""
    link = _dangling_link(folder)
    if link is not None:
        raise ConfigError(f"{key}: {folder} cannot be created: {link} is a symbolic link "
                          f"that leads nowhere (a missing target or a loop)")
    if folder.exists():
        if not folder.is_dir():
            raise ConfigError(f"{key}: {folder} exists and is not a folder")
        _probe(folder, key, folder)
        return
    above = _existing_ancestor(folder)
    if not above.is_dir():
        raise ConfigError(f"{key}: {folder} cannot be created: {above} is a file, not a "
                          f"folder")
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{key}: cannot create {folder} ({_describe(exc)})") from None
        _probe(folder, key, folder)
    else:
        _probe(above, key, folder)


def _check_file(path: Path, key: str) -> None:
    """An output file's path is not taken by a folder."""
    if path.is_dir():
        raise ConfigError(f"{key}: {path} is an existing folder; the file cannot be "
                          f"written there (remove it or choose another output.name)")


def output_paths(config: Any) -> dict[str, Path]:
    """The files and folders a run writes, by the key that decides each one."""
    out = config.output
    folder = Path(out.dir)
    name = out.name
    paths = {"output.name": folder / f"{name}.safetensors",
             "output.name (loss map)": folder / f"{name}.loss.json"}
    if out.plot:
        paths["output.plot"] = folder / f"{name}.loss.png"
    if out.keep_best:
        paths["output.keep_best"] = folder / f"{name}.best.safetensors"
    if out.save_every:
        paths["output.save_every"] = folder / f"{name}.checkpoints"
    if out.samples is not None:
        paths["output.samples"] = folder / f"{name}.samples"
    return paths


def input_paths(config: Any) -> dict[str, Path]:
    """Every path the config reads from, by its dotted key (``output.dir`` aside): the
    model's folder or file, the data files, ``adapter.existing``... found by walking
    the validated sections, so a plugin's own path options count too."""
    found: dict[str, Path] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, Path):
            if key != "output.dir":
                found[key] = value
        elif isinstance(value, BaseModel):
            for name in type(value).model_fields:
                walk(getattr(value, name, None), f"{key}.{name}" if key else name)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, f"{key}.{i}")
        elif isinstance(value, dict):
            for name, item in value.items():
                walk(item, f"{key}.{name}")

    walk(config, "")
    return found


def _check_apart(outputs: dict[str, Path], inputs: dict[str, Path]) -> None:
    """No output may replace an input: an output file that is an input file, or an
    existing safetensors file inside an input folder that this engine did not write
    (a model's weights), and no output folder (checkpoints, samples) may hold an input.
    An earlier run's LoRA in the model's folder is replaced as anywhere else, and so is
    an ``adapter.existing`` that is the output itself (it is read before training and
    the output replaces it whole at the end: training a LoRA on in place)."""
    for out_key, out in outputs.items():
        for in_key, source in inputs.items():
            relation = path_overlap(out, source)
            if relation == "is" and in_key == "adapter.existing":
                continue  # training a LoRA on in place: read first, replaced whole
            if relation == "is inside" and not _foreign_weights(
                    Path(os.path.realpath(out))):
                continue
            how = {"is": "is", "contains": "holds",
                   "is inside": "would replace a weights file of"}.get(relation or "")
            if how is None:
                continue
            raise ConfigError(f"{out_key}: {out} {how} {in_key} {source}; the run would "
                              f"write over its own input (choose another output.dir or "
                              f"output.name)")


def _foreign_weights(path: Path) -> bool:
    """Whether ``path`` is a safetensors file that no loraengine run wrote (its metadata
    has no ``loraengine.`` entry; unreadable counts as foreign)."""
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    try:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
    except Exception:  # a damaged header: not a file of ours either
        return True
    return not any(key.startswith("loraengine.") for key in meta)


def check_outputs(config: Any, *, create: bool = False) -> None:
    """Prove every output path of ``config`` usable; ``ConfigError`` naming the key.

    With ``create`` the output folder and the run's subfolders are made; without, a
    missing folder's nearest existing parent is probed instead (nothing is left behind,
    for runs that end up writing nothing)."""
    out = config.output
    check_name(out.name)
    if "\x00" in str(out.dir):
        raise ConfigError("output.dir: contains a NUL byte, which no path can hold")
    folder = Path(out.dir)
    _check_folder(folder, "output.dir", create=create)
    longest = len(os.fsencode(out.name)) + _LONGEST_SUFFIX
    limit = _name_max(_existing_ancestor(folder))
    if longest > limit:
        raise ConfigError(f"output.name: {len(out.name)} characters is too long for the "
                          f"file system at {folder}: its file names take at most {limit} "
                          f"bytes and the engine's names add up to {_LONGEST_SUFFIX} to it")
    outputs = output_paths(config)
    _check_apart(outputs, input_paths(config))
    for key, path in outputs.items():
        if key in ("output.save_every", "output.samples"):
            if path.exists() and not path.is_dir():
                raise ConfigError(f"{key}: {path} exists and is not a folder")
            if path.is_dir():
                _probe(path, key, path)
        else:
            _check_file(path, key)


def preflight(config: Any) -> None:
    """The checks ``build_pipeline`` runs first. A config without an ``output`` section
    may be trained in memory with nothing written, so its (default) outputs are left to
    the trainer, which checks them when it does write."""
    fields = getattr(config, "model_fields_set", None)
    if fields is not None and "output" not in fields:
        return
    check_outputs(config)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def needed_bytes(config: Any, adapter_bytes: int, file_bytes: int) -> int:
    """What the run's outputs will take at once: the LoRA (and its best copy) plus, when
    checkpoints are saved, one checkpoint (``CHECKPOINT_FACTOR`` × the adapter) and the
    temporary copy of the next one."""
    out = config.output
    total = file_bytes * (2 if out.keep_best else 1)
    if out.save_every:
        total += CHECKPOINT_FACTOR * adapter_bytes * 2
    return total


def check_disk(config: Any, adapter_bytes: int, file_bytes: int) -> None:
    """``ConfigError`` naming ``output.dir`` when its file system has less free space
    than ``needed_bytes``."""
    folder = Path(config.output.dir)
    try:
        free = shutil.disk_usage(_existing_ancestor(folder)).free
    except OSError:
        return  # nothing to compare with; writes report their own errors
    need = needed_bytes(config, adapter_bytes, file_bytes)
    if need > free:
        raise ConfigError(f"output.dir: {folder} has {_fmt_bytes(free)} free; the LoRA"
                          f"{' and one checkpoint' if config.output.save_every else ''} "
                          f"need about {_fmt_bytes(need)}")


# -- debris of killed runs -----------------------------------------------------------------

def _tmp_name(filename: str) -> re.Pattern[str]:
    """The temporary name ``atomic_path`` gives a copy of ``filename``."""
    return re.compile(rf"^\.{re.escape(filename)}\.[A-Za-z0-9_]+\.tmp$")


def clean_output_debris(folder: Path, filenames: Iterable[str]) -> list[Path]:
    """Remove temporary copies of ``filenames`` in ``folder`` (``.<file>.<random>.tmp``
    left by a killed write); returns what was removed. Other files are never touched."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    patterns = [_tmp_name(f) for f in filenames]
    removed = []
    for child in folder.iterdir():
        if any(p.match(child.name) for p in patterns) and child.is_file() \
                and not child.is_symlink():
            try:
                child.unlink()
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    continue
            removed.append(child)
    return removed
