"""Video-family files as ComfyUI 0.8.0 writes and reads them, pinned by fixtures made with
ComfyUI's own code (tests/fixtures/interop/make_comfyui_video_fixtures.py; the commit is
in the key files): Wan 2.1 (and each Wan 2.2 A14B expert, the same model in ComfyUI),
LTX-2 (ComfyUI's audio-video LTXAV) and HunyuanVideo 1.5.

The fixtures hold, for the tiny transformers of ``loraengine.testing.tiny_video``
(seeded as the script seeds them), every key ComfyUI's ``model_lora_keys_unet`` accepts
and the weight it patches, the keys and shapes its TrainLoraNode saves, one
TrainLoraNode-layout LoRA file and weights ComfyUI patched from it.

Tolerance of the patched weights: the file's values are bf16, upcast exactly on both
sides; each side computes up·down·α/r and W + ΔW in fp32 (ComfyUI on the fused q/k/v
weight, loraengine per diffusers layer: the same products per row), a few ulps of
|W + ΔW| at most, far below the 1e-4 relative bound of docs/compatibility.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures.interop.comfy_layout import native_by_layout
from safetensors.torch import load_file

import loraengine
from loraengine.core.adapter import ADAPTABLE, AdapterNetwork
from loraengine.core.adapter.network import select_layers
from loraengine.core.files import in_layout, module_layouts, write_adapter_file
from loraengine.plugins import build_plugin_manager
from loraengine.plugins.models import comfy_names, hunyuan_video15, ltx2, wan
from loraengine.testing import tiny_video as tv
from loraengine.testing.conformance import perturb, relative_error

FIXTURES = Path(__file__).parent / "fixtures" / "interop"
HOST = build_plugin_manager()
REG = HOST.registry
FAMILIES = ("wan", "ltx2", "hunyuan_video15")
BUILD = {"wan": tv.wan_transformer, "ltx2": tv.ltx2_transformer,
         "hunyuan_video15": tv.hunyuan_video15_transformer}
#: each family's default exporter, as its record says
DEFAULT = {f.name: f.default_exporter for f in (wan.WAN, ltx2.LTX2,
                                                hunyuan_video15.HUNYUAN_VIDEO15)}
TOL = 1e-4


def _model(family: str):
    return BUILD[family](0).eval()


def _keys(family: str) -> dict:
    return json.loads((FIXTURES / f"{family}_comfyui_video.json").read_text())


def _network(model, algorithm: str, options: dict | None = None) -> AdapterNetwork:
    """Perturbed, rank 2, α = 3, on every layer loraengine adapts (Linear, Conv3d)."""
    spec = REG.get("adapter", algorithm)
    config = spec.config_model.model_validate(options or {})
    g = torch.Generator().manual_seed(0)
    layers = {}
    for i, (path, base) in enumerate(sorted(select_layers(model, ["*"], [], ADAPTABLE).items())):
        layer = spec.create(base, 2, 3.0, config, g)
        layer.algorithm = algorithm
        perturb(layer, i)
        layers[path] = layer
    return AdapterNetwork(layers)


def _export(model, network, exporter: str) -> dict[str, torch.Tensor]:
    spec = REG.get("exporter", exporter)
    return spec.to_file(in_layout(network.file_modules(), spec, module_layouts(REG, model)))


def _native(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return native_by_layout(module_layouts(REG, model).get(comfy_names.LAYOUT, {}), state)


def _modules(keys) -> set[str]:
    out = set()
    for key in keys:
        stem = key.rsplit(".", 1)[0]
        for tail in (".lora_up", ".lora_down", ".lora_A", ".lora_B"):
            stem = stem.removesuffix(tail)
        out.add(stem)
    return out


def test_the_fixtures_are_comfyui_0_8_0s():
    for family in FAMILIES:
        keys = _keys(family)
        assert keys["comfyui_version"] == "0.8.0" and keys["comfyui_commit"] == "618b803"


@pytest.mark.parametrize("family", FAMILIES)
def test_comfyui_export_has_trainloranodes_modules_and_shapes(family):
    """A LoRA on every layer, exported for ComfyUI, names exactly the modules
    TrainLoraNode trains with a LoRA (its ≥2-D weights: Linears and the Conv3d patch
    embedding), fused where ComfyUI's model is, with the same rows and columns."""
    model = _model(family)
    theirs = _keys(family)["trainlora_keys"]
    ours = _export(model, _network(model, "lora"), "comfyui")
    stems = {k.removesuffix(".lora_up.weight") for k in theirs if k.endswith(".lora_up.weight")}
    assert {k.removesuffix(".lora_up.weight") for k in ours
            if k.endswith(".lora_up.weight")} == stems
    for stem in stems:
        assert ours[f"{stem}.lora_up.weight"].shape[0] == theirs[f"{stem}.lora_up.weight"][0]
        # (TrainLoraNode flattens a convolution's lora_down to [r, in·k·k·k])
        assert ours[f"{stem}.lora_down.weight"][0].numel() == \
            theirs[f"{stem}.lora_down.weight"][1]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("exporter", ["comfyui", "default", "diffusers"])
