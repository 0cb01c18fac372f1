"""``loraengine validate`` checks the files a config names without training: model
(config only, no weights loaded), data tensors against the model, adapter.existing and
outputs; every problem one line naming key and file, exit status 2."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import save_file

from loraengine.cli.main import cli

REPO = Path(__file__).resolve().parents[1]


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def problems(result) -> list[str]:
    assert "Traceback" not in result.output
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def write(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def config(unet_dir: Path, data_files: tuple[Path, Path], tmp_path: Path, **over) -> dict:
    cfg = {"model": {"family": "diffusers", "path": str(unet_dir)},
           "data": {"latents": str(data_files[0]), "conditioning": str(data_files[1])},
           "training": {"steps": 2, "batch_size": 2},
           "adapter": {"algorithm": "lora", "rank": 2},
           "output": {"dir": str(tmp_path / "out"), "name": "v"}}
    for section, values in over.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


def test_the_sd15_example_on_a_clean_checkout_names_every_missing_file():
    res = run("validate", str(REPO / "examples" / "sd15_lora.yaml"))
    assert res.exit_code == 2
    lines = problems(res)
    assert len(lines) == 3, lines
    assert lines[0].startswith("error: model.path: ") and "models/sd15 does not exist" in lines[0]
    assert lines[1].startswith("error: data.latents ") and "latents.safetensors" in lines[1]
    assert lines[2].startswith("error: data.conditioning ") and \
        "conditioning.safetensors" in lines[2]


def test_syntax_only_keeps_checking_keys_and_values_alone():
    res = run("validate", "--syntax-only", str(REPO / "examples" / "sd15_lora.yaml"))
    assert res.exit_code == 0, res.output
    assert "ok" in res.stdout


def test_a_complete_config_is_ok_and_reads_no_weights(unet_dir, data_files, tmp_path,
                                                      monkeypatch):
    import diffusers

    def refuse(*args, **kwargs):
        raise AssertionError("validate loaded the model's weights")

    monkeypatch.setattr(diffusers.UNet2DConditionModel, "from_pretrained", refuse)
    monkeypatch.setattr("safetensors.torch.load_file", refuse)
    for family in ("diffusers", "sd15"):
        res = run("validate", str(write(tmp_path, config(unet_dir, data_files, tmp_path,
                                                         model={"family": family}))))
        assert res.exit_code == 0, res.output
    assert not (tmp_path / "out").exists()  # probed, not created
    assert not [p for p in tmp_path.rglob("*") if "probe" in p.name]


def test_data_that_does_not_fit_the_model_is_named_with_its_file(unet_dir, data_files,
                                                                  tmp_path):
    # the tiny UNet takes 4 latent channels and 16-wide conditioning
    save_file({"latents": torch.zeros(6, 3, 8, 8)}, str(tmp_path / "lat3.safetensors"))
    res = run("validate", str(write(tmp_path, config(
        unet_dir, data_files, tmp_path, data={"latents": str(tmp_path / "lat3.safetensors")}))))
    assert res.exit_code == 2
    [line] = problems(res)
    assert "data.latents" in line and "lat3.safetensors" in line
    assert "3 channels" in line and "takes 4" in line

    save_file({"cond": torch.zeros(6, 3, 12)}, str(tmp_path / "c12.safetensors"))
    res = run("validate", str(write(tmp_path, config(
        unet_dir, data_files, tmp_path,
        data={"conditioning": str(tmp_path / "c12.safetensors")}))))
    [line] = problems(res)
    assert "data.conditioning" in line and "c12.safetensors" in line and "12 wide" in line

    save_file({"latents": torch.zeros(6, 4, 8, 8, dtype=torch.int32)},
              str(tmp_path / "int.safetensors"))
    save_file({"cond": torch.zeros(0, 3, 16)}, str(tmp_path / "empty.safetensors"))
    res = run("validate", str(write(tmp_path, config(
        unet_dir, data_files, tmp_path, data={"latents": str(tmp_path / "int.safetensors"),
                                              "conditioning": str(tmp_path / "c12.safetensors")}
    ))))
    [line] = problems(res)
    assert "int.safetensors" in line and "floating point" in line


def test_every_problem_is_reported_not_only_the_first(unet_dir, data_files, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    (tmp_path / "latents_dir").mkdir()
    cfg = config(unet_dir, data_files, tmp_path,
                 data={"latents": str(tmp_path / "latents_dir"),
                       "conditioning": str(tmp_path / "missing.safetensors")},
                 adapter={"existing": str(tmp_path / "nope.safetensors")},
                 output={"dir": str(blocker / "sub")})
    cfg["model"]["path"] = str(tmp_path / "no_model")
    res = run("validate", str(write(tmp_path, cfg)))
    assert res.exit_code == 2
    lines = problems(res)
    assert len(lines) == 5, lines
    keys = [line.split()[1].rstrip(":") for line in lines]
    assert keys == ["model.path", "data.latents", "data.conditioning", "adapter.existing",
                    "output.dir"], lines
    assert "is a folder" in lines[1]
    assert "not found" in lines[2] and "missing.safetensors" in lines[2]
    assert "nope.safetensors" in lines[3]
    assert "a_file is a file" in lines[4]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_as_data_is_refused_without_opening_it(unet_dir, data_files, tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    res = run("validate", str(write(tmp_path, config(unet_dir, data_files, tmp_path,
                                                     data={"latents": str(fifo)}))))
    [line] = problems(res)
    assert "data.latents" in line and "FIFO" in line


def test_a_model_folder_without_weights_or_with_a_broken_header(unet_dir, data_files,
                                                                 tmp_path):
    model = tmp_path / "model"
    shutil.copytree(unet_dir, model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
    cfg = config(unet_dir, data_files, tmp_path, model={"path": str(model)})
    [line] = problems(run("validate", str(write(tmp_path, cfg))))
    assert line.startswith("error: model.path: ") and "not a readable safetensors" in line
    weights.unlink()
    [line] = problems(run("validate", str(write(tmp_path, cfg))))
    assert line.startswith("error: model.path: ") and "no weights" in line
    (model / "unet" / "config.json").write_text("{not json")
    [line] = problems(run("validate", str(write(tmp_path, cfg))))
    assert "config.json" in line and "cannot read JSON" in line


def test_a_bucketed_file_without_bucket_mode_suggests_it(unet_dir, data_files, tmp_path):
    lat = tmp_path / "bucketed.safetensors"
    save_file({"latents.0": torch.zeros(2, 4, 8, 8), "latents.1": torch.zeros(2, 4, 8, 16)},
              str(lat))
    cond = tmp_path / "bcond.safetensors"
    save_file({"cond.0": torch.zeros(2, 3, 16), "cond.1": torch.zeros(2, 3, 16)}, str(cond))
    cfg = config(unet_dir, data_files, tmp_path,
                 data={"latents": str(lat), "conditioning": str(cond)})
    [line] = problems(run("validate", str(write(tmp_path, cfg))))
    assert "set data.bucket_mode: true" in line
    cfg["data"]["bucket_mode"] = True
    res = run("validate", str(write(tmp_path, cfg)))
    assert res.exit_code == 0, res.output


def test_adapter_existing_of_another_algorithm_is_named(unet_dir, data_files, tmp_path):
    path = tmp_path / "loha.safetensors"
    save_file({"lora_unet_conv_in.hada_w1_a": torch.zeros(4, 2),
               "lora_unet_conv_in.hada_w1_b": torch.zeros(2, 36),
               "lora_unet_conv_in.hada_w2_a": torch.zeros(4, 2),
               "lora_unet_conv_in.hada_w2_b": torch.zeros(2, 36)}, str(path))
    cfg = config(unet_dir, data_files, tmp_path, adapter={"existing": str(path)})
    [line] = problems(run("validate", str(write(tmp_path, cfg))))
    assert line.startswith("error: adapter.existing: ") and "loha" in line
    assert "adapter.algorithm is 'lora'" in line
    cfg["adapter"]["algorithm"] = "loha"
    res = run("validate", str(write(tmp_path, cfg)))
    assert res.exit_code == 0, res.output


def _layers(module: torch.nn.Module) -> dict[str, tuple[type, tuple[int, ...]]]:
    """The adaptable layers of ``module``: path -> (type, weight shape)."""
    from loraengine.core.adapter import ADAPTABLE

    return {p: (type(m), tuple(m.weight.shape)) for p, m in module.named_modules()
            if isinstance(m, ADAPTABLE)}


@pytest.mark.slow  # saves a tiny pipeline of every family
@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux"])
def test_what_a_family_describes_is_what_it_loads(tmp_path, family):
    """The data a family says its model takes from the config alone is what the loaded
    model says (latent channels, conditioning widths and names), for a pipeline folder
    and, where the family reads one, an original-layout single file."""
    from loraengine.plugins import build_plugin_manager
    from loraengine.testing import tiny_pipelines as tp

    folder = tp.save(family, tmp_path / family)
    spec = build_plugin_manager().registry.get("model", family)
    context = {"base_dir": None, "module": None}
    options = spec.config_model(path=folder)
    loaded = spec.load(options, context)
    layout = spec.describe(options, context)
    assert (layout.latent_ndim, layout.latent_channels, layout.cond_widths,
            layout.cond_keys, layout.source) == \
        (loaded.latent_ndim, loaded.latent_channels, loaded.cond_widths, loaded.cond_keys,
         loaded.source)
    # the skeleton validate selects adapter targets on: the loaded model's layers
    assert _layers(layout.skeleton()) == _layers(loaded.module)
    assert layout.default_include == loaded.default_include
    if family in ("sdxl", "sd3"):
        state = loaded.module.state_dict()
        original = tp.sd3_to_original(state) if family == "sd3" else \
            tp.unet_to_original(state, loaded.module.config)
        ckpt = tmp_path / "single.safetensors"
        save_file(original, str(ckpt))
        single = spec.config_model(path=ckpt, config=folder)
        assert spec.describe(single, context).cond_widths == loaded.cond_widths
        without = spec.config_model(path=ckpt)
        with pytest.raises(Exception, match="model.config: required"):
            spec.describe(without, context)


def _run_error(cfg: dict, tmp_path: Path) -> str:
    """The one error line ``loraengine train`` gives for ``cfg`` (after loading)."""
    from loraengine.testing.harness import one_error_line

    return one_error_line(run("train", str(write(tmp_path, cfg)), "-q"), 2)


def test_an_include_that_matches_no_layer_is_named_as_the_run_names_it(
        unet_dir, data_files, tmp_path, monkeypatch):
    cfg = config(unet_dir, data_files, tmp_path,
                 adapter={"include": ["*to_qq", "*attn1.to_kk"]})
    import diffusers

    def refuse(*args, **kwargs):
        raise AssertionError("validate loaded the model's weights")

    for family in ("diffusers", "sd15"):
        cfg["model"]["family"] = family
        trained = _run_error(cfg, tmp_path)  # what the run says once it has loaded
        with monkeypatch.context() as m:
            m.setattr(diffusers.UNet2DConditionModel, "from_pretrained", refuse)
            m.setattr("loraengine.plugins.models.weights.load_folder", refuse)
            res = run("validate", str(write(tmp_path, cfg)))
        assert res.exit_code == 2, res.output
        [line] = problems(res)
        assert line == trained, (line, trained)
        assert line.startswith("error: adapter.include: no Linear/Conv layer matches "
                               "['*to_qq', '*attn1.to_kk']"), line
        assert "'*to_qq', '*attn1.to_kk' match no layer of the model" in line


def test_only_the_pattern_that_matches_nothing_is_named(unet_dir, data_files, tmp_path):
    cfg = config(unet_dir, data_files, tmp_path,
                 adapter={"include": ["*to_qq", "conv_in"], "exclude": ["conv_in"]})
    [line] = problems(run("validate", str(write(tmp_path, cfg))))
    assert "'*to_qq' matches no layer of the model (its layers are named like " in line
    cfg["adapter"] = {"include": ["conv_*"], "exclude": ["conv_*"]}
    [line] = problems(run("validate", str(write(tmp_path, cfg))))
    assert line.endswith(": adapter.exclude removes every layer it matches"), line
    cfg["adapter"] = {"include": ["*attn1.to_q"]}
    res = run("validate", str(write(tmp_path, cfg)))
    assert res.exit_code == 0, res.output


def test_a_family_without_a_skeleton_leaves_the_targets_to_the_run(host, unet_dir, data_files,
                                                                   tmp_path):
    """A family whose description has no skeleton (or one that cannot be built) gets a
    note for ``adapter.include``, not a problem."""
    from loraengine.api import resolve_config
    from loraengine.core.model import ModelLayout
    from loraengine.core.plugins.specs import ModelFamilySpec
    from loraengine.core.validate import validate_config
    from loraengine.plugins.models.common import FamilyOptions
    from loraengine.testing.harness import registered

    def broken() -> torch.nn.Module:
        raise RuntimeError("no meta kernel for this")

    for name, skeleton in (("bare", None), ("brittle", broken)):
        spec = ModelFamilySpec(name, lambda options, context: None, FamilyOptions, "",
                               describe=lambda options, context, s=skeleton: ModelLayout(
                                   source=str(options.path), skeleton=s))
        cfg = config(unet_dir, data_files, tmp_path, model={"family": name},
                     adapter={"include": ["*to_qq"]})
        with registered(host, spec):
            found, notes = validate_config(resolve_config(cfg, host)[0], host)
        assert found == [], found
        [note] = [n for n in notes if n.startswith("adapter.include: ")]
        assert ("cannot build its model without loading it" if skeleton is None else
                "no meta kernel for this") in note, note


@pytest.mark.slow  # saves tiny Wan pipelines
@pytest.mark.parametrize("family", ["wan", "wan22"])
def test_wans_skeleton_is_the_expert_or_experts_it_trains(tmp_path, family):
    """Wan 2.2's two experts train as one module, each under its prefix, and so
    does the skeleton; one expert picked is that expert's."""
    from loraengine.plugins import build_plugin_manager
    from loraengine.testing.tiny_video import save_video

    folder = save_video(family, tmp_path / family)
    spec = build_plugin_manager().registry.get("model", "wan")
    context = {"base_dir": None, "module": None}
    prefixes = {}
    for expert in ("auto", "low_noise") if family == "wan22" else ("auto",):
        options = spec.config_model(path=folder, expert=expert)
        loaded, layout = spec.load(options, context), spec.describe(options, context)
        layers = _layers(layout.skeleton())
        assert layers == _layers(loaded.module)
        assert layout.default_include == loaded.default_include
        prefixes[expert] = {p.split(".")[0] for p in layers}
    if family == "wan22":
        assert {"high_noise", "low_noise"} <= prefixes["auto"]  # both, under their names
        assert "low_noise" not in prefixes["low_noise"]  # one transformer, unprefixed
