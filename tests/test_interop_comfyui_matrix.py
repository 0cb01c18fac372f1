"""loraengine's files in ComfyUI for every algorithm and option, as ComfyUI's own loader
reads them (tests/fixtures/interop/make_comfyui_matrix_fixtures.py ran ComfyUI a125cd8's
``load_lora_for_models`` + ``patch_model`` on the SD1.5- and SDXL-structured tiny UNets
and the tiny SD3 and FLUX.1 transformers with the ``comfyui``, ``kohya`` and
``diffusers`` exports, for every case of
test_merge_matrix.MATRIX; CI cannot fetch ComfyUI, so it reads what the script wrote).

Tolerance for "exact": as in test_interop_webui_lycoris, each element of W + ΔW is a sum
of at most n = 64·9 = 576 fp32 products (the widest fan-in of these models); two
programs summing in different orders differ by at most γ_n ≈ n·u ≈ 3.4e-5 (u = 2⁻²⁴)
relative to the sum of the terms' magnitudes, so by under 1e-4 relative to max |W|:
the issue's threshold, and the bound here. (The worst exact cell measured is ~1e-6:
OFT's Cayley transform, inverted in another order.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import test_merge_matrix as mm
import torch
from conftest import first_of_each, fixture_script
from safetensors.torch import load_file

HERE = Path(__file__).parent / "fixtures" / "interop"
RESULTS = json.loads((HERE / "comfyui_matrix_results.json").read_text())
EXACT = 1e-4


def _script():
    return fixture_script("make_comfyui_matrix_fixtures")


MAKE = _script()
MAKE.setup_path()
CASES = {MAKE.case_id(*c): c for c in MAKE.cases()}
CELLS = MAKE.columns()


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def test_the_fixture_covers_every_case_family_and_exporter():
    matrix = {MAKE.case_id(*mm._values(c)) for c in mm.MATRIX}
    assert matrix <= set(CASES)
    for family, exporter in CELLS:
        assert set(RESULTS["cases"][family][exporter]) == set(CASES), (family, exporter)
    assert RESULTS["comfyui_commit"] == "a125cd8"


#: cases that take over 5 s here (BOFT: many stages, or built on every family twice)
SLOW = {"boft-block_size=2-r4", "boft-constraint=0.05-r4"}


def _algorithm(cid: str) -> str:
    """The algorithm of a case id (``lokr-factor=-1-r2`` -> ``lokr``)."""
    return cid.split("-", 1)[0]


@pytest.mark.parametrize("cid", first_of_each(list(CASES), _algorithm, slow=SLOW))
def test_every_cell_is_exact_or_a_comfyui_limit_the_export_warns_about(cid):
    """Per family and exporter: our export today has the key count ComfyUI was given,
    and where ComfyUI did not read it exactly, the exporter's ``limits`` (what ``train``
    warns with, ``core/checks.py``) name a ComfyUI limit for this file."""
    for family in MAKE.FAMILIES:
        files, summaries, refused = MAKE.our_files(family, CASES[cid])
        for exporter in MAKE.FAMILIES[family]:
            row = RESULTS["cases"][family][exporter][cid]
            assert row["keys"] == len(files[exporter]), (family, exporter)
            assert row["refused"] == len(refused), (family, exporter)
            if not MAKE.exact(row):
                warned = MAKE.limits_of(exporter, summaries[exporter], CASES[cid])
                assert any(line.startswith("ComfyUI") for line in warned), \
                    (family, exporter, row)


#: cells this work made exact (they were not): LoKr's Tucker core written whole for
#: ComfyUI (its LoKr failed on 52 convolutions of the SD1.5 UNet), full ΔW fused over
#: FLUX.1's and SD3's q/k/v, FLUX.1's q/k RMSNorm deltas under ComfyUI's names
FIXED = [("sd15", "comfyui", "lokr-factor=-1-use_tucker=True-r2"),
         ("sdxl", "comfyui", "lokr-factor=-1-use_tucker=True-decompose_both=True-r1"),
         ("sd15", "comfyui", "lokr-factor=-1-use_tucker=True-norm_and_bias_deltas=True-r2"),
         ("sd3", "comfyui", "full-r4"), ("flux", "comfyui", "full-r4"),
         ("sd3", "comfyui", "full-norm_and_bias_deltas=True-r4"),
         ("flux", "comfyui", "full-norm_and_bias_deltas=True-r4"),
         ("flux", "comfyui", "lora-norm_and_bias_deltas=True-r4")]


@pytest.mark.parametrize(("family", "exporter", "cid"), FIXED)
def test_fixed_cells_are_exact(family, exporter, cid):
    assert MAKE.exact(RESULTS["cases"][family][exporter][cid])


#: columns where ComfyUI reads an export made for another consumer, and where not every
#: layer of plain LoRA is placed (the ComfyUI limits ``test_added_columns_…`` checks)
PARTIAL = {("sd15", "diffusers"), ("sdxl", "diffusers")}


def test_plain_lora_loads_exactly_everywhere():
    """Plain LoRA is exact in every column but the UNets' diffusers export, whose
    attention projections ComfyUI has no diffusers name for (see below)."""
    for family, exporter in CELLS:
        if (family, exporter) in PARTIAL:
            continue
        row = RESULTS["cases"][family][exporter]["lora-r4"]
        assert MAKE.exact(row), (family, exporter)
        assert row["changed"] > 0


@pytest.mark.parametrize("cid", ["oft-constraint=0.05-r4", "boft-constraint=0.05-r4"])
def test_comfyui_reads_alpha_0_oft_files_as_we_do(cid):
    """OFT/BOFT with a constraint are written with the blocks already projected onto it
    and alpha 0 (ComfyUI then applies no constraint of its own): exact in ComfyUI on
    both UNets, in both exports (2.6e-7 / 5.9e-7 measured, the Cayley inverse's
    rounding), and every alpha of the file is 0."""
    for family in MAKE.UNETS:
        files, _, _ = MAKE.our_files(family, CASES[cid])
        for exporter in ("comfyui", "kohya"):
            row = RESULTS["cases"][family][exporter][cid]
            assert MAKE.exact(row) and row["changed"] > 0, (family, exporter)
            alphas = [float(v) for k, v in files[exporter].items() if k.endswith(".alpha")]
            assert alphas and set(alphas) == {0.0}


def _kept() -> dict[tuple[str, str, str], dict[str, torch.Tensor]]:
    grouped: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(HERE / "comfyui_matrix_patched.safetensors").items():
        family, exporter, cid, name = key.split("/")
        grouped.setdefault((family, exporter, cid), {})[name] = tensor
    return grouped


KEPT = _kept()


def test_the_patched_fixture_is_small_and_covers_every_family():
    assert (HERE / "comfyui_matrix_patched.safetensors").stat().st_size < 1_000_000
    assert {f for f, _, _ in KEPT} == set(MAKE.FAMILIES)


@pytest.mark.parametrize(("family", "exporter", "cid"),
                         first_of_each(sorted(KEPT, key=lambda g: (list(CASES).index(g[2]), g)),
                                       lambda g: (g[0], _algorithm(g[2])), ids="-".join))
def test_comfyuis_patched_weights_equal_our_merge(family, exporter, cid):
    """The tensors ComfyUI patched (committed) against loraengine's merge of the same
    seeded network, computed here; each one the file changes."""
    group = (family, exporter, cid)
    model, _, _, _ = MAKE.our_case(family, CASES[cid])
    _, native = _natives()[family]
    want = native(model.state_dict())
    base = native(MAKE.diffusers_model(family).state_dict())
    for key, got in KEPT[group].items():
        assert _rel(got, want[key]) <= EXACT, key
        assert not torch.equal(want[key], base[key]), key


def _natives():
    """Per family, a map of a diffusers state dict to ComfyUI's names without ComfyUI:
    the UNets' from ComfyUI's own ``unet_to_diffusers`` (committed with the key fixture),
    the transformers' from ``comfy_names`` (checked against ComfyUI's by the transformer
    fixtures)."""
    from comfy_layout import native_by_layout

    from loraengine.plugins.models import comfy_names

    out = {}
    for family in MAKE.UNETS:
        keys = json.loads((HERE / f"{family}_comfyui_keys.json").read_text())
        cmap = keys["unet_to_diffusers"]
        out[family] = (None, lambda sd, cmap=cmap: {cmap[k]: v for k, v in sd.items()
                                                    if k in cmap})
    names = {"flux": comfy_names.flux_names, "sd3": comfy_names.sd3_names}
    for family, fn in names.items():
        layout = fn(MAKE.diffusers_model(family))
        # weights the layout does not rename (FLUX.1's q/k RMSNorm, ``...scale`` there):
        # by ComfyUI's own key map of diffusers names (committed)
        keymap = json.loads((HERE / f"{family}_comfyui_transformer.json").read_text()
                            )["model_lora_keys_unet"]

        def native(sd, layout=layout, keymap=keymap):
            out = native_by_layout(layout, sd)
            for key in [k for k in out if k in sd and k.endswith(".weight")]:
                target = keymap.get(f"transformer.{key[:-len('.weight')]}")
                if isinstance(target, str):
                    out[target[len("diffusion_model."):]] = out.pop(key)
            return out

        out[family] = (None, native)
    return out


# -- the warnings, as train and convert give them ---------------------------------------

def _unet_file(tmp_path, name, options, rank=4, exporter="kohya"):
    from loraengine.core.files import write_adapter_file

    unet = MAKE.diffusers_model("sd15")
    network = mm.build_network(unet, name, options, rank)
    src = tmp_path / f"{name}.safetensors"
    write_adapter_file(src, network.file_modules(), mm.REG.get("exporter", exporter),
                       {"loraengine.algorithm": name})
    return src


def test_convert_to_comfyui_warns_about_oft_rescale(tmp_path):
    """``convert --to comfyui`` names OFT's rescale, which ComfyUI loads and never
    applies: without a model by name, with one with the measured error, which is what
    ComfyUI's own code gave on the same model and file (the fixture; 2 digits printed)."""
    import re

    from loraengine.tools.convert.logic import convert_file

    cid = "oft-constraint=0.5-rescaled=True-r4"
    src = _unet_file(tmp_path, *CASES[cid][:2], rank=CASES[cid][2])
    # a kohya file's flattened names need the model; a file in diffusers' names does not
    named = _unet_file(tmp_path / "named", *CASES[cid][:2], rank=CASES[cid][2],
                       exporter="diffusers")
    plain = convert_file(named, "comfyui", out=tmp_path / "a.safetensors")["warnings"]
    assert any(line.startswith("ComfyUI: ComfyUI never applies OFT's rescale")
               for line in plain), plain
    measured = convert_file(src, "comfyui", out=tmp_path / "b.safetensors",
                            model=MAKE.diffusers_model("sd15"))["warnings"]
    line = next(w for w in measured if "rescale" in w)
    assert line.startswith("ComfyUI: ComfyUI loads OFT's rescale and never applies it")
    got = float(re.search(r"max relative weight error ([0-9.e+-]+)", line).group(1))
    theirs = RESULTS["cases"]["sd15"]["comfyui"][cid]["max_rel"]
    assert theirs > EXACT
    assert got == pytest.approx(float(f"{theirs:.2g}"), rel=1e-4), line


