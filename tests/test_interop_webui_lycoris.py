"""loraengine's files in A1111 1.8, Forge and LyCORIS, as those programs' own loaders
read them (tests/fixtures/interop/make_webui_lycoris_fixtures.py ran them on the SD1.5-
and SDXL-structured tiny UNets for every case of test_merge_matrix.MATRIX; CI cannot
fetch them, so it reads what the script wrote). LyCORIS is also a pip package of the
test environment: a few cases run its loader here, live.

Tolerance for "exact": each element of W + ΔW is a sum of at most n = 64·9 = 576 fp32
products (the widest fan-in of these UNets); two programs summing in different orders
differ by at most γ_n ≈ n·u ≈ 3.4e-5 each (u = 2⁻²⁴) relative to the sum of the terms'
magnitudes, so by under 1e-4 relative to max |W| — the issue's threshold, and the bound
here. (The measured worst exact cell is 4.5e-7.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import test_merge_matrix as mm
import torch
from conftest import first_of_each, fixture_script
from safetensors.torch import load_file

from loraengine.plugins.exporters import A1111, FORGE, LYCORIS, kohya_limits

HERE = Path(__file__).parent / "fixtures" / "interop"
RESULTS = json.loads((HERE / "webui_lycoris_results.json").read_text())
EXACT = 1e-4
LABELS = {"a1111": A1111, "forge": FORGE, "lycoris": LYCORIS}


def _script():
    return fixture_script("make_webui_lycoris_fixtures")


MAKE = _script()
CASES = {MAKE.case_id(*mm._values(c)): mm._values(c) for c in mm.MATRIX}


def _exact(row: dict) -> bool:
    return row["unloaded"] == 0 and row["errors"] == 0 and row["unchanged"] == 0 \
        and row["max_rel"] <= EXACT


def _summary(family: str, case) -> tuple[dict, dict]:
    """Our file's modules for ``case`` as ``kohya_limits`` sees them, and the files."""
    files, summary = MAKE.our_files(family, case)
    return summary, files


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def test_the_fixture_covers_every_case_family_and_consumer():
    for consumer in MAKE.CONSUMERS:
        for family in MAKE.FAMILIES:
            assert set(RESULTS["cases"][consumer][family]) == set(CASES)


#: cases whose network takes long to build here (BOFT with 2-row blocks: many stages)
SLOW = {"boft-block_size=2-r4"}


def _algorithm(cid: str) -> str:
    """The algorithm of a case id (``lokr-factor=-1-r2`` -> ``lokr``)."""
    return cid.split("-", 1)[0]


@pytest.mark.parametrize("cid", first_of_each(list(CASES), _algorithm, slow=SLOW))
def test_every_cell_is_exact_or_a_limit_the_export_warns_about(cid):
    """Per family and consumer: our export today has the key count the consumer was
    given, and where the consumer did not read it exactly, ``kohya_limits`` (what
    ``train`` and ``convert`` warn with) names that consumer for this file."""
    for family in MAKE.FAMILIES:
        summary, files = _summary(family, CASES[cid])
        for consumer in MAKE.CONSUMERS:
            row = RESULTS["cases"][consumer][family][cid]
            assert row["keys"] == len(files[consumer]), (consumer, family)
            if not _exact(row):
                warned = kohya_limits(summary[consumer], (LABELS[consumer],),
                                      metadata=mm.file_notes(*CASES[cid][:2]))
                assert warned, (consumer, family, row)


#: cells the exporter's fixes made exact (they were not): OFT/BOFT constraints in the
#: readers that take alpha·out_dim, norm deltas as w_norm/b_norm in LyCORIS, LoKr's
#: Tucker core written out for Forge
FIXED = [("forge", "lokr-factor=-1-use_tucker=True-r2"),
         ("forge", "lokr-factor=-1-use_tucker=True-decompose_both=True-r1"),
         ("forge", "lokr-factor=-1-use_tucker=True-norm_and_bias_deltas=True-r2"),
         ("a1111", "oft-constraint=0.5-rescaled=True-r4"),
         ("a1111", "boft-constraint=0.5-rescaled=True-r4"),
         ("a1111", "oft-block_count=2-constraint=0.3-r4"),
         ("lycoris", "oft-constraint=0.5-rescaled=True-r4"),
         ("lycoris", "boft-constraint=0.5-rescaled=True-r4"),
         ("lycoris", "full-norm_and_bias_deltas=True-r4")]


@pytest.mark.parametrize(("consumer", "cid"), FIXED)
def test_fixed_cells_are_exact(consumer, cid):
    for family in MAKE.FAMILIES:
        assert _exact(RESULTS["cases"][consumer][family][cid]), family


def test_plain_lora_loads_exactly_everywhere():
    for consumer in MAKE.CONSUMERS:
        for family in MAKE.FAMILIES:
            row = RESULTS["cases"][consumer][family]["lora-r4"]
            assert _exact(row) and row["max_rel"] == 0.0, (consumer, family)


