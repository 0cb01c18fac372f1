"""``adapter.weight_decompose_norm: comfyui``: DoRA trained with the norm ComfyUI and Forge
divide by when they load a file, recorded in the file and read back by every reader.

The formula below is ComfyUI's ``weight_decompose`` (comfy/weight_adapter/base.py at the
fixtures' commit) written out: W' = W + k·(m / n · (W + ΔW) − W), with n = ‖W‖ + ε per
output row when the magnitude is per output channel and ‖W + ΔW‖ + ε per input column
otherwise, ε float32's epsilon. tests/test_interop_comfyui_dora.py checks files against
ComfyUI's code itself.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import nn

import loraengine
from loraengine.cli.main import cli
from loraengine.core.adapter import layer_op
from loraengine.core.errors import DataError
from loraengine.core.files import read_metadata
from loraengine.plugins import build_plugin_manager
from loraengine.plugins.adapters.dora import NORM_KEY
from loraengine.testing.conformance import perturb
from loraengine.testing.harness import deep_merge

REG = build_plugin_manager().registry
EPS = torch.finfo(torch.float32).eps
ALGORITHMS = {"lora": {}, "loha": {}, "lokr": {"factor": -1}}


def comfyui_weight(w: torch.Tensor, raw: torch.Tensor, m: torch.Tensor, k: float
                   ) -> torch.Tensor:
    """ComfyUI's DoRA weight (see the module doc), from the base weight, the raw ΔW (the
    algorithm's scale in it), the magnitude as saved and the strength."""
    calc = w + raw
    if m.shape[0] == w.shape[0]:
        n = w.reshape(w.shape[0], -1).norm(dim=1, keepdim=True).reshape(
            w.shape[0], *[1] * (w.dim() - 1))
    else:
        t = calc.transpose(0, 1)
        n = t.reshape(t.shape[0], -1).norm(dim=1, keepdim=True).reshape(
            t.shape[0], *[1] * (w.dim() - 1)).transpose(0, 1)
    calc = calc * (m / (n + EPS))
    return w + k * (calc - w)


def _layer(name: str, base: nn.Module, norm: str, seed: int = 0):
    spec = REG.get("adapter", name)
    options = spec.config_model.model_validate(
        {**ALGORITHMS[name], "weight_decompose": True, "weight_decompose_norm": norm})
    layer = spec.create(base, 2, 3.0, options, torch.Generator().manual_seed(seed))
    return spec, options, layer


def _bases():
    torch.manual_seed(0)
    return {"linear": nn.Linear(12, 8), "conv": nn.Conv2d(4, 8, 3, padding=1)}


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_the_layer_computes_comfyuis_formula(name, kind, strength):
    base = _bases()[kind]
    _, _, layer = _layer(name, base, "comfyui")
    w = base.weight.detach()
    # at init the adapter is exactly the identity (m starts at ‖W‖ + ε)
    assert torch.equal(layer.delta_weight(), torch.zeros_like(w))
    perturb(layer, 3)
    layer.multiplier = strength
    with torch.no_grad():
        want = comfyui_weight(w, layer.raw_delta(), layer.dora_scale, strength)
        got = w + layer.delta_weight()
    # fp32 throughout: a few ulps of the largest weight
    assert torch.allclose(got, want, rtol=0, atol=8 * EPS * float(want.abs().max()))
    # and not the standard norm's weight
    _, _, std = _layer(name, base, "standard")
    std.load_state_dict(layer.state_dict())
    std.multiplier = strength
    with torch.no_grad():
        assert (w + std.delta_weight() - want).abs().max() > 1e-3


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_a_per_input_magnitude_loads_with_comfyuis_norm(name):
    """A ``[1, in]`` magnitude (older LyCORIS files): ComfyUI divides by ‖W + ΔW‖ + ε
    per input column."""
    base = _bases()["linear"]
    spec, options, layer = _layer(name, base, "comfyui")
    perturb(layer, 5)
    tensors = {k: v.detach() for k, v in layer.file_tensors().items()}
    tensors["dora_scale"] = torch.rand(1, 12, generator=torch.Generator().manual_seed(2)) + 1
    loaded = spec.load(base, tensors, options)
    assert not loaded.dora_on_out and loaded.dora_norm == "comfyui"
    w = base.weight.detach()
    with torch.no_grad():
        want = comfyui_weight(w, loaded.raw_delta(), tensors["dora_scale"], 1.0)
        assert torch.allclose(w + loaded.delta_weight(), want, rtol=0,
                              atol=8 * EPS * float(want.abs().max()))


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_bypass_needs_no_delta_weight(name):
    """ComfyUI's output-axis norm is the base weight's: bypass and the factored path
    never build ΔW (the standard norm does), and the cost model says so."""
    base = _bases()["conv"]
    _, _, layer = _layer(name, base, "comfyui")
    _, _, std = _layer(name, base, "standard")
    perturb(layer, 1)
    std.load_state_dict(layer.state_dict())
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = layer_op(base, x, base.weight + layer.delta_weight(), base.bias)
    costs, std_costs = layer.path_flops(x), std.path_flops(x)
    if costs is not None:  # an algorithm with a factored form
        assert costs[0] == pytest.approx(std_costs[0] - std.build_flops())

    def no_delta():
        raise AssertionError("raw_delta called")

    layer.raw_delta = no_delta
    with torch.no_grad():
        got = layer.bypass(x, base(x))
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


