"""loraengine's files for SD3 and FLUX.1 in Forge and LyCORIS, as those programs' own
loaders read them: tests/fixtures/interop/make_webui_lycoris_transformer_fixtures.py ran
Forge's loader and patcher (on Forge's own model classes at the tiny sizes) and
LyCORIS's ``create_network_from_weights`` + ``merge_to`` for every case of
test_merge_matrix.MATRIX on the tiny transformers; CI cannot fetch Forge, so it reads
what the script wrote.

Tolerance for "exact", as in test_interop_webui_lycoris: an element of W + ΔW is a sum
of at most n = 512 fp32 products here (the widest fan-in, SD3's 4·128 MLP input); two
programs summing in different orders differ by at most γ_n ≈ n·u ≈ 3.1e-5 relative to
the terms' magnitudes, so by under 1e-4 relative to max |W|.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import test_merge_matrix as mm
import torch
import yaml
from click.testing import CliRunner
from conftest import fixture_script
from safetensors.torch import load_file

from loraengine.core.files import module_layouts, read_adapter_file
from loraengine.plugins.models import comfy_names

HERE = Path(__file__).parent / "fixtures" / "interop"
EXACT = 1e-4


def _script():
    return fixture_script("make_webui_lycoris_transformer_fixtures")


MAKE = _script()
RESULTS = json.loads(MAKE.RESULTS.read_text())
CASES = {MAKE.base.case_id(*mm._values(c)): mm._values(c) for c in mm.MATRIX}


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def test_the_fixture_covers_every_case_family_and_consumer():
    for consumer in MAKE.CONSUMERS:
        for family in MAKE.FAMILIES:
            assert set(RESULTS["cases"][consumer][family]) == set(CASES)


#: cases whose network takes long to build here
SLOW = {"boft-block_size=2-r4", "boft-stages=2-r4"}


@pytest.mark.parametrize("cid", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW
                                 else c for c in sorted(CASES)])
def test_every_cell_is_exact_or_a_limit_the_export_warns_about(cid):
    """Per family and consumer: our export today has the key count the consumer was
    given; where the consumer did not read it exactly the exporter's own limits (what
    ``train`` and ``convert`` warn with) name that consumer, and where it did, they do
    not."""
    for family in MAKE.FAMILIES:
        _, files, summaries = MAKE.our_case(family, CASES[cid])
        for consumer in MAKE.CONSUMERS:
            row = RESULTS["cases"][consumer][family][cid]
            assert row["keys"] == len(files[consumer.split("-")[1]]), (consumer, family)
            warned = MAKE.consumer_limits(consumer, summaries, CASES[cid])
            assert bool(warned) != MAKE.exact(row), (consumer, family, row, warned)


#: what the fixes here made exact: the kohya export in sd-scripts' names (Forge read
#: none of the diffusers-style kohya names for SD3/FLUX.1), a full ΔW and LoHa with DoRA
#: fused into q/k/v
FIXED = [("forge-kohya", "lora-r4"), ("forge-kohya", "loha-r4"), ("forge-kohya", "full-r4"),
         ("lycoris-kohya", "full-r4"), ("lycoris-kohya", "lora-weight_decompose=True-r4"),
         ("forge-comfyui", "full-r4")]


@pytest.mark.parametrize(("consumer", "cid"), FIXED)
def test_fixed_cells_are_exact(consumer, cid):
    for family in MAKE.FAMILIES:
        assert MAKE.exact(RESULTS["cases"][consumer][family][cid]), family


def test_plain_lora_loads_exactly_in_forge_and_lycoris():
    for consumer in ("forge-kohya", "forge-comfyui", "lycoris-kohya"):
        for family in MAKE.FAMILIES:
            row = RESULTS["cases"][consumer][family]["lora-r4"]
            assert MAKE.exact(row) and row["max_rel"] == 0.0, (consumer, family)
    assert MAKE.exact(RESULTS["cases"]["forge-diffusers"]["flux"]["lora-r4"])


@pytest.mark.parametrize("family", MAKE.FAMILIES)
def test_the_kohya_export_has_only_names_forges_key_map_has(family):
    """Every module of the kohya LoRA export is a ``lora_unet_`` key of Forge's
    ``model_lora_keys_unet`` for its model (pinned), as sd-scripts names its own
    FLUX.1/SD3 models' layers."""
    _, files, _ = MAKE.our_case(family, CASES["lora-r4"])
    stems = {k.partition(".")[0] for k in files["kohya"]}
    assert stems <= set(RESULTS["forge_keys"][family])
    assert any(s.endswith(("_attn_qkv", "_linear1")) for s in stems)  # fused


