"""One run at a time per output, and signals during the end-of-run hooks.

A run that writes files holds ``<output.dir>/.<output.name>.lock`` from before it
writes anything to its end: a second run of the same output (another process, the
command line, ``loraengine.train``) is refused at once with one line naming the output
and the lock, exit 1, and writes nothing, not even its start-up clean-up. The lock is
given back (and its file deleted) when the run ends, fails or is interrupted; a file
left by a killed holder does not block. A SIGTERM while the end-of-run hooks run (a
last preview render) ends the run as an interruption (exit 130) with its files and its
``train_end`` event kept, instead of killing the process.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import warnings

import pytest
import yaml
from click.testing import CliRunner
from conftest import the_error_line
from safetensors.torch import load_file

import loraengine
import loraengine.cli.common as common
import loraengine.plugins as manager
from loraengine.cli.main import cli
from loraengine.core.build import build_pipeline
from loraengine.core.config.root import parse_config
from loraengine.core.errors import OutputError
from loraengine.core.plugins.hookspecs import hookimpl
from loraengine.core.train.loop import Trainer
from loraengine.core.train.output_lock import OutputLock, lock_path
from loraengine.core.train.signals import TrainingInterrupted


def config_dict(tmp_path, unet_config, **output):
    cfg = json.loads(json.dumps(unet_config))
    cfg["training"]["steps"] = 2
    cfg["output"] = {"dir": str(tmp_path / "out"), "name": "run", "plot": False, **output}
    return cfg


def config_file(tmp_path, unet_config, **output):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config_dict(tmp_path, unet_config, **output)))
    return path


def snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def error_line(result, code):
    """The command's one error line (after the ``warning:`` lines building the tiny
    all-layer run prints), once its exit status is ``code``."""
    assert result.exit_code == code, result.output
    return the_error_line(result.output)


def busy_line(out):
    return (f"error: output.name: another run is writing {out / 'run.safetensors'} (it "
            f"holds the lock {out / '.run.lock'}); wait for it to end, or choose another "
            f"output.name or output.dir")


def assert_free(out):
    """The lock is given back and its file deleted."""
    assert not lock_path(out, "run").exists()
    with OutputLock(out, "run"):
        pass


# -- a second run of the same output --------------------------------------------------------

def test_a_second_run_of_a_held_output_is_refused_at_once_and_writes_nothing(
        tmp_path, unet_config):
    path = config_file(tmp_path, unet_config, save_every=1)
    out = tmp_path / "out"
    out.mkdir()
    # what the holder is writing: its temporary file, which a start-up clean-up removes
    writing = out / ".run.safetensors.ab12cd34.tmp"
    writing.write_bytes(b"half of the other run's LoRA")
    with OutputLock(out, "run"):
        before = snapshot(out)
        result = CliRunner().invoke(cli, ["train", str(path), "-q"])
        assert error_line(result, 1) == busy_line(out)
        assert snapshot(out) == before  # not even the other run's temporary file went
        assert not (out / "run.checkpoints").exists()
    assert_free(out)


def test_the_lock_is_held_while_the_run_trains_and_given_back_after(host, unet_config,
                                                                   tmp_path):
    out = tmp_path / "out"
    seen = []

    class TryTheLock:
        @hookimpl
        def loraengine_on_step_end(self, run, step, metrics):
            seen.append(lock_path(out, "run").exists())
            with pytest.raises(OutputError, match=r"another run is writing .*\.run\.lock"):
                OutputLock(out, "run").acquire()

    host.register(TryTheLock(), name="test.try")
    pipe = build_pipeline(parse_config(config_dict(tmp_path, unet_config), host.registry),
                          host)
    try:
        Trainer(pipe).run()
    finally:
        pipe.close()
    assert seen == [True, True]
    assert_free(out)


def test_the_python_api_is_refused_too(tmp_path, unet_config):
    out = tmp_path / "out"
    out.mkdir()
    path = config_file(tmp_path, unet_config)
    with OutputLock(out, "run"):
        with pytest.raises(OutputError) as caught:
            loraengine.train(path)
    assert f"error: {caught.value}" == busy_line(out)
    assert sorted(p.name for p in out.iterdir()) == []  # nothing written
    assert loraengine.train(path).steps == 2  # the lock free again
    assert_free(out)


def test_another_process_holding_the_lock_refuses_until_it_is_killed(tmp_path, unet_config):
    """Two processes, and a holder killed with SIGKILL: its lock file stays behind, but
    not its lock, so the next run goes on (and deletes the file at its end)."""
    path = config_file(tmp_path, unet_config)
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import filelock, sys, time\n"
         "lock = filelock.FileLock(sys.argv[1])\n"
         "lock.acquire()\n"
         "print('held', flush=True)\n"
         "time.sleep(120)\n", str(out / ".run.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        result = CliRunner().invoke(cli, ["train", str(path), "-q"])
        assert error_line(result, 1) == busy_line(out)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert (out / ".run.lock").exists()  # what the killed holder left
    result = CliRunner().invoke(cli, ["train", str(path), "-q"])
    assert result.exit_code == 0, result.output
    assert load_file(str(out / "run.safetensors"))
    assert_free(out)


def test_a_lock_file_without_a_holder_does_not_block(tmp_path, unet_config):
    path = config_file(tmp_path, unet_config)
    out = tmp_path / "out"
    out.mkdir()
    (out / ".run.lock").write_bytes(b"")
    result = CliRunner().invoke(cli, ["train", str(path), "-q"])
    assert result.exit_code == 0, result.output
    assert_free(out)


def held(out):
    """Whether some run holds the lock of ``out``'s run."""
    lock = OutputLock(out, "run")
    try:
        lock.acquire()
    except OutputError:
        return True
    lock.release()
    return False


