"""How many CPU threads torch's intra-op pool uses while training.

torch starts with one thread per CPU it may run on, hyper-threads included; on a
shared or small machine that oversubscribes the cores and a step can get many times
slower. Training therefore picks the number of physical cores available to the
process that other work (the load average) leaves idle, unless the user chose a count (``training.threads``, or ``OMP_NUM_THREADS`` /
``MKL_NUM_THREADS`` in the environment, or a ``torch.set_num_threads`` call before the
run), and puts the previous count back afterwards."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

#: Environment variables through which a user sets the thread count themselves.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")

_CPU_SYS = Path("/sys/devices/system/cpu")
_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def affinity_cpus() -> set[int]:
    """The logical CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))  # platforms without affinity (macOS, Windows)


def _core_of(cpu: int) -> tuple[str, str] | None:
    """(package, core) of a logical CPU from sysfs, or None where sysfs does not say."""
    topo = _CPU_SYS / f"cpu{cpu}" / "topology"
    try:
        return ((topo / "physical_package_id").read_text().strip(),
                (topo / "core_id").read_text().strip())
    except OSError:
        return None


def _cgroup_cpu_limit() -> int | None:
    """Whole CPUs a cgroup-v2 quota allows (a container's ``--cpus``), or None."""
    try:
        quota, period = _CGROUP_CPU_MAX.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, int(int(quota) // int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def available_cores() -> int:
    """Physical cores among the CPUs the process may use (hyper-threads of one core
    count once), capped by a cgroup CPU quota; never more than the affinity and at
    least 1."""
    cpus = affinity_cpus()
    cores = {_core_of(c) for c in cpus}
    count = len(cpus) if None in cores else len(cores)
    limit = _cgroup_cpu_limit()
    if limit is not None:
        count = min(count, limit)
    return max(1, min(count, len(cpus)))


def busy_cpus() -> int:
    """CPUs other work keeps busy: the one-minute load average (runnable processes),
    rounded; 0 where the platform has none."""
    try:
        return max(0, round(os.getloadavg()[0]))
    except (AttributeError, OSError):
        return 0


def idle_cores() -> int:
    """Physical cores (``available_cores``) less those other work keeps busy right now,
    at least 1: on a busy 2-core machine, one thread runs many times faster than two
    that fight the other jobs for the cores."""
    return max(1, available_cores() - busy_cpus())


def user_chose_threads() -> bool:
    """True when the thread count was chosen outside the config: an environment
    variable of ``THREAD_ENV`` is set, or torch's count is not its start-up default
    (one per CPU of the affinity), i.e. someone called ``torch.set_num_threads``."""
    if any(os.environ.get(name, "").strip() for name in THREAD_ENV):
        return True
    return torch.get_num_threads() != len(affinity_cpus())


def choose_threads(setting: int | None) -> int | None:
    """The count training should use: ``setting`` (``training.threads``, at most the
    process's CPUs) when given,
    else ``idle_cores()`` (the physical cores other work leaves free, shared out among
    the processes torchrun started on this machine) unless the user chose one (then
    None: leave torch as is)."""
    if setting is not None:
        # never more than the CPUs the process may use: more threads only wait on each
        # other (``threads_over_cpus`` says so when the run is built)
        return min(int(setting), len(affinity_cpus()))
    if user_chose_threads():
        return None
    return max(1, idle_cores() // _local_processes())


def threads_over_cpus(setting: int | None) -> str | None:
    """The line to warn with when ``training.threads`` asks for more threads than the
    process has CPUs (``choose_threads`` uses the CPU count instead), else ``None``."""
    cpus = len(affinity_cpus())
    if setting is None or int(setting) <= cpus:
        return None
    return (f"training.threads: {setting} is more than the {cpus} CPU(s) this process may "
            f"use; {cpus} are used (more threads than CPUs only wait on each other)")


def _local_processes() -> int:
    """Training processes sharing this machine (torchrun's ``LOCAL_WORLD_SIZE``): they
    split the cores rather than each taking all of them."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


@contextmanager
def training_threads(setting: int | None) -> Iterator[int]:
    """Run the body with torch's intra-op thread count from ``choose_threads(setting)``;
    the previous count is restored on the way out. Yields the count in effect."""
    previous = torch.get_num_threads()
    chosen = choose_threads(setting)
    if chosen is not None and chosen != previous:
        torch.set_num_threads(chosen)
    try:
        yield torch.get_num_threads()
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)
