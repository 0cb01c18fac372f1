"""``loraengine merge`` never destroys an input: ``--out`` apart from ``--model`` and
``--lora`` (as real paths), ``--overwrite`` only over an earlier merge output, and the
replacement atomic (the earlier output survives a failed write)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from loraengine.cli.main import cli
from loraengine.core.adapter import AdapterNetwork
from loraengine.core.files import save_lora
from loraengine.plugins import build_plugin_manager
from loraengine.tools.merge.logic import MARKER

REG = build_plugin_manager().registry


def tree_hashes(root: Path) -> dict[str, str]:
    """Every file under ``root`` (or ``root`` itself) by relative path -> sha256."""
    root = Path(root)
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def one_line_error(result, code: int, *needles: str) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    err = result.stderr.strip()
    assert "Traceback" not in result.output
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def merge(*args: str):
    return CliRunner().invoke(cli, ["merge", *args])


@pytest.fixture
def inputs(unet_dir, tmp_path):
    """A copy of the tiny pipeline folder under O/model and a LoRA file O/lora.safetensors."""
    from diffusers import UNet2DConditionModel

    work = tmp_path / "O"
    model = work / "model"
    shutil.copytree(unet_dir, model)
    unet = UNet2DConditionModel.from_pretrained(str(model / "unet"), local_files_only=True)
    spec = REG.get("adapter", "lora")
    opts = spec.config_model.model_validate({})
    g = torch.Generator().manual_seed(0)
    layers = {p: spec.create(m, 2, 2.0, opts, g) for p, m in unet.named_modules()
              if isinstance(m, (nn.Linear, nn.Conv2d))}
    for layer in layers.values():
        with torch.no_grad():
            for param in layer.parameters():
                param.normal_(0, 0.01, generator=g)
    network = AdapterNetwork(layers)
    lora = work / "lora.safetensors"
    save_lora(lora, REG.get("exporter", "kohya").to_file(network.file_modules(torch.float32)),
              {})
    return work, model, lora


def _snapshot(*paths: Path) -> dict[str, dict[str, str]]:
    return {str(p): tree_hashes(p) for p in paths}


@pytest.mark.parametrize(("out", "needle"), [
    ("O", "contains --model"),             # --out O --model O/model
    ("O/model", "is --model"),             # the model folder itself
    ("O/model/unet", "is inside --model"),  # a folder inside the model
    ("O/lora.safetensors", "is --lora"),   # the input LoRA becomes a folder
    ("link", "is --model"),                # a link to the model folder
])
@pytest.mark.parametrize("overwrite", [True, False])
def test_out_that_overlaps_an_input_is_refused(inputs, tmp_path, out, needle, overwrite):
    work, model, lora = inputs
    os.symlink(model, tmp_path / "link")
    before = _snapshot(model, lora)
    args = ["--model", str(model), "--lora", str(lora), "--out", str(tmp_path / out)]
    res = merge(*args, *(["--overwrite"] if overwrite else []))
    err = one_line_error(res, 2, "--out:", needle)
    assert str(tmp_path / out) in err
    assert _snapshot(model, lora) == before
    assert not [p for p in work.iterdir() if p.name.startswith(".")]


def test_a_lora_reached_through_a_link_is_recognised(inputs, tmp_path):
    _, model, lora = inputs
    os.symlink(lora, tmp_path / "alias.safetensors")
    before = _snapshot(model, lora)
    res = merge("--model", str(model), "--lora", str(tmp_path / "alias.safetensors"),
                "--out", str(lora), "--overwrite")
    one_line_error(res, 2, "--out:", "is --lora")
    assert _snapshot(model, lora) == before and lora.is_file()


@pytest.mark.parametrize("kind", ["folder", "file", "empty folder", "link"])
def test_overwrite_replaces_only_a_merge_output(inputs, tmp_path, kind):
    _, model, lora = inputs
    target = tmp_path / "target"
    if kind == "folder":
        target.mkdir()
        (target / "notes.txt").write_text("mine")
    elif kind == "empty folder":
        target.mkdir()
    elif kind == "file":
        target.write_bytes(b"precious")
    else:
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / MARKER).write_text("{}")
        os.symlink(tmp_path / "elsewhere", target)
    before = _snapshot(model, lora, target)
    res = merge("--model", str(model), "--lora", str(lora), "--out", str(target),
                "--overwrite")
    want = {"folder": "did not write", "empty folder": "did not write", "file": "is a file",
            "link": "is a link"}[kind]
    one_line_error(res, 2, "--out:", str(target), want, "only a merge output")
    assert _snapshot(model, lora, target) == before


def test_overwrite_of_a_merge_output_replaces_it_and_a_failed_write_keeps_it(
        inputs, tmp_path, monkeypatch):
    _, model, lora = inputs
    out = tmp_path / "merged"
    first = merge("--model", str(model), "--lora", str(lora), "--out", str(out))
    assert first.exit_code == 0, first.output
    assert (out / MARKER).is_file() and (out / "unet" / "config.json").is_file()
    again = merge("--model", str(model), "--lora", str(lora), "--out", str(out),
                  "--strength", "0.5", "--overwrite")
    assert again.exit_code == 0, again.output
    assert '"strength": 0.5' in (out / MARKER).read_text()

    # A failure half-way through the write: part of the new weights written, then ENOSPC.
    from diffusers import ModelMixin

    def broken_save(self, directory, *args, **kwargs):
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 100)
        raise OSError(28, "No space left on device")

    before = _snapshot(model, lora, out)
    monkeypatch.setattr(ModelMixin, "save_pretrained", broken_save)
    res = merge("--model", str(model), "--lora", str(lora), "--out", str(out),
                "--strength", "0.25", "--overwrite")
    one_line_error(res, 1, "--out:", str(out), "No space left on device", "is kept")
    assert _snapshot(model, lora, out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["O", "merged"]  # no debris


def test_an_input_model_that_is_itself_a_merge_output_stays_intact(inputs, tmp_path):
    """Merging a merge output into a new folder leaves the earlier one as it was."""
    _, model, lora = inputs
    first = tmp_path / "m1"
    assert merge("--model", str(model), "--lora", str(lora), "--out", str(first)).exit_code == 0
    before = _snapshot(first, lora)
    res = merge("--model", str(first), "--lora", str(lora), "--out", str(first),
                "--overwrite")
    one_line_error(res, 2, "is --model")
    assert _snapshot(first, lora) == before


def test_out_under_a_file_is_one_line_and_writes_nothing(inputs, tmp_path):
    _, model, lora = inputs
    (tmp_path / "afile").write_bytes(b"keep me")
    before = _snapshot(model, lora, tmp_path / "afile")
    res = merge("--model", str(model), "--lora", str(lora), "--out",
                str(tmp_path / "afile" / "merged"))
    one_line_error(res, 1, "--out:", "afile", "nothing was written")
    assert _snapshot(model, lora, tmp_path / "afile") == before


# -- hostile inputs: broken weights, non-finite strengths and adapters ---------------------

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
HEADER = "Error while deserializing header: "  # safetensors' own words


@pytest.mark.parametrize(("kind", "dtype", "reason"), [
    ("truncated", "auto", HEADER + "incomplete metadata, file not fully covered"),
    ("truncated", "fp16", HEADER + "incomplete metadata, file not fully covered"),
    ("garbage", "auto", HEADER + "header too large"),
    ("folder", "auto", None),
])
def test_broken_weights_are_one_line_and_nothing_is_written(inputs, tmp_path, kind, dtype,
                                                            reason):
    _, model, lora = inputs
    weights = model / WEIGHTS
    if kind == "truncated":
        os.truncate(weights, weights.stat().st_size // 2)
    elif kind == "garbage":
        weights.write_bytes(b"\xff" * 1000)
    else:
        weights.unlink()
        weights.mkdir()
    before = _snapshot(model, lora)
    res = merge("--model", str(model), "--lora", str(lora), "--out", str(tmp_path / "m"),
                "--dtype", dtype)
    err = one_line_error(res, 1)
    assert err == (f"error: --model: cannot read {weights}: {reason}" if reason else
                   f"error: --model path is a folder, not a safetensors file: {weights}")
    assert not (tmp_path / "m").exists() and _snapshot(model, lora) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["O"]  # no temporary folder


@pytest.mark.slow  # seconds a run: kept out of the fast default
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv to drop the right to read any file")
def test_weights_the_user_may_not_read_are_one_line(inputs, tmp_path):
    import subprocess
    import sys

    _, model, lora = inputs
    weights = model / WEIGHTS
    weights.chmod(0)
    out = tmp_path / "m"
    # root reads any file; without these capabilities it is refused as anyone would be
    res = subprocess.run(["setpriv", "--bounding-set", "-dac_override,-dac_read_search",
                          str(Path(sys.executable).parent / "loraengine"), "merge",
                          "--model", str(model), "--lora", str(lora), "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert res.stderr.splitlines() == [
        f"error: --model: cannot read {weights}: Permission denied"]
    assert not out.exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_non_finite_strength_is_refused_at_once(inputs, tmp_path, value):
    _, model, lora = inputs
    res = merge("--model", str(model), "--lora", str(lora), "--out", str(tmp_path / "m"),
                "--strength", value)
    err = one_line_error(res, 2)
    assert err == f"error: --strength: must be a finite number, got {float(value)}"
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_an_adapter_holding_nan_or_inf_is_refused_naming_the_tensor(inputs, tmp_path, value):
    from safetensors.torch import load_file, save_file

    _, model, lora = inputs
    tensors = load_file(str(lora))
    name = sorted(k for k in tensors if k.endswith("lora_up.weight"))[3]
    tensors[name][0, 0] = value
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad))
    before = _snapshot(model, bad)
    res = merge("--model", str(model), "--lora", str(bad), "--out", str(tmp_path / "m"))
    err = one_line_error(res, 1)
    assert err == (f"error: --lora {bad}: tensor {name!r} holds NaN or inf values; nothing "
                   f"was merged or written")
    assert not (tmp_path / "m").exists() and _snapshot(model, bad) == before


def test_a_finite_strength_that_overflows_the_weights_writes_nothing(inputs, tmp_path):
    _, model, lora = inputs
    res = merge("--model", str(model), "--lora", str(lora), "--out", str(tmp_path / "m"),
                "--strength", "1e39")
    err = one_line_error(res, 1, f"--lora {lora}: merged at strength 1e+39, the weight ",
                         "holds NaN or inf values in float32; nothing was written")
    assert "Traceback" not in err
    assert not (tmp_path / "m").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["O"]
