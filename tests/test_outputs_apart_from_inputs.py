"""A run never writes over what it reads: an output that is one of its inputs, an
output folder that holds one, or a LoRA written over the model's own weights is refused
by ``validate`` and ``train`` before anything is loaded, and ``--events`` appends to an
events log but refuses any other existing file. Every input is left byte for byte."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from click.testing import CliRunner

from loraengine.cli.main import cli


def _snapshot(*paths):
    return {p: p.read_bytes() for p in paths}


def _write(tmp_path, cfg):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _refused(result, code=2):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [x for x in result.output.splitlines() if x.strip() and x.startswith("error: ")]
    assert lines, result.output
    return lines


@pytest.mark.parametrize("command", ["validate", "train"])
def test_an_output_named_like_the_latents_file_is_refused(tmp_path, unet_config, command):
    latents = tmp_path / "data" / "latents.safetensors"
    latents.parent.mkdir()
    shutil.copy(unet_config["data"]["latents"], latents)
    unet_config["data"]["latents"] = str(latents)
    unet_config["output"] = {"dir": str(latents.parent), "name": "latents", "plot": False}
    before = _snapshot(latents)
    lines = _refused(CliRunner().invoke(cli, [command, str(_write(tmp_path, unet_config))]))
    assert any(line.startswith(f"error: output.name: {latents} is data.latents {latents}; "
                               "the run would write over its own input") for line in lines), lines
    assert _snapshot(latents) == before
    assert sorted(p.name for p in latents.parent.iterdir()) == ["latents.safetensors"]


def test_a_checkpoints_folder_that_holds_the_conditioning_is_refused(tmp_path, unet_config):
    out = tmp_path / "out"
    held = out / "run.checkpoints"
    held.mkdir(parents=True)
    cond = held / "cond.safetensors"
    shutil.copy(unet_config["data"]["conditioning"], cond)
    unet_config["data"]["conditioning"] = str(cond)
    unet_config["output"] = {"dir": str(out), "name": "run", "plot": False, "save_every": 1}
    before = _snapshot(cond)
    lines = _refused(CliRunner().invoke(cli, ["train", str(_write(tmp_path, unet_config))]))
    assert lines == [f"error: output.save_every: {held} holds data.conditioning {cond}; the "
                     "run would write over its own input (choose another output.dir or "
                     "output.name)"]
    assert _snapshot(cond) == before


def test_a_lora_written_over_the_model_weights_is_refused(tmp_path, unet_config):
    model = tmp_path / "pipe"
    shutil.copytree(unet_config["model"]["path"], model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.is_file()
    unet_config["model"]["path"] = str(model)
    unet_config["output"] = {"dir": str(weights.parent), "name": weights.stem, "plot": False}
    before = _snapshot(weights)
    lines = _refused(CliRunner().invoke(cli, ["train", str(_write(tmp_path, unet_config))]))
    assert lines == [f"error: output.name: {weights} would replace a weights file of "
                     f"model.path {model}; the run would write over its own input (choose "
                     "another output.dir or output.name)"]
    assert _snapshot(weights) == before


def test_an_earlier_lora_in_the_model_folder_is_replaced_as_anywhere(tmp_path, unet_config):
    # the model folder is an input, but a file this engine wrote there is no input
    model = tmp_path / "pipe"
    shutil.copytree(unet_config["model"]["path"], model)
    unet_config["model"]["path"] = str(model)
    unet_config["output"] = {"dir": str(model), "name": "mine", "plot": False}
    path = _write(tmp_path, unet_config)
    for _ in range(2):
        result = CliRunner().invoke(cli, ["train", str(path), "-q"])
        assert result.exit_code == 0, result.output
    assert (model / "mine.safetensors").is_file()


def test_events_refuses_a_file_that_is_no_events_log(tmp_path, unet_config):
    path = _write(tmp_path, unet_config)
    latents = tmp_path / "latents_copy.safetensors"
    shutil.copy(unet_config["data"]["latents"], latents)
    before = _snapshot(path, latents)
    for target in (path, latents):
        result = CliRunner().invoke(cli, ["train", str(path), "-q", "--events", str(target)])
        assert _refused(result) == [
            f"error: --events {target}: the file exists and is not an events log (its "
            "first line is no loraengine event); events are appended, so choose a new "
            "file or an earlier run's log"]
    assert _snapshot(path, latents) == before
    assert not (tmp_path / "out").exists()


def test_events_appends_to_an_earlier_log(tmp_path, unet_config):
    path = _write(tmp_path, unet_config)
    events = tmp_path / "events.jsonl"
    for _ in range(2):
        result = CliRunner().invoke(cli, ["train", str(path), "-q", "--events", str(events)])
        assert result.exit_code == 0, result.output
    kinds = [json.loads(line)["event"] for line in events.read_text().splitlines()]
    assert kinds.count("train_start") == 2 and kinds.count("train_end") == 2
    assert kinds.count("step") == 2 * unet_config["training"]["steps"]


def test_adapter_existing_that_is_the_output_is_trained_on_in_place(tmp_path, unet_config):
    unet_config["output"] = {"dir": str(tmp_path / "out"), "name": "run", "plot": False}
    path = _write(tmp_path, unet_config)
    assert CliRunner().invoke(cli, ["train", str(path), "-q"]).exit_code == 0
    lora = tmp_path / "out" / "run.safetensors"
    first = lora.read_bytes()
    result = CliRunner().invoke(cli, ["train", str(path), "-q", "--set",
                                      f"adapter.existing={lora}"])
    assert result.exit_code == 0, result.output
    assert lora.read_bytes() != first  # three more steps from where the first run ended


@pytest.mark.parametrize("own", ["run.events.jsonl", "run.loss.json", "run.safetensors"])
def test_events_may_not_be_a_file_the_run_writes(tmp_path, unet_config, own):
    out = tmp_path / "out"
    unet_config["output"] = {"dir": str(out), "name": "run", "plot": False}
    path = _write(tmp_path, unet_config)
    result = CliRunner().invoke(cli, ["train", str(path), "-q", "--events", str(out / own)])
    key = {"run.events.jsonl": "output.loggers (events)", "run.loss.json":
           "output.name (loss map)", "run.safetensors": "output.name"}[own]
    assert _refused(result) == [f"error: --events {out / own}: is the file the run writes "
                                f"for {key}; choose another path"]
    assert not out.exists()
