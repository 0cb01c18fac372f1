"""LoRA (+DoRA, rs_lora), LoHa, LoKr and full deltas against independent
implementations, end-to-end training, and applying/merging the files they write.

Oracles (test-only): PEFT for the layer math, LyCORIS for reading our files. Each is
used only where its own math is right; the known defects are named where skipped.
"""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import loraengine
from loraengine.api import resolve_config
from loraengine.core.adapter import AdapterNetwork
from loraengine.core.build import build_pipeline
from loraengine.core.errors import ConfigError, DataError
from loraengine.core.train.loop import Trainer
from loraengine.plugins import build_plugin_manager
from loraengine.plugins.adapters.lokr import factorization
from loraengine.testing.conformance import (
    adapter_cases,
    build_adapter,
    perturb,
    relative_error,
)
from loraengine.testing.models import tiny_unet_output

peft = pytest.importorskip("peft")
lycoris = pytest.importorskip("lycoris")
logging.getLogger("LyCORIS").setLevel(logging.ERROR)

REG = build_plugin_manager().registry
CASES = {c.name: c for c in adapter_cases()}


def spec(name):
    return REG.get("adapter", name)


# -- factorization --------------------------------------------------------------------

def test_factorization_matches_lycoris_for_every_dim_and_factor():
    from lycoris.functional.general import factorization as theirs

    for dim in range(1, 400):
        for factor in (-1, 1, 2, 3, 4, 8, 16, 32):
            assert factorization(dim, factor) == theirs(dim, factor), (dim, factor)


# -- PEFT as the oracle of the layer math ----------------------------------------------

class _Wrap(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def _peft_output(config, case, ours, copy_params):
    model = peft.get_peft_model(_Wrap(case.layer()), config)
    layer = model.base_model.model.layer
    with torch.no_grad():
        copy_params(layer)
    model.eval()
    with torch.no_grad():
        return model(case.input())


def _ours(name, case, options, rank, alpha):
    base = case.layer()
    adapter = build_adapter(spec(name), base, options, rank=rank, alpha=alpha)
    perturb(adapter)
    x = case.input()
    with torch.no_grad():
        return adapter, adapter.bypass(x, base(x))


LORA_VARIANTS = [{}, {"rs_lora": True}, {"weight_decompose": True},
                 {"weight_decompose": True, "rs_lora": True}]


@pytest.mark.parametrize("case", CASES.values(), ids=str)
@pytest.mark.parametrize("options", LORA_VARIANTS, ids=lambda o: "-".join(o) or "plain")
def test_lora_and_dora_match_peft(case, options):
    adapter, ours = _ours("lora", case, options, 4, 3.0)
    config = peft.LoraConfig(r=4, lora_alpha=3.0, target_modules=["layer"],
                             use_rslora=options.get("rs_lora", False),
                             use_dora=options.get("weight_decompose", False))

    def copy_params(layer):
        layer.lora_A["default"].weight.copy_(adapter.lora_down)
        layer.lora_B["default"].weight.copy_(adapter.lora_up)
        if adapter.dora_scale is not None:
            mag = layer.lora_magnitude_vector["default"].weight
            mag.copy_(adapter.dora_scale.reshape(mag.shape))

    theirs = _peft_output(config, case, adapter, copy_params)
    assert relative_error(ours, theirs) < 1e-5


def _copy_named(adapter, names):
    def copy_params(layer):
        for name in names:
            target = getattr(layer, name)["default"]
            target.copy_(getattr(adapter, name).reshape(target.shape))
    return copy_params


PEFT_CASES = [c for c in CASES.values() if c.name != "conv3d"]  # PEFT has no Conv3d LoHa/LoKr


@pytest.mark.parametrize("case", PEFT_CASES, ids=str)
@pytest.mark.parametrize("tucker", [False, True], ids=["flat", "tucker"])
def test_loha_matches_peft_with_alpha_not_rank(case, tucker):
    adapter, ours = _ours("loha", case, {"use_tucker": tucker}, 4, 3.0)
    config = peft.LoHaConfig(r=4, alpha=3.0, target_modules=["layer"],
                             use_effective_conv2d=tucker)
    names = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]
    names += ["hada_t1", "hada_t2"] if adapter.tucker else []
    theirs = _peft_output(config, case, adapter, _copy_named(adapter, names))
    assert relative_error(ours, theirs) < 1e-5


