"""Transformer-family files as ComfyUI writes and reads them, pinned by fixtures made
with ComfyUI's own code (tests/fixtures/interop/make_comfyui_transformer_fixtures.py;
the commit is in the key files, ComfyUI 0.8.0): FLUX.1, Chroma, SD3, Lumina 2,
Qwen-Image, HiDream, Flux.2 (dev and Klein) and Z-Image.

The fixtures hold, for the tiny transformers of ``tiny_pipelines.comfyui_transformer``
(seeded as the script seeds them), every key ComfyUI's ``model_lora_keys_unet`` accepts
and the weight (or band of a fused weight) it patches, the keys and shapes its
TrainLoraNode saves, one TrainLoraNode-layout LoRA file and the weights ComfyUI patched
from it.

Tolerance of the patched weights: the file's values are bf16, upcast exactly on both
sides; each side computes up·down·α/r and W + ΔW in fp32, ComfyUI on the fused weight
and loraengine per diffusers layer, the same products in the same order per row: a few
ulps of |W + ΔW| at most, far below the 1e-4 relative bound of docs/compatibility.md.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from fixtures.interop.comfy_layout import native_by_layout
from safetensors.torch import load_file

import loraengine
from loraengine.core.adapter import ADAPTABLE, AdapterNetwork
from loraengine.core.adapter.network import select_layers
from loraengine.core.errors import LoraEngineError
from loraengine.core.files import in_layout, module_layouts, write_adapter_file
from loraengine.plugins import build_plugin_manager
from loraengine.plugins.models import comfy_names
from loraengine.testing import tiny_pipelines as tp
from loraengine.testing.conformance import perturb, relative_error

FIXTURES = Path(__file__).parent / "fixtures" / "interop"
HOST = build_plugin_manager()
REG = HOST.registry
FAMILIES = ("flux", "chroma", "sd3", "lumina2", "qwen_image", "hidream", "flux2",
            "flux2_klein", "z_image")
#: families whose ComfyUI model is named as diffusers names it
SAME_NAMES = ("qwen_image", "hidream")
TOL = 1e-4


def _keys(family: str) -> dict:
    return json.loads((FIXTURES / f"{family}_comfyui_transformer.json").read_text())


def _network(model, algorithm: str, options: dict | None = None) -> AdapterNetwork:
    spec = REG.get("adapter", algorithm)
    config = spec.config_model.model_validate(options or {})
    g = torch.Generator().manual_seed(0)
    layers = {}
    for i, (path, base) in enumerate(sorted(select_layers(model, ["*"], [], ADAPTABLE).items())):
        if isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)):
            layer = spec.create(base, 2, 3.0, config, g)
            layer.algorithm = algorithm
            perturb(layer, i)
            layers[path] = layer
    return AdapterNetwork(layers)


def _export(model, network, exporter: str) -> dict[str, torch.Tensor]:
    spec = REG.get("exporter", exporter)
    return spec.to_file(in_layout(network.file_modules(), spec, module_layouts(REG, model)))


def _native(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers state dict in ComfyUI's names, by the layout (bands concatenated in
    row order, swapped halves swapped)."""
    return native_by_layout(module_layouts(REG, model).get(comfy_names.LAYOUT, {}), state)


def _modules(keys) -> set[str]:
    out = set()
    for key in keys:
        stem = key.rsplit(".", 1)[0]
        for tail in (".lora_up", ".lora_down", ".lora_A", ".lora_B"):
            stem = stem.removesuffix(tail)
        out.add(stem)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_comfyui_export_has_trainloranodes_modules_and_shapes(family):
    """A LoRA on every Linear, exported for ComfyUI, names exactly the modules
    TrainLoraNode trains that are Linears (its ≥2-D weights), fused where ComfyUI's
    model is, with the same ``lora_up`` rows and ``lora_down`` columns."""
    model = tp.comfyui_transformer(family)
    theirs = _keys(family)["trainlora_keys"]
    ours = _export(model, _network(model, "lora"), "comfyui")
    linear = {k.removesuffix(".lora_up.weight") for k in theirs if k.endswith(".lora_up.weight")}
    assert {k.removesuffix(".lora_up.weight") for k in ours if k.endswith(".lora_up.weight")} \
        == linear
    for stem in linear:
        assert ours[f"{stem}.lora_up.weight"].shape[0] == theirs[f"{stem}.lora_up.weight"][0]
        # (TrainLoraNode flattens a convolution's lora_down to [r, in·k·k])
        down = ours[f"{stem}.lora_down.weight"]
        assert down[0].numel() == theirs[f"{stem}.lora_down.weight"][1]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("exporter", ["comfyui", "diffusers"])
