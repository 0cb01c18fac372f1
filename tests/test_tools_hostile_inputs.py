"""Hostile inputs to ``inspect``, ``sample``, ``plan`` and ``monitor`` (``merge``'s are in
test_merge_safety.py): a metadata entry that is not JSON, non-finite strengths, absurd
sizes, options that would do nothing, paths out of the run folder. Each is one line
and the right exit code (or a short 4xx answer), no traceback, nothing written."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from loraengine.cli.main import cli
from loraengine.core.errors import ConfigError
from loraengine.testing.harness import one_error_line
from loraengine.tools.monitor.logic import make_app
from loraengine.tools.sample import logic as sample_logic


def _run(*args):
    return CliRunner().invoke(cli, list(args))



# -- inspect ------------------------------------------------------------------------------

def test_inspect_shows_a_file_whose_config_entry_is_not_json_with_a_warning(tmp_path):
    path = tmp_path / "odd.safetensors"
    save_file({"lora_unet_a.lora_down.weight": torch.zeros(2, 5),
               "lora_unet_a.lora_up.weight": torch.zeros(3, 2),
               "lora_unet_a.alpha": torch.tensor(1.0)}, str(path),
              metadata={"loraengine.config": "{rank: 4", "ss_network_dim": "2"})
    before = path.read_bytes()
    warning = (f"warning: {path}: the metadata entry loraengine.config is not JSON "
               f"(Expecting property name enclosed in double quotes: line 1 column 2 "
               f"(char 1)); shown as written")
    text = _run("inspect", str(path))
    assert text.exit_code == 0 and "Traceback" not in text.output, text.output
    assert text.stderr.splitlines() == [warning]
    assert "algorithm:   lora" in text.stdout and "rank:        2" in text.stdout
    assert "  loraengine.config: {rank: 4" in text.stdout.splitlines()
    as_json = _run("inspect", "--json", str(path))
    assert as_json.exit_code == 0 and as_json.stderr.splitlines() == [warning]
    info = json.loads(as_json.stdout)
    assert info["metadata"]["loraengine.config"] == "{rank: 4"
    assert info["warnings"] == [warning.removeprefix("warning: ")]
    assert (info["algorithm"], info["modules"]) == ("lora", 1)
    assert path.read_bytes() == before


# -- sample -------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["nan", "inf"])
def test_sample_refuses_a_non_finite_strength_before_loading(tmp_path, value):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    # the model does not exist: the strength is checked first
    line = one_error_line(_run("sample", "--model", str(tmp_path / "no-model"), "--prompts",
                          str(prompts), "--out", str(tmp_path / "o"), "--strength", value), 2)
    assert line == f"error: --strength: must be a finite number, got {float(value)}"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--size", "100000", "100000"], "--size: height and width must be 1 to 2048 (latent "
     "pixels), got [100000, 100000]"),
    (["--size", "0", "8"], "--size: height and width must be 1 to 2048 (latent pixels), "
     "got [0, 8]"),
    (["--frames", "100000"], "--frames: must be 1 to 1024 (latent frames), got 100000"),
])
def test_sample_refuses_absurd_sizes_before_loading(tmp_path, args, message):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    line = one_error_line(_run("sample", "--model", str(tmp_path / "no-model"), "--prompts",
                          str(prompts), "--out", str(tmp_path / "o"), *args), 2)
    assert line == f"error: {message}"
    assert not (tmp_path / "o").exists()


def test_sample_refuses_a_latent_too_large_for_memory_once_the_channels_are_known():
    video = SimpleNamespace(module=SimpleNamespace(config=SimpleNamespace(
        in_channels=16, sample_size=64)), latent_ndim=5, family="wan")
    assert sample_logic.latent_shape(video, None, None, 21) == (16, 21, 64, 64)
    with pytest.raises(ConfigError) as err:
        sample_logic.latent_shape(video, (2048, 2048), None, 1024)
    assert str(err.value) == ("--size/--frames: a latent of 16x1024x2048x2048 holds "
                              "68,719,476,736 values, more than the 268,435,456 one "
                              "sample may hold")


# -- plan ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "message"), [
    (["CONFIG", "--real", "sd15"], "plan: give a CONFIG file or --real NAME, not both"),
    (["CONFIG", "--frames", "81"], "--frames: only with --real NAME (a CONFIG sets these "
     "itself; change it with --set KEY=VALUE)"),
    (["CONFIG", "--rank", "4", "--resolution", "512"], "--resolution, --rank: only with "
     "--real NAME (a CONFIG sets these itself; change it with --set KEY=VALUE)"),
    (["--real", "sd15", "--set", "training.steps=2", "--measure"], "--set, --measure: only "
     "with a CONFIG, not with --real"),
    (["--real", "sd15", "--offload-blocks", "4"], "--offload-blocks: 4 for sd15, which has "
     "a UNet, whose levels are offloaded all or none"),
    (["--real", "flux1_dev", "--offload-blocks", "4"], "--offload-blocks: 4 for flux1_dev, "
     "which has two kinds of block, whose partial offloading is not planned"),
    (["--real", "z_image", "--offload-blocks", "31"], "--offload-blocks: 31 for z_image, "
     "which has 30 blocks"),
    (["--real", "sd15", "--batch", "5000"], "--batch/--resolution/--frames: a batch of "
     "5000 latents [4, 64, 64] with their conditioning holds 377,600,000 values, more than "
     "the 268,435,456 a dry run keeps in host memory; plan a smaller batch or size"),
    (["--real", "sd15", "--resolution", "100000"], "--batch/--resolution/--frames: a batch "
     "of 1 latents [4, 12500, 12500] with their conditioning holds 625,059,136 values, "
     "more than the 268,435,456 a dry run keeps in host memory; plan a smaller batch or "
     "size"),
    (["--real", "wan2.1_t2v_14b", "--frames", "400001"], "--batch/--resolution/--frames: a "
     "batch of 1 latents [16, 100001, 60, 104] with their conditioning holds "
     "9,986,196,992 values, more than the 268,435,456 a dry run keeps in host memory; plan "
     "a smaller batch or size"),
])
def test_plan_refuses_options_that_do_nothing_or_do_not_fit(tmp_path, args, message):
    config = tmp_path / "c.yaml"
    config.write_text("model: {family: sd15}\n")
    start = time.perf_counter()
    line = one_error_line(_run("plan", *[str(config) if a == "CONFIG" else a for a in args]), 2)
    assert line == f"error: {message}"
    assert time.perf_counter() - start < 10  # refused before any dry run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


@pytest.mark.parametrize(("option", "value", "range_"), [
    ("--offload-blocks", "-1", "x>=1"), ("--offload-blocks", "0", "x>=1"),
    ("--batch", "100000", "1<=x<=10000"), ("--rank", "0", "1<=x<=128")])
def test_plan_real_options_take_a_range(option, value, range_):
    result = _run("plan", "--real", "z_image", option, value)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert (f"Invalid value for '{option}': {value} is not in the range {range_}."
            in result.output)


# -- monitor ------------------------------------------------------------------------------

@pytest.fixture
def no_serving(monkeypatch):
    """A monitor that got as far as serving fails the test instead of serving forever."""
    import uvicorn

    def serve(*args, **kwargs):
        raise AssertionError("the monitor started serving")

    monkeypatch.setattr(uvicorn.Server, "run", serve)


@pytest.mark.parametrize("name", ["../..", "sub/run", "..", "."])
def test_monitor_refuses_a_name_that_is_not_a_plain_file_name(tmp_path, no_serving, name):
    line = one_error_line(_run("monitor", str(tmp_path), "--name", name), 2)
    assert line == (f"error: --name {name!r}: not a plain file name (the run's output.name, "
                    f"without a folder)")


def test_monitor_refuses_an_events_path_that_is_a_folder(tmp_path, no_serving):
    (tmp_path / "run.events.jsonl").mkdir()
    line = one_error_line(_run("monitor", str(tmp_path), "--name", "run"), 2)
    assert line == (f"error: --name: {tmp_path / 'run.events.jsonl'} is not a file (a "
                    f"folder?); the page follows the run's events file")
    line = one_error_line(_run("monitor", str(tmp_path)), 2)  # the newest stream: none is a file
    assert line.startswith(f"error: RUN_DIR: no *.events.jsonl file in {tmp_path}")


def test_monitor_answers_bad_requests_and_an_unreadable_stream_with_a_4xx(tmp_path):
    from starlette.testclient import TestClient

    events = tmp_path / "run.events.jsonl"
    events.write_text('{"event": "start"}\n')
    (tmp_path / "grid.png").write_bytes(b"\x89PNG")
    with TestClient(make_app(events)) as client:  # a server error would raise here
        assert client.get("/api/file", params={"path": "grid.png"}).status_code == 200
        for path in ("grid.png\0", "a\0b.png", "../" * 40 + "x.png", "x" * 5000 + ".png"):
            res = client.get("/api/file", params={"path": path})
            assert (res.status_code, res.text) == (404, "not found"), path
        events.unlink()
        events.mkdir()  # the stream replaced by a folder while the page follows it
        res = client.get("/api/events")
        assert res.status_code == 409
        assert res.json() == {"error": "run.events.jsonl: cannot be read (Is a directory)"}


def test_inspect_of_a_file_of_no_tensors_says_so(tmp_path):
    from safetensors.torch import save_file

    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty))
    result = CliRunner().invoke(cli, ["inspect", str(empty)])
    assert result.exit_code == 1, result.output
    assert result.output.strip() == f"error: {empty}: the file holds no tensors"
