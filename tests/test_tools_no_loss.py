"""``loraengine bucket`` and ``loraengine prepare`` never lose a file: no output over an
input, none over an earlier output unless asked (``bucket --overwrite``; a ``prepare``
rerun replaces its own pair), a pair written both or neither, and every bad ``--out``,
mixed-up input or unreadable caption one ``error:`` line with nothing changed on disk.

Permission cases run the command in a subprocess without the root capabilities that
ignore file modes (``setpriv``), since the tests may run as root."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from loraengine.cli.main import cli
from loraengine.core.errors import DataError
from loraengine.testing import tiny_pipelines as tp

ENOSPC = "No space left on device"


def _one_line(output: str, code: int, exit_code: int) -> str:
    assert exit_code == code, output
    assert "Traceback" not in output
    lines = [x for x in output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    return lines[0]


def _invoke(*args: str, code: int) -> str:
    result = CliRunner().invoke(cli, list(args))
    return _one_line(result.output, code, result.exit_code)


def _unprivileged(*args: str, code: int) -> str:
    """The command run as a process that file permissions apply to (root without
    CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH)."""
    cmd = [sys.executable, "-c", "from loraengine.cli.main import main; main()", *args]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: file modes do not apply")
        cmd = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return _one_line(done.stdout + done.stderr, code, done.returncode)


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _fail_writing(monkeypatch, folder: Path, prefix: str) -> None:
    """Make safetensors' writer fail like a full disk for a file in ``folder`` holding
    ``<prefix>*`` tensors, after it has written part of it."""
    real = safetensors.torch.serialize_file

    def serialize_file(tensors, filename, *args, **kwargs):
        if Path(filename).parent == folder and any(k.startswith(prefix) for k in tensors):
            Path(filename).write_bytes(b"half a file")
            raise OSError(errno.ENOSPC, ENOSPC)
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "serialize_file", serialize_file)


# -- bucket ----------------------------------------------------------------------------

@pytest.fixture
def inputs(tmp_path) -> tuple[Path, Path]:
    lat, cond = tmp_path / "l.safetensors", tmp_path / "c.safetensors"
    save_file({"latents.0": torch.randn(4, 8, 8), "latents.1": torch.randn(4, 12, 8),
               "latents.2": torch.randn(4, 8, 8)}, str(lat))
    save_file({f"cond.{k}": torch.randn(3, 8) for k in range(3)}, str(cond))
    return lat, cond


def _bucket(lat: Path, cond: Path, out: Path, *extra: str, code: int) -> str:
    return _invoke("bucket", "--latents", str(lat), "--conditioning", str(cond), "--out",
                   str(out), *extra, code=code)


@pytest.mark.parametrize("overwrite", [(), ("--overwrite",)], ids=["plain", "overwrite"])
@pytest.mark.parametrize("link", [False, True], ids=["same-path", "linked"])
@pytest.mark.parametrize("which", ["latents", "conditioning"])
def test_bucket_refuses_to_write_over_an_input(tmp_path, inputs, which, link, overwrite):
    """An output that is an input is refused, also where the output is a link to it
    (real paths are compared) and with --overwrite."""
    out = tmp_path / "out"
    out.mkdir()
    index = 0 if which == "latents" else 1
    output = out / f"{which}.safetensors"
    if link:
        output.symlink_to(inputs[index])
        given = inputs
    else:
        shutil.copy(inputs[index], output)
        given = (output, inputs[1]) if which == "latents" else (inputs[0], output)
    before = {p: p.read_bytes() for p in (*inputs, output)}
    line = _bucket(*given, out, *overwrite, code=2)
    assert line == (f"error: --out: {output} is the --{which} file; write the buckets "
                    f"to another folder")
    assert {p: p.read_bytes() for p in (*inputs, output)} == before
    assert sorted(p.name for p in out.iterdir()) == [output.name]


def test_bucket_replaces_earlier_outputs_only_with_overwrite(tmp_path, inputs):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["bucket", "--latents", str(inputs[0]),
                                      "--conditioning", str(inputs[1]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    before = _snapshot(out)
    line = _bucket(*inputs, out, code=2)
    assert line == (f"error: --out: {out / 'latents.safetensors'} and "
                    f"{out / 'conditioning.safetensors'} exist (pass --overwrite to "
                    f"replace them)")
    assert _snapshot(out) == before
    (out / "latents.safetensors").unlink()
    line = _bucket(*inputs, out, code=2)
    assert line == (f"error: --out: {out / 'conditioning.safetensors'} exists (pass "
                    f"--overwrite to replace it)")
    assert _snapshot(out) == {"conditioning.safetensors": before["conditioning.safetensors"]}

    save_file({"latents.0": torch.randn(4, 8, 8)}, str(inputs[0]))
    save_file({"cond.0": torch.randn(3, 8)}, str(inputs[1]))
    result = CliRunner().invoke(cli, ["bucket", "--latents", str(inputs[0]),
                                      "--conditioning", str(inputs[1]), "--out", str(out),
                                      "--overwrite"])
    assert result.exit_code == 0, result.output
    assert set(load_file(str(out / "latents.safetensors"))) == {"latents.0"}
    assert torch.equal(load_file(str(out / "conditioning.safetensors"))["cond.0"][0],
                       load_file(str(inputs[1]))["cond.0"])


@pytest.mark.parametrize("failing", ["cond.", "latents."])
def test_a_failed_bucket_write_leaves_both_earlier_outputs(tmp_path, inputs, monkeypatch,
                                                           failing):
    out = tmp_path / "out"
    out.mkdir()
    save_file({"latents.0": torch.zeros(1, 4, 2, 2)}, str(out / "latents.safetensors"))
    save_file({"cond.0": torch.zeros(1, 3, 8)}, str(out / "conditioning.safetensors"))
    before = _snapshot(out)
    _fail_writing(monkeypatch, out, failing)
    line = _bucket(*inputs, out, "--overwrite", code=1)
    name = "conditioning" if failing == "cond." else "latents"
    assert line == (f"error: {out / (name + '.safetensors')}: cannot write ({ENOSPC}); "
                    f"neither latents.safetensors nor conditioning.safetensors was changed, "
                    f"nothing half-written is left")
    assert _snapshot(out) == before  # no temporary file left either


def test_bucket_out_that_is_a_file_is_one_line(tmp_path, inputs):
    afile = tmp_path / "afile"
    afile.write_bytes(b"keep me")
    line = _bucket(*inputs, afile, code=2)
    assert line == f"error: --out {afile}: cannot create the folder (a file of that name exists)"
    line = _bucket(*inputs, afile / "sub", code=1)
    assert line == f"error: --out {afile / 'sub'}: cannot create the folder (Not a directory)"
    assert afile.read_bytes() == b"keep me"


@pytest.mark.slow  # seconds a run: kept out of the fast default
def test_bucket_out_in_a_read_only_folder_is_one_line(tmp_path, inputs):
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "keep.txt").write_text("keep")
    locked.chmod(0o555)
    try:
        line = _unprivileged("bucket", "--latents", str(inputs[0]), "--conditioning",
                             str(inputs[1]), "--out", str(locked / "b"), code=1)
    finally:
        locked.chmod(0o755)
    assert line == f"error: --out {locked / 'b'}: cannot create the folder (Permission denied)"
    assert _snapshot(locked) == {"keep.txt": b"keep"}


def test_bucket_refuses_mixed_up_inputs(tmp_path, inputs):
    lat, cond = inputs
    before = {p: p.read_bytes() for p in inputs}
    out = tmp_path / "out"
    line = _bucket(lat, lat, out, code=1)
    assert line == (f"error: --conditioning: {lat} holds latents.<k> tensors (latents.0, "
                    f"latents.1, latents.2), which belong in the --latents file")
    line = _bucket(cond, cond, out, code=1)
    assert line == (f"error: --latents: {cond} holds no latents.<k> tensor (it holds "
                    f"cond.0, cond.1, cond.2)")
    line = _bucket(cond, lat, out, code=1)
    assert line.startswith(f"error: --latents: {cond} holds no latents.<k> tensor")
    pooled = tmp_path / "pooled.safetensors"
    save_file({f"pooled.{k}": torch.randn(8) for k in range(3)}, str(pooled))
    line = _bucket(lat, pooled, out, code=1)
    assert line == (f"error: --conditioning: {pooled} holds no cond.<k> tensor (it holds "
                    f"pooled.0, pooled.1, pooled.2)")
    assert not out.exists()
    assert {p: p.read_bytes() for p in inputs} == before


# -- prepare ---------------------------------------------------------------------------

def _prepare(model: Path, images: Path, out: Path) -> list[str]:
    return ["prepare", "--model", str(model), "--images", str(images), "--out", str(out),
            "--resolution", "16", "-q"]


def test_a_prepare_rerun_replaces_its_pair_and_a_failed_one_keeps_it(tmp_path,
                                                                      monkeypatch):
    """The rerun that tests/test_prepare.py promises replaces both files; one whose
    write fails leaves the earlier pair byte for byte (and no temporary file)."""
    model = tp.save("sd15", tmp_path / "sd15")
    images = tmp_path / "images"
    tp.write_images(images, [(16, 16), (16, 16)])
    out = tmp_path / "data"
    first = CliRunner().invoke(cli, _prepare(model, images, out))
    assert first.exit_code == 0, first.output
    before = _snapshot(out)
    (images / "image_01.txt").write_text("another caption")
    _fail_writing(monkeypatch, out, "cond")
    line = _invoke(*_prepare(model, images, out), code=1)
    assert line == (f"error: {out / 'conditioning.safetensors'}: cannot write ({ENOSPC}); "
                    f"neither latents.safetensors nor conditioning.safetensors was changed, "
                    f"nothing half-written is left")
    after = _snapshot(out)
    for name in ("latents.safetensors", "conditioning.safetensors"):
        assert after[name] == before[name]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    again = CliRunner().invoke(cli, _prepare(model, images, out))
    assert again.exit_code == 0, again.output
    assert (out / "conditioning.safetensors").read_bytes() != \
        before["conditioning.safetensors"]


def test_an_unreadable_caption_is_one_line_naming_it(tmp_path):
    images = tmp_path / "images"
    tp.write_images(images, [(16, 16), (16, 16)])
    caption = images / "image_01.txt"
    caption.chmod(0o000)
    before = _snapshot(images) if os.geteuid() == 0 else None
    # --model is no pipeline: the captions are read first
    line = _unprivileged("prepare", "--model", str(tmp_path), "--images", str(images),
                         "--out", str(tmp_path / "out"), code=1)
    assert line == (f"error: 1 unusable caption file(s) in {images}: image_01.txt cannot "
                    f"be read (Permission denied)")
    caption.chmod(0o644)
    if before is not None:
        assert _snapshot(images) == before
    assert not (tmp_path / "out").exists()


def test_a_caption_that_is_a_folder_is_named_as_one(tmp_path):
    images = tmp_path / "images"
    tp.write_images(images, [(16, 16), (16, 16), (16, 16)])
    (images / "image_01.txt").unlink()
    (images / "image_01.txt").mkdir()
    (images / "image_02.txt").write_bytes(b"caf\xe9")
    line = _invoke("prepare", "--model", str(tmp_path), "--images", str(images), "--out",
                   str(tmp_path / "out"), code=1)
    assert line == (f"error: 2 unusable caption file(s) in {images}: image_01.txt is a "
                    f"folder, image_02.txt is not UTF-8 text")
    assert not (tmp_path / "out").exists()


def test_a_clips_caption_that_is_a_folder_is_named_as_one(tmp_path):
    from loraengine.tools.prepare.video import _caption

    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"")
    (tmp_path / "clip.txt").mkdir()
    with pytest.raises(DataError) as caught:
        _caption(clip, None, ".txt", tmp_path)
    assert str(caught.value) == f"{tmp_path / 'clip.txt'}: caption is a folder"