def _kept() -> dict[tuple[str, str, str], dict[str, torch.Tensor]]:
    grouped: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(HERE / "webui_lycoris_patched.safetensors").items():
        consumer, family, cid, name = key.split("/")
        grouped.setdefault((consumer, family, cid), {})[name] = tensor
    return grouped


KEPT = _kept()


@pytest.mark.parametrize(("consumer", "family", "cid"),
                         first_of_each(sorted(KEPT, key=lambda g: list(CASES).index(g[2])),
                                       lambda g: (g[0], _algorithm(g[2])), ids="-".join))
def test_the_consumers_patched_weights_equal_our_merge(consumer, family, cid):
    """The tensors the consumer patched (committed) against loraengine's merge of the
    same seeded network, computed here; each one the file changes."""
    group = (consumer, family, cid)
    ours, _, _ = MAKE.our_case(family, CASES[cid])
    want = ours.state_dict()
    base = MAKE.diffusers_unet(family).state_dict()
    changed = 0
    for key, got in KEPT[group].items():
        assert _rel(got, want[key]) <= EXACT, key
        changed += not torch.equal(want[key], base[key])
    assert changed >= 1


LIVE = ["lora-norm_and_bias_deltas=True-r4", "oft-constraint=0.5-rescaled=True-r4",
        "boft-constraint=0.5-rescaled=True-r4", "lora-weight_decompose=True-r4",
        "full-norm_and_bias_deltas=True-r4"]


@pytest.mark.parametrize("cid", LIVE)
def test_lycoris_loads_the_kohya_export_live(cid):
    """LyCORIS's ``create_network_from_weights`` + ``merge_to`` on the SD1.5-structured
    UNet, here: what it leaves unloaded is only what ``kohya_limits`` names (the bias
    deltas of adapted layers), the rest equals our merge."""
    pytest.importorskip("lycoris")
    family = "sd15"
    ours, files, summary = MAKE.our_case(family, CASES[cid])
    unet = MAKE.diffusers_unet(family)
    unloaded, errors = MAKE.run_lycoris(family, unet, files["lycoris"])
    assert not errors
    assert all(k.endswith(".diff_b") for k in unloaded)
    if unloaded:
        assert any("diff_b (the bias delta) of a layer that has an adapter is ignored"
                   in line for line in kohya_limits(summary["lycoris"], (LYCORIS,)))
    ignored = set(unloaded)
    got, want = unet.state_dict(), ours.state_dict()
    base = MAKE.diffusers_unet(family).state_dict()
    norms = 0
    for key, w in want.items():
        path, _, param = key.rpartition(".")
        if param == "bias" and f"lora_unet_{path.replace('.', '_')}.diff_b" in ignored:
            continue  # an ignored bias delta: the named limit
        assert _rel(got[key], w) <= EXACT, key
        norms += ".norm" in path and not torch.equal(w, base[key])
    if "norm_and_bias" in cid:
        assert norms > 0  # the norm deltas (w_norm/b_norm) were applied


def test_kohya_writes_norm_deltas_as_lycoris_names_and_reads_them_back():
    from loraengine.core.files import read_adapter_file

    family = "sd15"
    _, files = _summary(family, CASES["lora-norm_and_bias_deltas=True-r4"])
    tensors = files["lycoris"]
    norm_keys = [k for k in tensors if k.startswith("lora_unet_") and "_norm" in k
                 and k.endswith((".w_norm", ".b_norm"))]
    assert norm_keys
    assert not any(k.endswith(".diff") for k in tensors)  # LoRA: no full ΔW anywhere
    unet = MAKE.diffusers_unet(family)
    paths = [n for n, _ in unet.named_modules() if n]
    file = read_adapter_file(tensors, mm.REG, paths, model=unet)
    norm = "up_blocks.1.resnets.0.norm1"
    assert set(file.modules[norm].deltas) == {"diff", "diff_b"}
    assert not file.modules[norm].params
    assert torch.equal(file.modules[norm].deltas["diff"],
                       tensors["lora_unet_up_blocks_1_resnets_0_norm1.w_norm"])
    # without a model (inspect) too
    no_model = read_adapter_file(tensors, mm.REG)
    assert any(set(m.deltas) == {"diff", "diff_b"} and not m.params
               for m in no_model.modules.values())


def test_convert_names_each_consumers_limit(tmp_path):
    from loraengine.core.files import write_adapter_file
    from loraengine.tools.convert.logic import convert_file

    unet = MAKE.diffusers_unet("sd15")
    network = mm.build_network(unet, "loha", {"weight_decompose": True}, 4)
    src = tmp_path / "loha.safetensors"
    write_adapter_file(src, network.file_modules(), mm.REG.get("exporter", "kohya"),
                       {"loraengine.algorithm": "loha"})
    a1111 = convert_file(src, "a1111", out=tmp_path / "a.safetensors")["warnings"]
    assert any(line.startswith("A1111 1.8: no DoRA") for line in a1111)
    assert any(line.startswith("Forge: DoRA normalised by the norm of W") for line in a1111)
    assert not any("LyCORIS" in line for line in a1111)
    kohya = convert_file(src, "kohya", out=tmp_path / "k.safetensors")["warnings"]
    assert any(line.startswith("LyCORIS: LoHa/LoKr merged with alpha/rank applied twice")
               for line in kohya)
    assert not any(line.startswith(("A1111", "Forge")) for line in kohya)


