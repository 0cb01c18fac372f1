"""OFT, BOFT, GLoRA and IA3: exact in every mode, with the options the conformance
suite's defaults leave off (a norm constraint that is active, ``rescaled``,
``on_input``), numbers against LyCORIS as an independent implementation, and training
end to end on the tiny UNet in weight and bypass mode."""

from __future__ import annotations

import copy
import logging
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import loraengine
from loraengine.core.build import build_pipeline
from loraengine.core.config.root import parse_config
from loraengine.core.errors import ConfigError
from loraengine.core.seeding import make_generator
from loraengine.core.train.loop import Trainer
from loraengine.plugins import build_plugin_manager
from loraengine.plugins.adapters import boft, glora, ia3, oft
from loraengine.testing.conformance import (
    CHECKS,
    adapter_cases,
    build_adapter,
    perturb,
    relative_error,
    run_adapter_conformance,
)
from loraengine.testing.models import tiny_conditioning, tiny_latents

lycoris = pytest.importorskip("lycoris")
logging.getLogger("LyCORIS").setLevel(logging.ERROR)

SPECS = {"oft": oft.SPEC, "boft": boft.SPEC, "glora": glora.SPEC, "ia3": ia3.SPEC}
#: Options beyond the defaults, each run through every layer case.
VARIANTS = [
    ("oft", {"constraint": 0.5, "rescaled": True}),
    ("oft", {"block_size": 2}),
    ("oft", {"block_count": 2, "constraint": 0.3}),
    ("boft", {"constraint": 0.5, "rescaled": True}),
    ("boft", {"stages": 2}),
    ("glora", {}),
    ("ia3", {"on_input": True}),
]
CASES = adapter_cases()


def _id(v: tuple[str, dict]) -> str:
    return v[0] + "".join(f"-{k}={x}" for k, x in v[1].items())


def outputs(adapter, base, x) -> dict[str, torch.Tensor]:
    """bypass, rebuild (base op with W+ΔW) and merged outputs of one adapter."""
    base_out = base(x)
    out = {"bypass": adapter.bypass(x, base_out), "rebuild": adapter(x)}
    merged = copy.deepcopy(base)
    with torch.no_grad():
        merged.weight.add_(adapter.delta_weight())
    out["merged"] = merged(x)
    return out


# -- exactness with the options on ---------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS, ids=_id)
def test_bypass_rebuild_merged_agree_with_options(variant):
    name, options = variant
    report = run_adapter_conformance(SPECS[name], options)
    assert len(report.passed) == len(CASES) * len(CHECKS) and report.skipped == []


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("name", ["oft", "boft"])
def test_active_constraint_bounds_q_and_all_paths_agree(name, case):
    base, x = case.layer(), case.input()
    free = build_adapter(SPECS[name], base, {"constraint": 0.0})
    bound = build_adapter(SPECS[name], base, {"constraint": 0.25})
    perturb(free, std=0.3)
    perturb(bound, std=0.3)
    q = (free.oft_blocks - free.oft_blocks.transpose(-1, -2)).detach()
    assert float(q.norm()) > 0.4  # the bound is active, not a no-op
    outs_free = outputs(free, base, x)
    outs = outputs(bound, base, x)
    for label in ("bypass", "merged"):
        assert relative_error(outs[label], outs["rebuild"]) <= 1e-5, label
    assert relative_error(outs["rebuild"], outs_free["rebuild"]) > 1e-3
    # The bounded rotation equals the free one built from Q scaled to norm 0.25.
    scaled = build_adapter(SPECS[name], base, {"constraint": 0.0})
    with torch.no_grad():
        scaled.oft_blocks.copy_(free.oft_blocks * 0.25 / (float(q.norm()) + oft.NORM_EPS))
    assert relative_error(bound.delta_weight(), scaled.delta_weight()) <= 1e-5


