"""torch's thread count while training (issue 15, item 2): ``training.threads`` is
honoured during the steps and the previous count comes back; the default is the
physical cores of the affinity, never more CPUs than the affinity, and a count the user
chose (environment, ``torch.set_num_threads``) is left alone."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from loraengine.core import threads
from loraengine.core.errors import ConfigError
from loraengine.core.plugins.hookspecs import hookimpl
from loraengine.testing.harness import registered, train_tiny


class _ThreadProbe:
    """A lifecycle plugin noting torch's thread count at every step."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    @hookimpl
    def loraengine_on_step_end(self, run: Any, step: int, metrics: dict[str, float]) -> None:
        self.seen.append(torch.get_num_threads())


@pytest.fixture
def restore_threads():
    previous = torch.get_num_threads()
    yield previous
    torch.set_num_threads(previous)


def _train_probed(host: Any, overlay: dict[str, Any] | None = None) -> list[int]:
    probe = _ThreadProbe()
    with registered(host, probe, name="thread_probe"):
        train_tiny(host, overlay)
    return probe.seen


def test_training_threads_is_used_during_the_steps_and_restored(host, restore_threads):
    torch.set_num_threads(1)
    want = min(3, len(threads.affinity_cpus()))  # never more than the process's CPUs
    assert _train_probed(host, {"training": {"threads": want}}) == [want, want]
    assert torch.get_num_threads() == 1


def test_training_threads_must_be_positive(host):
    with pytest.raises(ConfigError, match="training.threads"):
        train_tiny(host, {"training": {"threads": 0}})


def _fake_topology(root: Path, cores: dict[int, tuple[int, int]]) -> None:
    for cpu, (package, core) in cores.items():
        topo = root / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text(f"{package}\n")
        (topo / "core_id").write_text(f"{core}\n")


def test_available_cores_counts_physical_cores_of_the_affinity(tmp_path, monkeypatch):
    # 8 logical CPUs: 4 cores with two hyper-threads each (cpu i and i+4 share core i)
    _fake_topology(tmp_path, {c: (0, c % 4) for c in range(8)})
    monkeypatch.setattr(threads, "_CPU_SYS", tmp_path)
    monkeypatch.setattr(threads, "_CGROUP_CPU_MAX", tmp_path / "absent")
    monkeypatch.setattr(threads, "affinity_cpus", lambda: set(range(8)))
    assert threads.available_cores() == 4
    monkeypatch.setattr(threads, "affinity_cpus", lambda: {0, 4})  # both threads of core 0
    assert threads.available_cores() == 1
    monkeypatch.setattr(threads, "affinity_cpus", lambda: {0, 1, 5})
    assert threads.available_cores() == 2
    quota = tmp_path / "cpu.max"
    quota.write_text("100000 100000\n")  # a container limited to one CPU
    monkeypatch.setattr(threads, "_CGROUP_CPU_MAX", quota)
    assert threads.available_cores() == 1
    quota.write_text("max 100000\n")
    assert threads.available_cores() == 2


def test_available_cores_falls_back_to_the_affinity_without_topology(tmp_path, monkeypatch):
    monkeypatch.setattr(threads, "_CPU_SYS", tmp_path / "none")
    monkeypatch.setattr(threads, "affinity_cpus", lambda: {2, 3, 7})
    assert threads.available_cores() == 3


def test_the_default_never_exceeds_the_affinity_on_this_machine():
    assert 1 <= threads.available_cores() <= len(os.sched_getaffinity(0))


def test_the_default_applies_when_nobody_chose_and_is_restored(host, monkeypatch,
                                                               restore_threads, tmp_path):
    for name in threads.THREAD_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # a quiet machine
    affinity = len(threads.affinity_cpus())
    torch.set_num_threads(affinity)  # torch's own start-up count: one per CPU
    seen = _train_probed(host)
    assert seen == [threads.available_cores()] * 2
    assert all(1 <= n <= affinity for n in seen)
    assert torch.get_num_threads() == affinity
    # the same CPUs as hyper-threads of one core: the run uses one thread, then gives
    # torch its count back
    _fake_topology(tmp_path, {c: (0, 0) for c in threads.affinity_cpus()})
    monkeypatch.setattr(threads, "_CPU_SYS", tmp_path)
    assert _train_probed(host) == [1, 1]
    assert torch.get_num_threads() == affinity


