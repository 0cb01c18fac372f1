"""Outputs checked before the first step, write failures as one line, no debris.

Each bad output path is refused by ``loraengine train`` with exit 2 before a model is
loaded; a disk that fills up during a checkpoint or the final write is one line naming
the file and what was kept, with nothing half-written left; a signal while the outputs
are written lets them finish; temporary files a killed run left are removed by the next.
"""

from __future__ import annotations

import errno
import json
import os
import signal

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors import SafetensorError
from safetensors.torch import load_file

import loraengine.core.build as build
from loraengine.cli.main import cli
from loraengine.core import preflight
from loraengine.core.config.root import parse_config
from loraengine.core.errors import ConfigError
from loraengine.core.train import checkpoints as ckpt
from loraengine.core.train import loop
from loraengine.core.train.loop import Trainer, TrainingInterrupted


def config_file(tmp_path, unet_config, **output):
    cfg = json.loads(json.dumps(unet_config))
    cfg["training"]["steps"] = 2
    cfg["output"] = {"dir": str(tmp_path / "out"), "name": "run", "plot": False, **output}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def snapshot(folder):
    """Every file under ``folder`` with its bytes (empty when there is none)."""
    if not folder.exists():
        return {}
    if folder.is_file():
        return {folder: folder.read_bytes()}
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_only_the_event_log_grew(before, after):
    """Every file as it was, but the run's event log (``<name>.events.jsonl``), which
    every run appends to, the failed one too: its earlier lines are kept as they were."""
    logs = {k for k in before.keys() | after.keys() if str(k).endswith(".events.jsonl")}
    assert {k: v for k, v in after.items() if k not in logs} == {
        k: v for k, v in before.items() if k not in logs}
    for k in logs:
        assert after[k].startswith(before.get(k, b"")), k


def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the outputs were checked")

    monkeypatch.setattr(build, "load_model", refuse)


def error_lines(result):
    return [line for line in result.output.splitlines() if line.startswith("error:")]


def assert_one_line(result, code, *words):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = error_lines(result)
    assert len(lines) == 1, result.output
    for word in words:
        assert word in lines[0], lines[0]


def _under_a_file(tmp_path):
    (tmp_path / "file").write_text("keep me")
    return {"dir": str(tmp_path / "file" / "out")}, "output.dir", tmp_path / "file"


def _lora_is_a_folder(tmp_path):
    (tmp_path / "out" / "run.safetensors").mkdir(parents=True)
    (tmp_path / "out" / "run.safetensors" / "inside").write_text("keep me")
    return {}, "output.name", tmp_path / "out"


def _name_too_long(tmp_path):
    return {"name": "n" * 250}, "output.name", tmp_path / "out"


def _nul_in_name(tmp_path):
    return {"name": "run\x00x"}, "output.name", tmp_path / "out"


def _escape_in_name(tmp_path):
    return {"name": "run\x1b[31m"}, "output.name", tmp_path / "out"


def _checkpoints_a_file(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "run.checkpoints").write_text("keep me")
    return {"save_every": 1}, "output.save_every", tmp_path / "out"


def _loss_map_a_folder(tmp_path):
    (tmp_path / "out" / "run.loss.json").mkdir(parents=True)
    return {}, "loss map", tmp_path / "out"


def _plot_a_folder(tmp_path):
    (tmp_path / "out" / "run.loss.png").mkdir(parents=True)
    return {"plot": True}, "output.plot", tmp_path / "out"


def _samples_a_file(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "run.samples").write_text("keep me")
    return {"samples": {"every": 1}}, "output.samples", tmp_path / "out"


BAD_OUTPUTS = [_under_a_file, _lora_is_a_folder, _name_too_long, _nul_in_name,
               _escape_in_name, _checkpoints_a_file, _loss_map_a_folder, _plot_a_folder,
               _samples_a_file]


@pytest.mark.parametrize("case", BAD_OUTPUTS, ids=lambda f: f.__name__.strip("_"))
def test_a_bad_output_path_is_refused_before_the_model_loads(case, tmp_path, unet_config,
                                                             monkeypatch):
    output, key, keep = case(tmp_path)
    path = config_file(tmp_path, unet_config, **output)
    before = snapshot(keep)
    no_model_load(monkeypatch)
    result = CliRunner().invoke(cli, ["train", str(path), "-q"])
    assert_one_line(result, 2, key)
    assert snapshot(keep) == before