def test_oft_rotation_is_orthogonal_and_acts_on_output_rows():
    base = nn.Linear(5, 12)
    layer = oft.OFTLayer(base, 3)
    with torch.no_grad():
        layer.oft_blocks.normal_(0, 0.5)
    r = layer.rotation()
    eye = torch.eye(3).expand_as(r)
    assert torch.allclose(r @ r.transpose(-1, -2), eye, atol=1e-5)
    # Independent construction: W' = diag(R_k^T) W with R = (I+Q)(I-Q)^-1.
    q = layer.oft_blocks - layer.oft_blocks.transpose(-1, -2)
    rs = [(torch.eye(3) + qk) @ torch.linalg.inv(torch.eye(3) - qk) for qk in q]
    want = torch.block_diag(*[rk.T for rk in rs]) @ base.weight
    assert torch.allclose(base.weight + layer.delta_weight(), want, atol=1e-5)


@pytest.mark.parametrize("name", ["oft", "boft", "ia3"])
def test_bypass_keeps_the_bias_out_of_the_channel_map(name):
    """The output map applies to W·x only: the bias is the merged layer's bias."""
    base = nn.Linear(8, 16)
    with torch.no_grad():
        base.bias.fill_(3.0)
    layer = build_adapter(SPECS[name], base, {"rescaled": True} if name != "ia3" else {})
    perturb(layer, std=0.3)
    x = torch.zeros(2, 8)  # W·x = 0: the adapted output must be exactly the bias
    out = layer.bypass(x, base(x))
    assert torch.allclose(out, torch.full_like(out, 3.0), atol=1e-6)


def test_multiplier_scales_the_change_linearly():
    base = nn.Conv2d(4, 8, 3)
    x = torch.randn(1, 4, 6, 6)
    for name in SPECS:
        layer = build_adapter(SPECS[name], base, {})
        perturb(layer, std=0.2)
        full = layer.bypass(x, base(x)) - base(x)
        layer.multiplier = 0.5
        half = layer.bypass(x, base(x)) - base(x)
        assert torch.allclose(half, 0.5 * full, atol=1e-6), name
        assert torch.allclose(base(x) + half, layer(x), atol=1e-5), name


# -- block-size rules ----------------------------------------------------------------

def test_block_splits_match_lycoris_and_comfyui_rules():
    from lycoris.functional.general import factorization, power2factorization

    for dim in range(1, 260):
        for factor in (-1, 1, 2, 3, 4, 5, 8, 16, 32):
            assert oft.balanced_split(dim, factor) == factorization(dim, factor), (dim, factor)
    for dim in range(2, 260, 2):
        for factor in (2, 4, 6, 8, 16):
            size, count = power2factorization(dim, factor)
            got = boft.butterfly_split(dim, factor)
            assert got == (None if count == 0 else (size, count)), (dim, factor)


def test_oft_block_options():
    base = nn.Linear(4, 24)
    # rank 8 divides 24: the split is 8 × 3, the smaller factor is the block size.
    assert oft.create(base, 8, 8.0, oft.OFTOptions(), None).oft_blocks.shape == (8, 3, 3)
    assert oft.create(base, 5, 5.0, oft.OFTOptions(), None).oft_blocks.shape == (6, 4, 4)
    assert oft.create(base, 8, 8.0, oft.OFTOptions(block_size=5), None).oft_blocks.shape \
        == (6, 4, 4)  # largest divisor of 24 not above 5
    assert oft.create(base, 8, 8.0, oft.OFTOptions(block_count=3), None).oft_blocks.shape \
        == (3, 8, 8)
    with pytest.raises(ValueError, match="block_size or block_count"):
        oft.OFTOptions(block_size=2, block_count=2)


def test_boft_shape_error_names_the_size_and_a_fix():
    with pytest.raises(ConfigError, match="output size 40 .* at most 4 .* smallest block "
                       "size that fits is 10"):
        boft.create(nn.Linear(3, 40), 4, 4.0, boft.BOFTOptions(), None)


