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

The second part runs diffusers' ``FluxPipeline.load_lora_weights`` (which converts
sd-scripts' FLUX.1 names) live on the same kohya FLUX.1 files: the blocks' LoRA fuses
to our merge; the embedders' and final layer's LoRA is never applied, which the
exporter's limits for diffusers say.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest
import torch
from conftest import fixture_script
from safetensors.torch import load_file

HERE = Path(__file__).parent / "fixtures" / "interop"
RESULTS = json.loads((HERE / "sdscripts_transformer_matrix.json").read_text())
PATCHED = load_file(str(HERE / "sdscripts_transformer_patched.safetensors"))
EXACT = 1e-4
#: what sd-scripts' LoRA modules load of a module's keys
LORA_KEYS = ("lora_down.weight", "lora_up.weight", "alpha")
DELTA_KEYS = ("diff", "diff_b", "w_norm", "b_norm")


def _script():
    return fixture_script("make_sdscripts_transformer_fixtures")


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
    """Merged (``merge_to``) and hooked (``apply_to``: each layer's output on a random
    input), the layers sd-scripts places equal ours, but for DoRA (its magnitude is
    ignored) and, hooked, the bias deltas it does not load (which change the output)."""
    row = RESULTS["cases"][family][cid]
    if "weight_decompose=True" in cid:
        # the magnitude is ignored: far from our DoRA
        assert row["max_rel_placed"] > 100 * EXACT, row
        assert row["max_rel_applied"] > 100 * EXACT, row
    else:
        assert row["max_rel_placed"] <= EXACT, row
        assert (row["max_rel_applied"] <= EXACT) == ("norm_and_bias_deltas" not in cid), row


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


# -- diffusers reading the same kohya FLUX.1 files (live: diffusers is a pip package) --

#: the diffusers layers FLUX.1's single-block ``linear1`` fuses: diffusers' converter
#: of sd-scripts files splits it at FLUX.1's released widths (3072 · 3 + 12288), which a
#: tiny model does not have; ``test_diffusers_splits_a_real_width_linear1_exactly``
#: checks it at that width
LINEAR1 = (".attn.to_q", ".attn.to_k", ".attn.to_v", ".proj_mlp")


def _network_on(model, case, keep):
    """test_merge_matrix's network on the Linear layers of ``model`` that ``keep``
    (a path test) accepts (the others hidden while it is built)."""
    import test_merge_matrix as mm
    from torch import nn

    held = []
    for path, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and not keep(path):
            parent, _, leaf = path.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            held.append((owner, leaf, module))
            owner._modules[leaf] = nn.Identity()
    try:
        return mm.build_network(model, *case)
    finally:
        for owner, leaf, module in held:
            owner._modules[leaf] = module


def _kohya_file(model, network):
    import test_merge_matrix as mm

    from loraengine.core.files import in_layout, module_layouts

    spec = mm.REG.get("exporter", "kohya")
    modules = network.file_modules()
    renamed = in_layout(modules, spec, module_layouts(mm.REG, model))
    layers = dict(network.items())
    summary = {n: ("deltas" if p not in layers else layers[p].algorithm,
                   {k: tuple(v.shape) for k, v in params.items()})
               for (p, params), n in zip(modules.items(), renamed, strict=True)}
    return {k: v.contiguous() for k, v in spec.to_file(renamed).items()}, summary


def _through_diffusers(make_model, tensors, folder: Path, keys):
    """``FluxPipeline.load_lora_weights`` + ``fuse_lora`` on a fresh ``make_model()``:
    (the ValueError that refused the file or None, its fused tensors of ``keys``)."""
    from safetensors.torch import save_file
    from test_interop_diffusers_matrix import pipeline

    path = folder / "flux-kohya.safetensors"
    save_file(tensors, str(path))
    pipe = pipeline("flux", make_model())
    try:
        pipe.load_lora_weights(str(path), adapter_name="ours")
        pipe.fuse_lora()
    except ValueError as e:
        return str(e).strip().splitlines()[0], {}
    state = pipe.transformer.state_dict()
    out = {}
    for key in keys:
        head, _, leaf = key.rpartition(".")
        out[key] = state.get(key, state.get(f"{head}.base_layer.{leaf}"))
    return None, out


