"""``--help`` does not load plugins it does not need: a built-in command's help loads
none, the group's help only the entry points (whose commands it lists)."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata

import pytest
from conftest import REPO

from loraengine.plugins import BUILTIN_PLUGINS

PROBE = """
import json, sys
sys.argv = ["loraengine", *sys.argv[1:]]
from loraengine.cli.main import main
try:
    main()
except SystemExit:
    pass
print(json.dumps(sorted(sys.modules)), file=sys.stderr)
"""


def modules_after(*args: str) -> set[str]:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=REPO, text=True,
                          capture_output=True, timeout=120,
                          env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                               "PATH": "/usr/bin:/bin"})
    assert "Usage:" in done.stdout, done.stderr[-2000:]
    return set(json.loads(done.stderr.strip().splitlines()[-1]))


def entry_point_modules() -> set[str]:
    return {ep.module for ep in metadata.entry_points(group="loraengine")}


@pytest.mark.slow  # a fresh interpreter imports torch
@pytest.mark.parametrize("command", ["train", "sample"])
def test_a_builtin_commands_help_loads_no_plugin(command):
    loaded = modules_after(command, "--help")
    assert not loaded & set(BUILTIN_PLUGINS)
    assert not loaded & entry_point_modules()


@pytest.mark.slow
def test_the_groups_help_loads_only_the_entry_points_that_may_add_commands():
    loaded = modules_after("--help")
    assert not loaded & set(BUILTIN_PLUGINS)
    assert entry_point_modules() <= loaded  # their commands are listed