LOKR_PEFT = [
    # (options, rank, alpha): PEFT scales by alpha/r always, right whenever a factor is
    # stored low rank; with both factors whole its scale is only right for alpha = r.
    ({"factor": -1}, 1, 3.0),
    ({"factor": -1, "decompose_both": True}, 1, 3.0),
    ({"factor": -1, "use_tucker": True}, 1, 3.0),
    ({"factor": -1}, 4, 4.0),
]


@pytest.mark.parametrize("case", PEFT_CASES, ids=str)
@pytest.mark.parametrize(("options", "rank", "alpha"), LOKR_PEFT,
                         ids=["w2-low-rank", "both-low-rank", "tucker", "whole"])
def test_lokr_matches_peft(case, options, rank, alpha):
    if case.name == "conv1d" and (options.get("use_tucker") or rank == 4):
        pytest.skip("PEFT defect: its Conv1d LoKr with a whole or Tucker w2 builds the "
                    "wrong Kronecker shape (w1 is not expanded to w2's rank)")
    adapter, ours = _ours("lokr", case, options, rank, alpha)
    config = peft.LoKrConfig(r=rank, alpha=alpha, target_modules=["layer"],
                             decompose_factor=-1,
                             decompose_both=options.get("decompose_both", False),
                             use_effective_conv2d=options.get("use_tucker", False))
    names = [k for k in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a",
                         "lokr_w2_b", "lokr_t2") if getattr(adapter, k) is not None]
    theirs = _peft_output(config, case, adapter, _copy_named(adapter, names))
    assert relative_error(ours, theirs) < 1e-5


@pytest.mark.parametrize(("factor", "by_channel"), [(3, False), (4, True)])
def test_lokr_file_with_the_kernel_in_its_split_loads_and_applies(factor, by_channel):
    """ComfyUI's trainer splits ``in·k`` (not ``in``) by its rank: such files load and
    ΔW is their kron reshaped. When the split cuts through a channel's kernel (3 does
    not divide 8 channels) bypass builds ΔW; otherwise it stays factored. Either way it
    agrees with the rebuild."""
    case = CASES["conv2d_3x3"]  # 8 -> 16, 3x3: in·k = 72
    base = case.layer()
    g = torch.Generator().manual_seed(5)
    a, b = factorization(16, 4)
    c, d = factorization(72, factor)
    w1, w2 = torch.randn(a, c, generator=g), torch.randn(b, d, generator=g)
    layer = spec("lokr").load(base, {"lokr_w1": w1, "lokr_w2": w2,
                                     "alpha": torch.tensor(9.0)}, None)
    assert layer.by_channel is by_channel and layer.scale == 1.0
    with torch.no_grad():
        assert torch.equal(layer.delta_weight(), torch.kron(w1, w2).reshape(base.weight.shape))
        x = case.input()
        rebuilt = nn.functional.conv2d(x, base.weight + layer.delta_weight(), base.bias,
                                       padding=1)
        assert relative_error(layer.bypass(x, base(x)), rebuilt) < 1e-5


def test_lokr_tucker_on_wide_convs_conforms_at_rank_above_one():
    """With a Tucker core of rank > 1 the w2 factor comes out of the Tucker product
    with permuted strides, which ``torch.kron`` cannot take: ΔW (merge, rebuild) must
    still build and agree with the factored bypass. The suite's own layers are too
    narrow for a rank-2 Tucker split, so these are wider."""
    from loraengine.testing.conformance import CHECKS, LayerCase, run_adapter_conformance

    def wide(cls):
        return lambda: nn.utils.skip_init(cls, 32, 64, 3, padding=1)

    cases = [LayerCase("conv2d_3x3_wide", wide(nn.Conv2d), (2, 32, 5, 5)),
             LayerCase("conv3d_wide", wide(nn.Conv3d), (1, 32, 3, 4, 4))]
    for case in cases:
        layer = build_adapter(spec("lokr"), case.layer(), {"factor": -1, "use_tucker": True},
                              rank=2)
        assert layer.lokr_t2 is not None and layer.lokr_t2.shape[0] == 2
    report = run_adapter_conformance(spec("lokr"), {"factor": -1, "use_tucker": True},
                                     rank=2, cases=cases)
    assert len(report.passed) == len(cases) * len(CHECKS)


