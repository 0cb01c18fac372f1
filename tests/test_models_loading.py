"""Loading a model folder holds one copy of the weights: the tensors are those of
diffusers' ``from_pretrained`` (then ``.to(dtype)``, what the engine did before), and
the peak resident memory of a load, measured in a fresh process, stays within 1.1× the
weights' bytes above the process's baseline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraengine.plugins import build_plugin_manager
from loraengine.plugins.models.weights import load_folder
from loraengine.testing import tiny_pipelines as tp
from tests.conftest import child_json

FAMILY_CLASS = {"sd15": "UNet2DConditionModel", "sd2": "UNet2DConditionModel",
                "sdxl": "UNet2DConditionModel", "sd3": "SD3Transformer2DModel",
                "flux": "FluxTransformer2DModel"}


def _load(family: str, dtype: torch.dtype | None, **options):
    host = build_plugin_manager()
    spec = host.registry.get("model", family)
    return spec.load(spec.config_model(**options),
                     {"base_dir": None, "module": None, "dtype": dtype}).module


def _reference(family: str, folder: Path, dtype: torch.dtype | None):
    import diffusers

    ref = getattr(diffusers, FAMILY_CLASS[family]).from_pretrained(str(folder))
    return ref if dtype is None else ref.to(dtype)


def _same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name
    # non-persistent buffers the class builds (not in the state dict) too
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())
    assert ba.keys() == bb.keys()
    for name in ba:
        assert ba[name].dtype == bb[name].dtype and torch.equal(ba[name], bb[name]), name


@pytest.mark.parametrize("family", sorted(FAMILY_CLASS))
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_loaded_tensors_are_those_of_from_pretrained(tmp_path, family, dtype):
    folder = tp.save(family, tmp_path / family)
    sub = folder / ("unet" if FAMILY_CLASS[family].startswith("UNet") else "transformer")
    assert load_folder(__import__("diffusers").__dict__[FAMILY_CLASS[family]], sub,
                       dtype) is not None  # the one-copy reader, not the fallback
    module = _load(family, dtype, path=folder)
    _same_tensors(module, _reference(family, sub, dtype))
    assert not module.training


def test_fp16_file_without_dtype_loads_as_from_pretrained_does(tmp_path):
    from diffusers import UNet2DConditionModel

    from loraengine.testing.models import tiny_unet_config

    torch.manual_seed(0)
    UNet2DConditionModel(**tiny_unet_config()).half().save_pretrained(tmp_path / "unet")
    module = load_folder(UNet2DConditionModel, tmp_path / "unet", None)
    assert module is not None
    _same_tensors(module, UNet2DConditionModel.from_pretrained(str(tmp_path / "unet")))


def test_bin_weights_fall_back_to_from_pretrained(tmp_path):
    from diffusers import UNet2DConditionModel

    from loraengine.testing.models import tiny_unet_config

    torch.manual_seed(0)
    UNet2DConditionModel(**tiny_unet_config()).save_pretrained(
        tmp_path / "unet", safe_serialization=False)
    assert load_folder(UNet2DConditionModel, tmp_path / "unet", None) is None
    module = _load("sd15", torch.bfloat16, path=tmp_path / "unet")
    _same_tensors(module, _reference("sd15", tmp_path / "unet", torch.bfloat16))


# -- peak resident memory of a load, in a fresh process -----------------------------------

CHILD = r"""
import json, sys, torch
from loraengine.plugins import build_plugin_manager

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

path, how, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
host = build_plugin_manager()
spec = host.registry.get("model", "sd15")
options = spec.config_model(path=path)
import accelerate, diffusers  # imported before the baseline, as training has them
cls = diffusers.UNet2DConditionModel
with torch.device("meta"):  # the class's code imported and run once
    cls(**cls.load_config(path + "/unet"))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again from the current RSS
base = status("VmRSS")
if how == "engine":
    module = spec.load(options, {"base_dir": None, "module": None, "dtype": dtype}).module
else:
    module = cls.from_pretrained(path + "/unet").to(dtype)
with torch.no_grad():  # memory-mapped pages count once read; training reads them all
    for t in module.state_dict().values():
        t.sum()
weights = sum(t.numel() * t.element_size() for t in module.state_dict().values())
print(json.dumps({"rise": status("VmHWM") - base, "weights": weights,
                  "largest": max(t.numel() * 4 for t in module.state_dict().values())}))
"""

# ~79M parameters, 316 MB of fp32 weights (the weights well above the process's
# own noise of a few MB)
MID_UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(192, 384, 384),
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                  "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=256, attention_head_dim=8, norm_num_groups=32)


def _peak(folder: Path, how: str, dtype: str) -> dict[str, int]:
    return child_json(CHILD, folder, how, dtype)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux /proc")
def test_load_peak_holds_one_copy_of_the_weights(tmp_path):
    from loraengine.testing.models import save_tiny_unet

    folder = save_tiny_unet(tmp_path / "pipe", config=MID_UNET)
    for dtype in ("float32", "bfloat16"):
        r = _peak(folder, "engine", dtype)
        assert r["weights"] > 20e6
        # one copy of the loaded weights, plus (converting) one tensor in the file's
        # dtype and the module's Python objects: 10% of the weights covers both
        assert r["rise"] <= 1.1 * r["weights"], (dtype, r)
    # the measurement sees extra copies: from_pretrained then .to(bf16) holds the fp32
    # file pages and the bf16 copy (three times the bf16 weights)
    old = _peak(folder, "from_pretrained", "bfloat16")
    assert old["rise"] > 2 * old["weights"], old