def test_oft_and_boft_files_are_told_apart_by_block_rank():
    o = build_adapter(oft.SPEC, nn.Linear(4, 16)).file_tensors()
    b = build_adapter(boft.SPEC, nn.Linear(4, 16)).file_tensors()
    assert oft.owns_keys(o) and not boft.owns_keys(o)
    assert boft.owns_keys(b) and not oft.owns_keys(b)
    with pytest.raises(ValueError, match="BOFT file: use adapter.algorithm: boft"):
        oft.load(nn.Linear(4, 16), dict(b), None)
    with pytest.raises(ValueError, match="OFT file: use adapter.algorithm: oft"):
        boft.load(nn.Linear(4, 16), dict(o), None)


# -- against LyCORIS -----------------------------------------------------------------

class _Holder(nn.Module):
    """One base layer under the module name LyCORIS files use here (``lycoris_layer``)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _lycoris_file(adapter) -> dict[str, torch.Tensor]:
    tensors = {k: v.detach().clone() for k, v in adapter.file_tensors().items()}
    return {f"lycoris_layer.{k}": v for k, v in tensors.items()}


def _in_lycoris(base: nn.Module, adapter):
    """A copy of ``base`` with ``adapter``'s file applied by LyCORIS's own network, and
    that network (so a test can switch it to bypass, restore it or merge it)."""
    from lycoris import create_lycoris_from_weights

    holder = _Holder(copy.deepcopy(base))
    net, _ = create_lycoris_from_weights(1.0, "", holder, _lycoris_file(adapter))
    net.apply_to()
    return holder, net


LYCORIS_VARIANTS = [
    ("oft", {}), ("oft", {"rescaled": True}), ("oft", {"constraint": 0.4}),
    ("boft", {}), ("boft", {"rescaled": True}), ("boft", {"constraint": 0.4}),
    ("glora", {}),
]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("variant", LYCORIS_VARIANTS, ids=_id)
def test_files_load_into_lycoris_and_give_our_merged_outputs(variant, case):
    name, options = variant
    base, x = case.layer(), case.input()
    adapter = build_adapter(SPECS[name], base, options)
    perturb(adapter, std=0.2)
    ours = outputs(adapter, base, x)["merged"]
    # LyCORIS reads an OFT/BOFT alpha as a bound of alpha·out_dim, ComfyUI as alpha: the
    # file holds the blocks already within the bound and alpha 0, which both read alike,
    # so LyCORIS gets the file as written.
    saved = {k: v.detach() for k, v in adapter.file_tensors().items()}
    if name in ("oft", "boft"):
        assert float(saved["alpha"]) == 0.0
    if options.get("constraint"):  # saved within the bound (scaled, where beyond it)
        raw = adapter.oft_blocks.detach()
        beyond = float(torch.linalg.vector_norm(raw - raw.transpose(-1, -2))) > \
            options["constraint"]
        assert beyond != torch.equal(saved["oft_blocks"], raw)
        q = saved["oft_blocks"] - saved["oft_blocks"].transpose(-1, -2)
        assert float(torch.linalg.vector_norm(q)) <= options["constraint"] * (1 + 1e-6)
    holder, net = _in_lycoris(base, adapter)
    assert len(net.loras) == 1
    with torch.no_grad():
        theirs = holder(x)
    assert relative_error(theirs, ours) <= 1e-5
    net.restore()
    with torch.no_grad():
        net.merge_to(1.0)
        assert relative_error(holder.layer(x), ours) <= 1e-5


@pytest.mark.parametrize("name", ["oft", "boft"])
def test_lycoris_bypass_rotates_the_bias_ours_does_not(name):
    """The reference's bypass differs from its own merged weights by the rotated bias."""
    case = CASES[0]
    base, x = case.layer(), case.input()
    adapter = build_adapter(SPECS[name], base)
    perturb(adapter, std=0.2)
    ours = outputs(adapter, base, x)
    holder, net = _in_lycoris(base, adapter)
    net.loras[0].bypass_mode = True
    with torch.no_grad():
        theirs_bypass = holder(x)
    assert relative_error(ours["bypass"], ours["merged"]) <= 1e-5
    assert relative_error(theirs_bypass, ours["merged"]) > 1e-3


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("on_input", [False, True])
def test_ia3_matches_lycoris_module(on_input, case):
    # LyCORIS 4.1 cannot rebuild IA3 from a file (its make_module_from_state_dict takes
    # one tensor fewer than its own extract_state_dict returns), so the module is built
    # directly and given our saved vector.
    from lycoris.modules.ia3 import IA3Module

    base, x = case.layer(), case.input()
    adapter = build_adapter(ia3.SPEC, base, {"on_input": on_input})
    perturb(adapter, std=0.2)
    ours = outputs(adapter, base, x)["merged"]
    holder = _Holder(copy.deepcopy(base))
    module = IA3Module("lycoris_layer", holder.layer, 1.0, train_on_input=on_input)
    saved = adapter.file_tensors()
    with torch.no_grad():
        module.weight.copy_(saved["weight"])
    assert int(saved["on_input"]) == int(module.on_input)
    module.apply_to()
    with torch.no_grad():
        assert relative_error(holder(x), ours) <= 1e-5


