"""``loraengine merge`` for every built-in algorithm and option combination.

Each case builds an adapter on every layer of the tiny diffusers UNet that the
algorithm adapts (seeded, perturbed so nothing is zero; with ``norm_and_bias_deltas``
also the bias and norm deltas), writes the file, merges it with the merge tool into a
new model folder and loads that folder back. The merged weights must equal the base
weights with the in-memory network merged into a fresh copy (nothing read from the
file), and the merged model's output must equal the base model run with the in-memory
network attached in bypass mode (which, for most algorithms, never builds ΔW).

Tolerances, from float32 rounding (u = 2⁻²⁴ ≈ 6e-8):

- weights: the file is fp32 and safetensors stores it bit for bit, so both sides
  compute ΔW from identical tensors by the same code and each side rounds W+ΔW once:
  an element may differ by at most 2u·|W+ΔW| (the check is element by element; the
  cases written in the PEFT layout use an α/r that folds into lora_B exactly).
- outputs: bypass computes W·x + ΔW·x, the merged model (W+ΔW)·x; each dot product of
  length n (n ≤ 48·9 = 432 in this UNet) rounds differently, by about √n·u ≈ 1.3e-6 of
  its terms' magnitude when the rounding errors are independent, and the UNet's ~30
  layers in sequence add these up to about √30 · 1.3e-6 ≈ 7e-6 relative to the output's
  largest value: the bound is 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from conftest import first_of_each

from loraengine.core.adapter import ADAPTABLE, NORMS, AdapterNetwork, ChannelDelta
from loraengine.core.adapter.network import select_layers
from loraengine.core.files import write_adapter_file
from loraengine.plugins import BUILTIN_PLUGINS, build_plugin_manager
from loraengine.testing.conformance import perturb, relative_error
from loraengine.testing.models import tiny_unet_output
from loraengine.tools.merge.logic import merge_model

REG = build_plugin_manager().registry
U = 2.0 ** -24
OUTPUT_TOL = 1e-5

#: (algorithm, options, rank) over the options each algorithm has. The UNet's channel
#: counts (4, 16, 32, 64, 128) decide the ranks LoKr needs for its factors to be low
#: rank: 32 = 4·8 balanced, so w2 is low rank below 4 and w1 (decompose_both) below 2.
MATRIX: list = [
    ("lora", {}, 4), ("lora", {"rs_lora": True}, 4), ("lora", {"weight_decompose": True}, 4),
    ("lora", {"rs_lora": True, "weight_decompose": True}, 3),
    ("lora", {"weight_decompose": True, "weight_decompose_norm": "comfyui"}, 4),
    ("lora", {"norm_and_bias_deltas": True}, 4),
    ("loha", {}, 4), ("loha", {"use_tucker": True}, 4), ("loha", {"weight_decompose": True}, 4),
    ("loha", {"use_tucker": True, "weight_decompose": True}, 4),
    ("loha", {"use_tucker": True, "weight_decompose": True, "weight_decompose_norm": "comfyui"},
     4),
    ("lokr", {}, 4), ("lokr", {"factor": -1}, 2), ("lokr", {"factor": 2}, 2),
    ("lokr", {"factor": -1, "decompose_both": True}, 1),
    ("lokr", {"factor": -1, "use_tucker": True}, 2),
    ("lokr", {"factor": -1, "use_tucker": True, "decompose_both": True}, 1),
    ("lokr", {"factor": -1, "weight_decompose": True}, 2),
    ("lokr", {"factor": -1, "use_tucker": True, "weight_decompose": True}, 2),
    ("lokr", {"factor": -1, "weight_decompose": True, "weight_decompose_norm": "comfyui"}, 2),
    ("lokr", {"full_matrix": True, "factor": -1}, 4),
    ("lokr", {"factor": -1, "use_tucker": True, "norm_and_bias_deltas": True}, 2),
    ("oft", {}, 4), ("oft", {"constraint": 0.5, "rescaled": True}, 4),
    ("oft", {"block_size": 2}, 4), ("oft", {"block_count": 2, "constraint": 0.3}, 4),
    ("oft", {"rescaled": True, "norm_and_bias_deltas": True}, 4),
    ("boft", {}, 4), ("boft", {"constraint": 0.5, "rescaled": True}, 4),
    ("boft", {"stages": 2}, 4), ("boft", {"block_size": 2}, 4),
    ("glora", {}, 4), ("ia3", {}, 4), ("ia3", {"on_input": True}, 4),
    ("full", {}, 4),
    ("full", {"norm_and_bias_deltas": True}, 4),
]


def _values(case) -> tuple[str, dict, int]:
    return tuple(case.values) if hasattr(case, "values") else case


def _id(case) -> str:
    name, options, rank = _values(case)
    return name + "".join(f"-{k}={v}" for k, v in options.items()) + f"-r{rank}"


def test_the_matrix_covers_every_builtin_algorithm_and_option():
    builtin = {n for n, p in REG.entries["adapter"].items() if p.plugin in BUILTIN_PLUGINS}
    cases = [_values(c) for c in MATRIX]
    assert {name for name, _, _ in cases} == builtin
    for name in builtin:
        fields = set(REG.get("adapter", name).config_model.model_fields)
        used = {k for n, opts, _ in cases if n == name for k in opts}
        assert fields <= used, (name, fields - used)


def _fresh_unet(folder):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(str(folder), local_files_only=True,
                                                torch_dtype=torch.float32).eval()


def build_network(unet, name: str, options: dict, rank: int, alpha: float = 3.0
                  ) -> AdapterNetwork:
    """A perturbed adapter on every layer ``name`` adapts (alpha ≠ rank, so a wrong
    scale shows), with bias and norm deltas when the options ask for them."""
    spec = REG.get("adapter", name)
    opts = dict(options)
    deltas_on = opts.pop("norm_and_bias_deltas", False)
    config = spec.config_model.model_validate(opts)
    layers = select_layers(unet, ["*"], [], spec.layer_types or ADAPTABLE)
    g = torch.Generator().manual_seed(0)
    built = {}
    for i, (path, base) in enumerate(sorted(layers.items())):
        layer = spec.create(base, rank, alpha, config, g)
        layer.algorithm = name
        perturb(layer, i)
        built[path] = layer
    deltas = {}
    if deltas_on:
        # as the engine builds them: no bias delta where the adapter trains its own
        candidates = {**select_layers(unet, ["*"], [], NORMS),
                      **{p: m for p, m in layers.items() if built[p].delta_bias() is None}}
        for i, (path, base) in enumerate(sorted(candidates.items())):
            delta = ChannelDelta.fresh(base)
            if delta is not None:
                perturb(delta, 10_000 + i)
                deltas[path] = delta
    return AdapterNetwork(built, deltas)


def check_merged(merged, unet, network: AdapterNetwork, bypass_out: torch.Tensor) -> None:
    """``merged`` (from the file) against ``unet`` with ``network`` merged in memory."""
    network.merge()
    paths = {p for p, _ in network.all_items()}
    assert paths, "no module adapted"
    want_state, got_state = unet.state_dict(), merged.state_dict()
    changed = 0
    for key, want in want_state.items():
        got = got_state[key]
        assert got.dtype == torch.float32, key
        diff = (got - want).abs()
        bound = 2 * U * want.abs()
        assert bool((diff <= bound).all()), (key, float(diff.max()))
        changed += key.rsplit(".", 1)[0] in paths
    assert changed >= len(network.paths)
    err = relative_error(tiny_unet_output(merged), bypass_out)
    assert err <= OUTPUT_TOL, err


def file_notes(name: str, options: dict) -> dict[str, str]:
    """The metadata a training run of ``name`` with ``options`` adds to its file
    (``AdapterSpec.file_metadata``: DoRA's norm among it)."""
    spec = REG.get("adapter", name)
    config = spec.config_model.model_validate(
        {k: v for k, v in options.items() if k != "norm_and_bias_deltas"})
    return spec.file_metadata(config) if spec.file_metadata else {}


def _build_and_write(unet_dir, tmp_path, case, exporter: str = "kohya"):
    name, options, rank = case
    unet = _fresh_unet(unet_dir / "unet")
    base_out = tiny_unet_output(unet)
    # The diffusers/PEFT layout folds α/r into lora_B; with α/r a power of two that
    # product is exact, so the file's tensors still give bit-identical ΔW.
    alpha = rank / 2 if exporter in ("peft", "diffusers") else 3.0
    network = build_network(unet, name, options, rank, alpha)
    network.attach("bypass")
    bypass_out = tiny_unet_output(unet)
    network.detach()
    assert relative_error(bypass_out, base_out) > 1e-3  # the adapter does something
    lora = tmp_path / f"{name}.safetensors"
    write_adapter_file(lora, network.file_modules(), REG.get("exporter", exporter),
                       {"loraengine.algorithm": name, **file_notes(name, options)})
    return unet, network, bypass_out, lora


@pytest.mark.parametrize(("name", "options", "rank"),
                         first_of_each(MATRIX, lambda c: c[0], ids=_id))
def test_merge_equals_the_networks_own_merge(name, options, rank, unet_dir, tmp_path):
    case = (name, options, rank)
    unet, network, bypass_out, lora = _build_and_write(unet_dir, tmp_path, case)
    out = tmp_path / "merged"
    info = merge_model(unet_dir, lora, out)
    assert info["algorithms"] == [case[0]] or (not network.paths and info["algorithms"] == [])
    assert info["modules"] == len(network.paths)
    check_merged(_fresh_unet(out / "unet"), unet, network, bypass_out)


#: (the comfyui exporter writes a Tucker LoKr's large factor whole, a product rounded
#: once more than the network's own ΔW: that case goes through kohya, which keeps the
#: factors as trained)
CLI_CASES = [
    (("lokr", {"factor": -1, "use_tucker": True}, 2), "kohya"),
    (("lora", {"weight_decompose": True}, 4), "peft"),
    (("boft", {"constraint": 0.5, "rescaled": True}, 4), "diffusers"),
    (("loha", {"use_tucker": True, "norm_and_bias_deltas": True}, 4), "comfyui"),
    (("lora", {"weight_decompose": True, "weight_decompose_norm": "comfyui"}, 4), "comfyui"),
]


@pytest.mark.parametrize(("case", "exporter"), CLI_CASES,
                         ids=[f"{_id(c)}-{e}" for c, e in CLI_CASES])
def test_merge_command_in_every_key_format(case, exporter, unet_dir, tmp_path):
    from loraengine.cli.main import cli

    unet, network, bypass_out, lora = _build_and_write(unet_dir, tmp_path, case, exporter)
    out = tmp_path / "merged"
    res = CliRunner().invoke(cli, ["merge", "--model", str(unet_dir), "--lora", str(lora),
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    # peft and diffusers are one key layout, reported by its first name
    layout = "diffusers" if exporter == "peft" else exporter
    assert case[0] in res.output and f"{layout} keys" in res.output
    check_merged(_fresh_unet(out / "unet"), unet, network, bypass_out)


def test_apply_merge_mode_of_lokr_tucker(unet_dir, tmp_path):
    """``loraengine.apply(mode="merge")`` on the LoKr-Tucker file (it used to crash in
    ``torch.kron``) merges the same weights as the merge tool's check."""
    import loraengine

    case = ("lokr", {"factor": -1, "use_tucker": True}, 2)
    unet, network, bypass_out, lora = _build_and_write(unet_dir, tmp_path, case)
    assert any(layer.lokr_t2 is not None for _, layer in network.items())
    applied = _fresh_unet(unet_dir / "unet")
    handle = loraengine.apply(applied, lora, mode="merge")
    assert set(handle.algorithms.values()) == {"lokr"}
    check_merged(applied, unet, network, bypass_out)
