"""Our own reader (``loraengine.apply``, which ``sample``, ``merge`` and ``convert`` share
with ``adapter.existing``) places every key of every file our exporters write, for every
model family: each module goes back on the layer it was trained on with the same ΔW,
and no key of the file is left unread. A file it cannot place whole is an error that
names the file and the layouts it tried, never a silent no-op."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import loraengine
from loraengine.core.adapter import ADAPTABLE, AdapterNetwork
from loraengine.core.adapter.network import select_layers
from loraengine.core.errors import DataError
from loraengine.core.files import in_layout, module_layouts, read_adapter_file
from loraengine.inference import adaptable_layers
from loraengine.plugins import build_plugin_manager
from loraengine.testing import tiny_pipelines as tp
from loraengine.testing import tiny_video as tv
from loraengine.testing.conformance import relative_error

HOST = build_plugin_manager()
REG = HOST.registry
BUILD = {"sd15": lambda: tp.unet(32, seed=0),
         "sdxl": lambda: tp.unet(32, sdxl_pooled=16, linear_proj=True, seed=0),
         "sd3": tp.sd3_transformer, "flux": tp.flux_transformer,
         "flux2": tp.flux2_transformer, "qwen_image": tp.qwen_image_transformer,
         "z_image": tp.z_image_transformer, "lumina2": tp.lumina2_transformer,
         "chroma": tp.chroma_transformer, "hidream": tp.hidream_transformer,
         "wan": tv.wan_transformer, "ltx2": tv.ltx2_transformer,
         "hunyuan_video15": tv.hunyuan_video15_transformer}
#: every format of the registry; Wan's own (``wan_comfyui``) is written for Wan only
EXPORTERS = [n for n in REG.names("exporter") if n != "wan_comfyui"]
CASES = [(f, e) for f in BUILD for e in EXPORTERS] + [("wan", "wan_comfyui")]
ALGORITHMS = ("lora", "loha", "lokr")
#: ΔW read back vs written: the same factors (or slices of them, for a layer ComfyUI
#: fuses), multiplied again in fp32 with α/r folded in or not — a few roundings of
#: products of O(1) values, far under 1e-5 relative
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: make().eval() for name, make in BUILD.items()}


def _network(model: torch.nn.Module, algorithm: str) -> AdapterNetwork:
    """``algorithm`` on every layer the engine adapts (Linear and convolutions), its
    parameters seeded away from the zero of initialisation."""
    spec = REG.get("adapter", algorithm)
    g = torch.Generator().manual_seed(0)
    layers = select_layers(model, ["*"], [], ADAPTABLE)
    options = spec.config_model(**({"factor": 2} if algorithm == "lokr" else {}))
    network = AdapterNetwork({p: spec.create(m, 2, 3.0, options, g)
                              for p, m in layers.items()}, {})
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return network


@pytest.mark.parametrize("family,exporter", CASES, ids=[f"{f}-{e}" for f, e in CASES])
def test_every_key_of_each_exporters_file_is_placed_with_its_delta(models, family,
                                                                   exporter):
    model = models[family]
    ex = REG.get("exporter", exporter)
    layouts = module_layouts(REG, model)
    for algorithm in ALGORITHMS:
        network = _network(model, algorithm)
        written = dict(network.items())
        tensors = ex.to_file(in_layout(network.file_modules(), ex, layouts))
        file = read_adapter_file(tensors, REG, adaptable_layers(model), model=model)
        assert file.unread == (), (algorithm, file.unread[:5])
        assert set(file.modules) == set(written), (algorithm, sorted(
            set(file.modules) ^ set(written))[:5])
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing left over, nothing dropped
            handle = loraengine.apply(copy.deepcopy(model), tensors, host=HOST)
        assert set(handle.modules) == set(written)
        for path, layer in handle.network.items():
            want = written[path].delta_weight().detach()
            got = layer.delta_weight().detach()
            assert relative_error(got, want) <= TOLERANCE, (algorithm, path)


def test_a_file_that_places_nothing_is_an_error_naming_it_and_the_layouts(models, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"some.layer.lora_A.weight": torch.zeros(2, 4)}, str(path))
    with pytest.raises(DataError) as info:
        loraengine.apply(copy.deepcopy(models["hunyuan_video15"]), path, host=HOST)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: no key format matches")
    assert message.endswith("module names tried: the model's own, comfyui")


def test_keys_another_format_holds_beside_the_file_are_an_error_not_dropped(models):
    """A ComfyUI-named HunyuanVideo 1.5 file with a diffusers-named module beside it:
    the reader takes the ComfyUI keys and would otherwise drop the rest unseen."""
    model = models["hunyuan_video15"]
    ex = REG.get("exporter", "comfyui")
    network = _network(model, "lora")
    tensors = ex.to_file(in_layout(network.file_modules(), ex, module_layouts(REG, model)))
    stray = {"transformer.x_embedder.proj.lora_A.weight": torch.zeros(2, 4),
             "transformer.x_embedder.proj.lora_B.weight": torch.zeros(4, 2)}
    with pytest.raises(DataError) as info:
        loraengine.apply(copy.deepcopy(model), {**tensors, **stray}, host=HOST)
    message = str(info.value)
    assert "\n" not in message
    assert "2 key(s) are not read as comfyui keys, as the rest of the file is: " \
        "transformer.x_embedder.proj.lora_A.weight, " \
        "transformer.x_embedder.proj.lora_B.weight" in message
    assert "module names tried: the model's own, comfyui" in message
    # not strict: placed, with the keys left out said in a warning
    with pytest.warns(UserWarning, match="2 key\\(s\\) are not read as comfyui keys"):
        handle = loraengine.apply(copy.deepcopy(model), {**tensors, **stray}, host=HOST,
                                  strict=False)
    assert set(handle.modules) == set(dict(network.items()))


def test_text_encoder_keys_are_a_warning_and_the_denoiser_is_placed(models):
    model = models["sd15"]
    ex = REG.get("exporter", "kohya")
    network = _network(model, "lora")
    tensors = ex.to_file(in_layout(network.file_modules(), ex, module_layouts(REG, model)))
    tensors["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = \
        torch.zeros(2, 32)
    with pytest.warns(UserWarning, match="1 text-encoder module\\(s\\) \\(lora_te_text_model_encoder_layers_0_mlp_fc1\\) are not applied"):
        handle = loraengine.apply(copy.deepcopy(model), tensors, host=HOST)
    assert set(handle.modules) == set(dict(network.items()))


@pytest.mark.parametrize("exporter", ["comfyui", "diffusers"])
def test_adapter_existing_continues_hunyuan_video15_files_with_every_module(exporter,
                                                                              tmp_path):
    """HunyuanVideo 1.5's default (``comfyui``: fused q/k/v, swapped final modulation)
    and its ``diffusers`` export, continued with ``adapter.existing``: every module is
    restored on its layer with the ΔW written, fused ones split back onto q, k and v."""
    import yaml
    from safetensors.torch import save_file

    from loraengine.api import resolve_config
    from loraengine.core.build import build_pipeline
    from loraengine.core.files import save_lora

    folder = tv.save_video_denoiser("hunyuan_video15", tmp_path / "m")
    model = tv.VIDEO_DENOISERS["hunyuan_video15"][1](0)
    network = _network(model, "lora")
    written = dict(network.items())
    ex = REG.get("exporter", exporter)
    path = tmp_path / "lora.safetensors"
    save_lora(path, ex.to_file(in_layout(network.file_modules(), ex,
                                         module_layouts(REG, model))), {})
    channels, width = tv.VIDEO_DENOISERS["hunyuan_video15"][3:5]
    save_file({"latents": torch.zeros(1, channels, 2, 4, 6)}, str(tmp_path / "lat.st"))
    save_file({"cond": torch.zeros(1, 7, width)}, str(tmp_path / "cond.st"))
    cfg = {"model": {"family": "hunyuan_video15", "path": str(folder)},
           "data": {"latents": str(tmp_path / "lat.st"),
                    "conditioning": str(tmp_path / "cond.st")},
           "training": {"steps": 1, "dtype": "fp32"},
           "adapter": {"rank": 2, "dtype": "fp32", "include": ["*"], "existing": str(path)},
           "output": {"dir": str(tmp_path / "out"), "name": "lora", "plot": False}}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(cfg))
    conf, base = resolve_config(tmp_path / "t.yaml", HOST)
    engine = build_pipeline(conf, HOST, base_dir=base)
    try:
        restored = dict(engine.network.items())
        assert set(restored) == set(written)
        for p, layer in restored.items():
            got = layer.delta_weight().detach().float()
            assert relative_error(got, written[p].delta_weight().detach()) <= TOLERANCE, p
    finally:
        engine.close()


def test_not_strict_a_file_of_another_model_is_still_an_error_placing_nothing(models):
    """``strict=False`` lets modules the model lacks go with a warning, but a file of
    which nothing fits is an error naming the file and what was tried."""
    model = models["hunyuan_video15"]
    ex = REG.get("exporter", "comfyui")
    other = models["wan"]
    tensors = ex.to_file(in_layout(_network(other, "lora").file_modules(), ex,
                                   module_layouts(REG, other)))
    with pytest.warns(UserWarning), pytest.raises(DataError) as info:
        loraengine.apply(copy.deepcopy(model), tensors, host=HOST, strict=False)
    message = str(info.value)
    assert "\n" not in message and "module(s) are not layers of this model" in message
    assert "module names tried: the model's own, comfyui" in message