# -- training end to end ---------------------------------------------------------------

LR = {"oft": 1e-2, "boft": 1e-2, "glora": 5e-3, "ia3": 2e-2}
TRAIN_OPTIONS = {"oft": {"constraint": 2.0}, "boft": {}, "glora": {"alpha": 2},
                 "ia3": {}}


_g = torch.Generator().manual_seed(11)
#: A fixed UNet call (x_t, timesteps, text states) to compare model outputs.
UNET_INPUTS = (torch.randn(2, 4, 8, 8, generator=_g), torch.tensor([10, 700]),
               torch.randn(2, 3, 16, generator=_g))


def _eval_loss(trainer: Trainer) -> float:
    """The loss on every sample with fixed noise and timesteps, without training."""
    saved = trainer.noise_gen
    trainer.noise_gen = make_generator(99, "eval")
    with torch.no_grad():
        value = float(trainer.micro_step(torch.arange(len(trainer.pipe.dataset))))
    trainer.noise_gen = saved
    return value


def _train(name: str, unet_config: dict, unet_dir, bypass: bool, out) -> tuple[dict, Any]:
    """Train the tiny UNet for 8 steps in float64; return the (diffusers-family) config
    that reloads the result, and the result.

    float64 because the two modes are compared after training: they compute the same
    function by different float operations, and Adam turns any difference in a
    gradient into a difference in the step (its first step is lr·sign(g), whatever
    the size of g). In float32 the base model's own rounding, which changes with the
    thread count and the kernels a machine picks, made the weight files of the two
    modes differ by 0.6e-4 to 2.4e-4 (relative) from run to run. With the base in
    float64 that rounding is about 1e-16 and no longer reaches the float32 adapter
    weights; what is left is the adapter's own float32 arithmetic (ΔW, the
    optimizer), the same on every thread count (glora: 3.8e-5 with 1 and 2 threads).
    The training problem is the same as the diffusers config's: same UNet, data and
    noise schedule (the module family's defaults are the tiny UNet's scheduler).
    """
    from diffusers import UNet2DConditionModel

    cfg = copy.deepcopy(unet_config)
    cfg["training"].update(steps=8, batch_size=6)
    cfg["optimizer"] = {"lr": LR[name]}
    cfg["adapter"] = {"algorithm": name, "rank": 4, "dtype": "fp32", **TRAIN_OPTIONS[name]}
    cfg["output"]["dir"] = str(out)
    in_fp64 = copy.deepcopy(cfg)
    in_fp64["model"] = {"family": "module"}
    in_fp64["training"]["dtype"] = "none"  # keep the model's float64
    in_fp64["memory"]["bypass_mode"] = bypass
    del in_fp64["data"]
    unet = UNet2DConditionModel.from_pretrained(str(unet_dir / "unet")).double()
    return cfg, loraengine.train(in_fp64, model=unet, latents=tiny_latents(),
                                 conditioning=tiny_conditioning(dim=16))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SPECS))