def test_convert_to_comfyui_writes_lokr_tucker_whole_with_the_same_delta(tmp_path):
    """ComfyUI's LoKr fails on a Tucker core over a convolution: the comfyui export has
    none, and read back every layer's ΔW is the network's (moving alpha/rank into
    ``lokr_w1`` rounds once more: 1e-6 relative is 16u)."""
    from loraengine.core.files import read_adapter_file
    from loraengine.inference import network_from_file
    from loraengine.tools.convert.logic import convert_file

    name, options, rank = CASES["lokr-factor=-1-use_tucker=True-r2"]
    unet = MAKE.diffusers_model("sd15")
    network = mm.build_network(unet, name, options, rank)
    src = _unet_file(tmp_path, name, options, rank)
    out = convert_file(src, "comfyui", out=tmp_path / "c.safetensors",
                       model=MAKE.diffusers_model("sd15"))
    assert not any("Tucker" in line for line in out["warnings"])
    tensors = load_file(out["out"])
    assert not any(k.endswith(".lokr_t2") for k in tensors)
    fresh = MAKE.diffusers_model("sd15")
    file = read_adapter_file(tensors, mm.REG, [n for n, _ in fresh.named_modules() if n],
                             model=fresh)
    loaded, _, _ = network_from_file(fresh, file, mm.REG)
    theirs = dict(loaded.items())
    assert len(theirs) == len(network.paths)
    for path, layer in network.items():
        assert _rel(theirs[path].delta_weight().detach(),
                    layer.delta_weight().detach()) <= 1e-6, path


