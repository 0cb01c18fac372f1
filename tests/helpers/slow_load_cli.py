"""``python -m loraengine.cli.main ARGS...`` whose model loading announces itself (it
creates the file named by the first argument) and then takes 60 s, so that a test can
interrupt a run for certain while it loads the model."""

from __future__ import annotations

import runpy
import sys
import time
from pathlib import Path

from loraengine.plugins.models import diffusers_folder


def main() -> None:
    marker = Path(sys.argv.pop(1))
    real = diffusers_folder.locate

    def slow_locate(options):  # type: ignore[no-untyped-def]
        marker.write_text("loading")
        time.sleep(60)
        return real(options)

    diffusers_folder.locate = slow_locate
    sys.argv[0] = "loraengine"
    runpy.run_module("loraengine.cli.main", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
