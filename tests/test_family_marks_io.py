"""A file made for one transformer family, given to another family's model: the error
is one line that names the family the file looks made for (from each family's record:
``Family.known_as``/``marks``), in every layout our exporters write (diffusers/PEFT,
ComfyUI, kohya). Files written by our own exporters from tiny models of the real
diffusers classes, read through ``loraengine.apply``, ``loraengine merge`` and
``adapter.existing``."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import save_file

import loraengine
from loraengine.api import resolve_config
from loraengine.cli.main import cli
from loraengine.core.adapter import ADAPTABLE, AdapterNetwork
from loraengine.core.adapter.network import select_layers
from loraengine.core.build import build_pipeline
from loraengine.core.errors import DataError
from loraengine.core.files import in_layout, looks_like, module_layouts, save_lora
from loraengine.plugins import build_plugin_manager
from loraengine.plugins.models import TRANSFORMERS, flux
from loraengine.plugins.models.comfy_names import comfyui_layouts
from loraengine.testing import tiny_pipelines as tp
from loraengine.testing import tiny_video as tv

HOST = build_plugin_manager()
REG = HOST.registry
FAMILIES = {f.name: f for f in TRANSFORMERS}
BUILD = {"sd3": tp.sd3_transformer, "flux": tp.flux_transformer,
         "flux2": tp.flux2_transformer, "qwen_image": tp.qwen_image_transformer,
         "z_image": tp.z_image_transformer, "lumina2": tp.lumina2_transformer,
         "chroma": tp.chroma_transformer, "hidream": tp.hidream_transformer,
         "wan": tv.wan_transformer, "ltx2": tv.ltx2_transformer,
         "hunyuan_video15": tv.hunyuan_video15_transformer}


def _phrase(name: str) -> str:
    return FAMILIES[name].known_as + " transformer"


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: make().eval() for name, make in BUILD.items()}


@pytest.fixture(scope="module")
def files(models, tmp_path_factory):
    """``files(family, exporter)``: a LoRA file over the family's default layers as that
    exporter writes it (made once)."""
    root, made = tmp_path_factory.mktemp("family-files"), {}
    spec = REG.get("adapter", "lora")

    def make(family: str, exporter: str):
        if (family, exporter) not in made:
            model = models[family]
            layers = select_layers(model, list(FAMILIES[family].default_include), [],
                                   ADAPTABLE)
            g = torch.Generator().manual_seed(0)
            network = AdapterNetwork({p: spec.create(m, 1, 1.0, spec.config_model(), g)
                                      for p, m in layers.items()}, {})
            ex = REG.get("exporter", exporter)
            tensors = ex.to_file(in_layout(network.file_modules(), ex,
                                           module_layouts(REG, model)))
            path = root / f"{family}-{exporter}.safetensors"
            save_lora(path, tensors, {})
            made[family, exporter] = path
        return made[family, exporter]

    return make


def _weight_names(model) -> list[str]:
    return [n for n, m in model.named_modules()
            if isinstance(getattr(m, "weight", None), torch.Tensor)]


@pytest.mark.parametrize("family", sorted(BUILD))
def test_a_familys_own_layer_names_in_every_layout_look_like_it(models, family):
    """Its diffusers names, as PEFT (``transformer.``) and kohya
    (``lora_transformer_``, ``lora_unet_``) write them, name exactly this family; its
    ComfyUI names (``diffusion_model.``) name it among the families whose ComfyUI
    layers are named alike."""
    names = _weight_names(models[family])
    want = _phrase(family)
    assert looks_like(REG, names) == want
    assert looks_like(REG, [f"transformer.{n}" for n in names]) == want
    for prefix in ("lora_transformer_", "lora_unet_"):
        assert looks_like(REG, [prefix + n.replace(".", "_") for n in names]) == want
    comfy = comfyui_layouts(models[family]).get("comfyui")
    if comfy:
        native = sorted({v.partition("#")[0] for v in comfy.values()})
        found = looks_like(REG, [f"diffusion_model.{n}" for n in native])
        assert found is not None and found.endswith(" transformer")
        named = FAMILIES[family].known_as.partition(" ")[2]
        assert named in re.split(r", | or ", found.partition(" ")[2][:-len(" transformer")])


def test_original_checkpoint_names_in_kohya_form_name_their_family():
    """Trainers that write the original checkpoints' names in kohya form (sd-scripts for
    FLUX.1: ``lora_unet_double_blocks_0_img_attn_qkv``; Wan's original names)."""
    flux_names = [f"lora_unet_double_blocks_{i}_{part}" for i in range(2)
                  for part in ("img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mod_lin",
                               "txt_attn_qkv", "txt_mod_lin")] + \
        [f"lora_unet_single_blocks_{i}_{part}" for i in range(3)
         for part in ("linear1", "linear2", "modulation_lin")]
    assert looks_like(REG, flux_names) == "a FLUX.1 transformer"
    # without the modulation layers, FLUX.1, Chroma and Flux.2 name them alike
    shared = [n for n in flux_names if "mod" not in n]
    assert looks_like(REG, shared) == "a FLUX.1, Flux.2 or Chroma transformer"
    wan_names = [f"lora_unet_blocks_{i}_{a}_{p}" for i in range(2)
                 for a in ("self_attn", "cross_attn") for p in "qkvo"]
    assert looks_like(REG, wan_names) == "a Wan 2.x transformer"