@pytest.mark.parametrize("exporter", ["kohya", "comfyui"])
@pytest.mark.parametrize("family", MAKE.FAMILIES)
@pytest.mark.parametrize("cid", ["lora-r4", "loha-weight_decompose=True-r4", "full-r4",
                                 "lokr-factor=-1-r2", "oft-r4"])
def test_the_export_reads_back_to_the_same_delta(family, cid, exporter):
    """The sd-scripts-named kohya file and the comfyui one (fused q/k/v, swapped final
    modulation, and the modules kept under diffusers' names: OFT on the swapped one no
    longer fails the export) read back onto the diffusers model: every layer's ΔW is the
    network's. Fusing and splitting move no value but α/r, which stays the same ratio:
    a few fp32 roundings of a product, 1e-6 relative is 16u."""
    from loraengine.inference import network_from_file

    name, options, rank = CASES[cid]
    model = MAKE.diffusers_model(family)
    network = MAKE.build_network(model, name, options, rank)
    _, files, _ = MAKE.our_case(family, CASES[cid])
    fresh = MAKE.diffusers_model(family)
    file = read_adapter_file(files[exporter], mm.REG,
                             [n for n, _ in fresh.named_modules() if n], model=fresh)
    loaded, _, _ = network_from_file(fresh, file, mm.REG)
    theirs = dict(loaded.all_items())
    ours = dict(network.all_items())
    assert set(theirs) == set(ours)
    checked = 0
    for path, layer in ours.items():
        for what in ("delta_weight", "delta_bias"):
            want = getattr(layer, what)()
            got = getattr(theirs[path], what)()
            assert (got is None) == (want is None), (path, what)
            if want is not None:
                assert _rel(got.detach(), want.detach()) <= 1e-6, (path, what)
                checked += 1
    assert checked >= len(ours)


def test_forge_lines_only_for_flux_and_sd3_files():
    """The comfyui and diffusers exports name Forge for FLUX.1/SD3 files only (what was
    measured); a UNet's warnings are as before."""
    import test_interop_webui_lycoris as unet_fixture

    from loraengine.plugins.exporters import comfyui_limits, diffusers_limits

    summary = unet_fixture.MAKE.summary_of("sd15", CASES["lora-weight_decompose=True-r4"])
    for limits in (comfyui_limits, diffusers_limits):
        assert not any(line.startswith("Forge") for line in limits(summary["lycoris"]))
    _, _, summaries = MAKE.our_case("flux", CASES["lora-weight_decompose=True-r4"])
    assert any(line.startswith("Forge: DoRA normalised")
               for line in comfyui_limits(summaries["comfyui"]))


def _kept() -> dict[tuple[str, str, str], dict[str, torch.Tensor]]:
    grouped: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(MAKE.PATCHED).items():
        consumer, family, cid, name = key.split("/")
        grouped.setdefault((consumer, family, cid), {})[name] = tensor
    return grouped


KEPT = _kept()


@pytest.mark.parametrize("group", sorted(KEPT), ids=lambda g: "-".join(g))
def test_the_consumers_patched_weights_equal_our_merge(group):
    """The fused and swapped weights Forge/LyCORIS patched (committed) against our
    merge of the same seeded network, carried to the original model's names by the
    ``comfy_names`` layout (bands concatenated, halves swapped); SD3's every 16th row."""
    import sys

    sys.path.insert(0, str(HERE))
    from comfy_layout import native_by_layout

    consumer, family, cid = group
    ours, _, _ = MAKE.our_case(family, CASES[cid])
    base = MAKE.diffusers_model(family)
    names = module_layouts(mm.REG, base)[comfy_names.LAYOUT]
    want = native_by_layout(names, ours.state_dict())
    was = native_by_layout(names, base.state_dict())
    step = MAKE.ROW_STEP[family]
    changed = 0
    for key, got in KEPT[group].items():
        assert _rel(got, want[key][::step]) <= EXACT, key
        changed += not torch.equal(want[key][::step], was[key][::step])
    assert changed >= 2


def test_training_lokr_for_kohya_on_flux_warns_forge_and_lycoris(tmp_path):
    """``train`` with ``adapter.exporter: kohya`` on FLUX.1: LoKr on the layers the
    original model joins into q/k/v has no form there; the warnings name Forge and
    LyCORIS, and ComfyUI, before training; LoRA has none."""
    from safetensors.torch import save_file

    from loraengine.cli.main import cli
    from loraengine.testing import tiny_pipelines as tp

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
                           "exporter": "kohya"},
               "output": {"dir": str(tmp_path / algorithm), "name": "f", "plot": False}}
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
        out = CliRunner().invoke(cli, ["train", str(tmp_path / "run.yaml"), "-q"])
        assert out.exit_code == 0, out.output
        lines[algorithm] = [ln for ln in out.output.splitlines()
                            if "written under diffusers' names" in ln]
        saved = load_file(tmp_path / algorithm / "f.safetensors")
        assert any(k.startswith("lora_unet_double_blocks_0_") for k in saved), algorithm
    # ComfyUI, which reads kohya files too, leaves the same layers unloaded (the kohya
    # columns of the ComfyUI matrix): its line comes beside Forge's and LyCORIS's
    forge, comfyui = sorted(lines["lokr"], key=lambda ln: "ComfyUI" in ln)
    assert forge.startswith("warning: adapter.exporter: Forge and LyCORIS: layers")
    assert comfyui.startswith("warning: adapter.exporter: ComfyUI's model fuses q/k/v")
    assert lines["lora"] == []