def test_every_exported_module_is_a_key_comfyui_loads(family, exporter):
    """Each module of the export is a key of ComfyUI's ``model_lora_keys_unet`` for
    that model — except where ComfyUI has no diffusers map (Lumina 2), one without
    Chroma's modulation approximator, or reads Flux.2 with FLUX.1's map: the limits
    docs/compatibility.md names, which the exporter's limits count exactly."""
    from loraengine.plugins.exporters import comfyui_unread

    model = tp.comfyui_transformer(family)
    key_map = _keys(family)["model_lora_keys_unet"]
    network = _network(model, "lora")
    stems = _modules(_export(model, network, exporter))
    unloaded = sorted(s for s in stems if s not in key_map)
    if exporter == "diffusers" and family == "lumina2":
        assert len(unloaded) == len(stems)  # ComfyUI maps no diffusers name for it
    elif exporter == "diffusers" and family == "chroma":
        assert unloaded and all(".distilled_guidance_layer." in s for s in unloaded)
    elif exporter == "diffusers" and family in ("flux2", "flux2_klein"):
        # the layers Flux.2 renamed (feed-forwards, single blocks, embedders, modulation)
        assert unloaded and not any(re.search(r"\.attn\.(to_[qkv]|add_[qkv]_proj)$", s)
                                    for s in unloaded)
        assert any(".ff.linear_in" in s for s in unloaded)
    else:
        assert unloaded == []
    if exporter == "diffusers":  # the warning counts what ComfyUI leaves out
        lines = comfyui_unread(network.paths)
        assert len(lines) == (1 if unloaded else 0)
        if unloaded:
            assert f": {len(unloaded)} layer(s) of this" in lines[0]
    if exporter == "comfyui":  # and each points at the weight of its own name
        assert all(key_map[s] == f"{s}.weight" for s in stems)


@pytest.mark.parametrize("family", FAMILIES)
def test_trainloranode_file_applies_with_comfyuis_weights(family):
    """TrainLoraNode's layout (fused LoRAs, ``diff`` on norms, ``diff_b`` on biases)
    applied to the diffusers model gives the weights ComfyUI patched from it."""
    model = tp.comfyui_transformer(family)
    tensors = load_file(str(FIXTURES / f"{family}_trainlora_lora.safetensors"))
    handle = loraengine.apply(model, tensors, mode="merge", host=HOST)
    assert handle.modules
    patched = load_file(str(FIXTURES / f"{family}_trainlora_lora_patched.safetensors"))
    ours = _native(model, {k: v.detach() for k, v in model.state_dict().items()})
    base = _native(model, tp.comfyui_transformer(family).state_dict())
    assert patched
    for key, want in patched.items():
        assert relative_error(ours[key], base[key]) > TOL, key  # the file changed it here
        assert relative_error(ours[key], want) <= TOL, key


@pytest.mark.parametrize("family,algorithm", [("flux2", "loha"), ("flux2", "lokr"),
                                              ("z_image", "loha"), ("z_image", "oft")])
