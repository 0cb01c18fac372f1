"""``training.host_memory`` on the CPU (glibc). ``return``: freed tensors of 64 KiB and
more go back to the system, so the process's resident memory follows its live tensors
instead of keeping the holes freed activations leave in the heap; ``reuse`` (the
default): they stay for the next tensors, without a page fault per allocation.
Measured in fresh processes."""

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

    monkeypatch.setattr(devices, "_host_mode", None)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert devices.return_freed_host_memory() is False
    # reuse with nothing changed before: the C library's own behaviour, nothing to set
    assert devices.reuse_freed_host_memory() is True


@pytest.mark.parametrize("mode", ["reuse", "return"])
def test_training_on_the_cpu_sets_the_configured_host_memory_mode(mode, monkeypatch):
    """build_pipeline returns freed memory while it loads, then applies
    training.host_memory for the steps."""
    import loraengine.core.build as build
    from loraengine.core.config.root import parse_config
    from loraengine.plugins import build_plugin_manager
    from loraengine.testing.models import TinyDenoiser, tiny_conditioning, tiny_latents

    seen: list[str] = []
    monkeypatch.setattr(build, "set_host_memory", seen.append)
    monkeypatch.setattr(build, "return_freed_host_memory", lambda: seen.append("loading"))
    host = build_plugin_manager(entry_points=False)
    cfg = parse_config({"model": {"family": "module"},
                        "training": {"device": "cpu", "dtype": "fp32", "steps": 1,
                                     **({} if mode == "reuse" else {"host_memory": mode})},
                        "adapter": {"algorithm": "lora", "rank": 2}}, host.registry)
    build.build_pipeline(cfg, host, model=TinyDenoiser(), latents=tiny_latents(),
                         conditioning=tiny_conditioning())
    assert seen == ["loading", mode]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_reuse_stops_the_page_faults_of_return():
    """With return, every freed tensor of 64 KiB+ is a mapping given back, so making it
    again faults its pages in; reuse (also after return, in the same process) serves it
    from the heap, and return after reuse gives them back again (measured on 4 MiB
    tensors: memory the heap already holds is served from it first, so 1 MiB ones
    may or may not fault there, by where the last free block lies). 200 allocations
    of 1 MiB: about 256 faults each under return."""
    out = _run_faults()
    assert out["return"] >= 100 * 256, out  # most of them fault (a page is 4 KiB)
    assert out["reuse"] <= out["return"] / 20, out
    assert out["return again"] >= 100 * 256, out  # a later run may return them again


FAULTS = r"""
import json, resource, torch
from loraengine.core import devices

def faults(size=1 << 18):  # elements: 1 MiB
    x = torch.empty(size)  # touched below
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(200):
        x = torch.ones(size)
        del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

out = {}
assert devices.set_host_memory("return")
out["return"] = faults()
assert devices.set_host_memory("reuse")
out["reuse"] = faults()
assert devices.set_host_memory("return")
out["return again"] = faults(1 << 20)  # 4 MiB: more than the heap kept under reuse
print(json.dumps(out))
"""


def _run_faults() -> dict[str, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True,
                         env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