def test_the_lock_is_given_back_when_the_run_fails(host, unet_config, tmp_path):
    seen = []

    class Broken:
        @hookimpl
        def loraengine_on_step_end(self, run, step, metrics):
            seen.append(held(tmp_path / "out"))
            raise RuntimeError("a plugin bug")

    host.register(Broken(), name="test.broken")
    pipe = build_pipeline(parse_config(config_dict(tmp_path, unet_config), host.registry),
                          host)
    try:
        with pytest.raises(Exception, match="a plugin bug"):
            Trainer(pipe).run()
    finally:
        pipe.close()
    assert seen == [True]
    assert_free(tmp_path / "out")


def test_the_lock_is_given_back_when_the_run_is_interrupted(host, unet_config, tmp_path):
    seen = []

    class CtrlC:
        @hookimpl
        def loraengine_on_step_end(self, run, step, metrics):
            seen.append(held(tmp_path / "out"))
            os.kill(os.getpid(), signal.SIGINT)

    host.register(CtrlC(), name="test.ctrl_c")
    pipe = build_pipeline(parse_config(config_dict(tmp_path, unet_config), host.registry),
                          host)
    try:
        with pytest.raises(TrainingInterrupted, match="SIGINT: stopped after step 1"):
            Trainer(pipe).run()
    finally:
        pipe.close()
    assert seen == [True]
    assert_free(tmp_path / "out")


def test_a_failed_resume_gives_the_lock_back(host, unet_config, tmp_path):
    pipe = build_pipeline(parse_config(config_dict(tmp_path, unet_config), host.registry),
                          host)
    try:
        trainer = Trainer(pipe)
        assert lock_path(tmp_path / "out", "run").exists()
        with pytest.raises(Exception, match="nowhere"):
            trainer.resume(tmp_path / "nowhere")
        assert_free(tmp_path / "out")
        assert trainer.run().steps == 2  # run takes it again
    finally:
        pipe.close()
    assert_free(tmp_path / "out")


def test_a_file_system_without_flock_falls_back_to_a_marker_lock(tmp_path, monkeypatch):
    unix = pytest.importorskip("filelock._native._unix")
    if not hasattr(unix, "lock_fd_nonblocking"):
        pytest.skip("filelock's flock call moved")

    def no_flock(fd):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(unix, "lock_fd_nonblocking", no_flock)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # filelock says it falls back
        with OutputLock(tmp_path, "run"):
            assert lock_path(tmp_path, "run").exists()
            with pytest.raises(OutputError, match="another run is writing"):
                OutputLock(tmp_path, "run").acquire()
        assert not lock_path(tmp_path, "run").exists()  # filelock deletes its marker
        with OutputLock(tmp_path, "run"):
            pass


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_leaves_the_parents_lock_alone(tmp_path):
    """A data loader's forked worker has the parent's lock object too: giving it back
    there must neither unlock the parent's hold nor delete its file."""
    with OutputLock(tmp_path, "run") as lock:
        child = os.fork()
        if child == 0:  # pragma: no cover (the child)
            code = 1
            try:
                lock.release()
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert lock.held and lock_path(tmp_path, "run").exists()
        with pytest.raises(OutputError, match="another run is writing"):
            OutputLock(tmp_path, "run").acquire()
    assert not lock_path(tmp_path, "run").exists()