def test_lokr_default_factor_is_the_rank_and_whole_factors_scale_one():
    """With no factor given the rank splits the dimensions (ComfyUI's trainer); when
    neither factor is low rank alpha does not scale ΔW."""
    base = CASES["linear"].layer()  # 24 -> 16
    layer = build_adapter(spec("lokr"), base, {}, rank=2, alpha=7.0)
    assert tuple(layer.lokr_w1.shape) == (2, 2)  # 16 = 2·8, 24 = 2·12
    assert layer.lokr_w2_a is not None and layer.lokr_w2_a.shape[0] == 8
    assert layer.scale == pytest.approx(7.0 / 2)
    whole = build_adapter(spec("lokr"), base, {"full_matrix": True}, rank=2, alpha=7.0)
    assert whole.lokr_w2 is not None and whole.scale == 1.0
    perturb(whole)
    w1, w2 = whole.lokr_w1.detach(), whole.lokr_w2.detach()
    assert torch.equal(whole.delta_weight().detach(), torch.kron(w1, w2))


# -- LyCORIS reads our files -----------------------------------------------------------

class _Layers(nn.Module):
    """One layer of every kind, each run on its own input."""

    def __init__(self):
        super().__init__()
        self.cases = {n: c for n, c in CASES.items()}
        self.layers = nn.ModuleDict({n: c.layer(i) for i, (n, c) in
                                     enumerate(self.cases.items())})

    def forward(self, _=None):
        return torch.cat([self.layers[n](c.input(7)).flatten()
                          for n, c in self.cases.items()])


def _network_on(model, name, options, rank, alpha):
    s = spec(name)
    opts = s.config_model.model_validate(options)
    g = torch.Generator().manual_seed(0)
    layers = {p: s.create(m, rank, alpha, opts, g) for p, m in model.named_modules()
              if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))}
    for i, layer in enumerate(layers.values()):
        perturb(layer, i)
    return AdapterNetwork(layers)


LYCORIS_FILES = [
    ("loha", {}, 4), ("loha", {"use_tucker": True}, 4), ("loha", {"weight_decompose": True}, 4),
    ("lokr", {"factor": -1}, 1), ("lokr", {"factor": -1, "decompose_both": True}, 1),
    ("lokr", {"factor": 2}, 2), ("lokr", {}, 4), ("lokr", {"full_matrix": True}, 4),
    ("lokr", {"factor": -1, "weight_decompose": True}, 1),
    ("lora", {}, 4), ("lora", {"weight_decompose": True}, 4), ("full", {}, 4),
]


@pytest.mark.parametrize(("name", "options", "rank"), LYCORIS_FILES,
                         ids=lambda v: v if isinstance(v, str) else str(v))
