"""Run ``loraengine train CONFIG --resume latest -q`` many times in one process's forks,
each fork SIGKILLed at a chosen point, to test that a run survives being killed anywhere.

Usage: ``kill_server.py CONFIG POINT [POINT ...]``. A point is ``any:N`` (die at the N-th
event of the run) or ``final:N`` (die at the N-th event inside the final write, the
events of the training loop not counted) or ``step:K`` (die right after optimizer step
K, before its checkpoint) or ``save:N`` (die inside the N-th file sync of a checkpoint
save of the run, before the checkpoint is renamed into place) or ``none`` (run to the
end) or ``plain:OTHER_CONFIG`` (run OTHER_CONFIG to the end). Events are: the end of an
optimizer step, each file sync of a checkpoint save (before and after its folder is
renamed into place), a LoRA or loss file written to its temporary name but not yet
renamed, and the folder sync after that rename.

The imports (torch, diffusers, the engine) happen once, here; each run is a fork, so
twenty kills cost twenty short runs, not twenty interpreter starts. Prints one JSON
line: the wait status of each run (``-9`` for a kill, else the exit code), the names in
CONFIG's checkpoint folder after each run, and the seconds taken by the set-up and by
each run."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path


def _run(config: str, point: str) -> None:
    """In the child: install the kill point and train; never returns."""
    from loraengine.cli.main import cli
    from loraengine.core import files
    from loraengine.core.train import checkpoints

    kind, _, n = point.partition(":")
    target = int(n) if n else 0
    seen = {"any": 0, "final": 0, "save": 0}
    in_final = {"on": False}

    def event() -> None:
        seen["any"] += 1
        if in_final["on"]:
            seen["final"] += 1
        if kind in seen and seen[kind] == target:
            os.kill(os.getpid(), signal.SIGKILL)

    real_fsync = checkpoints._fsync

    def fsync(path):  # type: ignore[no-untyped-def]
        seen["save"] += 1
        if kind == "save" and seen["save"] == target:
            os.kill(os.getpid(), signal.SIGKILL)
        event()
        real_fsync(path)

    checkpoints._fsync = fsync
    real_dir = files._fsync_dir

    def fsync_dir(folder):  # type: ignore[no-untyped-def]
        real_dir(folder)
        event()

    files._fsync_dir = fsync_dir
    real_write = files.write_atomic

    def write_atomic(path, writer):  # type: ignore[no-untyped-def]
        def write_then_event(tmp):  # type: ignore[no-untyped-def]
            writer(tmp)
            event()  # the temporary file is whole, not yet renamed

        real_write(path, write_then_event)

    files.write_atomic = write_atomic
    from loraengine.core.train import loop

    real_finish = loop.Trainer.finish

    def finish(self):  # type: ignore[no-untyped-def]
        in_final["on"] = True
        return real_finish(self)

    loop.Trainer.finish = finish
    from loraengine.core.plugins.hookspecs import hookimpl

    class StepEvents:
        @hookimpl
        def loraengine_on_step_end(self, run, step, metrics):  # type: ignore[no-untyped-def]
            if kind == "step" and step == target and "loss" in metrics:
                os.kill(os.getpid(), signal.SIGKILL)
            event()

    import loraengine.cli.common as common
    import loraengine.plugins as manager

    real_build = manager.build_plugin_manager

    def build(**kwargs):  # type: ignore[no-untyped-def]
        return real_build(**kwargs, extra=[StepEvents()])

    common.build_plugin_manager = build
    code = 0
    try:
        cli(["train", config, "--resume", "latest", "-q"], prog_name="loraengine")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        code = 99
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    begun = time.perf_counter()
    config, points = sys.argv[1], sys.argv[2:]
    # Everything a run imports is imported once, here, by assembling the run once
    # (nothing is trained or written); the forks inherit it.
    import loraengine.cli.main  # noqa: F401
    import loraengine.cli.progress  # noqa: F401
    from loraengine.api import resolve_config
    from loraengine.core.build import build_pipeline
    from loraengine.core.train import loop  # noqa: F401
    from loraengine.plugins import build_plugin_manager

    host = build_plugin_manager()
    cfg, base_dir = resolve_config(config, host)
    build_pipeline(cfg, host, base_dir=base_dir).close()
    folder = Path(cfg.output.dir) / f"{cfg.output.name}.checkpoints"  # as the trainer has it

    statuses, listings, seconds = [], [], []
    started = time.perf_counter()
    seconds.append(round(started - begun, 2))
    for point in points:
        t = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            if point.startswith("plain:"):
                _run(point[len("plain:"):], "none")
            _run(config, point)
        _, status = os.waitpid(pid, 0)
        statuses.append(-os.WTERMSIG(status) if os.WIFSIGNALED(status)
                        else os.WEXITSTATUS(status))
        listings.append(sorted(os.listdir(folder)) if folder.is_dir() else [])
        seconds.append(round(time.perf_counter() - t, 2))
    print(json.dumps({"statuses": statuses, "listings": listings, "seconds": seconds}))


if __name__ == "__main__":
    main()