@pytest.mark.parametrize("case", BAD_OUTPUTS, ids=lambda f: f.__name__.strip("_"))
def test_validate_refuses_the_same_output_paths(case, tmp_path, unet_config):
    output, key, keep = case(tmp_path)
    path = config_file(tmp_path, unet_config, **output)
    before = snapshot(keep)
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert_one_line(result, 2, key)
    assert snapshot(keep) == before


def test_validate_of_good_outputs_creates_nothing(tmp_path, unet_config):
    path = config_file(tmp_path, unet_config, save_every=1)
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "out").exists()


def test_a_folder_that_takes_no_file_is_refused(tmp_path, unet_config, monkeypatch):
    # tests run as root, where a read-only mode does not stop a write: the probe's
    # refusal is what a read-only folder gives
    path = config_file(tmp_path, unet_config)
    real = preflight.tempfile.mkstemp

    def read_only(*args, **kwargs):
        if ".loraengine-probe." in str(kwargs.get("prefix")):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(*args, **kwargs)

    monkeypatch.setattr(preflight.tempfile, "mkstemp", read_only)
    no_model_load(monkeypatch)
    result = CliRunner().invoke(cli, ["train", str(path), "-q"])
    assert_one_line(result, 2, "output.dir", "Permission denied")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_refused(tmp_path, unet_config, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "out").chmod(0o500)
    try:
        path = config_file(tmp_path, unet_config)
        no_model_load(monkeypatch)
        result = CliRunner().invoke(cli, ["train", str(path), "-q"])
        assert_one_line(result, 2, "output.dir")
    finally:
        (tmp_path / "out").chmod(0o700)


def test_too_little_free_disk_is_refused_before_step_one(tmp_path, unet_config,
                                                         monkeypatch):
    path = config_file(tmp_path, unet_config, save_every=1)
    real = preflight.shutil.disk_usage

    def nearly_full(folder):
        return real(folder)._replace(free=1000)

    monkeypatch.setattr(preflight.shutil, "disk_usage", nearly_full)
    steps = []
    monkeypatch.setattr(loop, "train_step", lambda *a, **k: steps.append(1))
    result = CliRunner().invoke(cli, ["train", str(path), "-q"])
    assert_one_line(result, 2, "output.dir", "free")
    assert steps == []
    assert not (tmp_path / "out" / "run.safetensors").exists()


def test_the_disk_estimate_counts_a_checkpoint_and_the_lora(host, unet_config, tmp_path):
    cfg = parse_config({**unet_config, "output": {"dir": str(tmp_path), "save_every": 1}},
                       host.registry)
    assert preflight.needed_bytes(cfg, 1000, 500) == 500 + 2 * 3 * 1000
    cfg = parse_config({**unet_config, "output": {"dir": str(tmp_path)}}, host.registry)
    assert preflight.needed_bytes(cfg, 1000, 500) == 500


# -- a disk that fills up while writing ---------------------------------------------------

def _torch_disk_full(*args, **kwargs):
    raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter "
                       "failed writing file data/0: file write failed")


def test_disk_full_during_a_checkpoint_is_one_line_and_keeps_the_older_ones(
        tmp_path, unet_config, monkeypatch):
    path = config_file(tmp_path, unet_config, save_every=1)
    real = torch.save
    calls = {"n": 0}

    def full_on_second(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            _torch_disk_full()
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", full_on_second)
    result = CliRunner().invoke(cli, ["train", str(path), "-q"])
    assert_one_line(result, 1, "step_00000002", "write failed", "step_00000001")
    folder = tmp_path / "out" / "run.checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000001"]
    ckpt.verify(folder / "step_00000001")


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                    'message: "No space left on device" })')], ids=["oserror", "safetensors"])
def test_disk_full_during_the_final_write_keeps_the_previous_lora(
        error, tmp_path, unet_config, monkeypatch):
    path = config_file(tmp_path, unet_config)
    assert CliRunner().invoke(cli, ["train", str(path), "-q"]).exit_code == 0
    before = snapshot(tmp_path / "out")

    def full(*args, **kwargs):
        raise error

    import loraengine.core.files as files

    monkeypatch.setattr(files, "save_file", full)
    result = CliRunner().invoke(cli, ["train", str(path), "-q"])
    assert_one_line(result, 1, "run.safetensors", "unchanged")
    # no temporary file either
    assert_only_the_event_log_grew(before, snapshot(tmp_path / "out"))