@pytest.mark.parametrize("alpha_equals_rank", [True, False], ids=["alpha=r", "alpha!=r"])
def test_lycoris_reads_our_file_like_our_merged_model(name, options, rank,
                                                      alpha_equals_rank, tmp_path):
    """Our file, loaded with ``create_lycoris_from_weights`` on the same model, gives
    our merged model's outputs: LyCORIS's forward always, its merge only with α = r
    (it applies the LoHa/LoKr scale twice when merging)."""
    from lycoris import create_lycoris_from_weights

    alpha = float(rank) if alpha_equals_rank else rank + 1.5
    model = _Layers().eval().requires_grad_(False)
    network = _network_on(model, name, options, rank, alpha)
    kohya = REG.get("exporter", "kohya")
    tensors = kohya.to_file(network.file_modules(torch.float32))
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for path, layer in network.items():  # W+ΔW (b+Δb) written into a copy
            target = merged.get_submodule(path)
            target.weight.add_(layer.delta_weight())
            if layer.delta_bias() is not None:
                target.bias.add_(layer.delta_bias())
        ours = merged()
    lyco_keys = {k.replace("lora_unet_", "lycoris_", 1): v for k, v in tensors.items()}
    modes = ["apply", "merge"] if (alpha_equals_rank or name in ("lora", "full")) else ["apply"]
    for how in modes:
        theirs_model = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net, _ = create_lycoris_from_weights(1.0, "", theirs_model, weights_sd=dict(lyco_keys))
        assert len(net.loras) == len(network.paths)
        net.apply_to() if how == "apply" else net.merge_to(1.0)
        with torch.no_grad():
            theirs = theirs_model()
        assert relative_error(theirs, ours) < 1e-5, how


def test_lycoris_merge_applies_the_scale_twice_which_we_do_not_copy():
    """The reason the test above merges through LyCORIS only with α = r."""
    from lycoris import create_lycoris_from_weights

    model = _Layers().eval().requires_grad_(False)
    network = _network_on(model, "lokr", {"factor": -1}, 1, 3.0)
    tensors = REG.get("exporter", "kohya").to_file(network.file_modules(torch.float32))
    lyco_keys = {k.replace("lora_unet_", "lycoris_", 1): v for k, v in tensors.items()}
    applied, merged = copy.deepcopy(model), copy.deepcopy(model)
    for target, how in ((applied, "apply"), (merged, "merge")):
        net, _ = create_lycoris_from_weights(1.0, "", target, weights_sd=dict(lyco_keys))
        net.apply_to() if how == "apply" else net.merge_to(1.0)
    with torch.no_grad():
        assert relative_error(merged(), applied()) > 1e-2


def test_lycoris_file_applies_like_lycoris(tmp_path):
    """A file LyCORIS writes itself (kohya keys) applies with ``loraengine.apply`` and
    gives LyCORIS's own outputs."""
    from lycoris import create_lycoris
    from safetensors.torch import save_file

    model = _Layers().eval().requires_grad_(False)
    results = {}
    variants = {"loha": ("loha", {}), "lokr": ("lokr", {}),
                "dora": ("lora", {"weight_decompose": True}),
                # older LyCORIS DoRA: one norm per input column (dora_scale [1, in, ...])
                "doha-in": ("loha", {"weight_decompose": True, "wd_on_out": False})}
    for label, (algo, kwargs) in variants.items():
        target = copy.deepcopy(model)
        torch.manual_seed(0)  # LyCORIS initialises from the global RNG
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = create_lycoris(target, 1.0, linear_dim=4, linear_alpha=4, algo=algo,
                                 conv_dim=4, conv_alpha=4, factor=-1, **kwargs)
        net.apply_to()
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn(p.shape) * 0.1)
            want = target()
        sd = {k.replace("lycoris_", "lora_unet_", 1): v.detach().contiguous()
              for k, v in net.state_dict().items()}
        file = tmp_path / f"{label}.safetensors"
        save_file(sd, str(file))
        for mode in ("bypass", "merge"):
            fresh = copy.deepcopy(model)
            handle = loraengine.apply(fresh, file, mode=mode)
            with torch.no_grad():
                got = fresh()
            results[f"{label}-{mode}"] = relative_error(got, want)
            assert set(handle.algorithms.values()) == {algo}
    assert max(results.values()) < 1e-5, results


# -- loraengine.apply ------------------------------------------------------------------

def test_apply_bypass_is_removable_and_strength_scales_the_delta(tmp_path):
    model = _Layers().eval().requires_grad_(False)
    network = _network_on(model, "lora", {}, 4, 3.0)
    tensors = REG.get("exporter", "kohya").to_file(network.file_modules(torch.float32))
    with torch.no_grad():
        base = model()
        with loraengine.apply(model, tensors, strength=1.0) as handle:
            full = model()
            handle.set_strength(0.5)
            half = model()
        after = model()
    assert torch.equal(after, base)
    assert relative_error(full, base) > 1e-3
    assert relative_error(half - base, (full - base) * 0.5) < 1e-5  # LoRA is linear in strength


