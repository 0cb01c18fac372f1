"""The loggers ``output.loggers`` names, each read back with its own program's reader:
TensorBoard's ``EventAccumulator``, MLflow's client, and the JSON-lines stream, all
against the run's ``loss.json``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

import loraengine
from loraengine.cli.main import cli


def _config(unet_config, data_files, loggers, steps=4):
    cfg = json.loads(json.dumps(unet_config))
    latents, conditioning = data_files
    cfg["training"]["steps"] = steps
    cfg["data"]["validation"] = {"latents": str(latents), "conditioning": str(conditioning)}
    cfg["validation"] = {"every": 2}
    cfg["output"].update(loggers=loggers, samples={"every": 2, "steps": 2, "count": 2})
    return cfg


def _loss_map(out: Path) -> dict:
    return json.loads((out / "test.loss.json").read_text())


def _f32(values):
    """What TensorBoard keeps of a scalar: its float32 value."""
    return [float(np.float32(v)) for v in values]


def test_tensorboard_event_files_hold_the_loss_map_and_the_previews(unet_config,
                                                                     data_files):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _config(unet_config, data_files, ["tensorboard", "events"])
    result = loraengine.train(cfg)
    out = Path(cfg["output"]["dir"])
    loss_map = _loss_map(out)
    # One event file, closed at the end: compare.png is announced before the loggers
    # close (a grid added after the close opened a second file that was never flushed,
    # so its image reached the disk or not depending on the writer thread's timing).
    assert len(list((out / "tensorboard" / "test").iterdir())) == 1
    events = [json.loads(line) for line in (out / "test.events.jsonl").read_text().splitlines()]
    assert [Path(e["path"]).name for e in events if e.get("kind") == "samples"] == [
        "step_2.png", "step_4.png", "compare.png"]
    assert events[-1]["event"] == "train_end"
    acc = EventAccumulator(str(out / "tensorboard" / "test"), size_guidance={"images": 0})
    acc.Reload()
    loss = acc.Scalars("loss")
    assert [e.step for e in loss] == list(range(1, result.steps + 1))
    assert [e.value for e in loss] == _f32(loss_map["loss"])
    assert [e.value for e in acc.Scalars("lr")] == _f32(loss_map["lr"])
    val = acc.Scalars("val_loss")
    assert [e.step for e in val] == loss_map["val_loss_step"] == [2, 4]
    assert [e.value for e in val] == _f32(loss_map["val_loss"])
    # the preview grids, one per step they were drawn at, as the PNGs on disk
    images = acc.Images("samples")
    assert [e.step for e in images] == [2, 4]
    with Image.open(out / "test.samples" / "step_4.png") as png:
        assert (images[-1].width, images[-1].height) == png.size
    assert [e.step for e in acc.Images("samples/compare")] == [4]
    assert "config/text_summary" in acc.Tags()["tensors"]


@pytest.mark.slow
def test_mlflow_offline_store_holds_the_loss_map_config_and_previews(unet_config, data_files,
                                                                      monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    cfg = _config(unet_config, data_files, ["mlflow", "events"])
    loraengine.train(cfg)
    out = Path(cfg["output"]["dir"])
    loss_map = _loss_map(out)
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("loraengine")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "test" and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == list(
        zip(range(1, 5), loss_map["loss"], strict=True))
    val = sorted(client.get_metric_history(run.info.run_id, "val_loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in val] == list(zip(loss_map["val_loss_step"],
                                                        loss_map["val_loss"], strict=True))
    samples = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "samples")}
    assert samples == {"step_2.png", "step_4.png", "compare.png"}
    # the config MLflow keeps is the one the event stream starts with
    config = client.load_dict(f"runs:/{run.info.run_id}/config.json") if hasattr(
        client, "load_dict") else json.loads(Path(client.download_artifacts(
            run.info.run_id, "config.json")).read_text())
    events = [json.loads(line) for line in (out / "test.events.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "train_start" and events[0]["config"] == config
    assert config["training"]["steps"] == 4


def test_the_event_stream_is_written_by_default_and_matches_the_loss_map(unet_config):
    cfg = json.loads(json.dumps(unet_config))
    cfg["training"]["steps"] = 3
    result = loraengine.train(cfg)
    out = Path(cfg["output"]["dir"])
    assert result.files["events"] == out / "test.events.jsonl"
    events = [json.loads(line) for line in (out / "test.events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events][:4] == ["train_start", "step", "step", "step"]
    assert events[0]["total_steps"] == 3 and events[0]["name"] == "test"
    steps = [e for e in events if e["event"] == "step"]
    assert [e["loss"] for e in steps] == _loss_map(out)["loss"]
    assert events[-1] == {"event": "train_end", "steps": 3, "time": events[-1]["time"]}
    # a second run of the name appends: the first run's lines stay as they were
    first = (out / "test.events.jsonl").read_bytes()
    cfg["training"]["steps"] = 2
    loraengine.train(cfg)
    both = (out / "test.events.jsonl").read_bytes()
    assert both.startswith(first)
    later = [json.loads(line) for line in both[len(first):].splitlines()]
    assert later[0]["event"] == "train_start" and later[0]["total_steps"] == 2
    assert [e["step"] for e in later if e["event"] == "step"] == [1, 2]


def test_no_loggers_writes_no_event_stream(unet_config):
    cfg = json.loads(json.dumps(unet_config))
    cfg["training"]["steps"] = 1
    cfg["output"]["loggers"] = []
    loraengine.train(cfg)
    assert sorted(p.name for p in Path(cfg["output"]["dir"]).iterdir()) == [
        "test.loss.json", "test.safetensors"]


def _validate(tmp_path, unet_config, loggers):
    cfg = json.loads(json.dumps(unet_config))
    cfg["output"]["loggers"] = loggers
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return CliRunner().invoke(cli, ["validate", str(path)])


def _one_error(result):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_an_unknown_logger_is_a_config_error_listing_the_installed_ones(tmp_path, unet_config):
    line = _one_error(_validate(tmp_path, unet_config, ["events", "tensorbord"]))
    assert "output.loggers.1" in line and "unknown logger 'tensorbord'" in line
    assert "mlflow" in line and "tensorboard" in line and "c.yaml:" in line


def test_a_logger_whose_package_is_missing_names_the_extra(tmp_path, unet_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not installed
    line = _one_error(_validate(tmp_path, unet_config, ["tensorboard"]))
    assert "output.loggers.0" in line and "pip install 'loraengine[tensorboard]'" in line


def test_a_logger_named_twice_is_a_config_error(tmp_path, unet_config):
    line = _one_error(_validate(tmp_path, unet_config, ["events", "events"]))
    assert "output.loggers" in line and "twice" in line
