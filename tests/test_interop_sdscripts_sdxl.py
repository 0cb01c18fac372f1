"""sd-scripts' own LoRA loader (``networks/lora.py``, commit 48d368f) on the ``kohya``
SDXL export (SAI names) of the LoRA cases of the merge matrix, at SDXL's real size: what
tests/fixtures/interop/make_sdscripts_sdxl_fixtures.py measured (CI cannot fetch
sd-scripts, so it reads what the script wrote).

Every module sd-scripts places was merged by its own ``merge_to`` into a layer with a
seeded full-size weight and compared with loraengine's merge of the same layer: bit for
bit (``max_rel_placed`` 0) except DoRA, which it does not have. Its LoRANetwork makes
modules only inside its UNet's blocks, so LoRA on ``conv_in``, ``conv_out`` and the
time and label embeddings, and the norm and bias deltas, are not placed; the ``kohya``
exporter's limits say so.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest
from conftest import fixture_script

HERE = Path(__file__).parent / "fixtures" / "interop"
RESULTS = json.loads((HERE / "sdxl_sdscripts_matrix.json").read_text())
EXACT = 1e-4
#: the kinds of layer sd-scripts' LoRANetwork makes modules for on SDXL (with conv
#: layers: what a file with every layer adapted asks of it)
KINDS = {"attention", "feed-forward", "proj_in/proj_out", "resnet conv",
         "resnet time_emb_proj", "resampler conv"}
#: the first parts of the diffusers names of a UNet's blocks
BLOCKS = ("down_blocks", "mid_block", "up_blocks")


def _script():
    return fixture_script("make_sdscripts_sdxl_fixtures")


MAKE = _script()
CASES = MAKE.lora_cases()


def test_the_fixture_covers_every_lora_case():
    assert set(RESULTS["cases"]) == set(CASES)
    assert RESULTS["sd_scripts_commit"] == "48d368f"


@pytest.mark.parametrize("cid", sorted(RESULTS["cases"]))
def test_every_module_sd_scripts_places_was_compared_by_number(cid):
    """All placed modules (788: attention, feed-forward, proj_in/out, resnet convs and
    time projections, resamplers) had their merged weights compared, not a sample."""
    row = RESULTS["cases"][cid]
    assert row["compared"] == row["placed"] == 788
    assert set(row["kinds"]) == KINDS
    assert sum(k["layers"] for k in row["kinds"].values()) == row["placed"]
    assert row["kinds"].keys() == RESULTS["cases"]["lora-r4"]["kinds"].keys()
    assert all(row["kinds"][k]["layers"] == v["layers"]
               for k, v in RESULTS["cases"]["lora-r4"]["kinds"].items())
    assert row["modules"] == row["placed"] + len(row["not_placed"])


@pytest.mark.parametrize("cid", [c for c in sorted(CASES) if "weight_decompose" not in c])
def test_the_layers_sd_scripts_places_merge_exactly(cid):
    row = RESULTS["cases"][cid]
    assert row["max_rel_placed"] <= EXACT
    assert all(k["max_rel"] <= EXACT for k in row["kinds"].values())


def test_sd_scripts_has_no_dora():
    dora = [c for c in CASES if "weight_decompose=True" in c]
    assert dora
    for cid in dora:
        assert RESULTS["cases"][cid]["max_rel_placed"] > 100 * EXACT, cid


def test_the_docs_show_the_fixtures_table():
    docs = (Path(__file__).parents[1] / "docs" / "compatibility.md").read_text()
    assert MAKE.table(RESULTS) in docs


@cache
def _unet():
    return MAKE.diffusers_sdxl()


@cache
def _ours(cid: str):
    """Our kohya SDXL file of case ``cid`` today (names and shapes: built on the meta
    device), its stems by diffusers path, and its modules as ``limits`` takes them."""
    unet = _unet()
    return MAKE.export(unet, MAKE.our_modules(unet, CASES[cid], weights=False), CASES[cid])


@pytest.mark.slow  # SDXL's full module tree on the meta device, and each case's file
@pytest.mark.parametrize("cid", sorted(RESULTS["cases"]))
def test_our_export_is_the_file_sd_scripts_was_given_and_what_it_left(cid):
    """Our kohya SDXL export today has the keys sd-scripts read; the modules it did not
    place are exactly the file's modules outside the UNet's blocks (from the diffusers
    paths) and those holding no LoRA (norm deltas); the keys ``load_state_dict`` did not
    take are exactly theirs and what a LoRA module of its network has no place for."""
    row = RESULTS["cases"][cid]
    tensors, stems, _ = _ours(cid)
    assert len(tensors) == row["keys"]
    modules = {k.split(".", 1)[0] for k in tensors}
    assert len(modules) == row["modules"]
    outside = {s for p, s in stems.items() if p.split(".", 1)[0] not in BLOCKS}
    lora = {k.split(".", 1)[0] for k in tensors if k.endswith(".lora_down.weight")}
    assert set(row["not_placed"]) == (modules & outside) | (modules - lora)
    # a module of its network holds only these: DoRA's magnitude and bias deltas of the
    # modules it places are not taken either
    held = {"lora_down.weight", "lora_up.weight", "alpha"}
    assert row["unexpected"] == sum(k.split(".", 1)[0] in row["not_placed"] or
                                    k.split(".", 1)[1] not in held for k in tensors)


@pytest.mark.slow
@pytest.mark.parametrize("cid", sorted(RESULTS["cases"]))
def test_what_sd_scripts_leaves_is_what_train_warns_about(cid):
    """Each thing sd-scripts did with the SDXL file but apply it exactly is a line of
    the kohya exporter's limits for sd-scripts (what ``train`` prints), with the count
    of layers it measured: LoRA outside its blocks (under SAI names), modules holding
    only deltas, DoRA read as plain LoRA."""
    import test_merge_matrix as mm

    from loraengine.plugins.exporters import SD_SCRIPTS, kohya_limits

    row = RESULTS["cases"][cid]
    tensors, _, summary = _ours(cid)
    name, options, _ = CASES[cid]
    lines = kohya_limits(summary, (SD_SCRIPTS,), metadata=mm.file_notes(name, options))
    text = "\n".join(lines)
    lora = {k.split(".", 1)[0] for k in tensors if k.endswith(".lora_down.weight")}
    outside = set(row["not_placed"]) & lora
    deltas = set(row["not_placed"]) - lora
    assert sorted(outside) == ["lora_unet_input_blocks_0_0", "lora_unet_label_emb_0_0",
                               "lora_unet_label_emb_0_2", "lora_unet_out_2",
                               "lora_unet_time_embed_0", "lora_unet_time_embed_2"]
    assert f"is not placed ({len(outside)} layer(s), e.g. input_blocks.0.0)" in text, lines
    if deltas:
        assert "norm and bias deltas (diff, diff_b, w_norm, b_norm) are not placed" in text, lines
    if row["max_rel_placed"] > EXACT:
        assert "no DoRA" in text, lines
    assert len(lines) == bool(outside) + bool(deltas) + (row["max_rel_placed"] > EXACT)
