"""Run ``loraengine train CONFIG -q`` in each torchrun worker and save every rank's final
adapter tensors to ``OUT/rank<r>.safetensors``; with ``die:K:R``, rank R SIGKILLs
itself after optimizer step K."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from safetensors.torch import save_file

import loraengine.cli.common as common
import loraengine.cli.main as main_mod
import loraengine.plugins as manager
from loraengine.core.plugins.hookspecs import hookimpl


class RankReport:
    def __init__(self, out: Path, die: tuple[int, int] | None):
        self.out, self.die = out, die
        self.rank = int(os.environ.get("RANK", "0"))

    @hookimpl
    def loraengine_on_step_end(self, run, step, metrics):
        if self.die and step == self.die[0] and self.rank == self.die[1] and "loss" in metrics:
            os.kill(os.getpid(), signal.SIGKILL)

    @hookimpl
    def loraengine_on_train_end(self, run, result):
        save_file({k: v.contiguous() for k, v in result.lora.items()},
                  str(self.out / f"rank{self.rank}.safetensors"))


def main() -> None:
    config, out = sys.argv[1], Path(sys.argv[2])
    die = None
    if len(sys.argv) > 3:
        _, k, r = sys.argv[3].split(":")
        die = (int(k), int(r))
    report = RankReport(out, die)
    real_build = manager.build_plugin_manager
    common.build_plugin_manager = lambda **kw: real_build(**kw, extra=[report])
    main_mod.cli(["train", config, "-q"], prog_name="loraengine")


if __name__ == "__main__":
    main()