def test_apply_errors_name_the_problem(tmp_path):
    model = _Layers()
    with pytest.raises(ConfigError, match="mode"):
        loraengine.apply(model, {}, mode="weld")
    stray = {"lora_unet_nowhere.lora_down.weight": torch.zeros(1, 2),
             "lora_unet_nowhere.lora_up.weight": torch.zeros(2, 1)}
    with pytest.raises(DataError, match="lora_unet_nowhere|nowhere"):
        loraengine.apply(model, stray)
    odd = {"lora_unet_layers_linear.mystery": torch.zeros(3)}
    with pytest.raises(DataError, match="layers.linear: keys \\['mystery'\\] match no"):
        loraengine.apply(model, odd)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="bad.safetensors"):
        loraengine.apply(model, bad)


def test_a_module_claimed_twice_goes_to_the_named_then_the_builtin_algorithm():
    from dataclasses import replace

    from loraengine.inference import owners_of

    lora = spec("lora")
    names_only = replace(lora, name="plugin_lora",
                         owns_keys=lambda keys: {"lora_down.weight"} <= keys)  # sets only
    params = {"lora_down.weight": torch.zeros(2, 3), "lora_up.weight": torch.zeros(3, 2)}
    specs = [names_only, lora]
    assert [s.name for s in owners_of(specs, params, None, {"lora"})] == ["lora", "plugin_lora"]
    assert [s.name for s in owners_of(specs, params, "plugin_lora", {"lora"})][0] == "plugin_lora"
    oft, boft = spec("oft"), spec("boft")  # same names; the tensors' shapes decide
    blocks = {"oft_blocks": torch.zeros(3, 4, 4, 4), "alpha": torch.tensor(0.0)}
    assert [s.name for s in owners_of([oft, boft], blocks)] == ["boft"]


def test_apply_is_the_function_of_the_inference_module():
    from loraengine import inference

    assert loraengine.apply is inference.apply


# -- end to end on the tiny UNet --------------------------------------------------------

TRAINED = [
    ("lora", {"weight_decompose": True}),
    ("loha", {}),
    ("lokr", {}),
    ("lokr", {"factor": -1, "decompose_both": True, "weight_decompose": True}),
    ("full", {}),
]


def _fresh_unet(unet_dir):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(str(unet_dir / "unet"),
                                                local_files_only=True).eval()


#: bypass mode in the fast default through one algorithm (every algorithm's bypass
#: equals its weight mode in the conformance suites); all of them in the full suite
_BYPASS_FAST = "lokr"


@pytest.mark.parametrize(
    ("name", "options", "bypass"),
    [pytest.param(n, o, b, id=f"{'bypass' if b else 'weight'}-{i}",
                  marks=(pytest.mark.slow,) if b and i != _BYPASS_FAST else ())
     for b in (False, True)
     for (n, o), i in zip(TRAINED, ["dora", "loha", "lokr", "lokr-both-dora", "full"],
                          strict=True)])
def test_trains_and_the_file_reproduces_the_trained_model(name, options, bypass,
                                                          unet_config, unet_dir):
    cfg = copy.deepcopy(unet_config)
    cfg["adapter"].update(algorithm=name, **options)
    cfg["training"]["steps"] = 12
    cfg["optimizer"] = {"lr": 1e-2}
    cfg["memory"]["bypass_mode"] = bypass
    host = build_plugin_manager()
    config, base_dir = resolve_config(cfg, host)
    pipe = build_pipeline(config, host, base_dir=base_dir)
    try:
        assert pipe.attach_mode == ("bypass" if bypass else "weight")

        def probe():  # fixed samples, noise and timesteps: a fresh trainer's first draw
            with torch.no_grad():
                return float(Trainer(pipe, write_files=False).micro_step(torch.arange(6)))

        before = probe()
        result = Trainer(pipe).run()
        after = probe()
        trained = tiny_unet_output(pipe.model)
    finally:
        pipe.close()
    assert after < before * 0.9, (before, after)
    assert result.path is not None and result.path.exists()

    base_out = tiny_unet_output(_fresh_unet(unet_dir))
    assert relative_error(trained, base_out) > 1e-4
    for mode in ("bypass", "merge"):
        unet = _fresh_unet(unet_dir)
        handle = loraengine.apply(unet, result.path, mode=mode)
        assert set(handle.algorithms.values()) == {name}
        assert relative_error(tiny_unet_output(unet), trained) < 1e-5, mode
        if mode == "bypass":
            handle.remove()
            assert torch.equal(tiny_unet_output(unet), base_out)