def test_every_exported_module_is_a_key_comfyui_loads(family, exporter):
    """Each module of the ``comfyui`` export and of each family's default (Wan's
    ``wan_comfyui``, HunyuanVideo 1.5's ``comfyui``) is a key of ComfyUI's
    ``model_lora_keys_unet`` for that model, pointing at the weight of its own name;
    ComfyUI 0.8.0 reads no diffusers names for these models, so the ``diffusers``
    export loads nothing there, but for LTX-2's (its default): its LoRA file is in the
    original names, which both diffusers' LTX2Pipeline and ComfyUI read
    (``exporters.BOTH_READ``)."""
    name = DEFAULT[family] if exporter == "default" else exporter
    model = _model(family)
    key_map = _keys(family)["model_lora_keys_unet"]
    stems = _modules(_export(model, _network(model, "lora"), name))
    unloaded = sorted(s for s in stems if s not in key_map)
    if name == "diffusers" and family != "ltx2":
        assert unloaded == sorted(stems)
    else:
        assert unloaded == [] and all(key_map[s] == f"{s}.weight" for s in stems)


@pytest.mark.parametrize("family", FAMILIES)
def test_trainloranode_file_applies_with_comfyuis_weights(family):
    """TrainLoraNode's layout (fused LoRAs, ``diff`` on norms, ``diff_b`` on biases)
    applied to the diffusers model places every module and gives the weights ComfyUI
    patched from it."""
    model = _model(family)
    tensors = load_file(str(FIXTURES / f"{family}_trainlora_lora.safetensors"))
    handle = loraengine.apply(model, tensors, mode="merge", host=HOST)
    # every module of the file is placed: as many as TrainLoraNode wrote (fused ones
    # are one module per part here)
    names = module_layouts(REG, model)[comfy_names.LAYOUT]
    parts: dict[str, int] = {}
    for native in (comfy_names.parse(n)[0] for n in names.values()):
        parts[native] = parts.get(native, 0) + 1
    written = {k.rsplit(".", 2 if ".lora_" in k else 1)[0].removeprefix("diffusion_model.")
               for k in tensors if not k.endswith(".alpha")}
    # adapters, and the norms' deltas (a bias delta beside an adapter is one too)
    placed = set(handle.modules) | set(handle.network.delta_paths)
    assert len(placed) == sum(parts.get(m, 1) for m in written)
    patched = load_file(str(FIXTURES / f"{family}_trainlora_lora_patched.safetensors"))
    ours = _native(model, {k: v.detach() for k, v in model.state_dict().items()})
    base = _native(model, _model(family).state_dict())
    assert len(patched) == 12
    for key, want in patched.items():
        assert relative_error(ours[key], base[key]) > TOL, key  # the file changed it here
        assert relative_error(ours[key], want) <= TOL, key


