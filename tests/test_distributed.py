"""Data-parallel training under torchrun (gloo on CPU)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import REPO
from safetensors.torch import load_file

from loraengine.core.train import checkpoints as ckpt

HELPER = REPO / "tests" / "helpers" / "dist_train.py"
pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None and
                                not (REPO / ".venv").exists(), reason="needs torchrun")


def unet_config(tiny_unet_dir, folder):
    """The tiny UNet's training config (as the ``unet_config`` fixture has it), with its
    data files in ``folder``: built here so that the module's one-process reference and
    each test's runs are the same config by construction."""
    from loraengine.testing.models import save_tiny_unet_data, tiny_unet_train_config

    return tiny_unet_train_config(tiny_unet_dir, save_tiny_unet_data(folder / "data"),
                                  {"adapter": {"alpha": 2}})


def config(tmp_path, unet_config, name, **extra):
    cfg = json.loads(json.dumps(unet_config))
    cfg["training"].update({"steps": 3, "batch_size": 4, "dist_timeout": 20})
    # SGD: the update is linear in the gradient, so the comparison measures the gradient
    # averaging itself (Adam's first steps turn float-noise gradients into ±lr updates)
    cfg["optimizer"] = {"name": "sgd", "lr": 0.1}
    cfg["output"] = {"dir": str(tmp_path / name), "name": "run", "plot": False, **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    (tmp_path / name).mkdir()
    return path


def launch(cfg, out, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--rdzv-endpoint=localhost:0", "--rdzv-backend=c10d", str(HELPER), str(cfg), str(out), *extra]
    if nproc == 1:
        cmd = [sys.executable, str(HELPER), str(cfg), str(out), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_unet_dir):
    """The reference of the module's tests, run once: 3 steps of the global batch of 4 in
    one process as 2 micro-batches of 2 (the same forward shapes as each rank's of a
    two-process run, so only the order of the final sum differs). Its folder holds
    ``rank0.safetensors``, ``run.safetensors`` and ``run.loss.json``."""
    tmp = tmp_path_factory.mktemp("one_process")
    single = config(tmp, unet_config(tiny_unet_dir, tmp), "single")
    cfg = yaml.safe_load(single.read_text())
    cfg["training"].update({"batch_size": 2, "grad_accumulation_steps": 2})
    single.write_text(yaml.safe_dump(cfg))
    proc = launch(single, tmp / "single", 1)
    assert proc.returncode == 0, proc.stderr
    return tmp / "single"


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_processes_match_one_process_and_each_other(tmp_path, tiny_unet_dir, fsdp,
                                                        one_process):
    double = config(tmp_path, unet_config(tiny_unet_dir, tmp_path), "double")
    cfg = yaml.safe_load(double.read_text())
    cfg["training"]["fsdp"] = fsdp
    double.write_text(yaml.safe_dump(cfg))
    proc = launch(double, tmp_path / "double", 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = load_file(str(tmp_path / "double" / "rank0.safetensors"))
    r1 = load_file(str(tmp_path / "double" / "rank1.safetensors"))
    ref = load_file(str(one_process / "rank0.safetensors"))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    # relative error of the whole trained update (all lora_up tensors as one vector)
    ups = [k for k in ref if k.endswith("lora_up.weight")]
    diff = torch.cat([(r0[k] - ref[k]).flatten() for k in ups]).norm()
    rel = float(diff / torch.cat([ref[k].flatten() for k in ups]).norm())
    assert rel <= 1e-6, rel
    # only rank 0 wrote the LoRA file, and its losses are the single run's
    la = json.loads((one_process / "run.loss.json").read_text())["loss"]
    lb = json.loads((tmp_path / "double" / "run.loss.json").read_text())["loss"]
    assert lb == pytest.approx(la, rel=1e-6)


@pytest.mark.slow
def test_a_rank_that_dies_stops_the_run_and_checkpoints_stay_intact(tmp_path, tiny_unet_dir):
    cfg = config(tmp_path, unet_config(tiny_unet_dir, tmp_path), "dies", save_every=1)
    proc = launch(cfg, tmp_path / "dies", 2, "die:2:1")
    assert proc.returncode != 0
    assert "rank" in proc.stderr.lower() and ("fail" in proc.stderr.lower())
    found = ckpt.list_checkpoints(tmp_path / "dies" / "run.checkpoints")
    assert found, proc.stderr[-4000:]
    for _, path in found:
        ckpt.verify(path)  # every finished checkpoint is intact


@pytest.mark.slow
def test_resume_with_another_world_size(tmp_path, tiny_unet_dir, one_process):
    """Checkpoints hold world-size-independent state: two processes stop after step 2,
    one process finishes; the result matches a single uninterrupted process."""
    from click.testing import CliRunner

    from loraengine.cli.main import cli

    split = config(tmp_path, unet_config(tiny_unet_dir, tmp_path), "split", save_every=1)
    cfg = yaml.safe_load(split.read_text())
    cfg["training"]["steps"] = 2
    split.write_text(yaml.safe_dump(cfg))
    proc = launch(split, tmp_path / "split", 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg["training"].update({"steps": 3, "batch_size": 2, "grad_accumulation_steps": 2})
    split.write_text(yaml.safe_dump(cfg))
    # the one process that finishes is this one (the test is about the checkpoint, not
    # the process)
    res = CliRunner().invoke(cli, ["train", str(split), "-q", "--resume", "latest"])
    assert res.exit_code == 0, res.output[-3000:]
    a = load_file(str(one_process / "run.safetensors"))
    b = load_file(str(tmp_path / "split" / "run.safetensors"))
    ups = [k for k in a if k.endswith("lora_up.weight")]
    diff = torch.cat([(a[k] - b[k]).flatten() for k in ups]).norm()
    assert float(diff / torch.cat([a[k].flatten() for k in ups]).norm()) <= 1e-6
    la = json.loads((one_process / "run.loss.json").read_text())["loss"]
    lb = json.loads((tmp_path / "split" / "run.loss.json").read_text())["loss"]
    assert lb == pytest.approx(la, rel=1e-6)