def test_trains_in_weight_and_bypass_mode_and_the_file_reloads(name, unet_config, unet_dir,
                                                              tmp_path):
    cfg, result = _train(name, unet_config, unet_dir, False, tmp_path / "weight")
    _, by_hooks = _train(name, unet_config, unet_dir, True, tmp_path / "bypass")
    assert result.path is not None and result.steps == 8
    weight_file, bypass_file = load_file(str(result.path)), load_file(str(by_hooks.path))
    assert weight_file.keys() == bypass_file.keys() and weight_file
    for key, value in weight_file.items():
        assert torch.isfinite(value.float()).all(), key
        # Both modes compute the same function, so training follows the same path (up
        # to the adapter's float32 rounding, see _train, which Adam may enlarge a little).
        assert relative_error(bypass_file[key], value) <= 2e-4, key
    assert result.loss_map["loss"] == pytest.approx(by_hooks.loss_map["loss"], rel=1e-4)

    # Reload the written file through the engine's own loader and measure the loss on a
    # fixed batch with the adapter on (multiplier 1) and off (0, the base model).
    host = build_plugin_manager()
    again = copy.deepcopy(cfg)
    again["adapter"]["existing"] = str(result.path)
    pipe = build_pipeline(parse_config(again, host.registry), host)
    try:
        assert pipe.previous_steps == 8
        trainer = Trainer(pipe, write_files=False)
        trained = _eval_loss(trainer)
        with torch.no_grad():
            want = pipe.model(*UNET_INPUTS).sample
        pipe.network.set_multiplier(0.0)
        untrained = _eval_loss(trainer)
    finally:
        pipe.close()
    assert trained < 0.97 * untrained, (untrained, trained)

    # The file on a fresh model through loraengine.apply, hooks or merged weights.
    from diffusers import UNet2DConditionModel

    for mode in ("bypass", "merge"):
        fresh = UNet2DConditionModel.from_pretrained(str(unet_dir / "unet")).eval()
        handle = loraengine.apply(fresh, result.path, mode=mode)
        assert set(handle.algorithms.values()) == {name}
        with torch.no_grad():
            got = fresh(*UNET_INPUTS).sample
        assert relative_error(got, want) <= 1e-5, mode


