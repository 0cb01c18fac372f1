"""sd-scripts' own LoRA loader (``networks/lora.py``, commit 48d368f) on the ``kohya``
export of the LoRA cases of the merge matrix, SD1.5-structured tiny UNet: what
tests/fixtures/interop/make_sdscripts_matrix_fixtures.py measured (CI cannot fetch
sd-scripts, so it reads what the script wrote).

The layers sd-scripts places it merges bit for bit (``max_rel_placed`` 0: the same fp32
products in the same order); its LoRANetwork creates modules only inside the blocks it
targets, so a file's LoRA on ``conv_in``, ``conv_out`` and ``time_embedding`` (which
loraengine adapts when the targets say ``*``) and its norm and bias deltas are not
placed; it has no DoRA (the magnitude is ignored).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import test_interop_diffusers_matrix as dm
from conftest import fixture_script

HERE = Path(__file__).parent / "fixtures" / "interop"
RESULTS = json.loads((HERE / "sd15_sdscripts_matrix.json").read_text())
#: the blocks sd-scripts' LoRANetwork puts its modules in (UNET_TARGET_REPLACE_MODULE
#: and ..._CONV2D_3X3)
TARGETS = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")


def _script():
    return fixture_script("make_sdscripts_matrix_fixtures")


def test_the_fixture_covers_every_lora_case():
    assert set(RESULTS["cases"]) == set(_script().lora_cases())
    assert RESULTS["sd_scripts_commit"] == "48d368f"


def _outside_targets(model) -> set[str]:
    """The kohya names of the layers of ``model`` not inside a block sd-scripts
    targets (from the model's own module classes)."""
    inside = set()
    for path, module in model.named_modules():
        if type(module).__name__ in TARGETS:
            inside |= {f"{path}.{p}" for p, _ in module.named_modules() if p}
    return {"lora_unet_" + p.replace(".", "_") for p, _ in model.named_modules()
            if p and p not in inside}


@pytest.mark.parametrize("cid", sorted(RESULTS["cases"]))
def test_our_export_is_the_file_sd_scripts_was_given_and_what_it_left(cid):
    """Our kohya export today has the key count sd-scripts read; the modules it did not
    place are exactly the file's modules outside its target blocks and those that hold
    no LoRA (norm deltas)."""
    row = RESULTS["cases"][cid]
    _, files, _ = dm.our_case("sd15", cid)
    tensors = files["kohya"]
    assert len(tensors) == row["keys"]
    modules = {k.split(".", 1)[0] for k in tensors}
    assert len(modules) == row["modules"]
    outside = _outside_targets(dm.MAKE.diffusers_model("sd15"))
    # it builds a module only for a LoRA (lora_down) inside its blocks: not for the norm
    # layers' deltas
    lora = {k.split(".", 1)[0] for k in tensors if k.endswith(".lora_down.weight")}
    assert set(row["not_placed"]) == (modules & outside) | (modules - lora)
    assert row["placed"] == len(lora - outside)


@pytest.mark.parametrize("cid", ["lora-r4", "lora-rs_lora=True-r4",
                                 "lora-norm_and_bias_deltas=True-r4"])
def test_the_layers_sd_scripts_places_merge_exactly(cid):
    row = RESULTS["cases"][cid]
    assert row["placed"] > 0 and row["max_rel_placed"] <= dm.EXACT


def test_sd_scripts_has_no_dora():
    for cid, row in RESULTS["cases"].items():
        if "weight_decompose=True" in cid:
            assert row["max_rel_placed"] > 100 * dm.EXACT, cid


@pytest.mark.parametrize("cid", sorted(RESULTS["cases"]))
def test_what_sd_scripts_leaves_is_what_train_warns_about(cid):
    """Each thing sd-scripts did with the file but apply it exactly (LoRA modules it did
    not place, outside its blocks: conv_in, conv_out, time_embedding; modules holding
    only deltas, also not placed; DoRA read as plain LoRA) is a line of the kohya
    exporter's limits for sd-scripts, which ``train`` prints, with the count of layers
    it measured."""
    import test_merge_matrix as mm

    from loraengine.plugins.exporters import SD_SCRIPTS, kohya_limits

    row = RESULTS["cases"][cid]
    _, files, summaries = dm.our_case("sd15", cid)
    name, options, _ = dm.CASES[cid]
    lines = kohya_limits(summaries["kohya"], (SD_SCRIPTS,),
                         metadata=mm.file_notes(name, options))
    text = "\n".join(lines)
    lora = {k.split(".", 1)[0] for k in files["kohya"] if k.endswith(".lora_down.weight")}
    outside = set(row["not_placed"]) & lora  # LoRAs outside its blocks
    deltas = set(row["not_placed"]) - lora  # modules holding deltas only
    assert outside  # every case targets every layer, conv_in among them
    assert f"is not placed ({len(outside)} layer(s), e.g. conv_in)" in text, lines
    if deltas:
        assert "norm and bias deltas" in text, lines
    if row["max_rel_placed"] > dm.EXACT:
        assert "no DoRA" in text, lines
    assert len(lines) == bool(outside) + bool(deltas) + (row["max_rel_placed"] > dm.EXACT)
