"""Disk full for real: a 3 MB tmpfs (mounted when the tests run as root and may mount;
skipped otherwise) that fills up between the start-up checks and a checkpoint or the
final write. Each is one line naming the file and what was kept, exit 1, no traceback,
an earlier run's files byte for byte as they were and no temporary file left.
The simulated-ENOSPC tests (tests/test_outputs_safety.py) cover the same paths without
a mount."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import the_error_line

from loraengine.core.plugins.hookspecs import hookimpl

pytestmark = pytest.mark.slow  # each trains a tiny model through the command line


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def fill(disk: Path, leave: int) -> None:
    """Fill ``disk`` with one file until the file system refuses, then give back
    ``leave`` bytes."""
    filler = disk / "filler.bin"
    with open(filler, "ab", buffering=0) as fh:
        for chunk in (1 << 16, 1 << 12, 1 << 9, 1):
            block = b"\0" * chunk
            while True:
                try:
                    fh.write(block)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    os.truncate(filler, max(0, filler.stat().st_size - leave))


class FillOn:
    """Fills the disk when the run starts, or once the first checkpoint is saved."""

    def __init__(self, disk: Path, when: str, leave: int):
        self.disk, self.when, self.leave = disk, when, leave

    @hookimpl
    def loraengine_on_train_start(self, run):
        if self.when == "start":
            fill(self.disk, self.leave)

    @hookimpl
    def loraengine_on_save(self, run, path, kind):
        if self.when == "after-checkpoint" and kind == "checkpoint":
            fill(self.disk, self.leave)
            self.when = "done"


def _says(line: str, head: str, tail: str) -> None:
    """``line`` is ``head`` + a no-space reason in parentheses + ``tail`` (the reason is
    worded by whichever writer hit the full disk: Python, torch or safetensors)."""
    assert line.startswith(head + "(No space left"), line
    assert line.endswith(tail), line
    reason = line[len(head):len(line) - len(tail)]
    assert reason.endswith(")") and ")" not in reason[:-1], line


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "filler.bin"}


def _train(monkeypatch, tmp_path, unet_config, disk, filler, **output):
    import loraengine.cli.common as common
    import loraengine.plugins as manager
    from loraengine.cli.main import cli

    real = manager.build_plugin_manager
    monkeypatch.setattr(common, "build_plugin_manager",
                        lambda **kw: real(**kw, extra=[filler]))
    cfg = json.loads(json.dumps(unet_config))
    cfg["training"]["steps"] = 3
    cfg["output"] = {"dir": str(disk / "out"), "name": "run", "plot": False, **output}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = disk / "out"
    out.mkdir()
    (out / "run.safetensors").write_bytes(b"an earlier run's LoRA " * 40)
    (out / "run.loss.json").write_text('{"loss": [1.0]}')
    before = _hashes(out)
    result = CliRunner().invoke(cli, ["train", str(path), "-q"])
    assert result.exit_code == 1, result.output
    line = the_error_line(result.output)
    # every run appends to its event log (<name>.events.jsonl), the failed one too; the
    # log is not one of the earlier run's files this test guards
    after = {k: v for k, v in _hashes(out).items() if not k.endswith(".events.jsonl")}
    left = [p for p in out.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
    assert left == []
    return line, before, after


def test_disk_full_at_the_first_checkpoint(monkeypatch, tmp_path, unet_config, small_disk):
    line, before, after = _train(monkeypatch, tmp_path, unet_config, small_disk,
                                 FillOn(small_disk, "start", 2048), save_every=1)
    ckpt = small_disk / "out" / "run.checkpoints" / "step_00000001"
    _says(line, f"error: checkpoint {ckpt}: cannot write ",
          "; no checkpoint was kept, nothing half-written is left")
    assert after == before


def test_disk_full_at_a_later_checkpoint_keeps_the_earlier(monkeypatch, tmp_path,
                                                           unet_config, small_disk):
    line, before, after = _train(monkeypatch, tmp_path, unet_config, small_disk,
                                 FillOn(small_disk, "after-checkpoint", 2048), save_every=1)
    ckpt = small_disk / "out" / "run.checkpoints" / "step_00000002"
    _says(line, f"error: checkpoint {ckpt}: cannot write ",
          "; the checkpoints up to step_00000001 are kept, nothing half-written is left")
    kept = {k: v for k, v in after.items() if not k.startswith("run.checkpoints/")}
    assert kept == before
    from loraengine.core.train import checkpoints

    checkpoints.verify(small_disk / "out" / "run.checkpoints" / "step_00000001")


def test_disk_full_at_the_final_write(monkeypatch, tmp_path, unet_config, small_disk):
    line, before, after = _train(monkeypatch, tmp_path, unet_config, small_disk,
                                 FillOn(small_disk, "start", 2048))
    lora = small_disk / "out" / "run.safetensors"
    _says(line, f"error: {lora}: cannot write ",
          "; the previous run.safetensors is unchanged, nothing half-written is left")
    assert after == before
