"""Files as ComfyUI writes and reads them, pinned by fixtures made with ComfyUI's own
code (tests/fixtures/interop/make_comfyui_fixtures.py; the commit is in the key files).

The models are the tiny UNets with SD1.5's and SDXL's real block layout, seeded as the
script seeds them. The fixtures hold what ComfyUI's ``model_lora_keys_unet`` accepts
and its ``unet_to_diffusers`` map for them, files in the layout its TrainLoraNode saves
(LoRA, LoHa, LoKr and OFT on both), and the weights ComfyUI's loader patched from those
files for a few layers.

Tolerance of the patched weights: the file's values are bf16 and both sides upcast
them exactly; each side then computes ΔW = up·down·α/r (or the LoHa/LoKr/OFT product) and
W + ΔW in fp32, in possibly different orders: a few ulps of |W + ΔW|, far below the
1e-4 relative bound the interop issue sets (the measured error is 0 or near it)."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

import loraengine
from loraengine.core.adapter import ADAPTABLE, NORMS, AdapterNetwork, ChannelDelta
from loraengine.core.adapter.network import select_layers
from loraengine.core.files import in_layout, module_layouts, read_adapter_file
from loraengine.inference import adaptable_layers
from loraengine.plugins import build_plugin_manager
from loraengine.plugins.models.unet_names import ldm_names
from loraengine.testing.conformance import perturb
from loraengine.testing.models import sd15_structure_unet_config, sdxl_structure_unet_config

FIXTURES = Path(__file__).parent / "fixtures" / "interop"
HOST = build_plugin_manager()
REG = HOST.registry
CONFIGS = {"sd15": sd15_structure_unet_config, "sdxl": sdxl_structure_unet_config}
#: every algorithm of TrainLoraNode, on both UNet families
TRAINED = [(name, algorithm) for name in ("sd15", "sdxl")
           for algorithm in ("lora", "loha", "lokr", "oft")]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def family(request):
    torch.manual_seed(0)  # as the fixture script builds it
    unet = UNet2DConditionModel(**CONFIGS[request.param]()).eval()
    keys = json.loads((FIXTURES / f"{request.param}_comfyui_keys.json").read_text())
    return request.param, unet, keys


def _unet(name: str) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**CONFIGS[name]()).eval()


def test_the_map_is_comfyuis_own(family):
    name, unet, keys = family
    ours = ldm_names(unet)
    theirs = {k[:-7]: v[:-7] for k, v in keys["unet_to_diffusers"].items()
              if k.endswith(".weight") and k[:-7] in ours}
    assert theirs == ours


def _full_network(unet) -> AdapterNetwork:
    """LoRA on every Linear/Conv, channel deltas on norms and on the biases: what
    TrainLoraNode trains."""
    spec = REG.get("adapter", "lora")
    g = torch.Generator().manual_seed(0)
    built = {}
    for i, (path, base) in enumerate(sorted(select_layers(unet, ["*"], [], ADAPTABLE).items())):
        layer = spec.create(base, 1, 1.0, spec.config_model(), g)
        perturb(layer, i)
        built[path] = layer
    deltas = {}
    candidates = {**select_layers(unet, ["*"], [], NORMS),
                  **select_layers(unet, ["*"], [], ADAPTABLE)}
    for i, (path, base) in enumerate(sorted(candidates.items())):
        delta = ChannelDelta.fresh(base)
        if delta is not None:
            perturb(delta, 10_000 + i)
            deltas[path] = delta
    return AdapterNetwork(built, deltas)


def test_comfyui_export_has_exactly_trainloranodes_keys(family):
    name, unet, keys = family
    exporter = REG.get("exporter", "comfyui")
    network = _full_network(unet)
    ours = exporter.to_file(in_layout(network.file_modules(), exporter,
                                      module_layouts(REG, unet)))
    theirs = load_file(str(FIXTURES / f"{name}_trainlora_lora.safetensors"))
    assert set(ours) == set(theirs)
    for key in theirs:
        # TrainLoraNode keeps a conv's lora_down flattened, [r, in·k·k]; ComfyUI reads
        # that and kohya's [r, in, k, k] alike, and the export keeps kohya's
        assert ours[key].numel() == theirs[key].numel(), key
        assert ours[key].ndim == 0 or ours[key].shape[0] == theirs[key].shape[0], key


@pytest.mark.parametrize("exporter", ["comfyui", "kohya"])
def test_every_exported_module_is_a_key_comfyui_loads(family, exporter):
    name, unet, keys = family
    key_map = keys["model_lora_keys_unet"]
    spec = REG.get("exporter", exporter)
    network = _full_network(unet)
    tensors = spec.to_file(in_layout(network.file_modules(), spec, module_layouts(REG, unet)))
    names = ldm_names(unet)
    for path in network.paths:
        stems = {k.rsplit(".", 2)[0] for k in tensors
                 if k.endswith(".lora_down.weight")}
        stem = next(s for s in stems if s.endswith(names[path]) or
                    s.endswith(names[path].replace(".", "_")) or
                    s.endswith(path.replace(".", "_")))
        assert key_map[stem] == f"diffusion_model.{names[path]}.weight", (stem, path)


@pytest.mark.parametrize("name,algorithm", TRAINED)
def test_trainloranode_files_load_with_comfyuis_weights(name, algorithm):
    unet = _unet(name)
    source = FIXTURES / f"{name}_trainlora_{algorithm}.safetensors"
    file = read_adapter_file(source, REG, adaptable_layers(unet), model=unet)
    layers = adaptable_layers(unet)
    assert file.not_in(layers) == []
    assert len(file.modules) == len(ldm_names(unet))  # every weighted layer of the model
    patched = load_file(str(FIXTURES / f"{name}_trainlora_{algorithm}_patched.safetensors"))
    model = copy.deepcopy(unet)
    loraengine.apply(model, source, mode="merge", host=HOST)
    state = model.state_dict()
    base = unet.state_dict()
    # the file changes every one of these weights (so agreeing says something)
    for key, want in patched.items():
        assert not torch.equal(want, base[key]), key
    for key, want in patched.items():
        err = float((state[key] - want).abs().max() / want.abs().max())
        assert err <= 1e-4, (key, err)



@pytest.mark.parametrize("name,algorithm", TRAINED)
def test_trainloranode_files_continue_as_adapter_existing(name, algorithm):
    """``adapter.existing`` on a TrainLoraNode file: one adapter of the file's algorithm
    on every weighted layer of the model, its ``diff``/``diff_b`` on the rest, and the
    network, merged before any step, gives the weights ComfyUI patched."""
    from types import SimpleNamespace

    from loraengine.api import resolve_config
    from loraengine.core.build import build_adapters

    unet = _unet(name)
    source = FIXTURES / f"{name}_trainlora_{algorithm}.safetensors"
    conf, _ = resolve_config({"adapter": {"algorithm": algorithm, "include": ["*"],
                                          "dtype": "fp32", "existing": str(source)}},
                             HOST, has_model=True)
    loaded = SimpleNamespace(module=unet, default_include=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layer starts fresh, nothing is dropped
        network, _, _ = build_adapters(conf, HOST, loaded, torch.device("cpu"))
    file = read_adapter_file(source, REG, adaptable_layers(unet), model=unet)
    assert set(network.paths) == {p for p, m in file.modules.items() if m.params}
    assert set(network.delta_paths) == {p for p, m in file.modules.items() if m.deltas}
    assert set(network.paths) | set(network.delta_paths) == set(ldm_names(unet))
    assert all(layer.algorithm == algorithm for _, layer in network.items())
    patched = load_file(str(FIXTURES / f"{name}_trainlora_{algorithm}_patched.safetensors"))
    network.merge()
    state = unet.state_dict()
    for key, want in patched.items():
        err = float((state[key] - want).abs().max() / want.abs().max())
        assert err <= 1e-4, (key, err)