@pytest.mark.parametrize("algorithm", ["lora", "loha"])
def test_hunyuan_fused_layout_reads_back_to_the_same_delta(algorithm, tmp_path):
    """HunyuanVideo 1.5 written with q/k/v fused and the final modulation swapped, read
    on the diffusers model: every module back on its layer with its ΔW, bit for bit."""
    model = _model("hunyuan_video15")
    network = _network(model, algorithm)
    path = tmp_path / "c.safetensors"
    tensors = write_adapter_file(path, network.file_modules(), REG.get("exporter", "comfyui"),
                                 {}, module_layouts(REG, model))
    assert "diffusion_model.double_blocks.0.img_attn.qkv.alpha" in tensors
    assert "diffusion_model.txt_in.individual_token_refiner.blocks.0.self_attn.qkv.alpha" \
        in tensors
    target = _model("hunyuan_video15")
    handle = loraengine.apply(target, path, mode="merge", host=HOST)
    assert sorted(handle.modules) == sorted(network.paths)
    network.merge()
    for p in network.paths:
        assert torch.equal(target.get_submodule(p).weight, model.get_submodule(p).weight), p


def test_hunyuan_lokr_over_fused_qkv_keeps_diffusers_names_and_warns(tmp_path):
    """LoKr over q, k and v stacked is no Kronecker product: those modules keep their
    diffusers names (which ComfyUI does not load: the exporter's limit says so), every
    other one takes ComfyUI's; read back, every module is placed with its ΔW."""
    model = _model("hunyuan_video15")
    network = _network(model, "lokr", {"factor": -1})
    exporter = REG.get("exporter", "comfyui")
    layouts = module_layouts(REG, model)
    path = tmp_path / "k.safetensors"
    tensors = write_adapter_file(path, network.file_modules(), exporter, {}, layouts)
    key_map = _keys("hunyuan_video15")["model_lora_keys_unet"]
    unloaded = sorted(s for s in _modules(tensors) if s not in key_map)
    names = layouts[comfy_names.LAYOUT]
    banded = sorted(f"diffusion_model.{p}" for p, n in names.items()
                    if isinstance(comfy_names.parse(n)[1], tuple) and p in network.paths)
    assert unloaded == banded and len(banded) == 6 * 2 + 3  # 2 double blocks, 1 refiner
    renamed = in_layout({p: dict(v) for p, v in network.file_modules().items()}, exporter,
                        layouts)
    (line,) = [ln for ln in exporter.limits(
        {n: ("lokr", {k: tuple(t.shape) for k, t in v.items()}) for n, v in renamed.items()})
        if "fuses" in ln]
    assert f"{len(banded)} layer(s)" in line
    target = _model("hunyuan_video15")
    handle = loraengine.apply(target, path, mode="merge", host=HOST)
    assert sorted(handle.modules) == sorted(network.paths)
    network.merge()
    for p in network.paths:
        assert torch.equal(target.get_submodule(p).weight, model.get_submodule(p).weight), p


@pytest.mark.parametrize("family", ["wan", "hunyuan_video15"])
@pytest.mark.parametrize("options", [{"factor": -1}, {"factor": 2, "use_tucker": True}],
                         ids=["whole", "tucker"])
def test_lokr_on_the_3d_patch_embedding_is_written_as_comfyui_computes_it(family, options,
                                                                          tmp_path):
    """ComfyUI widens LoKr's small factor for 2-D kernels only (``torch.kron(w1, w2)``
    of a matrix and a 5-D tensor is another product) and its Tucker product is written
    for 2-D kernels (it raises on a 5-D core): a Conv3d's large factor is written as a
    matrix (a Tucker core multiplied out first), with which ComfyUI's formula,
    ``kron(w1, w2).reshape(W.shape)`` times α/dim where a factor is low rank, is the
    layer's ΔW; read back, the same ΔW."""
    model = _model(family)
    conv = next(p for p, m in model.named_modules() if isinstance(m, torch.nn.Conv3d))
    network = _network(model, "lokr", options)
    if family == "wan":  # (HunyuanVideo 1.5's 9 input channels get no Tucker core here)
        assert ("lokr_t2" in network.file_modules()[conv]) == ("use_tucker" in options)
    path = tmp_path / "k.safetensors"
    exporters = ("comfyui", "wan_comfyui") if family == "wan" else ("comfyui",)
    stem = f"diffusion_model.{module_layouts(REG, model)[comfy_names.LAYOUT][conv]}"
    delta = network[conv].delta_weight().detach()
    # ΔW in fp32 of factors multiplied out: a few ulps of |ΔW|
    tol = 1e-6
    for exporter in exporters:
        tensors = write_adapter_file(path, network.file_modules(), REG.get("exporter", exporter),
                                     {}, module_layouts(REG, model))
        mine = {k.removeprefix(stem + "."): v.float() for k, v in tensors.items()
                if k.startswith(stem + ".")}
        assert "lokr_t2" not in mine
        w1 = mine["lokr_w1"] if "lokr_w1" in mine else mine["lokr_w1_a"] @ mine["lokr_w1_b"]
        w2 = mine["lokr_w2"] if "lokr_w2" in mine else mine["lokr_w2_a"] @ mine["lokr_w2_b"]
        assert w1.ndim == w2.ndim == 2
        low = mine.get("lokr_w2_b", mine.get("lokr_w1_b"))
        scale = float(mine["alpha"]) / low.shape[0] if low is not None and "alpha" in mine \
            else 1.0
        theirs = torch.kron(w1, w2).reshape(delta.shape) * scale
        assert relative_error(theirs, delta) <= tol
        target = _model(family)
        handle = loraengine.apply(target, path, mode="merge", host=HOST)
        assert conv in handle.modules
        want = model.get_submodule(conv).weight.detach() + delta
        assert relative_error(target.get_submodule(conv).weight.detach(), want) <= tol