def test_names_of_no_family_name_none():
    assert looks_like(REG, ["foo.bar", "lora_unet_baz_qux", "transformer.blocks_x"]) is None
    assert looks_like(REG, []) is None


#: (file's family, its exporter, model's family, the family the error names)
PAIRS = [
    ("flux", "diffusers", "flux2", "flux"),
    # (Flux.2's diffusers export is in the released checkpoint's names, which FLUX.1's
    # ComfyUI names share: test_a_flux2_default_file_on_flux1_fails_in_one_line)
    ("flux2", "kohya", "flux", "flux2"),
    ("flux", "diffusers", "chroma", "flux"),
    ("flux", "kohya", "hunyuan_video15", "flux"),
    ("sd3", "comfyui", "wan", "sd3"),
    ("qwen_image", "diffusers", "sd3", "qwen_image"),
    ("qwen_image", "kohya", "hidream", "qwen_image"),
    ("z_image", "diffusers", "lumina2", "z_image"),
    ("lumina2", "kohya", "z_image", "lumina2"),
    ("hidream", "diffusers", "flux", "hidream"),
    ("hidream", "comfyui", "ltx2", "hidream"),
    ("wan", "comfyui", "ltx2", "wan"),
    ("wan", "kohya", "sd3", "wan"),
    ("ltx2", "diffusers", "wan", "ltx2"),
    ("flux2", "comfyui", "qwen_image", None),
    ("chroma", "kohya", "sd3", None),
    ("hunyuan_video15", "diffusers", "qwen_image", None),
]
#: files whose layers carry the same names in several families name all of them
TIES = {("flux2", "comfyui"): "a FLUX.1, Flux.2 or Chroma transformer",
        ("chroma", "kohya"): "a FLUX.1 or Chroma transformer",
        ("hunyuan_video15", "diffusers"): "an SD3, FLUX.1 or HunyuanVideo 1.5 transformer"}


@pytest.mark.parametrize("theirs,exporter,ours,named", PAIRS,
                         ids=[f"{a}-{e}-on-{b}" for a, e, b, _ in PAIRS])
def test_a_file_for_another_family_says_which(models, files, theirs, exporter, ours,
                                              named):
    path = files(theirs, exporter)
    with pytest.raises(DataError) as info:
        loraengine.apply(copy.deepcopy(models[ours]), path, host=HOST)
    message = str(info.value)
    assert "\n" not in message
    assert "module(s) are not layers of this model" in message
    want = _phrase(named) if named else TIES[theirs, exporter]
    assert message.endswith(f"; the file looks made for {want}"), message
    tried = re.search(r"module names tried: ([^)]*)\)", message).group(1)
    assert tried.split(", ")[0] == "the model's own"
    assert ("comfyui" in tried) == bool(comfyui_layouts(models[ours]))
    # on its own family's model every module is placed
    loraengine.apply(copy.deepcopy(models[theirs]), path, host=HOST).remove()