@pytest.mark.slow
def test_the_docs_show_the_fixtures_tables():
    """docs/compatibility.md's A1111/Forge/LyCORIS tables are the fixture's numbers."""
    docs = (Path(__file__).parents[1] / "docs" / "compatibility.md").read_text()
    assert MAKE.tables(RESULTS) in docs


#: (convert target, reader, case, the limit's first words): convert --model measures
#: these limits with the reader's formula; the fixture has what the reader's own code
#: computed on the same model and file
MEASURED = [("a1111", "A1111 1.8", "lora-weight_decompose=True-r4", "no DoRA"),
            ("a1111", "Forge", "lora-weight_decompose=True-r4", "DoRA normalised"),
            ("a1111", "Forge", "oft-r4", "no OFT"),
            ("a1111", "A1111 1.8", "glora-r4", "GLoRA fails"),
            ("kohya", "LyCORIS", "loha-r4", "LoHa/LoKr merged"),
            ("kohya", "LyCORIS", "lokr-factor=2-r2", "LoHa/LoKr merged")]
READER_KEYS = {"A1111 1.8": "a1111", "Forge": "forge", "LyCORIS": "lycoris"}


@pytest.mark.parametrize(("target", "reader", "cid", "start"), MEASURED,
                         ids=[f"{r}-{c}" for _, r, c, _ in MEASURED])
def test_convert_measures_the_readers_limit_as_the_reader_computes_it(
        target, reader, cid, start, tmp_path):
    """``convert --model`` reports the max relative weight error of the reader's
    formula; it equals what the reader's own code gave on the SD1.5-structured UNet
    (the fixture), to fp32 rounding of the two computations (both are O(1) errors
    of W-sized sums: 1e-4 relative)."""
    import re

    from loraengine.core.files import write_adapter_file
    from loraengine.tools.convert.logic import convert_file

    name, options, rank = CASES[cid]
    unet = MAKE.diffusers_unet("sd15")
    network = mm.build_network(unet, name, options, rank)
    src = tmp_path / "in.safetensors"
    write_adapter_file(src, network.file_modules(), mm.REG.get("exporter", "kohya"),
                       {"loraengine.algorithm": name})
    warnings = convert_file(src, target, out=tmp_path / "out.safetensors",
                            model=MAKE.diffusers_unet("sd15"))["warnings"]
    line = next(w for w in warnings if w.startswith(f"{reader}: {start}"))
    measured = float(re.search(r"max relative weight error ([0-9.e+-]+)", line).group(1))
    theirs = RESULTS["cases"][READER_KEYS[reader]]["sd15"][cid]["max_rel"]
    # the warning prints 2 significant digits
    assert measured == pytest.approx(float(f"{theirs:.2g}"), rel=1e-4), line


@pytest.mark.parametrize("cid", ["lokr-factor=-1-use_tucker=True-r2",
                                 "lokr-factor=-1-use_tucker=True-decompose_both=True-r1"])
def test_the_a1111_export_writes_lokr_tucker_whole_with_the_same_delta(cid, tmp_path):
    """``convert --to a1111`` writes a Tucker LoKr's large factor whole (``lokr_w2``;
    Forge fails on ``lokr_t2``); read back, every layer's ΔW is the network's: the
    product is the one the layer computes, and moving alpha/rank into ``lokr_w1`` adds
    one fp32 rounding per element (1e-6 relative is 16u)."""
    from loraengine.core.files import read_adapter_file, write_adapter_file
    from loraengine.inference import network_from_file
    from loraengine.tools.convert.logic import convert_file

    name, options, rank = CASES[cid]
    unet = MAKE.diffusers_unet("sd15")
    network = mm.build_network(unet, name, options, rank)
    src = tmp_path / "lokr.safetensors"
    write_adapter_file(src, network.file_modules(), mm.REG.get("exporter", "kohya"),
                       {"loraengine.algorithm": name})
    out = convert_file(src, "a1111", out=tmp_path / "a1111.safetensors",
                       model=MAKE.diffusers_unet("sd15"))
    assert not any(line.startswith("Forge") for line in out["warnings"])
    tensors = load_file(out["out"])
    assert not any(k.endswith(".lokr_t2") for k in tensors)
    assert any(k.endswith(".lokr_w2") for k in tensors)
    fresh = MAKE.diffusers_unet("sd15")
    file = read_adapter_file(tensors, mm.REG, [n for n, _ in fresh.named_modules() if n],
                             model=fresh)
    loaded, _, _ = network_from_file(fresh, file, mm.REG)
    theirs = dict(loaded.items())
    checked = 0
    for path, layer in network.items():
        want = layer.delta_weight().detach()
        got = theirs[path].delta_weight().detach()
        assert _rel(got, want) <= 1e-6, path
        checked += 1
    assert checked == len(theirs)