@pytest.mark.parametrize(("options", "start"), [
    ({"algorithm": "lora", "weight_decompose": True}, "ComfyUI's DoRA divides"),
    ({"algorithm": "oft", "rescaled": True}, "ComfyUI loads OFT's rescale"),
    ({"algorithm": "ia3"}, "ComfyUI has no IA3")])
def test_train_with_the_kohya_exporter_warns_about_comfyuis_limits(options, start):
    """ComfyUI reads kohya files too: ``train`` with ``adapter.exporter: kohya`` names
    its limits (the kohya column of the matrix; LoKr's Tucker core, the other one, is
    checked there on the UNets' 3×3 convolutions)."""
    from loraengine.plugins import build_plugin_manager
    from loraengine.testing.harness import train_tiny

    overlay = {"adapter": {**options, "rank": 2, "exporter": "kohya"}}
    with pytest.warns(UserWarning, match=rf"adapter.exporter: {start}"):
        train_tiny(build_plugin_manager(), overlay)


@pytest.mark.parametrize(("cid", "start"), [
    ("boft-r4", "ComfyUI stores the final modulation"),
    ("oft-r4", "ComfyUI's model fuses q/k/v")])
def test_convert_to_comfyui_names_the_layers_comfyui_cannot_place(cid, start, tmp_path):
    """On FLUX.1, ``convert --to comfyui --model`` warns with the same structural limits
    as ``train`` (the exporter's ``limits``): modules written under diffusers' names that
    ComfyUI's model has no layer for; the fixture has ComfyUI leaving them unloaded."""
    from loraengine.core.files import write_adapter_file
    from loraengine.tools.convert.logic import convert_file

    name, options, rank = CASES[cid]
    network, _ = MAKE.build_network(MAKE.diffusers_model("flux"), name, options, rank)
    src = tmp_path / "in.safetensors"
    write_adapter_file(src, network.file_modules(), mm.REG.get("exporter", "diffusers"),
                       {"loraengine.algorithm": name})
    warnings = convert_file(src, "comfyui", out=tmp_path / "out.safetensors",
                            model=MAKE.diffusers_model("flux"))["warnings"]
    assert any(line.startswith(f"ComfyUI: {start}") for line in warnings), warnings
    row = RESULTS["cases"]["flux"]["comfyui"][cid]
    assert row["unloaded"] > 0 or row["unchanged"] > 0