def test_a_flux2_default_file_on_flux1_fails_in_one_line(models, files):
    """Flux.2's default file names its layers as the released checkpoint does, which
    FLUX.1's ComfyUI layout shares for the blocks: on a FLUX.1 model the shared names
    are tried there and the first that does not fit is named, in one line."""
    with pytest.raises(DataError) as info:
        loraengine.apply(copy.deepcopy(models["flux"]), files("flux2", "diffusers"), host=HOST)
    message = str(info.value)
    assert "\n" not in message and "flux2-diffusers.safetensors: module " in message
    loraengine.apply(copy.deepcopy(models["flux2"]), files("flux2", "diffusers"),
                     host=HOST).remove()


def test_a_file_of_the_models_own_family_but_more_blocks_names_no_other(models, files):
    """A FLUX.1 file on a FLUX.1 model with fewer blocks (here: no single blocks): the
    extra blocks are named, and no other family is."""
    small = copy.deepcopy(models["flux"])
    small.single_transformer_blocks = torch.nn.ModuleList()
    with pytest.raises(DataError) as info:
        loraengine.apply(small, files("flux", "diffusers"), host=HOST)
    message = str(info.value)
    assert "single_transformer_blocks.0." in message
    assert "looks made for" not in message


def test_a_file_that_fits_nothing_names_its_keys_and_the_layouts_tried(models, tmp_path):
    g = torch.Generator().manual_seed(0)
    read = tmp_path / "odd.safetensors"  # a key format reads it, no layer has its names
    save_file({f"transformer.nothing_{i}.lora_A.weight": torch.randn(1, 4, generator=g)
               for i in range(3)} |
              {f"transformer.nothing_{i}.lora_B.weight": torch.randn(4, 1, generator=g)
               for i in range(3)}, str(read))
    with pytest.raises(DataError) as info:
        loraengine.apply(copy.deepcopy(models["flux"]), read, host=HOST)
    message = str(info.value)
    assert "\n" not in message and "nothing_0" in message
    assert "module names tried: the model's own, comfyui" in message
    assert "looks made for" not in message
    unread = tmp_path / "unread.safetensors"  # no key format reads it at all
    save_file({"some.tensor": torch.zeros(2), "other.tensor": torch.zeros(2)}, str(unread))
    with pytest.raises(DataError) as info:
        loraengine.apply(copy.deepcopy(models["flux"]), unread, host=HOST)
    message = str(info.value)
    assert "other.tensor, some.tensor" in message
    tried = re.search(r"key formats tried: ([^)]*)\)", message).group(1).split(", ")
    assert {"diffusers", "peft", "kohya", "comfyui"} <= set(tried)


def test_a_comfyui_fused_layer_of_another_width_is_refused_by_name(models, files):
    """Lumina 2's and Z-Image's ComfyUI layers share names (``layers.N.attention.qkv``);
    a fused module with another number of rows is refused, naming it."""
    with pytest.raises(DataError, match=r"layers\.0\.attention\.qkv: lora_up\.weight has "
                                        r"\d+ rows where this model's fused layer has \d+"):
        loraengine.apply(copy.deepcopy(models["z_image"]), files("lumina2", "comfyui"),
                         host=HOST)


@pytest.fixture(scope="module")
def flux2_folder(tmp_path_factory):
    return tp.save_denoiser("flux2", tmp_path_factory.mktemp("flux2"))


def test_merge_of_a_file_for_another_family_exits_with_one_line(files, flux2_folder,
                                                                  tmp_path):
    result = CliRunner().invoke(cli, ["merge", "--model", str(flux2_folder), "--lora",
                                      str(files("flux", "diffusers")), "--out",
                                      str(tmp_path / "merged")])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert lines[0].endswith("the file looks made for a FLUX.1 transformer")
    assert not (tmp_path / "merged").exists()


