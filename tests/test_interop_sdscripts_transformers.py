"""sd-scripts' own FLUX.1 and SD3 LoRA networks (``networks/lora_flux.py``,
``networks/lora_sd3.py``, commit 48d368f) on the ``kohya`` export of the LoRA cases of
the merge matrix, on sd-scripts' own model classes at the tiny sizes: what
tests/fixtures/interop/make_sdscripts_transformer_fixtures.py measured (CI cannot fetch
sd-scripts, so it reads what the script wrote), pinned against our export today.

What it found: every LoRA it builds a module for merges bit for bit (the fused q/k/v
and FLUX.1's q/k/v/MLP input included: the exporter's combined down/up is the product
sd-scripts forms); its SD3 network places every module of the file; its FLUX.1 network
has no module on the final layer (``final_layer.linear``, ``final_layer.adaLN_
modulation.1``), so LoRA there is left out; neither reads DoRA's magnitude
(``dora_scale``) or norm and bias deltas. Each is a line of the ``kohya`` exporter's
limits for sd-scripts, which ``train`` prints.
"""

from __future__ import annotations

import importlib.util
import json
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).parent / "fixtures" / "interop"
RESULTS = json.loads((HERE / "sdscripts_transformer_matrix.json").read_text())
PATCHED = load_file(str(HERE / "sdscripts_transformer_patched.safetensors"))
EXACT = 1e-4
#: what sd-scripts' LoRA modules load of a module's keys
LORA_KEYS = ("lora_down.weight", "lora_up.weight", "alpha")
DELTA_KEYS = ("diff", "diff_b", "w_norm", "b_norm")