def test_trainloranodes_other_algorithms_apply_with_comfyuis_weights(family, algorithm):
    """TrainLoraNode's LoHa, LoKr and OFT files (one module over each fused ``qkv``:
    LoHa rows split as products of rows; LoKr whose small factor has one row, split
    inside its one block; OFT split by whole blocks, projected onto its constraint
    first) place every module on the diffusers model and give ComfyUI's weights. OFT's
    Cayley transform is computed on both sides in fp32 (an inverse of I − Q): a few
    ulps of |W| apart, within the 1e-4 bound."""
    model = tp.comfyui_transformer(family)
    tensors = load_file(str(FIXTURES / f"{family}_trainlora_{algorithm}.safetensors"))
    handle = loraengine.apply(model, tensors, mode="merge", host=HOST)
    linears = {p for p, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears <= set(handle.modules)
    patched = load_file(str(FIXTURES / f"{family}_trainlora_{algorithm}_patched.safetensors"))
    ours = _native(model, {k: v.detach() for k, v in model.state_dict().items()})
    base = _native(model, tp.comfyui_transformer(family).state_dict())
    assert any("qkv" in k for k in patched)
    for key, want in patched.items():
        assert relative_error(ours[key], base[key]) > TOL, key
        assert relative_error(ours[key], want) <= TOL, key


@pytest.mark.slow
def test_a_trainloranode_oft_across_flux2s_qkv_bands_is_refused_in_one_line():
    """TrainLoraNode's OFT on Flux.2's fused q/k/v rotates blocks of rows that straddle
    q, k and v (here 8 blocks of 6 rows over 3·16): no OFT of the diffusers layers is
    that rotation, and the error names the module and the rows."""
    tensors = load_file(str(FIXTURES / "flux2_trainlora_oft.safetensors"))
    assert tensors["diffusion_model.double_blocks.0.img_attn.qkv.oft_blocks"].shape[1] == 6
    with pytest.raises(LoraEngineError, match=r"double_blocks\.0\.(img|txt)_attn\.qkv: an "
                       r"OFT module over ComfyUI's fused layer cannot be split at rows "
                       r"\d+–\d+ \(not whole blocks of 6 rows\)"):
        loraengine.apply(tp.comfyui_transformer("flux2"), tensors, mode="merge", host=HOST)


def test_an_older_trainloranode_lumina2_file_names_its_final_norm():
    """ComfyUI before 0.8.0 (a125cd8) also trained Lumina 2's ``norm_final``, a norm its
    NextDiT had but never used and diffusers' model does not have: such a file is
    refused naming it."""
    tensors = load_file(str(FIXTURES / "lumina2_trainlora_lora.safetensors"))
    assert not any("norm_final" in k for k in tensors)  # 0.8.0 has no such norm
    tensors["diffusion_model.norm_final.diff"] = torch.zeros(32, dtype=torch.bfloat16)
    with pytest.raises(LoraEngineError, match="norm_final"):
        loraengine.apply(tp.comfyui_transformer("lumina2"), tensors, mode="merge", host=HOST)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in SAME_NAMES])
@pytest.mark.parametrize("algorithm", ["lora", "loha"])
def test_the_fused_layout_reads_back_to_the_same_delta(family, algorithm, tmp_path):
    """Written fused, read on the diffusers model: every module back on its layer with
    the rank it had and the ΔW it had (bit for bit: the split keeps the same numbers)."""
    model = tp.comfyui_transformer(family)
    network = _network(model, algorithm)
    path = tmp_path / "c.safetensors"
    write_adapter_file(path, network.file_modules(), REG.get("exporter", "comfyui"), {},
                       module_layouts(REG, model))
    target = tp.comfyui_transformer(family)
    handle = loraengine.apply(target, path, mode="merge", host=HOST)
    assert sorted(handle.modules) == sorted(network.paths)
    network.merge()
    for p in network.paths:
        assert torch.equal(target.get_submodule(p).weight, model.get_submodule(p).weight), p