@pytest.mark.parametrize("family", ["wan", "ltx2"])
def test_the_names_are_the_checkpoints_by_diffusers_converter(family):
    """Wan's and LTX-2's names are the released checkpoints' (ComfyUI's model's, in the
    fixtures): the weights renamed by the layout go through diffusers' own single-file
    converter back onto the model's keys, every adapted layer's among them."""
    from diffusers.loaders import single_file_utils as sfu

    model = _model(family)
    names = module_layouts(REG, model)[comfy_names.LAYOUT]
    adapted = set(select_layers(model, ["*"], [], ADAPTABLE))
    state = {k: v for k, v in model.state_dict().items()
             if k.rpartition(".")[0] in adapted | set(names)}
    convert = {"wan": sfu.convert_wan_transformer_to_diffusers,
               "ltx2": sfu.convert_ltx2_transformer_to_diffusers}[family]
    native = _native(model, state)
    key_map = _keys(family)["model_lora_keys_unet"]
    assert all(f"diffusion_model.{k.rpartition('.')[0]}" in key_map for k in native)
    back = convert(dict(native))
    assert sorted(back) == sorted(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("family", ["ltx2", "hunyuan_video15"])
def test_convert_rekeys_a_diffusers_file_into_comfyuis_names(family, tmp_path):
    """``loraengine convert --to comfyui`` with the model: a diffusers-keyed LoRA (what
    PEFT reads of HunyuanVideo 1.5, ``adapter.exporter: diffusers``; LTX-2's LoRA
    export is in the original names) comes out in TrainLoraNode's modules, every one a
    key ComfyUI loads, and reads back to the same merged weights."""
    from click.testing import CliRunner

    from loraengine.cli.main import cli

    model = _model(family)
    folder = tmp_path / "model"
    model.save_pretrained(str(folder))
    network = _network(model, "lora")
    source = tmp_path / "d.safetensors"
    write_adapter_file(source, network.file_modules(), REG.get("exporter", "diffusers"), {})
    out = tmp_path / "c.safetensors"
    res = CliRunner().invoke(cli, ["convert", str(source), "--to", "comfyui", "--model",
                                   str(folder), "--out", str(out)])
    assert res.exit_code == 0, res.output
    stems = _modules(load_file(str(out)))
    assert stems == _modules(k for k in _keys(family)["trainlora_keys"] if ".lora_" in k)
    assert stems <= set(_keys(family)["model_lora_keys_unet"])
    a, b = _model(family), _model(family)
    loraengine.apply(a, source, mode="merge", host=HOST)
    loraengine.apply(b, out, mode="merge", host=HOST)
    # the same numbers (α/r folded into lora_B by the diffusers export); fused, the same
    # products summed in the same order: a few ulps at most
    for p in network.paths:
        assert relative_error(b.get_submodule(p).weight, a.get_submodule(p).weight) <= 1e-6, p


@pytest.mark.parametrize(("family", "model_family", "phrase"), [
    ("wan", "ltx2", "a Wan 2.x"), ("ltx2", "hunyuan_video15", "an LTX-2"),
    ("hunyuan_video15", "wan", "a HunyuanVideo 1.5")])
def test_a_trainloranode_file_for_another_video_model_says_which(family, model_family,
                                                                  phrase):
    """ComfyUI's own names of one video model, applied to another: one line naming the
    family the file looks made for."""
    from loraengine.core.errors import LoraEngineError

    tensors = load_file(str(FIXTURES / f"{family}_trainlora_lora.safetensors"))
    with pytest.raises(LoraEngineError) as err:
        loraengine.apply(_model(model_family), tensors, mode="merge", host=HOST)
    message = str(err.value)
    assert "\n" not in message
    assert message.endswith(f"the file looks made for {phrase} transformer")


def test_wan22_experts_trained_together_write_comfyuis_names_in_each_file():
    """Wan 2.2 A14B's experts trained together (``model.expert: both``) write one file
    per expert, each named without its expert's prefix (as the training loop's
    ``lora_tensors`` does): with ``adapter.exporter: comfyui`` each file is in ComfyUI's
    names, every module a key ComfyUI's Wan model loads."""
    from loraengine.plugins.models.wan import WanExperts

    experts = WanExperts(tv.wan_transformer(0), tv.wan_transformer(1), 875.0)
    network = _network(experts, "lora")
    key_map = _keys("wan")["model_lora_keys_unet"]
    spec = REG.get("exporter", "comfyui")
    for prefix in ("high_noise.", "low_noise."):
        modules = {k[len(prefix):]: v for k, v in network.file_modules().items()
                   if k.startswith(prefix)}
        tensors = spec.to_file(in_layout(modules, spec, module_layouts(REG, experts)))
        stems = _modules(tensors)
        assert len(stems) == 27 and stems <= set(key_map)


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["diffusers", "comfyui"])
def test_train_says_comfyui_reads_no_diffusers_name_of_hunyuan_video15(exporter, tmp_path):
    """HunyuanVideo 1.5's diffusers names are SD3's and FLUX.1's too, so only the model
    the file is for (its ``ss_base_model_version``) tells that ComfyUI loads none of a
    ``diffusers`` export (the ``diffusers`` cells above) and that Forge's SD3 and FLUX.1
    limits do not apply; the ``comfyui`` export is warned about nothing."""
    import yaml
    from click.testing import CliRunner
    from safetensors.torch import save_file

    from loraengine.cli.main import cli

    folder = tv.save_video_denoiser("hunyuan_video15", tmp_path / "m")
    channels, width = tv.VIDEO_DENOISERS["hunyuan_video15"][3:5]
    g = torch.Generator().manual_seed(0)
    save_file({"latents": torch.randn(1, channels, 2, 4, 6, generator=g)},
              str(tmp_path / "lat.st"))
    save_file({"cond": torch.randn(1, 7, width, generator=g)}, str(tmp_path / "cond.st"))
    cfg = {"model": {"family": "hunyuan_video15", "path": str(folder)},
           "data": {"latents": str(tmp_path / "lat.st"),
                    "conditioning": str(tmp_path / "cond.st")},
           "training": {"steps": 1, "dtype": "fp32"},
           "adapter": {"dtype": "fp32", "exporter": exporter},
           "output": {"dir": str(tmp_path / "out"), "name": "lora", "plot": False}}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(cli, ["train", str(tmp_path / "t.yaml")])
    assert result.exit_code == 0, result.output
    warned = [line for line in result.output.splitlines() if line.startswith("warning:")]
    layers = len(_modules(load_file(str(tmp_path / "out" / "lora.safetensors"))))
    if exporter == "comfyui":
        assert warned == []
    else:
        assert warned == [f"warning: adapter.exporter: ComfyUI reads no diffusers names for "
                          f"HunyuanVideo 1.5: {layers} layer(s) of this HunyuanVideo 1.5 "
                          f"file are not loaded there (e.g. "
                          f"transformer_blocks.0.attn.add_k_proj); the comfyui exporter "
                          f"is, with every layer"]