def _script():
    spec = importlib.util.spec_from_file_location(
        "make_sdscripts_transformer_fixtures", HERE / "make_sdscripts_transformer_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MAKE = _script()
MAKE.setup_path()
CELLS = [(f, cid) for f in MAKE.FAMILIES for cid in sorted(RESULTS["cases"][f])]
CASES = {MAKE.case_id(*c): c for c in MAKE.lora_cases()}


@cache
def our_case(family: str, cid: str):
    return MAKE.our_case(family, CASES[cid])


def test_the_fixture_covers_every_lora_case_on_both_families():
    assert RESULTS["sd_scripts_commit"] == "48d368f"
    for family in MAKE.FAMILIES:
        assert set(RESULTS["cases"][family]) == set(CASES)


def _module(key: str) -> str:
    return key.split(".", 1)[0]


@pytest.mark.parametrize(("family", "cid"), CELLS)
def test_our_export_is_the_file_sd_scripts_was_given_and_what_it_left(family, cid):
    """Our kohya export today has the modules sd-scripts read; the keys its
    ``load_state_dict`` rejected are exactly those of the modules it built nothing for
    and those its LoRA module has no tensor for (DoRA's magnitude, the deltas)."""
    row = RESULTS["cases"][family][cid]
    _, tensors, _ = our_case(family, cid)
    modules = {_module(k) for k in tensors}
    assert len(tensors) == row["keys"]
    assert modules == set(row["created"]) | set(row["not_placed"])
    assert not set(row["created"]) & set(row["not_placed"])
    expected = sorted(k for k in tensors if _module(k) in row["not_placed"]
                      or k.split(".", 1)[1] not in LORA_KEYS)
    assert row["unexpected"] == expected
    assert row["missing"] == 0  # every module it built found its tensors in the file
    lora = {_module(k) for k in tensors if k.endswith(".lora_down.weight")}
    assert set(row["created"]) <= lora  # a module only where the file has a LoRA


@pytest.mark.parametrize(("family", "cid"), CELLS)
def test_the_layers_sd_scripts_places_merge_exactly_but_for_dora(family, cid):
    row = RESULTS["cases"][family][cid]
    if "weight_decompose=True" in cid:
        # the magnitude is ignored: far from our DoRA
        assert row["max_rel_placed"] > 100 * EXACT, row
    else:
        assert row["max_rel_placed"] <= EXACT, row


def test_sd3_plain_lora_is_exact_in_sd_scripts():
    for cid in ("lora-r4", "lora-rs_lora=True-r4"):
        row = RESULTS["cases"]["sd3"][cid]
        assert not row["not_placed"] and not row["unexpected"] and not row["unchanged"]
        assert row["max_rel"] <= EXACT


def _original(family: str, state: dict) -> dict:
    """A diffusers state dict in the original checkpoint's names (sd-scripts' models'),
    by loraengine's own layout code: the fixture mapped them with Forge's map instead."""
    from loraengine.testing import single_files, tiny_pipelines

    if family == "sd3":
        return tiny_pipelines.sd3_to_original(dict(state), prefix="")
    model = MAKE.diffusers_model(family)
    model.load_state_dict(state)
    return single_files.to_single_file(model)


@pytest.mark.parametrize("cid", MAKE.KEPT_CASES)
@pytest.mark.parametrize("family", MAKE.FAMILIES)
def test_sd_scripts_merged_tensors_equal_our_merge_today(family, cid):
    """The tensors sd-scripts merged (fused q/k/v, FLUX.1's linear1, modulations whose
    halves the original layout swaps, an embedder) equal our merge of today's network,
    carried to the original names by our own layout code. Both are the same fp32
    products up to the order of at most rank + 1 terms per element: well inside 1e-4."""
    want, _, _ = our_case(family, cid)
    ours = _original(family, want)
    step = MAKE.ROW_STEP[family]
    for key in MAKE.KEPT[family]:
        got = PATCHED[f"{family}/{cid}/{key}"]
        mine = ours[key][::step]
        assert got.shape == mine.shape, key
        err = float((got - mine).abs().max() / mine.abs().max())
        assert err <= EXACT, (key, err)


def _file_name(layout_name: str) -> str:
    from loraengine.plugins.models import comfy_names

    return "lora_unet_" + comfy_names.parse(layout_name)[0].replace(".", "_")


@pytest.mark.parametrize(("family", "cid"), CELLS)
def test_what_sd_scripts_leaves_is_what_train_warns_about(family, cid):
    """Each thing sd-scripts did with the file but apply exactly is one line of the
    kohya exporter's limits for sd-scripts, which ``train`` prints, naming what it
    measured: DoRA read as plain LoRA; the modules whose deltas it did not load; the
    FLUX.1 final layer's LoRA, which it placed nowhere. No line where it was exact."""
    import test_merge_matrix as mm

    from loraengine.plugins.exporters import SD_SCRIPTS, kohya_limits

    row = RESULTS["cases"][family][cid]
    _, tensors, summary = our_case(family, cid)
    name, options, _ = CASES[cid]
    lines = kohya_limits(summary, (SD_SCRIPTS,), metadata=mm.file_notes(name, options))
    text = "\n".join(lines)
    dora = row["max_rel_placed"] > EXACT
    deltas = {_module(k) for k in row["unexpected"] if k.split(".", 1)[1] in DELTA_KEYS}
    lora = {_module(k) for k in tensors if k.endswith(".lora_down.weight")}
    outside = set(row["not_placed"]) & lora
    assert ("no DoRA" in text) == dora, lines
    assert ("norm and bias deltas" in text) == bool(deltas), lines
    if deltas:
        # the layers the line counts are those whose deltas sd-scripts left
        hit = {_file_name(n) for n, (a, p) in summary.items()
               if a == "deltas" or {"diff", "diff_b"} & set(p)}
        assert hit == deltas
    assert ("final layer is not placed" in text) == bool(outside), lines
    if outside:
        assert outside == {"lora_unet_final_layer_linear",
                           "lora_unet_final_layer_adaLN_modulation_1"}
        assert f"is not placed (its FLUX.1 network has no module there) ({len(outside)} " \
            "layer(s)" in text
    assert len(lines) == dora + bool(deltas) + bool(outside)
    # and where none applies, sd-scripts left nothing and merged exactly
    if not lines:
        assert not row["unexpected"] and not row["unchanged"] and row["max_rel"] <= EXACT


def test_the_unchanged_tensors_are_those_it_left():
    """What sd-scripts left as it was: the weights of the modules it did not place, and
    the tensors our deltas change (biases, the FLUX.1 q/k norm scales)."""
    for family, cid in CELLS:
        row = RESULTS["cases"][family][cid]
        not_placed = set(row["not_placed"])
        for key in row["unchanged"]:
            stem, leaf = key.rsplit(".", 1)
            module = "lora_unet_" + stem.replace(".", "_")
            assert module in not_placed or leaf in ("bias", "scale"), (family, cid, key)


def test_the_kohya_exporter_limits_carry_the_flux_final_layer_line():
    """``train`` and ``convert`` warn with the exporter spec's ``limits`` (all readers of
    kohya files): for the FLUX.1 all-layer LoRA file, sd-scripts' final-layer line is
    among them, once; the SD3 file gets none from sd-scripts."""
    import test_merge_matrix as mm

    spec = mm.REG.get("exporter", "kohya")
    flux = list(spec.limits(our_case("flux", "lora-r4")[2], metadata={}))
    ours = [line for line in flux if line.startswith("sd-scripts:")]
    assert ours == ["sd-scripts: LoRA on FLUX.1's final layer is not placed (its FLUX.1 "
                    "network has no module there) (2 layer(s), e.g. norm_out.linear)"]
    sd3 = list(spec.limits(our_case("sd3", "lora-r4")[2], metadata={}))
    assert not [line for line in sd3 if line.startswith("sd-scripts:")]