@pytest.mark.parametrize("name", ["oft", "boft"])
def test_a_constrained_file_means_the_same_read_with_no_constraint(name):
    """The file holds the blocks scaled onto the bound with alpha 0: read back with no
    options it gives the same weight; read back for training with the constraint set
    (``adapter.existing``), the layer keeps the bound; a file with alpha > 0 (ComfyUI's
    own, or written before) keeps the file's bound in ComfyUI's reading."""
    base = nn.Linear(8, 16)
    spec = SPECS[name]
    adapter = build_adapter(spec, base, {"constraint": 0.3})
    perturb(adapter, std=0.5)
    raw = adapter.oft_blocks.detach()
    assert float(torch.linalg.vector_norm(raw - raw.transpose(-1, -2))) > 0.3
    saved = {k: v.detach().clone() for k, v in adapter.file_tensors().items()}
    want = base.weight.detach() + adapter.delta_weight().detach()
    plain = spec.load(base, saved, spec.config_model())
    assert plain.constraint == 0.0
    # the same blocks reach the same Cayley solve: the same weight, bit for bit
    assert torch.equal(base.weight + plain.delta_weight().detach(), want)
    resumed = spec.load(base, saved, spec.config_model(constraint=0.3))
    assert resumed.constraint == 0.3
    comfy = dict(saved, oft_blocks=raw.clone(), alpha=torch.tensor(0.3))
    from_comfy = spec.load(base, comfy, spec.config_model())
    assert from_comfy.constraint == pytest.approx(0.3)
    assert torch.equal(base.weight + from_comfy.delta_weight().detach(), want)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_boft_dense_and_stage_forms_agree_with_lycoris(case, monkeypatch):
    """BOFT's two forms of the butterfly (stage by stage, or one dense matrix built from
    the stages; a row-count rule picks one per call) give LyCORIS's output on the
    factored and the rebuild path, with equal gradients."""
    base, x = case.layer(), case.input()
    adapter = build_adapter(boft.SPEC, base, {"rescaled": True})
    perturb(adapter, std=0.2)
    holder, net = _in_lycoris(base, adapter)
    with torch.no_grad():
        theirs = holder(x)
    g = torch.randn(theirs.shape, generator=torch.Generator().manual_seed(5))
    grads = {}
    for dense in (False, True):
        monkeypatch.setattr(boft.BOFTLayer, "dense_for", lambda self, rows, d=dense: d)
        for path in ("factored", "rebuild"):
            adapter.path = path
            out = adapter(x)
            assert adapter.last_path == path
            # fp32: a few stages of orthogonal 2-8 wide products, ~1e-7 each
            assert relative_error(out, theirs) <= 1e-5, (dense, path)
            out.backward(g)
            grads[(dense, path)] = adapter.oft_blocks.grad.clone()
            adapter.oft_blocks.grad = None
            adapter.rescale.grad = None
    ref = grads[(False, "rebuild")]
    for key, grad in grads.items():
        assert relative_error(grad, ref) <= 1e-5, key


def test_boft_dense_rule_follows_the_row_count():
    """The dense matrix is used for many rows of a narrow layer, not for a few rows or a
    wide layer (where building it costs more than the stages)."""
    narrow = boft.SPEC.create(nn.Linear(8, 128), 8, 8.0, boft.BOFTOptions(), None)
    wide = boft.SPEC.create(nn.Linear(8, 1024), 8, 8.0, boft.BOFTOptions(), None)
    assert narrow.dense_for(4096) and not narrow.dense_for(64)
    assert not wide.dense_for(4096)


@pytest.mark.parametrize("path", ["factored", "rebuild"])
def test_oft_paired_blocks_agree_with_lycoris(path, monkeypatch):
    """OFT's 8×8 blocks applied two at a time as 16×16 ones (what large CPU inputs
    use) give LyCORIS's output, in the bypass too, and the gradients of the unpaired
    product."""
    base = nn.Linear(24, 64)  # LyCORIS reads block sizes up to the block count
    x = torch.randn(6, 24, generator=torch.Generator().manual_seed(3))
    adapter = build_adapter(oft.SPEC, base, {"block_size": 8})
    assert adapter.oft_blocks.shape == (8, 8, 8)
    perturb(adapter, std=0.2)
    holder, net = _in_lycoris(base, adapter)
    with torch.no_grad():
        theirs = holder(x)
    g = torch.randn(theirs.shape, generator=torch.Generator().manual_seed(4))
    adapter.path = path
    grads = []
    for threshold in (10**12, 0):  # never paired, then always
        monkeypatch.setattr(oft, "PAIR_ELEMENTS", threshold)
        out = adapter(x)
        assert relative_error(out, theirs) <= 1e-5
        with torch.no_grad():
            assert relative_error(adapter.bypass(x, base(x)), out) <= 1e-5
        out.backward(g)
        grads.append(adapter.oft_blocks.grad.clone())
        adapter.oft_blocks.grad = None
    assert relative_error(grads[1], grads[0]) <= 1e-5