def test_a_count_the_user_chose_is_left_alone(host, monkeypatch, restore_threads):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    monkeypatch.setattr(threads, "available_cores", lambda: 5)
    assert _train_probed(host) == [1, 1]
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    if len(threads.affinity_cpus()) != 1:  # 1 would be torch's default, not a choice
        assert _train_probed(host) == [1, 1]  # torch.set_num_threads(1) was a choice


@pytest.mark.slow  # a CLI training with several threads: ~9 s on 2 busy cores
def test_cli_train_uses_training_threads(tmp_path, unet_config, monkeypatch, restore_threads):
    import yaml
    from click.testing import CliRunner

    from loraengine.cli.main import cli

    probe = _ThreadProbe()
    from loraengine.cli import common

    original = common.build_plugin_manager

    def with_probe(**kw: Any) -> Any:
        h = original(**kw)
        h.register(probe, name="thread_probe")
        return h

    monkeypatch.setattr(common, "build_plugin_manager", with_probe)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**unet_config, "training": {
        **unet_config["training"], "threads": 2}}))
    torch.set_num_threads(1)
    out = CliRunner().invoke(cli, ["train", str(path), "--quiet"])
    assert out.exit_code == 0, out.output
    assert probe.seen == [2] * unet_config["training"]["steps"]


def test_processes_on_one_machine_share_the_cores(monkeypatch):
    for name in threads.THREAD_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads, "user_chose_threads", lambda: False)
    monkeypatch.setattr(threads, "available_cores", lambda: 8)
    monkeypatch.setattr(threads, "affinity_cpus", lambda: set(range(8)))
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # a quiet machine
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert threads.choose_threads(None) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert threads.choose_threads(None) == 1
    assert threads.choose_threads(5) == 5  # training.threads wins


def test_cores_other_work_keeps_busy_are_left_to_it(monkeypatch):
    """The default counts only the cores the load average leaves idle: on 4 cores
    with 2.6 runnable processes elsewhere, 1 thread; never below 1; torchrun's local
    processes share what is left."""
    for name in threads.THREAD_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads, "available_cores", lambda: 4)
    monkeypatch.setattr(threads, "affinity_cpus", lambda: set(range(4)))
    monkeypatch.setattr(threads, "user_chose_threads", lambda: False)
    for load, want in ((0.0, 4), (0.4, 4), (1.6, 2), (2.6, 1), (9.0, 1)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, 0.0, 0.0))
        assert threads.choose_threads(None) == want, load
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert threads.choose_threads(None) == 2
    monkeypatch.setattr(os, "getloadavg", lambda: (3.0, 0.0, 0.0))
    assert threads.choose_threads(None) == 1
    assert threads.choose_threads(3) == 3  # training.threads rules


def test_more_threads_than_cpus_are_capped_with_a_warning(restore_threads):
    import warnings

    import loraengine
    from loraengine.testing.harness import tiny_data, tiny_train_config
    from loraengine.testing.models import TinyDenoiser

    cpus = len(threads.affinity_cpus())
    assert threads.choose_threads(cpus + 1000) == cpus
    assert threads.choose_threads(1) == 1
    data = tiny_data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loraengine.train(tiny_train_config({"training": {"threads": cpus + 1000}}),
                         model=TinyDenoiser(), latents=data.latents,
                         conditioning=data.conditioning)
    assert f"training.threads: {cpus + 1000} is more than the {cpus} CPU(s) this process may " \
           f"use; {cpus} are used (more threads than CPUs only wait on each other)" in \
           [str(w.message) for w in caught]