@pytest.mark.slow
def test_forge_fails_on_a_tucker_core_only_where_the_file_has_one():
    """SD3's patch embedding is a convolution: LoKr with ``use_tucker`` has a Tucker core
    there. The kohya export keeps it (Forge's LoKr failed on it, and the warning says
    so); the comfyui export writes the factor whole (Forge patched every module it
    loaded, and no Tucker line is given)."""
    cid = "lokr-factor=-1-use_tucker=True-r2"
    _, files, summaries = MAKE.our_case("sd3", CASES[cid])
    rows = {c: RESULTS["cases"][c]["sd3"][cid] for c in ("forge-kohya", "forge-comfyui")}
    assert rows["forge-kohya"]["errors"] > 0 and rows["forge-comfyui"]["errors"] == 0
    assert any(k.endswith(".lokr_t2") for k in files["kohya"])
    assert not any(k.endswith(".lokr_t2") for k in files["comfyui"])
    tucker = {c: [line for line in MAKE.consumer_limits(c, summaries, CASES[cid])
                  if "Tucker" in line] for c in rows}
    assert tucker["forge-kohya"] and not tucker["forge-comfyui"]


def test_dora_on_a_swapped_layer_in_a_diffusers_file_is_named_for_forge():
    """Trained with ComfyUI's norm (which Forge computes), a FLUX.1 LoHa DoRA file in
    diffusers' names is off in Forge on the final modulation only: Forge swaps the ΔW of
    ``norm_out.linear`` into its row order, not the magnitude. The warning names that;
    the kohya and comfyui exports (magnitude swapped by us) are exact with no warning."""
    cid = "loha-use_tucker=True-weight_decompose=True-weight_decompose_norm=comfyui-r4"
    _, _, summaries = MAKE.our_case("flux", CASES[cid])
    row = RESULTS["cases"]["forge-diffusers"]["flux"][cid]
    assert not MAKE.exact(row) and row["worst"] == "final_layer.adaLN_modulation.1.weight"
    assert MAKE.consumer_limits("forge-diffusers", summaries, CASES[cid]) == [
        "Forge: applies DoRA's magnitude (dora_scale) in diffusers' row order of the final "
        "modulation, which it stores with halves swapped (1 layer(s))"]
    for consumer in ("forge-kohya", "forge-comfyui"):
        assert MAKE.exact(RESULTS["cases"][consumer]["flux"][cid])
        assert MAKE.consumer_limits(consumer, summaries, CASES[cid]) == []


@pytest.mark.slow
def test_the_docs_show_the_fixtures_tables():
    docs = (Path(__file__).parents[1] / "docs" / "compatibility.md").read_text()
    assert MAKE.tables(RESULTS) in docs


@pytest.mark.parametrize(("target", "reader"), [("kohya", "LyCORIS"), ("comfyui", "Forge")])
def test_convert_names_the_unfused_layers_for_flux(target, reader, tmp_path):
    """``convert --to kohya|comfyui --model`` of a FLUX.1 LoKr file: the layers over the
    fused q/k/v are written under diffusers' names, and the warning says so, naming the
    reader; a LoRA file gets no such line."""
    from loraengine.core.files import write_adapter_file
    from loraengine.tools.convert.logic import convert_file

    for name, options, rank, warned in (("lokr", {"factor": -1}, 2, True),
                                        ("lora", {}, 4, False)):
        network = MAKE.build_network(MAKE.diffusers_model("flux"), name, options, rank)
        src = tmp_path / f"{name}.safetensors"
        write_adapter_file(src, network.file_modules(), mm.REG.get("exporter", "diffusers"),
                           {"loraengine.algorithm": name})
        out = convert_file(src, target, out=tmp_path / f"{name}.{target}.safetensors",
                           model=MAKE.diffusers_model("flux"))
        lines = [w for w in out["warnings"] if w.startswith(f"{reader}: layers that")]
        assert bool(lines) == warned, out["warnings"]
        keys = load_file(out["out"])
        fused = any("img_attn_qkv" in k or "img_attn.qkv" in k for k in keys)
        assert fused != warned  # LoRA fuses into qkv; LoKr's q/k/v stay apart
