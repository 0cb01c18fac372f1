"""Freed tensors of 64 KiB and more go back to the system on the CPU (glibc): the
process's resident memory follows its live tensors instead of keeping the holes freed
activations leave in the heap. Measured in fresh processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = r"""
import json, sys, torch
from loraengine.core.devices import return_freed_host_memory

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

on = sys.argv[1] == "on"
if on:
    assert return_freed_host_memory()
x = torch.ones(4 << 20)  # 16 MiB, then freed: glibc's threshold follows it by default
del x
base = rss()
tensors = [torch.ones(1 << 20) for _ in range(40)]  # 4 MiB each
keep = tensors[1::2]  # every other one freed: holes between live ones
del tensors
live = sum(t.numel() * t.element_size() for t in keep)
print(json.dumps({"rise": rss() - base, "live": live}))
"""


def _run(mode: str) -> dict[str, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True,
                         text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_tensors_leave_the_process():
    on, off = _run("on"), _run("off")
    # with the setting, resident memory is the live tensors (plus page rounding)
    assert on["rise"] <= 1.1 * on["live"], on
    # the default allocator keeps the freed ones too: the measurement can tell
    assert off["rise"] >= 1.5 * off["live"], off


def test_a_users_malloc_setting_is_left_alone(monkeypatch):
    import loraengine.core.devices as devices

    monkeypatch.setattr(devices, "_host_allocator_set", False)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert devices.return_freed_host_memory() is False
