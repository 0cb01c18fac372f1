"""Hostile inputs to resuming and loading: damaged checkpoints fall back to the previous
good one, NaN and inf in the config or in ``adapter.existing`` are refused at the start,
and unreadable or non-safetensors model and data files are named with the real reason.
Each ends in one ``warning:`` / ``error:`` line, never a traceback."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import typing
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import REPO, the_error_line
from pydantic import BaseModel, ValidationError
from safetensors.torch import load_file, save_file

from loraengine.cli.main import cli
from loraengine.core.build import build_pipeline
from loraengine.core.config.root import build_config_model, parse_config
from loraengine.core.errors import DataError
from loraengine.core.options import _members
from loraengine.core.train import checkpoints as ckpt
from loraengine.core.train.loop import Trainer
from loraengine.plugins.models import single_file
from loraengine.testing.models import save_tiny_unet_data, tiny_unet_train_config

WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def write_cfg(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, unet_dir):
    """A 3-step run with a checkpoint after each step: (its folder, its config)."""
    root = tmp_path_factory.mktemp("hostile")
    files = save_tiny_unet_data(root / "data")
    cfg = tiny_unet_train_config(unet_dir, files, {
        "adapter": {"alpha": 2},
        "output": {"dir": str(root / "out"), "name": "run", "plot": False, "save_every": 1}})
    res = run("train", write_cfg(root / "c.yaml", cfg), "-q")
    assert res.exit_code == 0, res.output
    return root, cfg


def run_copy(trained, tmp_path: Path) -> tuple[dict, Path]:
    """The trained run's config and output, copied under ``tmp_path``: (config, the
    copied checkpoints folder)."""
    root, cfg = trained
    cfg = json.loads(json.dumps(cfg))
    shutil.copytree(root / "out", tmp_path / "out")
    cfg["output"]["dir"] = str(tmp_path / "out")
    return cfg, tmp_path / "out" / "run.checkpoints"


def damage(step_dir: Path, how: str) -> None:
    """Break one checkpoint as ``how`` says, then rewrite its manifest's hashes so that
    only the damage itself (not a hash mismatch) can refuse it."""
    manifest = json.loads((step_dir / "manifest.json").read_text())
    if how == "files is a list":
        manifest["files"] = list(manifest["files"])
    elif how == "step is text":
        manifest["step"] = "x"
    elif how == "manifest is a list":
        manifest = [manifest]
    elif how == "adapter is JSON":
        (step_dir / "adapter.safetensors").write_text('{"not": "safetensors"}')
    elif how == "state is junk":
        (step_dir / "state.pt").write_bytes(b"junk" * 64)
    elif how == "state is a list":
        torch.save([1, 2, 3], step_dir / "state.pt")
    elif how == "state lacks keys":
        torch.save({"step": 3}, step_dir / "state.pt")
    if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict):
        for name in manifest["files"]:
            manifest["files"][name] = hashlib.sha256((step_dir / name).read_bytes()).hexdigest()
    (step_dir / "manifest.json").write_text(json.dumps(manifest))


# -- 1. a damaged checkpoint is reported and the previous one used --------------------

DAMAGES = {  # how -> (the file named, what the warning says is wrong)
    "files is a list": ("manifest.json", "'files' is a list, not a mapping"),
    "step is text": ("manifest.json", "'step' is 'x', not a step number"),
    "manifest is a list": ("manifest.json", "holds a list, not a mapping"),
    "adapter is JSON": ("adapter.safetensors", "is not a readable safetensors file"),
    "state is junk": ("state.pt", "is not a readable saved state"),
    "state is a list": ("state.pt", "holds a list, not the state of a run"),
    "state lacks keys": ("state.pt", "lacks optimizer, lr_scheduler"),
}


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(host, trained, tmp_path, how):
    cfg, folder = run_copy(trained, tmp_path)
    damage(folder / "step_00000003", how)
    pipe = build_pipeline(parse_config(cfg, host.registry), host)
    trainer = Trainer(pipe)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        used = trainer.resume("latest")
    pipe.close()
    assert used == folder / "step_00000002"
    assert trainer.start_step == 2
    [message] = [str(w.message) for w in caught if w.category is ckpt.CheckpointWarning]
    file, wrong = DAMAGES[how]
    assert message.startswith(f"checkpoint {folder / 'step_00000003'}: {file}"), message
    assert wrong in message and message.endswith("; trying the previous checkpoint")


def test_resume_on_the_command_line_warns_and_says_which_checkpoint(trained, tmp_path):
    cfg, folder = run_copy(trained, tmp_path)
    damage(folder / "step_00000003", "state is junk")
    res = run("train", write_cfg(tmp_path / "c.yaml", cfg), "--resume", "latest")
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output
    lines = res.stderr.splitlines()
    assert any(x.startswith(f"warning: checkpoint {folder / 'step_00000003'}: state.pt is "
                            f"not a readable saved state") for x in lines), lines
    assert f"resuming from {folder / 'step_00000002'} (step 2)" in lines


def test_when_no_checkpoint_is_good_one_line_says_so(trained, tmp_path):
    cfg, folder = run_copy(trained, tmp_path)
    for step_dir in folder.iterdir():
        damage(step_dir, "state is a list")
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    res = run("train", write_cfg(tmp_path / "c.yaml", cfg), "-q", "--resume", "latest")
    assert res.exit_code == 1
    assert the_error_line(res.output) == (
        f"error: --resume: no usable checkpoint in {folder} (3 damaged; the newest, "
        f"step_00000003: state.pt holds a list, not the state of a run)")
    # nothing was trained over them
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


# -- 2. NaN and inf in the config --------------------------------------------------------

@pytest.mark.parametrize(("item", "key", "got"), [
    ("adapter.alpha=.inf", "adapter.alpha", "inf"),
    ("adapter.alpha=.nan", "adapter.alpha", "nan"),
    ("adapter.alpha=inf", "adapter.alpha", "'inf'"),
    ("optimizer.lr=.nan", "optimizer.lr", "nan"),
    ("training.max_grad_norm=-.inf", "training.max_grad_norm", "-inf"),
    ("optimizer.betas=[0.9, .nan]", "optimizer.betas.1", "nan"),
])
def test_nan_and_inf_in_the_config_are_refused_naming_the_key(tmp_path, unet_config, item,
                                                             key, got):
    path = write_cfg(tmp_path / "c.yaml", unet_config)
    for command in (["validate", "--syntax-only"], ["train", "-q"]):
        res = run(*command, path, "--set", item)
        assert res.exit_code == 2, res.output
        assert the_error_line(res.output) == \
            f"error: {key}: Input should be a finite number (got {got}) (--set)"
    assert not (tmp_path / "out").exists()


def _float_fields(model: type[BaseModel], seen: set[type]) -> list[tuple[type, str]]:
    """(model, field) for every float field of ``model`` and the models under it."""
    if model in seen:
        return []
    seen.add(model)
    out = []
    for name, info in model.model_fields.items():
        members = _members(info.annotation)
        if float in members:
            out.append((model, name))
        for member in members:
            for arg in (member, *typing.get_args(member)):
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    out += _float_fields(arg, seen)
    return out


def _errors_at(model: type[BaseModel], name: str, value: float) -> list[str] | None:
    """The kinds of error validating ``{name: value}`` gives at that key; ``None`` when
    the model refuses before its fields are read (adamw8bit without a GPU)."""
    try:
        model.model_validate({name: value})
    except ValidationError as err:
        at = [e["type"] for e in err.errors() if e["loc"] == (name,)]
        if not at and all(e["loc"] == () for e in err.errors()):
            return None
        return at
    return []


def test_every_float_field_of_the_config_refuses_nan_and_inf(host):
    fields = _float_fields(build_config_model(host.registry), set())
    assert len(fields) > 20  # the sections' own and every installed plugin's
    unchecked = set()
    for model, name in fields:
        default = model.model_fields[name].default
        where = f"{model.__name__}.{name}"
        if isinstance(default, float) and math.isinf(default):  # inf stands for no limit
            assert _errors_at(model, name, default) in ([], None), where
            assert _errors_at(model, name, float("nan")) != [], where
            continue
        for bad in (float("nan"), float("inf"), float("-inf")):
            found = _errors_at(model, name, bad)
            if found is None:
                unchecked.add(model.__name__)
                break
            assert found == ["finite_number"], (where, bad)
    assert len(unchecked) <= 1, unchecked


def test_an_infinite_default_may_still_be_written_out(tmp_path, unet_config):
    pytest.importorskip("prodigyopt")  # the dev extra has it
    path = write_cfg(tmp_path / "c.yaml", unet_config)
    res = run("validate", "--syntax-only", path, "--set", "optimizer.name=prodigy",
              "--set", "optimizer.growth_rate=.inf")
    assert res.exit_code == 0, res.output


# -- 3. adapter.existing with NaN or inf -------------------------------------------------

def test_adapter_existing_holding_inf_is_refused_at_the_start(trained, tmp_path):
    root, cfg = trained
    tensors = load_file(str(root / "out" / "run.safetensors"))
    key = sorted(k for k in tensors if k.endswith("lora_up.weight"))[0]
    tensors[key].view(-1)[0] = float("inf")
    existing = tmp_path / "inf.safetensors"
    save_file(tensors, str(existing))
    cfg = {**cfg, "adapter": {**cfg["adapter"], "existing": str(existing)},
           "output": {**cfg["output"], "dir": str(tmp_path / "out"), "save_every": None}}
    path = write_cfg(tmp_path / "c.yaml", cfg)
    line = f"error: adapter.existing: {existing}: tensor {key!r} holds NaN or inf values"
    res = run("train", path, "-q")
    assert res.exit_code == 1 and the_error_line(res.output) == line
    assert not (tmp_path / "out" / "run.safetensors").exists()
    res = run("validate", path)
    assert res.exit_code == 2 and line in res.stderr.splitlines(), res.output


# -- 4. permission denied is reported as such --------------------------------------------

def _as_unprivileged(tmp_path: Path, *commands: list[str]) -> list[tuple[int, str]]:
    """Each CLI command's exit status and stderr, run in one child process that cannot
    bypass file permissions (root keeps no CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH)."""
    script = ("import json, sys\nfrom click.testing import CliRunner\n"
              "from loraengine.cli.main import cli\nout = []\n"
              "for args in json.loads(sys.argv[1]):\n"
              "    r = CliRunner().invoke(cli, args)\n"
              "    out.append([r.exit_code, r.stderr])\nprint(json.dumps(out))\n")
    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv to drop the override")
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([*prefix, sys.executable, "-c", script, json.dumps(commands)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    if done.returncode != 0 and "setpriv" in done.stderr:
        pytest.skip(f"setpriv cannot drop capabilities here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr[-2000:]
    return [(code, err) for code, err in json.loads(done.stdout.strip().splitlines()[-1])]


@pytest.fixture
def unreadable(tmp_path, unet_dir, unet_config, data_files):
    """Two configs under ``tmp_path``, each naming one file this process may not read
    once it cannot bypass permissions: (the config whose latents file that is, the
    config whose model weights it is, the latents file, the weights file)."""
    model = tmp_path / "model"
    shutil.copytree(unet_dir, model)
    latents, weights = data_files[0], model / WEIGHTS
    data_cfg = write_cfg(tmp_path / "data.yaml", unet_config)
    model_cfg = write_cfg(tmp_path / "model.yaml", {
        **unet_config, "model": {"family": "diffusers", "path": str(model)}})
    latents.chmod(0)
    weights.chmod(0)
    yield data_cfg, model_cfg, latents, weights
    latents.chmod(0o644)
    weights.chmod(0o644)


def test_validate_says_permission_denied_for_data_and_weights(tmp_path, unreadable):
    data_cfg, model_cfg, latents, weights = unreadable
    (data_code, data_err), (model_code, model_err) = _as_unprivileged(
        tmp_path, ["validate", str(data_cfg)], ["validate", str(model_cfg)])
    data_line = f"error: data.latents: cannot read {latents}: Permission denied"
    model_line = f"error: model.path: cannot read {weights}: Permission denied"
    assert data_code == 2 and data_line in data_err.splitlines(), data_err
    assert model_code == 2 and model_line in model_err.splitlines(), model_err
    assert "No such file" not in data_err + model_err


@pytest.mark.slow  # each train imports and starts building the model before it reads
def test_train_says_permission_denied_for_data_and_weights(tmp_path, unreadable):
    data_cfg, model_cfg, latents, weights = unreadable
    (data_code, data_err), (model_code, model_err) = _as_unprivileged(
        tmp_path, ["train", str(data_cfg), "-q"], ["train", str(model_cfg), "-q"])
    assert data_code == 1 and model_code == 1
    # the model config's data is unreadable too; its weights are read first
    assert the_error_line(model_err) == \
        f"error: model.path: cannot read {weights}: Permission denied"
    assert the_error_line(data_err) == \
        f"error: latents: cannot read {latents}: Permission denied"


# -- 5. model weights that are not safetensors ------------------------------------------

def _safetensors(header: bytes, data: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header + data


NOT_SAFETENSORS = {  # what the weights file holds -> (its bytes, what the line says)
    "text": (b"this is a text file, not weights\n", "it gives a header length of"),
    "other bytes": (bytes(range(256)) * 12, "it gives a header length of"),
    "a header not JSON": (_safetensors(b"not json at all!", b""), "it is not JSON"),
    "a header not an object": (_safetensors(b"[]", b""), "it is not a JSON object"),
    "data past the end": (_safetensors(
        b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,80]}}', bytes(8)), "tensor 'a'"),
    "data not the shape": (_safetensors(
        b'{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}', bytes(8)), "tensor 'a'"),
}


@pytest.mark.parametrize(("content", "why"), NOT_SAFETENSORS.values(), ids=NOT_SAFETENSORS)
def test_weights_that_are_not_safetensors_name_the_file(tmp_path, unet_dir, unet_config,
                                                        data_files, content, why):
    model = tmp_path / "model"
    shutil.copytree(unet_dir, model)
    (model / WEIGHTS).write_bytes(content)
    cfg = {**unet_config, "model": {"family": "diffusers", "path": str(model)}}
    path = write_cfg(tmp_path / "c.yaml", cfg)
    start = (f"error: model.path: {model / WEIGHTS} is not a readable safetensors file "
             f"(its header is damaged: ")
    for args in (["train", path, "-q"], ["plan", path],
                 ["sample", "--model", model, "--prompts", data_files[1], "--out",
                  tmp_path / "samples"]):
        res = run(*args)
        assert res.exit_code == 1, (args[0], res.output)
        line = the_error_line(res.output)
        assert line.startswith(start) and why in line, (args[0], line)
    assert not (tmp_path / "samples").exists()


def test_a_single_file_that_is_text_is_named(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_text("not a model")
    with pytest.raises(DataError, match=rf"^model.path: {file} is not a readable "
                       r"safetensors file \(its header is damaged: "):
        single_file.header(file)


# -- 6. wording ---------------------------------------------------------------------------

def test_adapter_files_of_no_known_algorithm_or_no_tensors_read_well(tmp_path, unet_config):
    odd, empty = tmp_path / "odd.safetensors", tmp_path / "empty.safetensors"
    save_file({"foo.bar": torch.zeros(2)}, str(odd))
    save_file({}, str(empty))
    res = run("validate", write_cfg(tmp_path / "c.yaml", {
        **unet_config, "adapter": {**unet_config["adapter"], "existing": str(odd)}}))
    assert f"error: adapter.existing: {odd}: module foo holds an adapter of unknown " \
        "algorithm, but adapter.algorithm is 'lora'" in res.stderr.splitlines(), res.output
    res = run("train", "-q", write_cfg(tmp_path / "c.yaml", {
        **unet_config, "adapter": {**unet_config["adapter"], "existing": str(empty)}}))
    assert res.exit_code == 1
    assert the_error_line(res.output) == f"error: adapter.existing: {empty} holds no tensors"
