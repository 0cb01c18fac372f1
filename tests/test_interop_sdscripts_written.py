"""Files sd-scripts' trainer writes load here and merge to what sd-scripts merges.

tests/fixtures/interop/make_sdscripts_written_fixtures.py (sd-scripts commit 48d368f)
built ``networks/lora.py``'s network as train_network.py does (LoRA on the attention
and feed-forward layers, and on the resnets' 3x3 convolutions: ``conv_dim``), gave it
seeded factors, wrote it with ``LoRANetwork.save_weights`` (fp16 at rank 4, fp32 and
bf16 at rank 1, with training metadata) and merged it with sd-scripts' own ``merge_to``. CI
cannot fetch sd-scripts, so these tests read what the script wrote:

- SD1.5 (the SD1.5-structured tiny diffusers UNet): the files themselves, and each
  patched weight as its first row and its product with seeded probes; the fp16 file
  also has LoRA on the text encoder (``lora_te_*``, sd-scripts' default), which
  loraengine does not adapt: every reader says so, and ``convert`` carries those
  modules unchanged to the consumers that read them;
- SDXL (sd-scripts' own SDXL UNet, on the meta device): every key's shape and the
  metadata (``lora_te1_``/``lora_te2_`` modules included), and for one layer of each kind the file's tensors, the seeded base weight
  (``base_weight``) and the same summary of the patched weight.

Tolerance: both sides read the same stored factors (fp16, bf16 or fp32) and upcast them
exactly, so the only difference is fp32 rounding of ΔW = up·down·α/r and of W + ΔW in
possibly different orders — a few ulps (~1e-7) of the largest weight, and the probe
products (fp64 sums of fp32 weights times Gaussian probes) inherit that relative size.
1e-5 leaves a wide margin below the 1e-4 the interop issue asks for.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import fixture_script
from diffusers import UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file

import loraengine
from loraengine.core.files import read_adapter_file
from loraengine.inference import adaptable_layers
from loraengine.plugins import build_plugin_manager
from loraengine.plugins.models.unet_names import ldm_names
from loraengine.testing.models import (
    save_tiny_unet,
    save_tiny_unet_data,
    sd15_structure_unet_config,
)

HERE = Path(__file__).parent / "fixtures" / "interop"
HOST = build_plugin_manager()
REG = HOST.registry
TOL = 1e-5
SD15 = ("fp16", "fp32", "bf16")


def _script():
    return fixture_script("make_sdscripts_written_fixtures")


MAKE = _script()


def _unet() -> UNet2DConditionModel:
    torch.manual_seed(0)  # as the fixture script builds it
    return UNet2DConditionModel(**sd15_structure_unet_config()).eval()


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


def _patched(name: str) -> tuple[list[str], dict[str, torch.Tensor]]:
    path = HERE / f"sd15_sdscripts_written_{name}_patched.safetensors"
    with safe_open(str(path), "pt") as f:
        layers = json.loads(f.metadata()["layers"])
    return layers, load_file(str(path))


def _unet_stems(source: Path) -> set[str]:
    return {k.split(".", 1)[0] for k in load_file(str(source)) if k.startswith("lora_unet_")}


def _te_warning(source: Path, what: str) -> list[str]:
    """The line every reader gives for the file's text-encoder modules (none for a
    UNet-only file)."""
    names = sorted({k.split(".", 1)[0] for k in load_file(str(source))
                    if k.startswith("lora_te_")})
    if not names:
        return []
    return [f"{source}: {len(names)} text-encoder module(s) ({names[0]}, {names[1]} ...) "
            f"are not {what}: loraengine adapts the denoiser only"]


def _matches_sd_scripts(state: dict[str, torch.Tensor], name: str) -> None:
    """Every weight sd-scripts patched, in ``state``, against its pinned summary."""
    layers, summary = _patched(name)
    for index, key in enumerate(layers):
        flat = state[key].detach().flatten(1)
        rows = summary[f"{key}.rows"]
        assert _rel(flat[:len(rows)], rows) <= TOL, key
        probes = MAKE.probes(flat.shape[1], index)
        ours = (flat.double() @ probes.double()).float()
        assert _rel(ours, summary[f"{key}.probes"]) <= TOL, key


def test_the_files_are_what_sd_scripts_writes():
    """The fixtures' own shape: sd-scripts' key names and 0-d alphas, the save dtype,
    its metadata and additional-networks hashes."""
    for name, dtype in (("fp16", torch.float16), ("fp32", torch.float32),
                        ("bf16", torch.bfloat16)):
        path = HERE / f"sd15_sdscripts_written_{name}.safetensors"
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        assert meta["ss_sd_scripts_commit_hash"] == "48d368f"
        assert meta["ss_network_module"] == "networks.lora"
        assert {"sshs_model_hash", "sshs_legacy_hash"} <= set(meta)
        prefixes = ("lora_unet_", "lora_te_") if name == "fp16" else ("lora_unet_",)
        assert all(k.startswith(prefixes) for k in tensors)
        assert any(k.startswith(prefixes[-1]) for k in tensors)
        assert {v.dtype for v in tensors.values()} == {dtype}
        alphas = [v for k, v in tensors.items() if k.endswith(".alpha")]
        assert len(alphas) * 3 == len(tensors) and all(a.dim() == 0 for a in alphas)
        # LoCon: the resnets' 3x3 convolutions are in the file
        assert any(k.endswith("resnets_0_conv1.lora_down.weight") for k in tensors)
        assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape[2:] \
            == (3, 3)


@pytest.mark.parametrize("name", SD15)
def test_sd15_file_places_every_module_and_merges_as_sd_scripts_does(name):
    unet = _unet()
    source = HERE / f"sd15_sdscripts_written_{name}.safetensors"
    layers = adaptable_layers(unet)
    file = read_adapter_file(source, REG, layers, model=unet)
    stems = _unet_stems(source)
    assert file.not_in(layers) == []
    assert len(file.modules) == len(stems)  # every UNet module of the file, on a layer
    assert all(m.algorithm == "lora" for m in file.modules.values())
    base = unet.state_dict()
    model = copy.deepcopy(unet)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = loraengine.apply(model, source, mode="merge", host=HOST)
    assert [str(w.message) for w in caught] == _te_warning(source, "applied")
    assert len(handle.algorithms) == len(stems)
    state = model.state_dict()
    changed = sorted(k for k, v in state.items() if not torch.equal(v, base[k]))
    # we change exactly the weights sd-scripts changed, to the same values
    assert changed == _patched(name)[0]
    _matches_sd_scripts(state, name)


def _train_config(tmp_path: Path, existing: Path, steps: int) -> Path:
    folder = save_tiny_unet(tmp_path / "pipe", seed=0, config=sd15_structure_unet_config())
    lat, cond = save_tiny_unet_data(tmp_path / "data")
    cfg = {"model": {"family": "sd15", "path": str(folder)},
           "data": {"latents": str(lat), "conditioning": str(cond)},
           "training": {"steps": steps, "batch_size": 2, "dtype": "fp32", "seed": 0},
           "optimizer": {"lr": 1e-4},
           "adapter": {"rank": 4, "alpha": 2, "dtype": "fp32", "existing": str(existing)},
           "memory": {"gradient_checkpointing": False},
           "output": {"dir": str(tmp_path / "out"), "name": "cont", "plot": False}}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_sd15_file_as_adapter_existing_starts_from_sd_scripts_weights(tmp_path):
    """``adapter.existing``: the network built from the sd-scripts file, merged before
    any step, gives sd-scripts' patched weights; a short run continuing it trains and
    writes a file."""
    from loraengine.api import resolve_config
    from loraengine.cli.main import cli
    from loraengine.core.build import build_pipeline

    source = HERE / "sd15_sdscripts_written_fp16.safetensors"
    config = _train_config(tmp_path, source, steps=2)
    conf, base_dir = resolve_config(config, HOST)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = build_pipeline(conf, HOST, base_dir=base_dir)
    assert _te_warning(source, "trained or written to the output")[0] in \
        [str(w.message) for w in caught]
    try:
        stems = _unet_stems(source)
        assert len(engine.network.paths) == len(stems)
        engine.network.merge()
        _matches_sd_scripts(engine.model.state_dict(), "fp16")
    finally:
        engine.close()
    result = CliRunner().invoke(cli, ["train", str(config), "-q"])
    assert result.exit_code == 0, result.output
    # one line, as the CLI gives its warnings
    assert f"warning: {_te_warning(source, 'trained or written to the output')[0]}\n" \
        in result.output
    out = load_file(str(tmp_path / "out" / "cont.safetensors"))
    assert len({k.split(".", 1)[0] for k in out if ".lora_" in k}) == len(stems)


def test_inspect_and_convert_take_the_sd_scripts_file(tmp_path):
    from loraengine.cli.main import cli

    source = HERE / "sd15_sdscripts_written_fp16.safetensors"
    runner = CliRunner()
    shown = runner.invoke(cli, ["inspect", str(source)])
    assert shown.exit_code == 0, shown.output
    assert "Traceback" not in shown.output
    assert "modules:     277\n" in shown.output  # the UNet's
    assert "text encoder: 12 module(s)" in shown.output
    assert "ss_network_module: networks.lora" in shown.output
    folder = save_tiny_unet(tmp_path / "pipe", seed=0, config=sd15_structure_unet_config())
    out = tmp_path / "comfy.safetensors"
    done = runner.invoke(cli, ["convert", str(source), "--to", "comfyui", "--model",
                               str(folder), "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert "Traceback" not in done.output
    comfy = load_file(str(out))
    theirs = load_file(str(source))
    # the UNet in ComfyUI's layout, the text encoder's modules as sd-scripts wrote them
    # (ComfyUI's model_lora_keys_clip reads lora_te_text_model_encoder_layers_*)
    te = {k: v for k, v in theirs.items() if k.startswith("lora_te_text_model_encoder_")}
    assert te and all(torch.equal(comfy[k], v) for k, v in te.items())
    assert all(k.startswith("diffusion_model.") for k in comfy if k not in te)
    # the converted file merges to the same weights
    model = _unet()
    with pytest.warns(UserWarning, match="text-encoder module"):
        loraengine.apply(model, out, mode="merge", host=HOST)
    _matches_sd_scripts(model.state_dict(), "fp16")
    # diffusers reads one layout per file: the text encoder's modules are left out, and
    # convert says so
    done = runner.invoke(cli, ["convert", str(source), "--to", "diffusers", "--model",
                               str(folder), "--out", str(tmp_path / "d.safetensors")])
    assert done.exit_code == 0, done.output
    assert "12 text-encoder module(s)" in done.output and "Traceback" not in done.output
    assert not any(k.startswith("lora_te") for k in load_file(str(tmp_path / "d.safetensors")))


def test_merge_says_the_text_encoder_modules_are_not_merged(tmp_path):
    from loraengine.cli.main import cli

    source = HERE / "sd15_sdscripts_written_fp16.safetensors"
    folder = save_tiny_unet(tmp_path / "pipe", seed=0, config=sd15_structure_unet_config())
    done = CliRunner().invoke(cli, ["merge", "--model", str(folder), "--lora", str(source), "--out",
                                    str(tmp_path / "merged")])
    assert done.exit_code == 0, done.output
    assert f"warning: {_te_warning(source, 'merged')[0]}" in done.output
    merged = UNet2DConditionModel.from_pretrained(str(tmp_path / "merged" / "unet"))
    _matches_sd_scripts(merged.state_dict(), "fp16")


# -- SDXL --------------------------------------------------------------------------------

SDXL = json.loads((HERE / "sdxl_sdscripts_written.json").read_text())


def _sdxl_meta_unet() -> UNet2DConditionModel:
    from test_interop_sdscripts import SDXL_CONFIG

    with torch.device("meta"):
        return UNet2DConditionModel(**SDXL_CONFIG)


def test_sdxl_fixture_is_sd_scripts_fp16_file():
    assert SDXL["sd_scripts_commit"] == "48d368f"
    assert SDXL["dtypes"] == ["torch.float16"]
    assert SDXL["metadata"]["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    stems = {k.split(".", 1)[0] for k in SDXL["keys"] if k.startswith("lora_unet_")}
    # the same modules sd-scripts' SDXL network has in the older names fixture
    names = json.loads((HERE / "sdxl_sdscripts_lora_names.json").read_text())["unet_loras"]
    assert stems == set(names)
    assert set(SDXL["layers"]) <= stems


def test_sdxl_file_places_every_module_with_its_shape():
    unet = _sdxl_meta_unet()
    layers = adaptable_layers(unet)
    # the file's tensors (zeros: only names and shapes matter here), as sd-scripts
    # wrote them
    tensors = {k: torch.zeros(s, dtype=torch.float16) for k, s in SDXL["keys"].items()}
    file = read_adapter_file(tensors, REG, layers, model=unet, metadata=SDXL["metadata"])
    assert file.not_in(layers) == []
    unet_keys = [k for k in SDXL["keys"] if k.startswith("lora_unet_")]
    assert len(file.modules) == len(unet_keys) // 3
    # both text encoders' modules, which no reader puts on the UNet, are named as such
    te = file.text_encoder_modules
    assert len(te) * 3 == len(SDXL["keys"]) - len(unet_keys)
    assert {n.split("_")[1] for n in te} == {"te1", "te2"}
    for path, module in file.modules.items():
        weight = unet.get_submodule(path).weight
        down, up = module.params["lora_down.weight"], module.params["lora_up.weight"]
        assert (up.shape[0], down.shape[1], *down.shape[2:]) == tuple(weight.shape), path


@pytest.mark.slow
def test_sdxl_layers_of_every_kind_merge_as_sd_scripts_does():
    """Our merge (``loraengine.apply``) of the checked layers' tensors from the
    sd-scripts file, on the diffusers SDXL UNet with only those layers materialised
    with the same seeded base weights, equals sd-scripts' merge."""
    unet = _sdxl_meta_unet()
    stored = load_file(str(HERE / "sdxl_sdscripts_written_layers.safetensors"))
    by_stem = {"lora_unet_" + ldm.replace(".", "_"): path
               for path, ldm in ldm_names(unet).items()}
    tensors = {k: v for k, v in stored.items() if not k.endswith((".rows", ".probes"))}
    paths = {}
    for index, stem in enumerate(SDXL["layers"]):
        path = by_stem[stem]
        paths[stem] = path
        layer = unet.get_submodule(path)
        layer.to_empty(device="cpu")
        with torch.no_grad():
            layer.weight.copy_(MAKE.base_weight(layer.weight.shape, index))
            if layer.bias is not None:
                layer.bias.zero_()
    handle = loraengine.apply(unet, tensors, mode="merge", host=HOST)
    assert len(handle.algorithms) == len(SDXL["layers"])
    for index, stem in enumerate(SDXL["layers"]):
        flat = unet.get_submodule(paths[stem]).weight.detach().flatten(1)
        assert _rel(flat[:1], stored[f"{stem}.rows"]) <= TOL, stem
        ours = (flat.double() @ MAKE.probes(flat.shape[1], index).double()).float()
        assert _rel(ours, stored[f"{stem}.probes"]) <= TOL, stem


def test_the_docs_say_what_these_tests_check():
    docs = (Path(__file__).parents[1] / "docs" / "compatibility.md").read_text()
    part = docs.split("### Files sd-scripts writes", 1)[1].split("\n### ", 1)[0]
    stems = {k.split(".", 1)[0] for k in SDXL["keys"] if k.startswith("lora_unet_")}
    assert f"all {len(stems)}\nmodules" in part or f"all {len(stems)} modules" in part
    assert "test_interop_sdscripts_written.py" in part and "48d368f" in part