def test_an_error_that_is_not_the_disk_still_propagates(tmp_path):
    from loraengine.core.files import write_atomic

    def broken(p):
        raise ValueError("a bug, not a disk")

    with pytest.raises(ValueError, match="a bug"):
        write_atomic(tmp_path / "x.bin", broken)
    assert list(tmp_path.iterdir()) == []


# -- signals while the outputs are written, and what a killed run left ---------------------

class Killed(BaseException):
    """What the default SIGTERM action does to a process, made observable."""


def pipeline(host, unet_config, tmp_path, steps=2, **output):
    cfg = json.loads(json.dumps(unet_config))
    cfg["training"]["steps"] = steps
    cfg["output"] = {"dir": str(tmp_path / "out"), "name": "run", "plot": False, **output}
    return build.build_pipeline(parse_config(cfg, host.registry), host)


def test_sigterm_during_the_final_write_lets_the_lora_finish(host, unet_config, tmp_path,
                                                             monkeypatch):
    def killed(signum, frame):
        raise Killed

    previous = signal.signal(signal.SIGTERM, killed)
    real = loop.save_lora

    def signalled_save(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "save_lora", signalled_save)
    pipe = pipeline(host, unet_config, tmp_path)
    try:
        with pytest.raises(TrainingInterrupted, match="SIGTERM.*complete"):
            Trainer(pipe).run()
    finally:
        pipe.close()
        signal.signal(signal.SIGTERM, previous)
    out = tmp_path / "out"
    assert load_file(str(out / "run.safetensors"))
    assert (out / "run.loss.json").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_debris_of_a_killed_run_is_removed_by_the_next(host, unet_config, tmp_path):
    out = tmp_path / "out"
    folder = out / "run.checkpoints"
    (folder / ".step_00000002.k3j_x9ab").mkdir(parents=True)
    (folder / ".step_00000002.k3j_x9ab" / "state.pt").write_bytes(b"half")
    ours = [out / ".run.safetensors.ab12cd34.tmp", out / ".run.loss.json.zz_99xyz.tmp",
            out / ".run.best.safetensors.q1w2e3r4.tmp"]
    foreign = [out / ".other.safetensors.ab12cd34.tmp", out / "notes.tmp",
               out / ".run.safetensors.keep", folder / "readme.txt"]
    for p in ours + foreign:
        p.write_bytes(b"x")
    (folder / "mine").mkdir()
    pipe = pipeline(host, unet_config, tmp_path, save_every=1)
    try:
        Trainer(pipe).run()
    finally:
        pipe.close()
    assert not any(p.exists() for p in ours)
    assert all(p.read_bytes() == b"x" for p in foreign)
    assert sorted(p.name for p in folder.iterdir()) == [
        "mine", "readme.txt", "step_00000001", "step_00000002"]


def test_a_checkpoint_moved_aside_when_killed_is_put_back(tmp_path):
    folder = tmp_path / "run.checkpoints"
    saved = ckpt.save_checkpoint(folder, 3, {"a": torch.ones(2)}, {"step": 3}, {})
    os.replace(saved, folder / ".step_00000003.old")  # killed between the two renames
    (folder / ".step_00000003.ab_12xyz").mkdir()  # the new copy, never put in place
    removed = ckpt.clean_debris(folder)
    assert [p.name for p in removed] == [".step_00000003.ab_12xyz"]
    assert [s for s, _ in ckpt.list_checkpoints(folder)] == [3]
    ckpt.verify(folder / "step_00000003")


def test_a_run_without_an_output_section_creates_nothing(host, unet_config, tmp_path,
                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = {k: v for k, v in unet_config.items() if k != "output"}
    pipe = build.build_pipeline(parse_config(cfg, host.registry, base_dir=tmp_path), host)
    pipe.close()
    assert not (tmp_path / "output").exists()


def test_preflight_names_the_key_of_a_nul_in_the_folder(host, unet_config, tmp_path):
    cfg = parse_config({**unet_config, "output": {"dir": str(tmp_path)}}, host.registry)
    cfg.output.dir = tmp_path / "a\x00b"
    with pytest.raises(ConfigError, match="output.dir"):
        preflight.check_outputs(cfg)
