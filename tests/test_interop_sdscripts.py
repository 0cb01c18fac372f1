"""The ``kohya`` export for SDXL names its modules as sd-scripts does.

The fixture (tests/fixtures/interop/make_sdscripts_fixtures.py) lists the LoRA modules
sd-scripts' ``LoRANetwork`` creates on its own SDXL UNet, with their weight shapes. Both
UNets are built at SDXL's real size on the meta device (nothing allocated)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

FIXTURE = Path(__file__).parent / "fixtures" / "interop" / "sdxl_sdscripts_lora_names.json"

#: stabilityai/stable-diffusion-xl-base-1.0's unet/config.json (the layout that matters)
SDXL_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    norm_num_groups=32)


def our_kohya_tensors() -> dict[str, torch.Tensor]:
    """A rank-1 LoRA file (zeros) in the ``kohya`` layout on every layer the ``sdxl``
    family adapts by default, as the trainer would write it."""
    from diffusers import UNet2DConditionModel

    from loraengine.core.adapter import ADAPTABLE
    from loraengine.core.adapter.network import select_layers
    from loraengine.core.files import in_layout, module_layouts
    from loraengine.plugins import build_plugin_manager
    from loraengine.plugins.models.unet import UNET_TARGETS

    reg = build_plugin_manager().registry
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_CONFIG)
    modules = {}
    for path, layer in select_layers(unet, list(UNET_TARGETS), [], ADAPTABLE).items():
        out, inp, *kernel = layer.weight.shape
        modules[path] = {"lora_down.weight": torch.zeros(1, inp, *kernel),
                         "lora_up.weight": torch.zeros(out, 1, *[1] * len(kernel)),
                         "alpha": torch.tensor(1.0)}
    exporter = reg.get("exporter", "kohya")
    return exporter.to_file(in_layout(modules, exporter, module_layouts(reg, unet)))


@pytest.mark.slow  # SDXL's full module tree, built twice on the meta device (~15 s)
def test_sdxl_kohya_export_has_exactly_sd_scripts_module_names_and_shapes():
    theirs = json.loads(FIXTURE.read_text())["unet_loras"]
    ours = our_kohya_tensors()
    stems = {k.split(".", 1)[0] for k in ours}
    assert stems == set(theirs)
    for stem, shape in theirs.items():
        down, up = ours[f"{stem}.lora_down.weight"], ours[f"{stem}.lora_up.weight"]
        assert [up.shape[0], down.shape[1], *down.shape[2:]] == shape, stem