def test_cli_train_then_merge_writes_the_merged_model(unet_config, unet_dir, tmp_path):
    import yaml

    from loraengine.cli.main import cli

    cfg = copy.deepcopy(unet_config)
    cfg["adapter"].update(algorithm="lokr", factor=-1, decompose_both=True)
    cfg["training"]["steps"] = 2
    path = tmp_path / "lokr.yaml"
    path.write_text(yaml.safe_dump(cfg))
    runner = CliRunner()
    res = runner.invoke(cli, ["train", str(path), "--quiet"])
    assert res.exit_code == 0, res.output
    lora = tmp_path / "out" / "test.safetensors"
    assert lora.exists()

    out = tmp_path / "merged"
    res = runner.invoke(cli, ["merge", "--model", str(unet_dir), "--lora", str(lora),
                              "--out", str(out), "--strength", "0.7"])
    assert res.exit_code == 0, res.output
    assert "lokr" in res.output
    assert (out / "model_index.json").exists() and (out / "scheduler").is_dir()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged.")]
    merged = _fresh_unet(out)
    want = _fresh_unet(unet_dir)
    loraengine.apply(want, lora, strength=0.7, mode="bypass")
    assert relative_error(tiny_unet_output(merged), tiny_unet_output(want)) < 1e-5

    again = runner.invoke(cli, ["merge", "--model", str(unet_dir), "--lora", str(lora),
                                "--out", str(out)])
    assert again.exit_code == 2
    assert "error: --out:" in again.output and "exists" in again.output
    assert "Traceback" not in again.output
    missing = runner.invoke(cli, ["merge", "--model", str(unet_dir), "--lora",
                                  str(tmp_path / "none.safetensors"), "--out",
                                  str(tmp_path / "m2"), "--overwrite"])
    assert missing.exit_code == 1 and "none.safetensors" in missing.output
    assert not (tmp_path / "m2").exists()


def test_merge_of_a_plain_model_folder_keeps_or_sets_the_dtype(unet_dir, tmp_path):
    """A model folder (config.json + weights) in, the same kind of folder out, in the
    requested dtype; the merged weights equal W+ΔW."""
    from loraengine.cli.main import cli
    from loraengine.core.files import save_lora

    unet = _fresh_unet(unet_dir)
    network = _network_on(unet, "loha", {}, 2, 1.0)
    lora = tmp_path / "loha.safetensors"
    save_lora(lora, REG.get("exporter", "kohya").to_file(network.file_modules()), {})
    out = tmp_path / "unet16"
    res = CliRunner().invoke(cli, ["merge", "--model", str(unet_dir / "unet"), "--lora",
                                   str(lora), "--out", str(out), "--dtype", "fp16"])
    assert res.exit_code == 0, res.output
    from safetensors import safe_open

    weights = sorted(out.glob("*.safetensors"))
    with safe_open(str(weights[0]), framework="pt") as fh:
        assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"F16"}
    merged = _fresh_unet_folder(out)
    path, layer = next(iter(network.items()))
    want = (unet.get_submodule(path).weight + layer.delta_weight()).detach()
    got = merged.get_submodule(path).weight.float()
    assert relative_error(got, want) < 2e-3  # fp16 rounding only
    assert relative_error(want, unet.get_submodule(path).weight) > 1e-3


def _fresh_unet_folder(folder):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(str(folder), local_files_only=True,
                                                torch_dtype=torch.float16)
