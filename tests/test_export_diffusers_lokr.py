"""LoKr in the diffusers/PEFT key layout, checked with diffusers' own pipelines.

diffusers 0.42 reads LoKr files for the Flux.2 and Z-Image pipelines only (their
``lora_state_dict`` lets ``.lokr_`` keys through; ``load_lora_adapter`` then builds a
PEFT ``LoKrConfig`` from the factors' shapes with α = r, a scale of 1). The
``diffusers`` exporter writes a LoKr module as ``transformer.<path>.lokr_w1`` … with
LoKr's own scale folded into the small factor and no ``alpha``. Tolerance: both sides
compute W + kron(w1, w2)·s in fp32 in a different order (PEFT scales after the
product, we scale w1 first); the rounding of that is a few ulps of |W|, far below the
1e-4 asked of every consumer in docs/compatibility.md.
"""

from __future__ import annotations

import pytest
from torch import nn

from loraengine.core.adapter import ADAPTABLE, AdapterNetwork
from loraengine.core.adapter.network import select_layers
from loraengine.core.files import read_adapter_file, write_adapter_file
from loraengine.plugins import build_plugin_manager
from loraengine.plugins.exporters import diffusers_limits, lokr_pipeline
from loraengine.testing import tiny_pipelines as tp
from loraengine.testing.conformance import relative_error
from tests.conftest import assert_pipeline_fuses_our_merge, linear_network

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

REG = build_plugin_manager().registry
#: α ≠ r and α/r not a power of two, so folding the scale into w1 is exercised
RANK, ALPHA = 2, 3.0
TOL = 1e-4
#: LoKr's layouts: w2 low rank (the default), near-square split, both factors low
#: rank where small enough, both full (scale 1 whatever α says)
OPTIONS = ({}, {"factor": -1}, {"decompose_both": True, "factor": 4}, {"full_matrix": True})


def _transformer(family: str) -> nn.Module:
    return tp.DENOISERS[family][1](0).eval()


def _lokr_network(model: nn.Module, options: dict) -> AdapterNetwork:
    return linear_network(model, "lokr", RANK, ALPHA, options)


@pytest.mark.parametrize("family", ["flux2", "z_image"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "default")
def test_the_pipeline_loads_our_lokr_file_and_fuses_our_merged_weights(family, options,
                                                                       tmp_path):
    ours = _transformer(family)
    network = _lokr_network(ours, options)
    path = tmp_path / "lokr.safetensors"
    tensors = write_adapter_file(path, network.file_modules(), REG.get("exporter", "diffusers"),
                                 {})
    assert all(k.startswith("transformer.") and ".lokr_" in k for k in tensors)
    assert not [k for k in tensors if k.endswith(".alpha")]
    # no warning about diffusers here (Flux.2's says what ComfyUI does not load of it)
    limits = diffusers_limits({p: ("lokr", tuple(t)) for p, t in
                               network.file_modules().items()})
    assert [line for line in limits if not line.startswith("ComfyUI ")] == []
    assert len(limits) == (1 if family == "flux2" else 0)
    network.merge()

    make, sched = tp.DENOISERS[family][1], tp.DENOISERS[family][2]
    pipe = tp.denoiser_pipeline(family, make(0).eval(),
                                diffusers.FlowMatchEulerDiscreteScheduler(**sched))
    assert_pipeline_fuses_our_merge(pipe, path, network, ours, make(0),
                                    ("lokr_w1", "lokr_w1_a"), TOL)


def test_our_reader_takes_the_file_back_to_the_same_delta(tmp_path):
    """The file read back (no ``alpha``: scale 1 on the folded factor) gives each layer
    the ΔW the network had."""
    model = _transformer("z_image")
    network = _lokr_network(model, {})
    path = tmp_path / "lokr.safetensors"
    write_adapter_file(path, network.file_modules(), REG.get("exporter", "diffusers"), {})
    file = read_adapter_file(path, REG, list(select_layers(model, ["*"], [], ADAPTABLE)))
    spec = REG.get("adapter", "lokr")
    for p, layer in network.items():
        back = spec.load(model.get_submodule(p), file.modules[p].params, spec.config_model())
        assert relative_error(back.delta_weight(), layer.delta_weight()) <= 1e-6


def test_lokr_for_other_pipelines_still_warns():
    """Flux.1 and Qwen-Image pipelines reject ``.lokr_`` keys: the limit stays there."""
    for family in ("flux", "qwen_image"):
        model = tp.flux_transformer(0) if family == "flux" else _transformer(family)
        network = _lokr_network(model, {})
        mods = {p: ("lokr", tuple(t)) for p, t in network.file_modules().items()}
        assert lokr_pipeline(mods) is None
        (line,) = diffusers_limits(mods)
        assert f"{len(mods)} layer(s) of lokr are not applied" in line