# -- through the engine ----------------------------------------------------------------

def _config(unet_config, tmp_path, name, adapter):
    return deep_merge(unet_config, {
        "adapter": {"algorithm": "lora", "weight_decompose": True, **adapter},
        "optimizer": {"lr": 0.05},  # a few steps that move ΔW well away from zero
        "output": {"dir": str(tmp_path / name), "name": name, "plot": False}})


def _train(tmp_path, cfg):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return CliRunner().invoke(cli, ["train", str(path), "-q"])


@pytest.fixture
def comfyui_file(unet_config, tmp_path):
    cfg = _config(unet_config, tmp_path, "c", {"weight_decompose_norm": "comfyui"})
    out = _train(tmp_path, cfg)
    assert out.exit_code == 0, out.output
    return tmp_path / "c" / "c.safetensors", cfg


def _unet(unet_dir):
    return UNet2DConditionModel.from_pretrained(str(unet_dir / "unet")).eval()


@pytest.mark.slow
def test_a_trained_file_reads_back_with_comfyuis_norm(comfyui_file, unet_dir, tmp_path):
    path, _ = comfyui_file
    assert read_metadata(path)[NORM_KEY] == "comfyui"
    tensors = load_file(str(path))
    unet = _unet(unet_dir)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    applied = loraengine.apply(unet, path, mode="merge")
    assert len(applied.modules) > 10
    layers = dict(applied.network.items())
    for module in applied.modules:
        w = before[f"{module}.weight"]
        layer = layers[module]
        want = comfyui_weight(w, layer.raw_delta().detach(), layer.dora_scale.detach(), 1.0)
        got = unet.get_submodule(module).weight.detach()
        assert torch.allclose(got, want, rtol=0, atol=8 * EPS * float(want.abs().max())), module
    # the file's layers restored with the standard norm would compute other weights
    worst_std = 0.0
    std_unet = _unet(unet_dir)
    std_tensors = dict(tensors)
    std_path = tmp_path / "std.safetensors"
    meta = read_metadata(path)
    del meta[NORM_KEY]
    save_file(std_tensors, str(std_path), metadata=meta)
    loraengine.apply(std_unet, std_path, mode="merge")
    for module in applied.modules:
        key = f"{module}.weight"
        worst_std = max(worst_std, float((std_unet.state_dict()[key] - unet.state_dict()[key])
                                         .abs().max() / unet.state_dict()[key].abs().max()))
    assert worst_std > 1e-4
    # bypass hooks give the merged model's outputs
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    t = torch.tensor([10])
    cond = torch.randn(1, 3, unet.config.cross_attention_dim, generator=g)
    hooked = _unet(unet_dir)
    with torch.no_grad(), loraengine.apply(hooked, path, mode="bypass"):
        got = hooked(x, t, cond).sample
        want = unet(x, t, cond).sample
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.mark.slow
def test_merge_and_convert_read_the_norm(comfyui_file, unet_dir, tmp_path):
    path, _ = comfyui_file
    unet = _unet(unet_dir)
    loraengine.apply(unet, path, mode="merge")
    # ``loraengine merge`` writes the same weights
    out = CliRunner().invoke(cli, ["merge", "--model", str(unet_dir), "--lora", str(path), "--out",
                                   str(tmp_path / "merged")])
    assert out.exit_code == 0, out.output
    merged = UNet2DConditionModel.from_pretrained(
        str(next((tmp_path / "merged").rglob("config.json")).parent))
    for key, value in unet.state_dict().items():
        assert torch.allclose(merged.state_dict()[key], value, rtol=0, atol=1e-6), key
    # ``convert --to comfyui``: no DoRA limit, and the converted file reads the same
    conv = tmp_path / "c.comfyui.safetensors"
    res = CliRunner().invoke(cli, ["convert", str(path), "--to", "comfyui", "--model",
                                   str(unet_dir), "--out", str(conv)])
    assert res.exit_code == 0, res.output
    assert "DoRA" not in res.output
    again = _unet(unet_dir)
    loraengine.apply(again, conv, mode="merge")
    for key, value in unet.state_dict().items():
        assert torch.allclose(again.state_dict()[key], value, rtol=0, atol=1e-6), key


