"""Paths given on the command line that are no regular file where one is expected:
one line, the right exit code, no traceback, nothing written."""

from __future__ import annotations

import os
import time

import pytest
import yaml
from click.testing import CliRunner

from loraengine.cli.main import cli
from loraengine.testing.harness import one_error_line


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_a_fifo_as_the_config_is_refused_at_once(tmp_path):
    fifo = tmp_path / "c.yaml"
    os.mkfifo(fifo)
    start = time.perf_counter()
    line = one_error_line(CliRunner().invoke(cli, ["validate", str(fifo)]), 2)
    assert line == f"error: {fifo}: the config is a FIFO (named pipe), not a regular file"
    assert time.perf_counter() - start < 5  # reading it would wait for a writer forever


@pytest.mark.parametrize("where", ["folder", "under-a-file"])
def test_an_events_path_that_cannot_be_written_isone_error_line(tmp_path, unet_config, where):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(unet_config))
    if where == "folder":
        events = tmp_path / "events"
        events.mkdir()
        reason = "Is a directory"
    else:
        (tmp_path / "afile").write_text("keep")
        events = tmp_path / "afile" / "events.jsonl"
        reason = f"{tmp_path / 'afile'} is a file"
    line = one_error_line(CliRunner().invoke(cli, ["train", str(path), "-q", "--events",
                                              str(events)]), 2)
    assert line == f"error: --events {events}: cannot write ({reason})"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("debug", [False, True])
def test_an_unforeseen_exception_is_one_line_and_exit_70(tmp_path, monkeypatch, debug):
    # a defect in a command (here made on purpose) must not print a traceback unless
    # --debug asks for one; the exit status tells it apart from the engine's own errors
    import loraengine.tools.inspect.logic as logic

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(logic, "describe", broken)
    args = (["--debug"] if debug else []) + ["inspect", str(tmp_path / "x.safetensors")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 70, result.output
    last = result.output.strip().splitlines()[-1]
    assert last == ("error: unexpected ZeroDivisionError: division by zero (a bug in "
                    "loraengine; --debug shows the traceback to report)")
    assert ("Traceback (most recent call last)" in result.output) is debug
    if not debug:
        one_error_line(result, 70)


@pytest.mark.parametrize("link", ["loop", "broken"])
@pytest.mark.parametrize("below", [False, True])
def test_an_output_dir_behind_a_dead_link_is_refused_by_validate(tmp_path, unet_config,
                                                                 link, below):
    dead = tmp_path / link
    os.symlink(dead if link == "loop" else tmp_path / "missing" / "x", dead)
    folder = dead / "sub" if below else dead
    unet_config["output"] = {"dir": str(folder), "plot": False}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(unet_config))
    before = sorted(p.name for p in tmp_path.iterdir())
    for command in ("validate", "train"):
        line = one_error_line(CliRunner().invoke(cli, [command, str(path), *(["-q"] if command
                                                                       == "train" else [])]), 2)
        assert line == (f"error: output.dir: {folder} cannot be created: {dead} is a symbolic "
                        f"link that leads nowhere (a missing target or a loop)")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing made


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path):
    # `loraengine inspect FILE | head -1`: the pipe closes while the command writes
    import subprocess
    import sys

    import torch
    from safetensors.torch import save_file

    path = tmp_path / "l.safetensors"
    save_file({"lora_unet_a.lora_down.weight": torch.zeros(2, 5),
               "lora_unet_a.lora_up.weight": torch.zeros(3, 2)}, str(path))
    proc = subprocess.Popen([sys.executable, "-m", "loraengine.cli.main", "inspect", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before it writes a line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err  # 128 + SIGPIPE, as a shell reports it
    assert err == ""


@pytest.mark.parametrize(("device", "why"), [
    ("meta", "'meta' holds no values to train on (loraengine plan estimates a run without "
             "one) (got 'meta')"),
    ("mps", "'mps' is not usable here: Could not run 'aten::empty.memory_format' with "
            "arguments from the 'MPS' backend. ..."),
])
def test_validate_refuses_a_training_device_train_cannot_use(tmp_path, unet_config, device,
                                                             why):
    import torch

    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(unet_config))
    result = CliRunner().invoke(cli, ["validate", str(path), "--set",
                                      f"training.device={device}"])
    line = one_error_line(result, 2)
    assert line == f"error: training.device: {why}" + (" (--set)" if device == "meta" else "")
