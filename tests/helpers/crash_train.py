"""Run ``loraengine train CONFIG --resume latest -q`` and SIGKILL this process at a chosen
point: ``step:K`` (right after optimizer step K) or ``save:N`` (inside the N-th file
sync of a checkpoint save, before the checkpoint is renamed into place)."""

from __future__ import annotations

import os
import signal
import sys

from loraengine.cli.main import cli
from loraengine.core.plugins.hookspecs import hookimpl
from loraengine.core.train import checkpoints as checkpoint


def main() -> None:
    config, point = sys.argv[1], sys.argv[2]
    kind, _, n = point.partition(":")
    count = {"syncs": 0}
    if kind == "save":
        real = checkpoint._fsync

        def fsync_then_die(path):
            count["syncs"] += 1
            if count["syncs"] == int(n):
                os.kill(os.getpid(), signal.SIGKILL)
            real(path)

        checkpoint._fsync = fsync_then_die
    extra = []
    if kind == "step":
        class Killer:
            @hookimpl
            def loraengine_on_step_end(self, run, step, metrics):
                if step == int(n) and "loss" in metrics:
                    os.kill(os.getpid(), signal.SIGKILL)

        extra.append(Killer())
    if extra:
        import loraengine.plugins as manager

        real_build = manager.build_plugin_manager

        def build(**kwargs):
            return real_build(**kwargs, extra=extra)

        import loraengine.cli.common as common

        common.build_plugin_manager = build
    cli(["train", config, "--resume", "latest", "-q"], prog_name="loraengine")


if __name__ == "__main__":
    main()