@pytest.mark.slow
def test_the_docs_show_the_fixtures_table():
    """docs/compatibility.md's ComfyUI matrix is the fixture's numbers, with the notes
    ``train`` warns with."""
    docs = (Path(__file__).parents[1] / "docs" / "compatibility.md").read_text()
    assert MAKE.table(RESULTS) in docs


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("cid", ["full-r4", "oft-r4", "glora-r4", "ia3-r4", "boft-r4",
                                 "lora-norm_and_bias_deltas=True-r4"])
def test_the_comfyui_export_reads_back_to_the_same_weights(family, cid, tmp_path):
    """Fused (full) and swapped (OFT, GLoRA, IA3) modules, BOFT kept under diffusers'
    names on a swapped layer, and norm deltas (FLUX.1's q/k RMSNorms under ComfyUI's
    ``….scale`` names): written by the ``comfyui`` exporter and read on the diffusers
    model, every module is back on its layer with its ΔW, bit for bit (the rows are only
    moved)."""
    import loraengine
    from loraengine.core.files import module_layouts, write_adapter_file
    from loraengine.plugins import build_plugin_manager

    name, options, rank = CASES[cid]
    model = MAKE.diffusers_model(family)
    network, _ = MAKE.build_network(model, name, options, rank)
    path = tmp_path / "c.safetensors"
    write_adapter_file(path, network.file_modules(), mm.REG.get("exporter", "comfyui"), {},
                       module_layouts(mm.REG, model))
    target = MAKE.diffusers_model(family)
    handle = loraengine.apply(target, path, mode="merge", host=build_plugin_manager())
    assert set(network.paths) <= set(handle.modules)
    network.merge()
    want = model.state_dict()
    for key, value in target.state_dict().items():
        assert torch.equal(value, want[key]), key


# -- the added columns: ComfyUI reading the diffusers export of a UNet, the kohya export
# -- of FLUX.1/SD3 --------------------------------------------------------------------

def _count(line: str) -> int:
    import re

    return int(re.search(r"(\d+) (?:layer|norm delta)\(s\)", line).group(1))


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("cid", ["lora-r4", "loha-r4", "oft-r4", "lokr-factor=-1-r2"])
def test_comfyui_leaves_exactly_the_warned_unet_attention_layers(family, cid):
    """ComfyUI maps a UNet's diffusers names with the attention projections in the
    attention-processor spelling only: the diffusers export's to_q/to_k/to_v/to_out.0
    are what it left unloaded (its own log) and unchanged, as many as the warning says,
    and no other layer (every other tensor it patched as we merged: the measured error
    is the attention layers' own, at the tensor the warning's pattern names)."""
    import re

    from loraengine.plugins.exporters import UNET_ATTENTION

    files, summaries, _ = MAKE.our_files(family, CASES[cid])
    row = RESULTS["cases"][family]["diffusers"][cid]
    line = next(w for w in MAKE.limits_of("diffusers", summaries["diffusers"], CASES[cid])
                if w.startswith("ComfyUI reads a UNet's attention projections"))
    assert row["unchanged"] == _count(line) > 0
    assert not row["errors"]

    def module(key: str) -> str:  # a file key's layer, diffusers' path
        key = key.removeprefix("unet.")
        return key.rsplit(".", 2)[0] if ".lora_" in key else key.rsplit(".", 1)[0]

    attention = {module(k) for k in files["diffusers"] if UNET_ATTENTION.search(module(k))}
    assert len(attention) == _count(line)
    assert row["unloaded_first"] and all(module(k) in attention
                                         for k in row["unloaded_first"])
    # the worst tensor (ComfyUI's name) is an attention projection's
    assert re.search(r"\.attn[12]\.(to_[qkv]|to_out\.0)\.(weight|bias)$", row["worst"])