def test_a_trainer_that_writes_nothing_takes_no_lock(host, unet_config, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    pipe = build_pipeline(parse_config(config_dict(tmp_path, unet_config), host.registry),
                          host)
    try:
        with OutputLock(out, "run"):
            assert Trainer(pipe, write_files=False).run().steps == 2
    finally:
        pipe.close()


# -- a signal while the end-of-run hooks run ----------------------------------------------

class Killed(BaseException):
    """What the default SIGTERM action does to a process, made observable."""


class TermAtTrainEnd:
    """Sends this process SIGTERM from the first end-of-run hook, as a ``kill`` during a
    last preview render would (the preview plugin's hook runs first too)."""

    def __init__(self):
        self.finished = False

    @hookimpl(tryfirst=True)
    def loraengine_on_train_end(self, run, result):
        os.kill(os.getpid(), signal.SIGTERM)
        self.finished = True  # the hook is not cut short


def _killed(signum, frame):
    raise Killed


@pytest.fixture
def sigterm_kills():
    """SIGTERM's default action (ending the process) as an exception instead."""
    previous = signal.signal(signal.SIGTERM, _killed)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def events_of(out):
    return [json.loads(line) for line in (out / "run.events.jsonl").read_text().splitlines()]


def test_sigterm_in_an_end_of_run_hook_ends_as_interrupted_with_the_files_kept(
        host, unet_config, tmp_path, sigterm_kills):
    plugin = TermAtTrainEnd()
    host.register(plugin, name="test.term")
    pipe = build_pipeline(parse_config(config_dict(tmp_path, unet_config), host.registry),
                          host)
    try:
        with pytest.raises(TrainingInterrupted) as caught:
            Trainer(pipe).run()
    finally:
        pipe.close()
    out = tmp_path / "out"
    assert str(caught.value) == (
        f"SIGTERM: received while the end-of-run hooks ran; training had finished (step "
        f"2) and {out / 'run.safetensors'} is complete")
    assert caught.value.exit_code == 130
    assert plugin.finished
    assert load_file(str(out / "run.safetensors"))
    assert json.loads((out / "run.loss.json").read_text())["loss"]
    events = events_of(out)
    assert events[-1]["event"] == "train_end" and events[-1]["steps"] == 2
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert_free(out)


def test_sigterm_in_an_end_of_run_hook_exits_130_from_the_command_line(
        tmp_path, unet_config, monkeypatch, sigterm_kills):
    real = manager.build_plugin_manager
    monkeypatch.setattr(common, "build_plugin_manager",
                        lambda **kw: real(**kw, extra=[TermAtTrainEnd()]))
    path = config_file(tmp_path, unet_config)
    result = CliRunner().invoke(cli, ["train", str(path), "-q"])
    out = tmp_path / "out"
    assert error_line(result, 130) == (
        f"error: SIGTERM: received while the end-of-run hooks ran; training had finished "
        f"(step 2) and {out / 'run.safetensors'} is complete")
    assert load_file(str(out / "run.safetensors"))
    last = events_of(out)[-1]
    assert (last["event"], last["steps"]) == ("train_end", 2)
    assert_free(out)


# -- refused before the model is built ------------------------------------------------------

def _never_built(*args, **kwargs):
    raise AssertionError("the model was built for a run that could not write its output")


def test_the_command_line_refuses_a_held_output_before_building_the_model(
        tmp_path, unet_config, monkeypatch):
    import loraengine.core.build

    path = config_file(tmp_path, unet_config)
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(loraengine.core.build, "build_pipeline", _never_built)
    with OutputLock(out, "run"):
        result = CliRunner().invoke(cli, ["train", str(path), "-q"])
        assert error_line(result, 1) == busy_line(out)
    assert_free(out)


def test_the_python_api_refuses_a_held_output_before_building_the_model(
        tmp_path, unet_config, monkeypatch):
    import loraengine.api

    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(loraengine.api, "build_pipeline", _never_built)
    with OutputLock(out, "run"), pytest.raises(OutputError, match="another run is writing"):
        loraengine.train(config_dict(tmp_path, unet_config))
    assert_free(out)


def test_an_early_lock_is_given_back_when_building_fails(tmp_path, unet_config,
                                                         monkeypatch):
    import loraengine.api

    out = tmp_path / "out"
    out.mkdir()

    def broken(*args, **kwargs):
        assert lock_path(out, "run").exists()  # held while the model is built
        raise OutputError("the build failed")

    monkeypatch.setattr(loraengine.api, "build_pipeline", broken)
    with pytest.raises(OutputError, match="the build failed"):
        loraengine.train(config_dict(tmp_path, unet_config))
    assert_free(out)
    result = CliRunner().invoke(cli, ["train", str(config_file(tmp_path, unet_config)), "-q"])
    assert result.exit_code == 0, result.output  # nothing left held: the next run trains
    assert_free(out)
