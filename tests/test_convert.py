"""``loraengine convert``: re-keyed files load back to the same weights, the consumer's
layout is written, limits are reported with the measured error, inputs are safe."""

from __future__ import annotations

import copy

import pytest
import torch
from click.testing import CliRunner
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

import loraengine
from loraengine.cli.main import cli
from loraengine.core.adapter import ADAPTABLE, AdapterNetwork
from loraengine.core.adapter.network import select_layers
from loraengine.core.files import module_layouts, write_adapter_file
from loraengine.plugins import build_plugin_manager
from loraengine.plugins.models.unet_names import ldm_names
from loraengine.testing.conformance import perturb
from loraengine.testing.models import sdxl_structure_unet_config

HOST = build_plugin_manager()
REG = HOST.registry


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**sdxl_structure_unet_config()).eval()
    folder = tmp_path_factory.mktemp("m") / "unet"
    unet.save_pretrained(str(folder))
    return folder, unet


def _file(tmp_path, unet, name, options=None, exporter="diffusers", include=("*",),
          original=False):
    spec = REG.get("adapter", name)
    config = spec.config_model.model_validate(options or {})
    layers = select_layers(unet, list(include), [], spec.layer_types or ADAPTABLE)
    g = torch.Generator().manual_seed(0)
    built = {}
    for i, (path, base) in enumerate(sorted(layers.items())):
        layer = spec.create(base, 2, 2.0, config, g)
        layer.algorithm = name
        perturb(layer, i)
        built[path] = layer
    network = AdapterNetwork(built, {})
    path = tmp_path / f"{name}.safetensors"
    write_adapter_file(path, network.file_modules(), REG.get("exporter", exporter),
                       {"loraengine.algorithm": name},
                       module_layouts(REG, unet) if original else None)
    return path, network


def _run(*args):
    return CliRunner().invoke(cli, ["convert", *map(str, args)])


@pytest.mark.slow
def test_converted_for_comfyui_has_its_names_and_the_same_weights(model_dir, tmp_path):
    folder, unet = model_dir
    src, network = _file(tmp_path, unet, "loha")
    out = tmp_path / "c.safetensors"
    res = _run(src, "--to", "comfyui", "--model", folder, "--out", out)
    assert res.exit_code == 0, res.output
    names = ldm_names(unet)
    keys = set(load_file(str(out)))
    assert {k.rsplit(".", 2 if k.endswith(".weight") else 1)[0] for k in keys} == \
        {f"diffusion_model.{names[p]}" for p in network.paths}
    a, b = copy.deepcopy(unet), copy.deepcopy(unet)
    loraengine.apply(a, src, mode="merge", host=HOST)
    loraengine.apply(b, out, mode="merge", host=HOST)
    for key, value in a.state_dict().items():
        assert torch.equal(b.state_dict()[key], value), key


def test_kohya_conversion_without_a_model_keeps_the_files_names(model_dir, tmp_path):
    folder, unet = model_dir
    src, _ = _file(tmp_path, unet, "lora", exporter="comfyui")
    out = tmp_path / "k.safetensors"
    assert _run(src, "--to", "kohya", "--out", out).exit_code == 0
    keys = load_file(str(out))
    assert all(k.startswith("lora_unet_down_blocks") or k.startswith("lora_unet_")
               for k in keys)
    res = _run(src, "--to", "kohya", "--model", folder, "--out", tmp_path / "k2.safetensors")
    assert res.exit_code == 0, res.output
    keys2 = load_file(str(tmp_path / "k2.safetensors"))
    assert any(k.startswith("lora_unet_input_blocks_4_1_") for k in keys2)
    assert not any(k.startswith("lora_unet_down_blocks") for k in keys2)


def test_kohya_conversion_names_the_lora_sd_scripts_does_not_place(model_dir, tmp_path):
    """sd-scripts' LoRANetwork has modules only inside the UNet's blocks: a LoRA on every
    layer has its conv_in, conv_out and time/label embedding layers named, counted from
    the model's own module tree, under diffusers' names and (with the model) SAI's."""
    folder, unet = model_dir
    src, network = _file(tmp_path, unet, "lora")
    top = [p for p in network.paths if p.split(".", 1)[0] not in
           ("down_blocks", "mid_block", "up_blocks")]
    assert {"conv_in", "conv_out", "time_embedding.linear_1"} <= set(top)
    for i, (args, first) in enumerate((((), min(top)),
                                       (("--model", folder), "input_blocks.0.0"))):
        res = _run(src, "--to", "kohya", *args, "--out", tmp_path / f"k{i}.safetensors")
        assert res.exit_code == 0, res.output
        lines = [x for x in res.output.splitlines() if x.startswith("warning: sd-scripts:")]
        assert lines == [f"warning: sd-scripts: LoRA outside the UNet blocks its network "
                         f"adapts (conv_in, conv_out, time and label embeddings) is not "
                         f"placed ({len(top)} layer(s), e.g. {first})"], res.output


def test_ia3_for_comfyui_warns_with_the_size_of_what_is_lost(model_dir, tmp_path):
    folder, unet = model_dir
    src, network = _file(tmp_path, unet, "ia3", exporter="kohya")
    res = _run(src, "--to", "comfyui", "--model", folder, "--out", tmp_path / "i.safetensors")
    assert res.exit_code == 0, res.output
    line = next(s for s in res.output.splitlines() if s.startswith("warning:"))
    assert "ComfyUI has no IA3" in line
    # what is lost, per layer: max |ΔW| / max |W + ΔW|
    want = 0.0
    for path, layer in network.items():
        w = unet.get_submodule(path).weight.detach()
        d = layer.delta_weight().detach()
        want = max(want, float(d.abs().max() / (w + d).abs().max()))
    assert f"error {want:.2g}" in line


