"""Selective activation checkpointing (``memory.checkpoint_policy``): the gradients
equal those of a run without checkpointing, what is kept is not recomputed (the
plan's FLOP count of the backward pass says so), and the choice under a budget keeps
the outputs costliest to recompute per byte."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import factored_unet_config, seed_adapter

from loraengine.cli.main import cli
from loraengine.core.build import build_pipeline
from loraengine.core.config.root import parse_config
from loraengine.core.errors import ConfigError
from loraengine.plugins.memory import checkpointing
from loraengine.testing.models import save_tiny_unet_data
from loraengine.tools.plan import logic as plan

#: The same operations on the same inputs: equal in practice, as for the depth option.
RTOL = 1e-6

POLICIES = {
    "save-matmuls": {"checkpoint_policy": "save_matmuls"},
    "budget-0.3": {"checkpoint_policy": "budget", "checkpoint_budget": 0.3},
    "depth-2-budget-0.6": {"checkpoint_depth": 2, "checkpoint_policy": "budget",
                           "checkpoint_budget": 0.6},
    "offloading+budget-0.3": {"offloading": True, "checkpoint_policy": "budget",
                              "checkpoint_budget": 0.3},
}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    return save_tiny_unet_data(tmp_path_factory.mktemp("selective-data"))


def second_pass_grads(host, unet_dir, files, memory: dict, algorithm: str
                      ) -> dict[str, torch.Tensor]:
    """Adapter gradients of the second of two forward+backward passes on the same
    inputs (the budget policy chooses in the first and keeps from the second)."""
    cfg = parse_config(factored_unet_config(unet_dir, files, algorithm, memory),
                       host.registry)
    pipe = build_pipeline(cfg, host)
    try:
        g = seed_adapter(pipe)
        x = torch.randn(2, 4, 8, 8, generator=g)
        cond = torch.randn(2, 3, 16, generator=g)
        for _ in range(2):
            pipe.network.zero_grad(set_to_none=True)
            out = pipe.loaded.predict(pipe.model, x, torch.tensor([10, 700]),
                                      {"cond": cond})
            (out ** 2).mean().backward()
        return {n: p.grad.detach().clone() for n, p in pipe.network.named_parameters()
                if p.requires_grad}
    finally:
        pipe.close()


_plain: dict[str, dict[str, torch.Tensor]] = {}


CASES = [("lora", p) for p in POLICIES] + [("loha", "budget-0.3"), ("oft", "budget-0.3")]


@pytest.mark.parametrize(("algorithm", "policy"), CASES)
def test_selective_gradients_equal_a_run_without_checkpointing(host, unet_dir, files,
                                                               algorithm, policy):
    if algorithm not in _plain:
        _plain[algorithm] = second_pass_grads(host, unet_dir, files,
                                              {"gradient_checkpointing": False}, algorithm)
    g0 = _plain[algorithm]
    g = second_pass_grads(host, unet_dir, files,
                          {"gradient_checkpointing": True, **POLICIES[policy]}, algorithm)
    assert set(g) == set(g0) and g0
    total = torch.sqrt(sum((v.double() ** 2).sum() for v in g0.values()))
    assert total > 0
    for name, ref in g0.items():  # a tensor whose gradient is 0 must stay (near) 0
        err = float((g[name].double() - ref.double()).norm()
                    / ref.double().norm().clamp_min(1e-12 * total))
        assert err <= RTOL, (name, err)


# -- what is kept is not recomputed ------------------------------------------------------

_plans: dict[str, plan.MemoryPlan] = {}


def planned(host, unet_dir, files, memory: dict) -> plan.MemoryPlan:
    key = repr(sorted(memory.items()))
    if key not in _plans:
        cfg = parse_config(factored_unet_config(unet_dir, files, "lora", memory),
                           host.registry)
        _plans[key] = plan.estimate(cfg, host)
    return _plans[key]


@pytest.mark.slow
def test_kept_outputs_are_not_recomputed_and_cost_memory(host, unet_dir, files):
    """The plan's dry run counts the FLOPs of matmuls, convolutions and attention.
    Plain checkpointing recomputes every one of them in the backward pass; with
    save_matmuls none is recomputed, so the backward pass costs what it costs without
    checkpointing; a budget lies between, and so do the activations."""
    bare = planned(host, unet_dir, files, {"gradient_checkpointing": False})
    full = planned(host, unet_dir, files, {"gradient_checkpointing": True})
    keep = planned(host, unet_dir, files, {"gradient_checkpointing": True,
                                           "checkpoint_policy": "save_matmuls"})
    part = planned(host, unet_dir, files, {"gradient_checkpointing": True,
                                           "checkpoint_policy": "budget",
                                           "checkpoint_budget": 0.3})
    assert bare.forward_flops == full.forward_flops == keep.forward_flops == part.forward_flops
    assert full.backward_flops > bare.backward_flops
    assert keep.backward_flops == bare.backward_flops
    assert bare.backward_flops < part.backward_flops < full.backward_flops
    assert full.activations < part.activations < keep.activations


@pytest.mark.slow
def test_budget_keeps_nothing_at_0_and_everything_at_1(host, unet_dir, files):
    def flops(budget: float) -> int:
        return planned(host, unet_dir, files, {
            "gradient_checkpointing": True, "checkpoint_policy": "budget",
            "checkpoint_budget": budget}).backward_flops

    full = planned(host, unet_dir, files, {"gradient_checkpointing": True})
    bare = planned(host, unet_dir, files, {"gradient_checkpointing": False})
    assert flops(0.0) == full.backward_flops
    assert flops(1.0) == bare.backward_flops


def test_choose_fills_the_budget_by_flops_per_byte():
    # (flops, bytes): intensities 10, 1, 5, 20, 2
    candidates = [(100, 10), (40, 40), (50, 10), (400, 20), (40, 20)]
    total = sum(b for _, b in candidates)
    for budget in (0.0, 0.1, 0.3, 0.5, 0.75, 1.0):
        kept = checkpointing.choose(candidates, budget)
        assert sum(candidates[i][1] for i in kept) <= budget * total
        # greedy by intensity: each left-out candidate did not fit beside the kept
        # ones of higher intensity
        by_intensity = sorted(range(5), key=lambda i: -candidates[i][0] / candidates[i][1])
        used = 0
        for i in by_intensity:
            if i in kept:
                used += candidates[i][1]
            else:
                assert used + candidates[i][1] > budget * total
    assert checkpointing.choose(candidates, 1.0) == frozenset(range(5))
    assert checkpointing.choose(candidates, 0.0) == frozenset()


def test_budget_chooses_per_input_shape():
    """A new input shape is noted in its own first pass (recomputing everything)."""
    policy = checkpointing.BudgetPolicy(0.5)
    a, b = ((2, 4),), ((3, 4),)
    mm = torch.ops.aten.mm.default
    x = torch.ones(2, 4)
    first = policy.for_call(a)
    assert not first(0, mm, (x, torch.ones(4, 4)), {}, x @ torch.ones(4, 4))
    assert not first(1, mm, (x, torch.ones(4, 1)), {}, x @ torch.ones(4, 1))
    kept = policy.for_call(a)  # the first pass is over: the choice is made
    # both have 2 FLOPs per byte (2·2·4·n FLOPs over 2·n·4 bytes); the first (32 bytes)
    # does not fit half of the 40 bytes, the second (8 bytes) does
    assert [kept(0), kept(1)] == [False, True]
    assert b not in policy.kept and not policy.for_call(b)(0, mm, (x, x.T), {}, x @ x.T)


# -- configuration ------------------------------------------------------------------------

def test_policy_without_checkpointing_is_a_config_error(host, unet_dir, files):
    data = factored_unet_config(unet_dir, files, "lora",
                                {"gradient_checkpointing": False,
                                 "checkpoint_policy": "save_matmuls"})
    with pytest.raises(ConfigError, match="memory.checkpoint_policy: save_matmuls needs "
                                          "memory.gradient_checkpointing: true"):
        parse_config(data, host.registry)


@pytest.mark.slow
def test_plan_names_the_policy(unet_dir, files, tmp_path):
    import yaml

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(factored_unet_config(unet_dir, files, "lora",
                                                        {"gradient_checkpointing": True})))
    res = CliRunner().invoke(cli, ["plan", str(path), "--set", "memory.checkpoint_policy=budget",
                                   "--set", "memory.checkpoint_budget=0.25"])
    assert res.exit_code == 0, res.output
    assert "gradient_checkpointing(depth 1, budget 0.25)" in res.output
    res = CliRunner().invoke(cli, ["plan", str(path), "--set",
                                   "memory.checkpoint_policy=save_all"])
    assert res.exit_code == 2 and "memory.checkpoint_policy" in res.output