@pytest.mark.parametrize("family", ["flux", "sd3", "lumina2", "flux2", "z_image"])
def test_lokr_over_a_fused_layer_keeps_diffusers_names_and_reads_back(family, tmp_path):
    """LoKr's ΔW over q, k and v stacked is no Kronecker product: those modules keep
    their diffusers names (ComfyUI does not load them, as the limit says — but for
    Z-Image, whose ComfyUI map reads them onto their bands of ``qkv``), the others
    take ComfyUI's; read back, every module is placed with its ΔW."""
    from loraengine.plugins.exporters import comfyui_limits

    model = tp.comfyui_transformer(family)
    network = _network(model, "lokr", {"factor": -1})
    path = tmp_path / "k.safetensors"
    tensors = write_adapter_file(path, network.file_modules(), REG.get("exporter", "comfyui"),
                                 {}, module_layouts(REG, model))
    key_map = _keys(family)["model_lora_keys_unet"]
    stems = _modules(tensors)
    unloaded = sorted(s for s in stems if s not in key_map)
    names = module_layouts(REG, model)[comfy_names.LAYOUT]
    banded = sorted(f"diffusion_model.{p}" for p, n in names.items()
                    if isinstance(comfy_names.parse(n)[1], tuple) and p in network.paths)
    assert banded
    limits = comfyui_limits({names.get(p, p): ("lokr", params)
                             for p, params in network.file_modules().items()})
    if family == "z_image":
        assert unloaded == []
        for p, n in names.items():  # each onto its own band of ComfyUI's weight
            native, band = comfy_names.parse(n)
            if isinstance(band, tuple) and p in network.paths:
                assert key_map[f"diffusion_model.{p}"] == [
                    f"diffusion_model.{native}.weight", [0, band[0], band[1]]]
        assert not any("fuses" in line for line in limits)
    else:
        assert unloaded == banded
        assert sum("fuses" in line for line in limits) == 1
    target = tp.comfyui_transformer(family)
    handle = loraengine.apply(target, path, mode="merge", host=HOST)
    assert sorted(handle.modules) == sorted(network.paths)
    network.merge()
    for p in network.paths:
        assert torch.equal(target.get_submodule(p).weight, model.get_submodule(p).weight), p


def test_training_lokr_for_comfyui_on_flux_warns_before_training(tmp_path):
    """``loraengine train`` says so before training (the check sees the names the file
    will have), one line naming the consumer and the way out; LoRA does not."""
    import yaml
    from click.testing import CliRunner
    from safetensors.torch import save_file

    from loraengine.cli.main import cli

    folder = tp.save("flux", tmp_path / "flux")
    g = torch.Generator().manual_seed(1)
    save_file({"latents": torch.randn(2, 4, 8, 8, generator=g)}, str(tmp_path / "lat.st"))
    save_file({"cond": torch.randn(2, 9, 32, generator=g), "pooled": torch.randn(2, 16,
               generator=g)}, str(tmp_path / "cond.st"))
    lines = {}
    for algorithm in ("lokr", "lora"):
        cfg = {"model": {"family": "flux", "path": str(folder)},
               "data": {"latents": str(tmp_path / "lat.st"),
                        "conditioning": str(tmp_path / "cond.st")},
               "training": {"steps": 1, "batch_size": 2, "dtype": "fp32", "seed": 0},
               "adapter": {"algorithm": algorithm, "rank": 2, "dtype": "fp32",
                           "exporter": "comfyui"},
               "output": {"dir": str(tmp_path / algorithm), "name": "f", "plot": False}}
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
        out = CliRunner().invoke(cli, ["train", str(tmp_path / "run.yaml"), "-q"])
        assert out.exit_code == 0, out.output
        lines[algorithm] = [ln for ln in out.output.splitlines() if "fuses" in ln]
    (line,) = lines["lokr"]
    assert line.startswith("warning: adapter.exporter: ComfyUI's model fuses q/k/v")
    assert "diffusers exporter" in line and "layer(s)" in line
    assert lines["lora"] == []