def test_dora_for_comfyui_warns_with_the_measured_error(model_dir, tmp_path):
    folder, unet = model_dir
    src, network = _file(tmp_path, unet, "lora", {"weight_decompose": True},
                         include=("down_blocks.1.attentions.0.proj_in",))
    res = _run(src, "--to", "comfyui", "--model", folder, "--out", tmp_path / "d.safetensors")
    assert res.exit_code == 0, res.output
    line = next(s for s in res.output.splitlines() if s.startswith("warning:"))
    assert "DoRA" in line and "1 layer(s)" in line
    # ComfyUI: m · (W + ΔW) / ‖W‖ per output row; ours m · (W + ΔW) / ‖W + ΔW‖. Their
    # ratio per row is ‖W + ΔW‖ / ‖W‖, so the error follows from ours alone.
    (path, layer), = network.items()
    w = unet.get_submodule(path).weight.detach()
    ours = w + layer.delta_weight().detach()
    m = ours.norm(dim=1, keepdim=True)                 # ours has row norms m
    up, down = layer.lora_up.detach(), layer.lora_down.detach()
    raw = w + (up @ down) * (layer.alpha / layer.rank)
    theirs = m * raw / (w.norm(dim=1, keepdim=True) + torch.finfo(w.dtype).eps)
    want = float((theirs - ours).abs().max() / ours.abs().max())
    got = float(line.split("error ")[1].split(" ")[0])
    assert want > 1e-3
    assert got == pytest.approx(want, rel=0.06)  # printed to 2 significant digits


def test_non_lora_for_diffusers_warns(model_dir, tmp_path):
    folder, unet = model_dir
    src, _ = _file(tmp_path, unet, "lokr", {"factor": -1}, exporter="kohya",
                   include=("down_blocks.1.*",))
    res = _run(src, "--to", "diffusers", "--model", folder, "--out", tmp_path / "x.safetensors")
    assert res.exit_code == 0, res.output
    # measured with the model: every LoKr layer is left out by diffusers' reader
    assert "warning: diffusers: diffusers reads only LoRA (lokr layers left unchanged): " \
           "52 layer(s), max relative weight error 1" in res.output


@pytest.mark.parametrize("target", ["comfyui", "diffusers"])
def test_a_kohya_file_needs_the_model_to_be_rekeyed(model_dir, tmp_path, target):
    # its names lost their dots: without the model, these targets got names nothing
    # reads (diffusion_model.lora_unet_..., transformer.lora_unet_...)
    folder, unet = model_dir
    src, _ = _file(tmp_path, unet, "lora", exporter="kohya", include=("down_blocks.1.*",))
    out = tmp_path / f"{target}.safetensors"
    res = _run(src, "--to", target, "--out", out)
    assert res.exit_code == 2, res.output
    assert res.output.startswith(f"error: --model: {src} has kohya's flattened names (e.g. "
                                 "lora_unet_down_blocks_1_"), res.output
    assert res.output.strip().endswith("so pass --model PATH") and not out.exists()
    assert _run(src, "--to", target, "--model", folder, "--out", out).exit_code == 0


def test_never_writes_over_the_input(model_dir, tmp_path):
    folder, unet = model_dir
    src, _ = _file(tmp_path, unet, "lora", include=("down_blocks.1.*",))
    before = src.read_bytes()
    res = _run(src, "--to", "comfyui", "--out", src, "--overwrite")
    assert res.exit_code == 2
    assert "is the input file" in res.output and len(res.output.strip().splitlines()) == 1
    assert src.read_bytes() == before
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep")
    res = _run(src, "--to", "comfyui", "--out", out)
    assert res.exit_code == 2 and "exists" in res.output
    assert out.read_bytes() == b"keep"


def test_diffusers_names_from_original_names_need_the_model(model_dir, tmp_path):
    folder, unet = model_dir
    src, _ = _file(tmp_path, unet, "lora", exporter="comfyui", include=("down_blocks.1.*",),
                   original=True)
    assert all(k.startswith("diffusion_model.input_blocks.") for k in load_file(str(src)))
    out = tmp_path / "p.safetensors"
    res = _run(src, "--to", "diffusers", "--out", out)
    assert res.exit_code == 2 and "--model" in res.output and not out.exists()
    res = _run(src, "--to", "diffusers", "--model", folder, "--out", out)
    assert res.exit_code == 0, res.output
    assert all(k.startswith("unet.down_blocks.1.") for k in load_file(str(out)))


def test_a_file_of_no_tensors_is_refused_and_nothing_written(tmp_path):
    from safetensors.torch import save_file

    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty))
    result = _run(empty, "--to", "kohya")
    assert result.exit_code == 1, result.output
    assert result.output.strip() == (f"error: {empty}: holds no adapter tensors to convert; "
                                     "nothing written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.safetensors"]


@pytest.mark.parametrize("target", ["kohya", "a1111"])
def test_a_kohya_file_converted_without_a_model_keeps_its_keys(model_dir, tmp_path, target):
    # the writer adds lora_unet_ to names that carry it already: it came out doubled
    folder, unet = model_dir
    src, _ = _file(tmp_path, unet, "lora", exporter="kohya", include=("down_blocks.1.*",))
    out = tmp_path / f"{target}.safetensors"
    res = _run(src, "--to", target, "--out", out)
    assert res.exit_code == 0, res.output
    before, after = load_file(str(src)), load_file(str(out))
    assert sorted(after) == sorted(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
