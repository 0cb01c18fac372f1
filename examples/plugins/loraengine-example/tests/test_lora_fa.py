"""The LoRA-FA adapter passes loraengine's adapter conformance suite, keeps its down
projection frozen, and writes files any LoRA reader understands."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("loraengine_example", reason="pip install -e examples/plugins/loraengine-example")

from loraengine_example.adapter import SPEC

from loraengine.testing.conformance import CHECKS, adapter_cases, build_adapter, perturb, run_check

OPTIONS = [{}, {"train_down": True}]


@pytest.mark.parametrize("options", OPTIONS, ids=["frozen_down", "train_down"])
@pytest.mark.parametrize("case", adapter_cases(SPEC), ids=str)
@pytest.mark.parametrize("check", CHECKS)
def test_lora_fa_conforms(case, check, options):
    run_check(SPEC, case, check, options)


@pytest.mark.parametrize("case", adapter_cases(SPEC), ids=str)
def test_only_up_is_trainable_by_default(case):
    adapter = build_adapter(SPEC, case.layer())
    assert [n for n, p in adapter.named_parameters() if p.requires_grad] == ["lora_up"]
    assert "lora_down" in dict(adapter.named_buffers())


@pytest.mark.parametrize("case", adapter_cases(SPEC), ids=str)
def test_delta_is_up_times_down_times_alpha_over_rank(case):
    base = case.layer()
    adapter = build_adapter(SPEC, base, rank=4, alpha=3.0)
    perturb(adapter)
    up = adapter.lora_up.detach().double().flatten(1)
    down = adapter.lora_down.double().flatten(1)
    want = (up @ down * 3.0 / 4).reshape(base.weight.shape)
    torch.testing.assert_close(adapter.delta_weight().double(), want)


@pytest.mark.parametrize("case", adapter_cases(SPEC), ids=str)
def test_file_loads_as_a_builtin_lora(case, loraengine_builtin_host):
    lora = loraengine_builtin_host.registry.get("adapter", "lora")
    adapter = build_adapter(SPEC, case.layer())
    perturb(adapter)
    tensors = {k: v.detach().clone() for k, v in adapter.file_tensors().items()}
    assert lora.owns_keys(set(tensors))
    as_lora = lora.load(case.layer(), tensors, lora.config_model())
    torch.testing.assert_close(as_lora.delta_weight(), adapter.delta_weight())


def test_down_init_comes_from_the_generator_only():
    case = adapter_cases(SPEC)[0]
    a = build_adapter(SPEC, case.layer(), seed=1)
    b = build_adapter(SPEC, case.layer(), seed=1)
    c = build_adapter(SPEC, case.layer(), seed=2)
    assert torch.equal(a.lora_down, b.lora_down)
    assert not torch.equal(a.lora_down, c.lora_down)
