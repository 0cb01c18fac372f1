"""The LDM <-> diffusers module map of UNet families, on tiny UNets with the real block
layouts of SD1.5 and SDXL (and the suite's two-level tiny UNet)."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from loraengine.plugins.models.unet_names import LDM, SAI, ldm_names, unet_layouts
from loraengine.testing.models import (
    sd15_structure_unet_config,
    sdxl_structure_unet_config,
    tiny_unet_config,
)
from loraengine.testing.tiny_pipelines import unet_to_original

CONFIGS = {"sd15": sd15_structure_unet_config, "sdxl": sdxl_structure_unet_config,
           "tiny": tiny_unet_config}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def unet(request: pytest.FixtureRequest) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**CONFIGS[request.param]())


def _weighted(unet: torch.nn.Module) -> list[str]:
    return [n for n, m in unet.named_modules()
            if isinstance(getattr(m, "weight", None), torch.Tensor)]


def test_every_weighted_module_maps_one_to_one(unet: UNet2DConditionModel) -> None:
    names = ldm_names(unet)
    modules = _weighted(unet)
    assert sorted(names) == sorted(modules)
    assert len(set(names.values())) == len(names)  # bijective
    assert not set(names.values()) & set(modules)  # two separate namespaces


def test_the_whole_state_dict_survives_diffusers_single_file_conversion(
        unet: UNet2DConditionModel) -> None:
    """Rename the model's state dict with the map (weights and biases), convert it back
    with the converter from_single_file uses: every tensor lands on its own key."""
    names = ldm_names(unet)
    sd = unet.state_dict()
    ldm = {}
    for key, tensor in sd.items():
        module, _, param = key.rpartition(".")
        ldm[f"model.diffusion_model.{names[module]}.{param}"] = tensor
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert sorted(back) == sorted(sd)
    assert all(back[k] is sd[k] or torch.equal(back[k], sd[k]) for k in sd)


def test_agrees_with_the_suites_own_single_file_writer(unet: UNet2DConditionModel) -> None:
    """The tiny single-file checkpoints of the model tests are written by an independent
    rename; the map gives the same name for every weight."""
    names = ldm_names(unet)
    sd = {k: v for k, v in unet.state_dict().items() if k.endswith(".weight")}
    orig = unet_to_original(sd, unet.config, prefix="")
    ours = {f"{names[k[:-len('.weight')]]}.weight" for k in sd}
    assert ours == set(orig)


def test_layouts_offer_sai_names_only_for_sdxl() -> None:
    sd15 = UNet2DConditionModel(**sd15_structure_unet_config())
    sdxl = UNet2DConditionModel(**sdxl_structure_unet_config())
    assert set(unet_layouts(sd15)) == {LDM}
    assert set(unet_layouts(sdxl)) == {LDM, SAI}
    assert unet_layouts(sdxl)[SAI]["down_blocks.1.attentions.0.proj_in"] == \
        "input_blocks.4.1.proj_in"
    assert unet_layouts(torch.nn.Linear(2, 2)) == {}
