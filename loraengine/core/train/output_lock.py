"""One run at a time per output.

``output.dir`` and ``output.name`` decide every file a run writes: the LoRA and its
variants, the loss map and plot, the checkpoint folder. Two runs of the same output at
once would replace each other's files and prune each other's checkpoints, and the second
one's start-up clean-up would delete the temporary files the first is writing. So a run
that writes files holds an exclusive lock for its output from before it writes anything
until it ends; a second run is refused at once (``OutputError``, exit 1).

Where the lock lives: ``<output.dir>/.<output.name>.lock``. The output folder always
exists by the time the lock is taken (the checkpoint folder only when ``save_every`` is
set), the name is tied to exactly what the lock guards, and the leading dot plus the
``.lock`` suffix keep it out of what other tools load from the folder: ComfyUI and the
WebUIs list LoRAs by their extension (``.safetensors``...), and file
browsers hide dot files. The file is deleted again when the run ends.

The lock is the operating system's (``flock`` through ``filelock``), held by an open
file: a killed run's lock goes with its process, so a file a killed run left behind
does not block the next run, which takes the lock on it and removes it at its end.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import filelock

from loraengine.core.errors import OutputError


def lock_path(folder: Path | str, name: str) -> Path:
    """The lock file of the run that writes ``<folder>/<name>.*``."""
    return Path(folder) / f".{name}.lock"


class OutputLock:
    """The exclusive, non-blocking lock of one output (``folder`` + ``name``); taken by
    ``acquire`` and given back by ``release`` (both may be called again), or used as a
    context manager."""

    def __init__(self, folder: Path | str, name: str):
        self.folder = Path(folder)
        self.name = name
        self.path = lock_path(folder, name)
        self._lock: filelock.BaseFileLock | None = None
        # the lock file as this run took it (POSIX flock only), to delete it at release
        self._taken: os.stat_result | None = None
        self._pid = 0  # the process that took it

    @property
    def held(self) -> bool:
        return self._lock is not None and self._lock.is_locked

    def acquire(self) -> None:
        """Take the lock, or raise ``OutputError`` naming the output and the lock file
        when another run holds it."""
        if self.held:
            return
        # flock on POSIX, filelock's marker-file lock on a file system without flock
        # (some network and FUSE mounts: it records its holder and breaks a dead one's),
        # Windows' own lock there. thread_local=False: a run may end (and give the lock
        # back) on another thread than the one that made its trainer.
        lock = filelock.FileLock(self.path, blocking=False, thread_local=False)
        try:
            lock.acquire()
        except filelock.Timeout:  # (an OSError too, hence first)
            lora = self.folder / f"{self.name}.safetensors"
            raise OutputError(
                f"output.name: another run is writing {lora} (it holds the lock "
                f"{self.path}); wait for it to end, or choose another output.name or "
                f"output.dir") from None
        except OSError as exc:
            raise OutputError(f"output.dir: cannot take the lock {self.path} "
                              f"({exc.strerror or type(exc).__name__})") from None
        self._lock, self._pid = lock, os.getpid()
        if os.name == "posix" and not _marker_lock(lock):
            # flock leaves its file behind: ``release`` deletes it. While the lock is
            # held nobody else deletes or replaces the file.
            self._taken = os.stat(self.path)

    def release(self) -> None:
        """Give the lock back and delete its file (nothing when it is not held)."""
        lock, taken = self._lock, self._taken
        self._lock = self._taken = None
        if lock is None or os.getpid() != self._pid:
            # a forked child (a data loader's worker) shares the parent's lock: it must
            # neither delete the file nor unlock it (filelock leaves an inherited lock be)
            return
        try:
            if taken is not None:
                # flock leaves its file in place. It is deleted here while still locked,
                # and only when it is still the file this run locked: a run that opened
                # it meanwhile and then gets the lock on the deleted file sees that it is
                # gone (filelock checks the link count) and does not count as a holder,
                # so no two runs can ever hold one output. Deleted after the unlock, a
                # newcomer could hold the old file while a third run made a new one.
                try:
                    if os.path.samestat(os.lstat(self.path), taken):
                        os.unlink(self.path)
                except OSError:
                    pass  # gone already, or not ours to delete: the lock is what counts
        finally:
            lock.release(force=True)

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        # a trainer made and dropped without ``run`` or ``close``: its file goes too
        with contextlib.suppress(Exception):
            self.release()


def lock_early(folder: Path | str, name: str) -> OutputLock | None:
    """The output's lock, taken before the model is built where the output folder
    exists already (the usual case: a loras folder), so that a second run is refused
    before it spends minutes loading a model; ``None`` where the folder does not exist
    yet: the run takes the lock when it creates the folder, and nothing is created for
    a run that may still fail while it builds. Give it to ``Trainer(output_lock=...)``."""
    if not Path(folder).is_dir():
        return None
    lock = OutputLock(folder, name)
    lock.acquire()
    return lock


def _marker_lock(lock: filelock.BaseFileLock) -> bool:
    """Whether ``lock`` fell back to filelock's marker file, which deletes its file
    itself on release: only that kind records its holder's PID (asking a flock lock
    for one is an ``AttributeError``). When unsure, the file is left to filelock."""
    try:
        return hasattr(lock, "pid")
    except Exception:
        return True