def test_adapter_existing_for_another_family_says_which(files, flux2_folder, tmp_path):
    _, _, _, channels, width = tp.DENOISERS["flux2"]
    g = torch.Generator().manual_seed(0)
    save_file({"latents": torch.randn(2, channels, 4, 4, generator=g)},
              str(tmp_path / "lat.st"))
    save_file({"cond": torch.randn(2, 5, width, generator=g)}, str(tmp_path / "cond.st"))
    cfg = {"model": {"family": "flux2", "path": str(flux2_folder)},
           "data": {"latents": str(tmp_path / "lat.st"),
                    "conditioning": str(tmp_path / "cond.st")},
           "training": {"steps": 1, "batch_size": 1, "dtype": "fp32"},
           "adapter": {"rank": 1, "existing": str(files("qwen_image", "diffusers"))},
           "output": {"dir": str(tmp_path / "out"), "name": "lora", "plot": False}}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    conf, base = resolve_config(path, HOST)
    with pytest.raises(DataError) as info:
        build_pipeline(conf, HOST, base_dir=base)
    message = str(info.value)
    assert "\n" not in message and "not adapted layers of this model" in message
    assert message.endswith("the file looks made for a Qwen-Image transformer")


FIXTURES = Path(__file__).parent / "fixtures" / "interop"
#: files ComfyUI's own TrainLoraNode wrote (``tests/fixtures/interop``), the model they
#: are given to, and the family the error names
TRAINLORA = [("flux", "qwen_image", "a FLUX.1 transformer"),
             ("chroma", "sd3", "a Chroma transformer"),
             ("sd3", "flux", "an SD3 transformer"),
             ("qwen_image", "wan", "a Qwen-Image transformer"),
             ("hidream", "lumina2", "a HiDream-I1 transformer"),
             ("lumina2", "flux", "a Z-Image or Lumina 2 transformer"),
             ("flux2", "qwen_image", "a Flux.2 transformer"),
             ("z_image", "flux", "a Z-Image or Lumina 2 transformer"),
             ("sd15", "flux", "an SD1.x/2.x UNet"),
             ("sdxl", "wan", "an SDXL UNet"),
             ("flux", "unet", "a FLUX.1 transformer")]


@pytest.mark.parametrize("made_for,ours,named", TRAINLORA,
                         ids=[f"{a}-on-{b}" for a, b, _ in TRAINLORA])
def test_a_trainloranode_file_for_another_family_says_which(models, made_for, ours, named):
    """ComfyUI's files (``diffusion_model.<its names>``, ``lora_up.weight`` / ``.alpha``
    / ``.diff_b`` per module) are grouped into whole modules and named by family."""
    from diffusers import UNet2DConditionModel

    from loraengine.testing.models import tiny_unet_config

    model = UNet2DConditionModel(**tiny_unet_config()) if ours == "unet" else \
        copy.deepcopy(models[ours])
    with pytest.raises(DataError) as info:
        loraengine.apply(model, FIXTURES / f"{made_for}_trainlora_lora.safetensors",
                         host=HOST)
    message = str(info.value)
    assert "\n" not in message and "read as comfyui keys" in message
    first = re.search(r"not layers of this model: ([^ ]+),", message).group(1)
    assert not first.endswith((".lora_up", ".lora_down")), message  # whole modules
    assert message.endswith(f"; the file looks made for {named}"), message


def test_a_family_record_with_marks_names_its_files_on_its_own(models):
    """A family made with ``make_spec`` outside the built-in list (a plugin's) answers
    ``looks_like`` from its own record; without marks it does not answer."""
    import dataclasses

    from loraengine.plugins.models.common import make_spec

    names = _weight_names(models["flux"])
    spec = make_spec(dataclasses.replace(flux.FLUX, name="my_flux"))
    assert spec.looks_like is not None and spec.looks_like(names) == "a FLUX.1 transformer"
    assert spec.looks_like(_weight_names(models["wan"])) is None
    assert make_spec(dataclasses.replace(flux.FLUX, marks=())).looks_like is None