@pytest.mark.slow
def test_readers_with_the_standard_norm_are_named(comfyui_file, unet_dir, tmp_path):
    """A comfyui-norm file for a reader whose DoRA is the standard one (PEFT in
    diffusers, LyCORIS behind sd-scripts) is warned about with the measured error;
    Forge, whose DoRA is ComfyUI's, is not."""
    path, _ = comfyui_file
    lines = {}
    for target in ("diffusers", "kohya", "a1111"):
        res = CliRunner().invoke(cli, ["convert", str(path), "--to", target, "--model",
                                       str(unet_dir), "--out", str(tmp_path / f"{target}.st")])
        assert res.exit_code == 0, res.output
        lines[target] = [ln for ln in res.output.splitlines() if "DoRA" in ln]
    (peft,) = lines["diffusers"]
    assert peft.startswith("warning: diffusers: DoRA trained with weight_decompose_norm: "
                           "comfyui") and "max relative weight error" in peft
    # a kohya file's LoRA is read by sd-scripts' own loader too, which has no DoRA
    lycoris, sd_scripts = sorted(lines["kohya"])
    assert lycoris.startswith("warning: LyCORIS: DoRA trained with weight_decompose_norm")
    assert sd_scripts.startswith("warning: sd-scripts: no DoRA")
    assert not any("Forge" in ln for ln in lines["a1111"])
    assert any(ln.startswith("warning: A1111 1.8: no DoRA") for ln in lines["a1111"])


@pytest.mark.slow
def test_continuing_a_file_needs_its_norm(comfyui_file, tmp_path):
    path, cfg = comfyui_file
    cont = deep_merge(cfg, {"adapter": {"existing": str(path),
                                        "weight_decompose_norm": "standard"},
                            "output": {"dir": str(tmp_path / "d"), "name": "d"}})
    out = _train(tmp_path, cont)
    assert out.exit_code == 2, out.output
    (line,) = [ln for ln in out.output.splitlines() if ln.strip()]
    assert "adapter.weight_decompose_norm: 'standard'" in line and str(path) in line
    assert "Traceback" not in out.output
    # ``validate`` says so without training
    checked = CliRunner().invoke(cli, ["validate", str(tmp_path / "run.yaml")])
    assert checked.exit_code != 0
    assert any(ln.strip().endswith("set adapter.weight_decompose_norm: comfyui to "
                                   "continue it") for ln in checked.output.splitlines())
    cont["adapter"]["weight_decompose_norm"] = "comfyui"
    out = _train(tmp_path, cont)
    assert out.exit_code == 0, out.output
    assert read_metadata(tmp_path / "d" / "d.safetensors")[NORM_KEY] == "comfyui"


@pytest.mark.parametrize("norm", ["standard", "comfyui"])
def test_train_warns_for_comfyuis_dora_only_with_the_standard_norm(unet_config, tmp_path, norm):
    cfg = _config(unet_config, tmp_path, "e", {"weight_decompose_norm": norm,
                                               "exporter": "comfyui"})
    cfg["training"]["steps"] = 1
    out = _train(tmp_path, cfg)
    assert out.exit_code == 0, out.output
    dora = [ln for ln in out.output.splitlines() if "DoRA" in ln]
    if norm == "comfyui":
        assert dora == []
    else:
        (line,) = dora
        assert line.startswith("warning: adapter.exporter: ComfyUI's DoRA divides by the "
                               "norm of W") and "weight_decompose_norm: comfyui" in line


def test_an_unknown_norm_in_a_file_is_named(comfyui_file, unet_dir, tmp_path):
    path, _ = comfyui_file
    meta = read_metadata(path) | {NORM_KEY: "sideways"}
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(path)), str(bad), metadata=meta)
    with pytest.raises(DataError, match=f"{bad}: metadata {NORM_KEY}: expected standard "
                                        f"or comfyui, got 'sideways'"):
        loraengine.apply(_unet(unet_dir), bad, mode="merge")
    info = json.loads(CliRunner().invoke(cli, ["inspect", "--json", str(path)]).output)
    assert info["metadata"][NORM_KEY] == "comfyui"