@pytest.mark.parametrize("cid", ["lora-norm_and_bias_deltas=True-r4",
                                 "full-norm_and_bias_deltas=True-r4"])
def test_comfyui_leaves_flux_qk_norms_of_the_kohya_export_as_warned(cid):
    """FLUX.1's q/k RMSNorm deltas in sd-scripts' names (``….norm.key_norm.scale``):
    ComfyUI's ``lora_unet_*`` keys cover ``….weight`` tensors only; those norms are what
    it left unloaded and unchanged, as many as the warning says (the comfyui export
    places them: its cell is exact)."""
    _, summaries, _ = MAKE.our_files("flux", CASES[cid])
    row = RESULTS["cases"]["flux"]["kohya"][cid]
    line = next(w for w in MAKE.limits_of("kohya", summaries["kohya"], CASES[cid])
                if w.startswith("ComfyUI has no lora_unet_* key for FLUX.1's"))
    assert row["unchanged"] == row["unloaded"] == _count(line) > 0
    assert all("_norm_scale." in k for k in row["unloaded_first"])
    assert row["worst"].endswith("_norm.scale")
    assert MAKE.exact(RESULTS["cases"]["flux"]["comfyui"][cid])


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("cid", ["lokr-r4", "oft-r4", "boft-r4", "glora-r4"])
def test_comfyui_leaves_unfused_layers_of_the_kohya_export_as_warned(family, cid):
    """On FLUX.1/SD3 the kohya export keeps parts of a fused layer (and the final
    modulations, for BOFT: SD3's last context one too) under diffusers' names when the algorithm has no fused form;
    ComfyUI left keys unloaded there, and the export warns as the comfyui one does."""
    import re

    _, summaries, _ = MAKE.our_files(family, CASES[cid])
    row = RESULTS["cases"][family]["kohya"][cid]
    warned = MAKE.limits_of("kohya", summaries["kohya"], CASES[cid])
    assert any(w.startswith(("ComfyUI's model fuses", "ComfyUI stores the final"))
               for w in warned), warned
    assert row["unloaded"] > 0 and row["unchanged"] > 0
    assert all(re.search(r"_(attn_|proj_mlp|norm_out_linear|norm1_context_linear)", k)
               for k in row["unloaded_first"]), row["unloaded_first"]


@pytest.mark.parametrize(("family", "exporter", "cid", "start"), [
    ("sd15", "diffusers", "lora-r4", "ComfyUI reads a UNet's attention projections"),
    ("flux", "kohya", "lora-norm_and_bias_deltas=True-r4",
     "ComfyUI has no lora_unet_* key for FLUX.1's")])
def test_train_check_gives_the_added_lines_with_the_measured_count(family, exporter, cid,
                                                                   start):
    """``core/checks.py``'s ``adapter.exporter`` check (what ``train`` warns with), run
    on the seeded network on the diffusers model (the parts of a built run it reads),
    names the layers ComfyUI's own code left unchanged in the fixture, by count."""
    from types import SimpleNamespace

    from loraengine.core import checks

    name, options, rank = CASES[cid]
    model = MAKE.diffusers_model(family)
    network, _ = MAKE.build_network(model, name, options, rank)
    pipe = SimpleNamespace(
        config=SimpleNamespace(adapter=SimpleNamespace(exporter=exporter)),
        host=SimpleNamespace(registry=mm.REG), network=network,
        loaded=SimpleNamespace(module=model, default_exporter=exporter,
                               base_model_version=""),
        adapter_spec=mm.REG.get("adapter", name))
    lines = checks._exporter_limits(pipe)
    line = next(w for w in lines if w.startswith(f"adapter.exporter: {start}"))
    assert _count(line) == RESULTS["cases"][family][exporter][cid]["unchanged"]