@pytest.fixture
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("_one_thread")
@pytest.mark.parametrize("cid", list(CASES))
def test_diffusers_reads_our_kohya_flux_file_or_we_warn(cid, tmp_path):
    """Our kohya FLUX.1 file of each LoRA case (every layer but the single blocks'
    linear1 parts) in diffusers' FluxPipeline: the layers in the double and single
    blocks fuse to our merge (≤ 1e-4: each element sums at most rank + 1 fp32 terms);
    what does not is a line of the exporter's limits for diffusers — DoRA's magnitude
    dropped, a file with deltas refused, and the embedders' and final layer's LoRA
    converted but never applied (diffusers says nothing of those)."""
    import test_merge_matrix as mm

    from loraengine.plugins.exporters import diffusers_kohya_limits

    name, options, _ = CASES[cid]
    model = MAKE.diffusers_model("flux")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    network = _network_on(model, CASES[cid], lambda p: not (
        p.startswith("single_transformer_blocks.") and p.endswith(LINEAR1)))
    tensors, summary = _kohya_file(model, network)
    network.merge()
    want = model.state_dict()
    refused, got = _through_diffusers(lambda: MAKE.diffusers_model("flux"), tensors,
                                      tmp_path, list(want))
    lines = diffusers_kohya_limits(summary, mm.file_notes(name, options))
    if refused:
        assert "Incompatible keys" in refused
        assert len(lines) == 1 and "refuses the whole file" in lines[0], lines
        assert cid == "lora-norm_and_bias_deltas=True-r4"
        return
    changed = {k for k in want if not torch.equal(want[k], base[k])}
    unchanged = {k for k in changed if torch.equal(got[k], base[k])}
    outside = {k for k in changed if not k.startswith(("transformer_blocks.",
                                                       "single_transformer_blocks."))}
    assert unchanged == outside and len(outside) == 10  # every embedder and final layer
    assert any(f"{len(outside)} layer(s) are left unchanged there, without a warning" in line
               for line in lines), lines
    errors = {k: float((got[k] - want[k]).abs().max() / want[k].abs().max())
              for k in changed - outside}
    dora = "weight_decompose=True" in cid
    assert any("drops DoRA's magnitude" in line for line in lines) == dora, lines
    if dora:
        assert max(errors.values()) > 100 * EXACT
    else:
        assert max(errors.values()) <= EXACT, max(errors.items(), key=lambda kv: kv[1])
    assert len(lines) == 1 + dora


@pytest.mark.slow
@pytest.mark.usefixtures("_one_thread")
def test_diffusers_splits_a_real_width_linear1_exactly(tmp_path):
    """At FLUX.1's released width (3072, 24 heads; one single block and no double one:
    0.8 GB a copy, 2.7 GB at peak) diffusers' converter splits our kohya file's fused
    single-block linear1 (q, k, v, MLP input) back onto its layers: fused, they equal
    our merge."""
    from diffusers import FluxTransformer2DModel

    def make():
        torch.manual_seed(0)
        return FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=0, num_single_layers=1,
            attention_head_dim=128, num_attention_heads=24, joint_attention_dim=32,
            pooled_projection_dim=16, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56)).eval().requires_grad_(False)

    def block(path: str) -> bool:
        return path.startswith("single_transformer_blocks.0.")

    model = make()
    network = _network_on(model, ("lora", {}, 4), block)
    tensors, _ = _kohya_file(model, network)
    assert "lora_unet_single_blocks_0_linear1.lora_down.weight" in tensors
    network.merge()
    want = {k: v for k, v in model.state_dict().items() if block(k) and k.endswith(".weight")
            and "norm" not in k}
    del model, network
    refused, got = _through_diffusers(make, tensors, tmp_path, list(want))
    assert refused is None
    base = make().state_dict()
    for key, w in want.items():
        assert not torch.equal(got[key], base[key]), key
        assert float((got[key] - w).abs().max() / w.abs().max()) <= EXACT, key


def test_the_docs_show_the_measured_table():
    """docs/compatibility.md's sd-scripts FLUX.1/SD3 table is the fixture's, with
    today's warnings as its notes (``make_sdscripts_transformer_fixtures.py --table``)."""
    docs = (Path(__file__).parents[1] / "docs" / "compatibility.md").read_text()
    assert MAKE.table(RESULTS) in docs
