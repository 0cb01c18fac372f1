"""Every built-in adapter algorithm in the registry passes the conformance suite
(loraengine.testing.conformance), on every layer case and check, under each of its
option variants below. Algorithms registered later are picked up automatically."""

from __future__ import annotations

import pytest

from loraengine.plugins import build_plugin_manager
from loraengine.testing.conformance import CHECKS, adapter_cases, run_adapter_conformance, run_check

#: Option sets worth running besides the defaults, per algorithm; "rank" (popped) is
#: the rank to run at: the tiny layers need rank 1 for LoKr to store factors low rank.
VARIANTS: dict[str, list[dict]] = {
    "lora": [{"rs_lora": True}, {"weight_decompose": True},
             {"rs_lora": True, "weight_decompose": True, "rank": 3},
             {"weight_decompose": True, "weight_decompose_norm": "comfyui"}],
    "loha": [{"use_tucker": True}, {"weight_decompose": True},
             {"use_tucker": True, "weight_decompose": True},
             {"use_tucker": True, "weight_decompose": True, "weight_decompose_norm": "comfyui"}],
    "lokr": [{"factor": -1, "rank": 1}, {"factor": -1, "decompose_both": True, "rank": 1},
             {"factor": -1, "use_tucker": True, "rank": 1}, {"factor": 2, "rank": 1},
             {"factor": -1, "rank": 1, "weight_decompose": True}, {"weight_decompose": True},
             {"factor": -1, "rank": 1, "weight_decompose": True,
              "weight_decompose_norm": "comfyui"},
             {"full_matrix": True, "factor": -1}],
}


def _variants(spec):
    """(options, rank) pairs for ``spec``: defaults first."""
    out = []
    for entry in [{}, *VARIANTS.get(spec.name, [])]:
        opts = dict(entry)
        rank = opts.pop("rank", 4)
        if set(opts) <= set(spec.config_model.model_fields):  # skip options not present
            out.append((opts, rank))
    return out


def _registry_specs():
    """The built-in algorithms (third-party ones installed here run their own suite)."""
    from loraengine.plugins import BUILTIN_PLUGINS

    reg = build_plugin_manager().registry
    return [p.spec for _, p in sorted(reg.entries["adapter"].items())
            if p.plugin in BUILTIN_PLUGINS]


def _params():
    out = []
    for spec in _registry_specs():
        for opts, rank in _variants(spec):
            label = spec.name + "".join(f"-{k}={v}" for k, v in opts.items()) + f"-r{rank}"
            for case in adapter_cases():
                out.append(pytest.param(spec, opts, rank, case, id=f"{label}-{case.name}"))
    return out


@pytest.mark.parametrize(("spec", "options", "rank", "case"), _params())
@pytest.mark.parametrize("check", CHECKS)
def test_builtin_adapter_conforms(spec, options, rank, case, check):
    if not case.supported_by(spec):
        pytest.skip(f"{spec.name} does not adapt {case.name}")
    run_check(spec, case, check, options, rank=rank)


def test_run_adapter_conformance_reports_every_case_and_check():
    spec = build_plugin_manager().registry.get("adapter", "lora")
    report = run_adapter_conformance(spec, {"rs_lora": True})
    assert report.algorithm == "lora"
    assert len(report.passed) == len(adapter_cases()) * len(CHECKS)
    assert report.skipped == []


def test_conformance_refuses_alpha_equal_to_rank():
    spec = build_plugin_manager().registry.get("adapter", "lora")
    with pytest.raises(ValueError, match="alpha != rank"):
        run_adapter_conformance(spec, rank=4, alpha=4)


# -- the suite catches broken algorithms ------------------------------------------------

def _broken_spec(kind: str):
    """LoRA with one deliberate defect of the kind the reference implementations have."""
    from dataclasses import replace

    import torch

    from loraengine.plugins.adapters import lora

    class Broken(lora.LoRALayer):
        def bypass(self, x, base_out):
            out = super().bypass(x, base_out)
            if kind == "double_scale_bypass":  # the GLoRA defect: scale applied twice
                return base_out + (out - base_out) * self.scale
            return out

        def delta_bias(self):
            if kind == "rotates_bias":  # a delta that also touches the bias in merge only
                return torch.ones_like(self.base.bias) * 0.5
            return None

    def create(base, rank, alpha, options, generator):
        layer = Broken(base, rank, alpha, False, generator)
        if kind == "nonzero_init":
            with torch.no_grad():
                layer.lora_up.add_(1e-3)
        return layer

    def load(base, tensors, options):
        layer = lora.load(base, tensors, options)
        fixed = Broken(base, layer.rank, layer.alpha)
        fixed.load_state_dict(layer.state_dict())
        if kind == "load_ignores_alpha":  # ComfyUI's resume defect
            fixed.alpha = float(fixed.rank)
        return fixed

    return replace(lora.SPEC, name=f"broken_{kind}", create=create, load=load)


@pytest.mark.parametrize(("kind", "check"), [
    ("double_scale_bypass", "paths_agree"),
    ("rotates_bias", "zero_init"),
    ("nonzero_init", "zero_init"),
    ("load_ignores_alpha", "file_roundtrip"),
])
def test_conformance_catches_a_defect(kind, check):
    spec = _broken_spec(kind)
    case = adapter_cases()[2]
    with pytest.raises(AssertionError, match=rf"\[{check}\] broken_{kind}"):
        run_check(spec, case, check)


def test_file_keys_identify_exactly_one_algorithm():
    """A saved module's tensors must be claimed by its own algorithm only, or applying
    a file could not tell which algorithm to rebuild. (Names alone may be shared, as
    OFT's and BOFT's ``oft_blocks`` are; the tensors' shapes then decide.)"""
    from loraengine.inference import owners_of
    from loraengine.testing.conformance import build_adapter, perturb

    specs = _registry_specs()
    for spec in specs:
        for opts, rank in _variants(spec):
            case = adapter_cases(spec)[0]
            adapter = build_adapter(spec, case.layer(), opts, rank=rank)
            perturb(adapter)
            tensors = adapter.file_tensors()
            owners = [s.name for s in owners_of(specs, tensors)]
            assert owners == [spec.name], (spec.name, opts, sorted(tensors), owners)