@pytest.mark.parametrize("family", ["flux2", "z_image"])
def test_the_names_are_the_released_checkpoints_by_diffusers_converter(family):
    """Flux.2 and Z-Image (no ComfyUI model at the fixtures' commit): the weights renamed
    to the layout go through diffusers' own single-file converter back onto the model's
    own keys, every adapted Linear among them (fused ones split back)."""
    from diffusers.loaders import single_file_utils as sfu

    model = tp.DENOISERS[family][1](0)
    names = module_layouts(REG, model)[comfy_names.LAYOUT]
    linears = {p for p, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    # every Linear: renamed by the layout, or named as the checkpoint names it
    state = {k: v for k, v in model.state_dict().items() if k.rpartition(".")[0] in linears}
    convert = {"flux2": sfu.convert_flux2_transformer_checkpoint_to_diffusers,
               "z_image": sfu.convert_z_image_transformer_checkpoint_to_diffusers}[family]
    native = _native(model, state)
    back = convert(dict(native))
    assert sorted(back) == sorted(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert any(isinstance(comfy_names.parse(n)[1], tuple) for n in names.values())
    assert len(native) < len(state)  # q/k/v fused


def test_the_comfyui_format_writes_wan_as_wan_comfyui_does():
    """One place for ComfyUI's names: on a Wan model the ``comfyui`` format writes the
    same keys and tensors as the family's own ``wan_comfyui`` format."""
    from loraengine.testing.tiny_video import wan_transformer

    model = wan_transformer(0)
    network = _network(model, "lora")
    blocks = AdapterNetwork({p: layer for p, layer in network.items() if p.startswith("blocks.")})
    ours = _export(model, blocks, "comfyui")
    theirs = _export(model, blocks, "wan_comfyui")
    assert sorted(ours) == sorted(theirs) and ours
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_convert_rekeys_a_diffusers_file_into_comfyuis_fused_layout(family, tmp_path):
    """``loraengine convert --to comfyui`` with the model: a diffusers-keyed LoRA comes
    out in TrainLoraNode's modules (fused), every one a key ComfyUI loads, and reads
    back to the same merged weights."""
    from click.testing import CliRunner

    from loraengine.cli.main import cli

    model = tp.comfyui_transformer(family)
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
    trained = _modules(k for k in _keys(family)["trainlora_keys"] if ".lora_" in k)
    assert stems == trained
    assert stems <= set(_keys(family)["model_lora_keys_unet"])
    a, b = tp.comfyui_transformer(family), tp.comfyui_transformer(family)
    loraengine.apply(a, source, mode="merge", host=HOST)
    loraengine.apply(b, out, mode="merge", host=HOST)
    # both files hold the same numbers (α/r already folded into lora_B by the diffusers
    # export); fused, the same products are summed in the same order: a few ulps at most
    for p in network.paths:
        assert relative_error(b.get_submodule(p).weight, a.get_submodule(p).weight) <= 1e-6, p


def test_an_untrained_trainloranode_file_places_every_layer():
    """TrainLoraNode starts ``lora_up`` at zero: such a fused file still gives every
    diffusers layer its module (at the file's rank, ΔW zero), so it can be continued."""
    model = tp.comfyui_transformer("flux")
    tensors = load_file(str(FIXTURES / "flux_trainlora_lora.safetensors"))
    zero = {k: torch.zeros_like(v) if k.endswith("lora_up.weight") else v
            for k, v in tensors.items() if not k.endswith((".diff", ".diff_b"))}
    handle = loraengine.apply(model, zero, mode="merge", host=HOST)
    linears = {p for p, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(handle.modules) == linears


def test_a_fused_lokr_splits_by_whole_blocks_of_its_large_factor():
    """A LoKr over FLUX.1's fused ``img_attn.qkv`` (3·16 rows) whose small factor has
    one row per part: each of to_q/k/v gets rows i·16…(i+1)·16 of kron(w1, w2)·α/r,
    computed here with torch.kron; a band that cuts a block is refused in one line."""
    model = tp.comfyui_transformer("flux")
    hidden = model.transformer_blocks[0].attn.to_q.in_features
    g = torch.Generator().manual_seed(3)
    w1 = torch.randn(3, 1, generator=g)
    w2a, w2b = torch.randn(hidden, 2, generator=g), torch.randn(2, hidden, generator=g)
    key = "diffusion_model.double_blocks.0.img_attn.qkv"
    tensors = {f"{key}.lokr_w1": w1, f"{key}.lokr_w2_a": w2a, f"{key}.lokr_w2_b": w2b,
               f"{key}.alpha": torch.tensor(3.0)}
    fused = torch.kron(w1, w2a @ w2b) * (3.0 / 2)
    base = tp.comfyui_transformer("flux")
    handle = loraengine.apply(model, tensors, mode="merge", host=HOST)
    parts = ["attn.to_q", "attn.to_k", "attn.to_v"]
    assert sorted(handle.modules) == sorted(f"transformer_blocks.0.{p}" for p in parts)
    for i, part in enumerate(parts):
        path = f"transformer_blocks.0.{part}"
        want = base.get_submodule(path).weight + fused[i * hidden:(i + 1) * hidden]
        assert relative_error(model.get_submodule(path).weight, want) <= 1e-6, part
    cut = {f"{key}.lokr_w1": torch.randn(2, 1, generator=g),
           f"{key}.lokr_w2_a": torch.randn(24, 2, generator=g),
           f"{key}.lokr_w2_b": w2b, f"{key}.alpha": torch.tensor(3.0)}
    with pytest.raises(LoraEngineError, match=r"qkv: a LoKr module over ComfyUI's fused "
                       r"layer cannot be split at rows \d+–\d+ \(not whole blocks of 24"):
        loraengine.apply(tp.comfyui_transformer("flux"), cut, mode="merge", host=HOST)


def test_training_flux2_for_diffusers_says_what_comfyui_does_not_load(tmp_path):
    """``loraengine train`` on Flux.2 with the default (diffusers) exporter: a LoRA is
    written in the released checkpoint's names, which ComfyUI reads whole, so there is
    no ComfyUI line; a LoKr on the q/k/v projections stays in diffusers' names, and
    ``train`` warns, one line, that ComfyUI leaves the layers Flux.2 renamed out of it,
    pointing at the comfyui exporter."""
    import yaml
    from click.testing import CliRunner
    from safetensors.torch import load_file, save_file

    from loraengine.cli.main import cli

    folder = tp.save_denoiser("flux2", tmp_path / "flux2")
    _, _, _, channels, width = tp.DENOISERS["flux2"]
    g = torch.Generator().manual_seed(0)
    save_file({"latents": torch.randn(2, channels, 4, 4, generator=g)}, str(tmp_path / "l.st"))
    save_file({"cond": torch.randn(2, 5, width, generator=g)}, str(tmp_path / "c.st"))
    lines, keys = {}, {}
    for algorithm in ("lora", "lokr"):
        cfg = {"model": {"family": "flux2", "path": str(folder)},
               "data": {"latents": str(tmp_path / "l.st"),
                        "conditioning": str(tmp_path / "c.st")},
               "training": {"steps": 1, "batch_size": 2, "dtype": "fp32", "seed": 0},
               "adapter": {"rank": 2, "dtype": "fp32", "algorithm": algorithm},
               "output": {"dir": str(tmp_path / algorithm), "name": "f", "plot": False}}
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
        out = CliRunner().invoke(cli, ["train", str(tmp_path / "run.yaml"), "-q"])
        assert out.exit_code == 0, out.output
        lines[algorithm] = [ln for ln in out.output.splitlines() if "ComfyUI" in ln]
        keys[algorithm] = set(load_file(str(tmp_path / algorithm / "f.safetensors")))
    assert lines["lora"] == []
    assert all(k.startswith("diffusion_model.") for k in keys["lora"])
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight" in keys["lora"]
    assert all(k.startswith("transformer.") for k in keys["lokr"])
    (line,) = lines["lokr"]
    assert line.startswith("warning: adapter.exporter: ComfyUI reads Flux.2's diffusers "
                           "names through its FLUX.1 map")
    # the default targets (the blocks): feed-forwards and the single block's layers
    model = tp.flux2_transformer(0)
    renamed = [p for p, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and p.startswith(("transformer_blocks.", "single_transformer_blocks."))
               and re.search(r"(\.ff(_context)?\.linear_|single_transformer_blocks.*"
                             r"\.attn\.to_(qkv_mlp_proj|out)$)", p)]
    assert f": {len(renamed)} layer(s) of this Flux.2 file" in line
    assert "comfyui exporter" in line


@pytest.mark.parametrize("family", ["flux2", "z_image"])
def test_convert_of_a_lokr_to_comfyui_warns_where_comfyui_cannot_load_it(family, tmp_path):
    """``loraengine convert --to comfyui --model``: a LoKr over the q/k/v ComfyUI fuses
    is written under diffusers' names; for Flux.2 ComfyUI does not load those (one
    warning line, as ``train`` gives), for Z-Image it does (no line)."""
    from click.testing import CliRunner

    from loraengine.cli.main import cli

    model = tp.comfyui_transformer(family)
    folder = tmp_path / "model"
    model.save_pretrained(str(folder))
    network = _network(model, "lokr", {"factor": -1})
    source = tmp_path / "d.safetensors"
    write_adapter_file(source, network.file_modules(), REG.get("exporter", "diffusers"), {})
    out = tmp_path / "c.safetensors"
    res = CliRunner().invoke(cli, ["convert", str(source), "--to", "comfyui", "--model",
                                   str(folder), "--out", str(out)])
    assert res.exit_code == 0, res.output
    fused = [ln for ln in res.output.splitlines() if "fuses q/k/v" in ln]
    stems = _modules(load_file(str(out)))
    unloaded = sorted(s for s in stems if s not in _keys(family)["model_lora_keys_unet"])
    if family == "flux2":
        (line,) = fused
        assert line.startswith("warning: ComfyUI: ComfyUI's model fuses q/k/v")
        assert f": {len(unloaded)} layer(s) are written" in line and unloaded
        # what ComfyUI leaves out: those layers' ΔW, relative to their merged weights
        base = {p: model.get_submodule(p).weight.detach().clone() for p in network.paths}
        network.merge()
        change = {s.removeprefix("diffusion_model."): relative_error(
            base[s.removeprefix("diffusion_model.")],
            model.get_submodule(s.removeprefix("diffusion_model.")).weight)
            for s in unloaded}
        worst = max(change, key=change.__getitem__)
        assert line.endswith(f"unloaded, max relative weight error {change[worst]:.2g} "
                             f"(worst {worst})"), line
    else:
        assert fused == [] and unloaded == []


def test_an_oft_on_a_swapped_layer_is_written_as_comfyui_rotates_it(tmp_path):
    """OFT on FLUX.1's final modulation (ComfyUI stores its halves swapped): the file's
    blocks, rotated as ComfyUI's OFT does (W_k ← R_kᵀ W_k per block of rows, R the
    Cayley transform (I + Q)(I − Q)⁻¹ of Q = B − Bᵀ), give our merged weight with its
    halves swapped (both in fp32, the inverse of I − Q computed two ways: far below
    1e-5); read back, the module has the same ΔW."""
    model = tp.comfyui_transformer("flux")
    path = "norm_out.linear"
    base = model.get_submodule(path)
    spec = REG.get("adapter", "oft")
    layer = spec.create(base, 4, 1.0, spec.config_model.model_validate({}),
                        torch.Generator().manual_seed(0))
    layer.algorithm = "oft"
    perturb(layer, 0)
    network = AdapterNetwork({path: layer})
    file = tmp_path / "o.safetensors"
    tensors = write_adapter_file(file, network.file_modules(), REG.get("exporter", "comfyui"),
                                 {}, module_layouts(REG, model))
    blocks = tensors["diffusion_model.final_layer.adaLN_modulation.1.oft_blocks"].float()
    assert float(tensors.get("diffusion_model.final_layer.adaLN_modulation.1.alpha", 0)) == 0
    w = base.weight.detach().float().clone()
    first, second = w.chunk(2)
    native = torch.cat([second, first])
    eye = torch.eye(blocks.shape[1])
    q = blocks - blocks.transpose(1, 2)
    r = (eye + q) @ torch.linalg.inv(eye - q)
    theirs = torch.einsum("knm,kn...->km...", r, native.view(blocks.shape[0], blocks.shape[1],
                                                               -1)).reshape(native.shape)
    network.merge()
    merged = model.get_submodule(path).weight.detach().float()
    assert relative_error(merged, w) > 1e-3  # the rotation is not the identity
    first, second = merged.chunk(2)
    assert relative_error(theirs, torch.cat([second, first])) <= 1e-5
    target = tp.comfyui_transformer("flux")
    loraengine.apply(target, file, mode="merge", host=HOST)
    assert relative_error(target.get_submodule(path).weight, merged) <= 1e-6
