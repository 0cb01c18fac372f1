"""Config validation and bad input: exit 2 for config errors, 1 for runtime errors,
one clear line naming the key or file, no traceback."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import save_file

from loraengine.cli.main import cli
from loraengine.core.config.root import parse_config


def write_config(tmp_path, cfg: dict, name: str = "config.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def assert_clean_error(result, code: int, *needles: str) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    err = result.stderr
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def test_defaults_match_the_node(host):
    cfg = parse_config({"model": {"family": "diffusers", "path": "m"}}, host.registry)
    t, a, m = cfg.training, cfg.adapter, cfg.memory
    assert (t.batch_size, t.grad_accumulation_steps, t.steps, t.seed, t.dtype) == (1, 1, 16, 0, "bf16")
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.loss.name) == ("adamw", 0.0005, "mse")
    assert (a.algorithm, a.rank, a.dtype, a.existing) == ("lora", 8, "bf16", None)
    assert (m.gradient_checkpointing, m.checkpoint_depth, m.offloading, m.bypass_mode,
            m.quantized_backward) == (True, 1, False, False, False)
    assert cfg.data.bucket_mode is False


def test_relative_paths_resolve_against_the_config_folder(tmp_path, host):
    from loraengine.core.config.root import load_config

    sub = tmp_path / "cfgs"
    sub.mkdir()
    path = write_config(sub, {"model": {"path": "model"}, "data": {"latents": "lat.safetensors"}})
    cfg = load_config(path, host.registry)
    assert cfg.model.path == sub / "model"
    assert cfg.data.latents == sub / "lat.safetensors"


@pytest.mark.parametrize("section,key,value,needle", [
    ("adapter", "rank", 0, "adapter.rank: Input should be greater than or equal to 1"),
    ("adapter", "rank", 129, "adapter.rank: Input should be less than or equal to 128"),
    ("memory", "checkpoint_depth", 6, "memory.checkpoint_depth: Input should be less than or equal to 5"),
    ("optimizer", "lr", 2.0, "optimizer.lr: Input should be less than or equal to 1"),
    ("training", "seed", -1, "training.seed: Input should be greater than or equal to 0"),
    ("training", "seed", 2**64, "training.seed: Input should be less than or equal to 18446744073709551615"),
    ("training", "steps", "many", "training.steps: Input should be a valid integer"),
    ("training", "batch_size", 10001, "training.batch_size"),
    ("training", "grad_accumulation_steps", 1025, "training.grad_accumulation_steps"),
])
def test_out_of_range_values_exit_2_naming_key_and_line(tmp_path, section, key, value, needle):
    cfg = {"model": {"family": "diffusers", "path": "m"}, section: {key: value}}
    path = write_config(tmp_path, cfg)
    err = assert_clean_error(run("validate", str(path)), 2, needle)
    line = 5  # model: family, path take lines 1-3
    assert f"({path}:{line})" in err
    assert len(err.strip().splitlines()) == 1


def test_seed_at_the_top_of_its_range_is_accepted(tmp_path):
    path = write_config(tmp_path, {"model": {"path": "m"}, "training": {"seed": 2**64 - 1}})
    assert run("validate", "--syntax-only", str(path)).exit_code == 0


def test_unknown_key_is_an_error(tmp_path):
    path = write_config(tmp_path, {"model": {"path": "m"}, "training": {"stepz": 3}})
    assert_clean_error(run("validate", str(path)), 2, "training.stepz: unknown key", ":4)")


def test_unknown_plugin_option_is_an_error(tmp_path):
    path = write_config(tmp_path, {"model": {"path": "m"}, "optimizer": {"name": "sgd", "betas": [0.9, 0.9]}})
    assert_clean_error(run("validate", str(path)), 2, "optimizer.betas: unknown key")


def test_unknown_optimizer_lists_the_installed_ones(tmp_path):
    path = write_config(tmp_path, {"model": {"path": "m"}, "optimizer": {"name": "adamax"}})
    err = assert_clean_error(run("validate", str(path)), 2, "optimizer.name: unknown optimizer 'adamax'")
    for name in ("adam", "adamw", "rmsprop", "sgd"):
        assert name in err


def test_every_problem_is_listed(tmp_path):
    path = write_config(tmp_path, {"model": {"path": "m"}, "adapter": {"rank": 0},
                                   "training": {"steps": 0}})
    err = assert_clean_error(run("validate", str(path)), 2, "adapter.rank", "training.steps")
    assert len(err.strip().splitlines()) == 2


def test_set_overrides_and_reports_the_override(tmp_path):
    path = write_config(tmp_path, {"model": {"path": "m"}})
    assert run("validate", "--syntax-only", str(path), "--set", "training.steps=5").exit_code == 0
    assert_clean_error(run("validate", str(path), "--set", "adapter.rank=200"), 2,
                       "adapter.rank", "(--set)")


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  path: [unclosed\n")
    assert_clean_error(run("validate", str(path)), 2, "not valid YAML")


def test_missing_config_file(tmp_path):
    assert_clean_error(run("validate", str(tmp_path / "nope.yaml")), 2, "config file not found")


def test_schema_is_json_with_every_section():
    result = run("config", "schema")
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert {"training", "data", "memory", "output", "model", "optimizer", "loss", "adapter",
            "lr_scheduler"} <= set(schema["properties"])


# -- runtime (data) errors: exit 1 ------------------------------------------------------

def train_cli(tmp_path, cfg: dict):
    path = write_config(tmp_path, cfg)
    return run("train", "-q", str(path))


def test_missing_latents_file(tmp_path, unet_config):
    unet_config["data"]["latents"] = str(tmp_path / "missing.safetensors")
    assert_clean_error(train_cli(tmp_path, unet_config), 1, "latents file not found",
                       "missing.safetensors")


def test_file_that_is_not_safetensors(tmp_path, unet_config):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file at all")
    unet_config["data"]["conditioning"] = str(junk)
    assert_clean_error(train_cli(tmp_path, unet_config), 1, "junk.safetensors",
                       "not a readable safetensors file")


def test_latents_conditioning_count_mismatch(tmp_path, unet_config):
    cond = tmp_path / "c4.safetensors"
    save_file({"cond": torch.randn(4, 3, 16)}, str(cond))
    unet_config["data"]["conditioning"] = str(cond)
    assert_clean_error(train_cli(tmp_path, unet_config), 1,
                       "tensor 'cond' has 4 entries but there are 6 latents")


def test_wrong_latents_rank(tmp_path, unet_config):
    lat = tmp_path / "flat.safetensors"
    save_file({"latents": torch.randn(6, 64)}, str(lat))
    unet_config["data"]["latents"] = str(lat)
    assert_clean_error(train_cli(tmp_path, unet_config), 1, "must be [N,C,H,W]", "[6, 64]")


def test_missing_tensor_name(tmp_path, unet_config):
    lat = tmp_path / "named.safetensors"
    save_file({"x": torch.randn(6, 4, 8, 8)}, str(lat))
    unet_config["data"]["latents"] = str(lat)
    assert_clean_error(train_cli(tmp_path, unet_config), 1, "no tensor named 'latents'", "x")


def test_debug_shows_the_traceback(tmp_path, unet_config):
    unet_config["data"]["latents"] = str(tmp_path / "missing.safetensors")
    path = write_config(tmp_path, unet_config)
    result = run("--debug", "train", "-q", str(path))
    assert result.exit_code == 1
    assert "Traceback" in result.stderr


def test_nothing_is_written_when_training_fails(tmp_path, unet_config):
    out = tmp_path / "out"
    out.mkdir()
    (out / "test.safetensors").write_bytes(b"previous good file")
    unet_config["data"]["latents"] = str(tmp_path / "missing.safetensors")
    train_cli(tmp_path, unet_config)
    assert (out / "test.safetensors").read_bytes() == b"previous good file"
    assert sorted(p.name for p in out.iterdir()) == ["test.safetensors"]


def test_unknown_exporter_is_a_config_error(tmp_path):
    path = write_config(tmp_path, {"model": {"path": "m"}, "adapter": {"exporter": "kohyaa"}})
    assert_clean_error(run("validate", str(path)), 2,
                       "adapter.exporter: unknown key format 'kohyaa'", "kohya")


def test_plugin_name_that_is_not_a_string(tmp_path):
    path = write_config(tmp_path, {"model": {"path": "m"}, "adapter": {"algorithm": ["lora"]}})
    assert_clean_error(run("validate", str(path)), 2, "adapter.algorithm: expected a name")


def test_config_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("model: {path: caf\xe9}\n".encode("latin-1"))
    assert_clean_error(run("validate", str(path)), 2, "not UTF-8 text")


def test_unusable_device_is_a_config_error(tmp_path, unet_config):
    unet_config["training"]["device"] = "mps"
    assert_clean_error(train_cli(tmp_path, unet_config), 2, "training.device: 'mps'")


def test_an_unknown_key_suggests_the_closest_key_of_its_section(tmp_path):
    path = write_config(tmp_path, {"model": {"path": "m", "pathh": "x"},
                                   "training": {"stepz": 3},
                                   "memory": {"gradient_checkpointin": True},
                                   "outptu": {}, "zzz": 1})
    err = assert_clean_error(run("validate", "--syntax-only", str(path)), 2)
    assert "model.pathh: unknown key; did you mean 'path'?" in err
    assert "training.stepz: unknown key; did you mean 'steps'?" in err
    assert "memory.gradient_checkpointin: unknown key; did you mean " \
        "'gradient_checkpointing'?" in err
    assert "outptu: unknown key; did you mean 'output'?" in err
    assert "zzz: unknown key (" in err  # nothing close: no guess


def test_an_unknown_key_given_with_set_gets_a_suggestion_too(tmp_path):
    path = write_config(tmp_path, {"model": {"path": "m"}})
    err = assert_clean_error(run("validate", "--syntax-only", str(path), "--set",
                                 "optimizer.lrr=0.1", "--set", "outptu.dir=x"), 2)
    assert "optimizer.lrr: unknown key; did you mean 'lr'? (--set)" in err
    assert "outptu: unknown key; did you mean 'output'? (--set)" in err


@pytest.mark.parametrize("text", ["", "# nothing yet\n", "{}\n"])
def test_an_empty_config_says_what_a_minimal_one_needs(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text, encoding="utf-8")
    err = assert_clean_error(run("validate", str(path)), 2, "the config is empty",
                             "model: {family:", "data: {latents:", "examples/quickstart.yaml")
    assert "required key is missing" not in err
    assert len(err.strip().splitlines()) == 1
