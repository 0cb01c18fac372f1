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


def test_cut_keeps_by_rank_until_the_next_would_exceed_the_share():
    # (rank, bytes), ranks already in order of FLOPs per byte: 20, 10, 5, 2, 1
    candidates = [((-10.0, 0, 0), 10), ((-1.0, 0, 1), 40), ((-5.0, 0, 2), 10),
                  ((-20.0, 1, 0), 20), ((-2.0, 1, 1), 20)]
    total = sum(b for _, b in candidates)
    order = sorted(candidates)
    for budget in (0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0):
        cut = checkpointing.cut_of(candidates, budget)
        kept = [b for r, b in order if cut is not None and r <= cut]
        assert sum(kept) <= budget * total
        if len(kept) < len(order):  # the first left out did not fit
            assert sum(kept) + order[len(kept)][1] > budget * total
    assert checkpointing.cut_of(candidates, 0.0) is None
    assert checkpointing.cut_of(candidates, 1.0) == max(r for r, _ in candidates)


def _mm_call(decide, index: int, n: int, k: int, m: int) -> bool:
    """One candidate ``[n, k] @ [k, m]``: 2·n·k·m FLOPs over 4·n·m bytes, k/2 per byte."""
    a, b = torch.ones(n, k), torch.ones(k, m)
    return decide(index, torch.ops.aten.mm.default, (a, b), {}, a @ b)


def test_budget_ranks_candidates_across_blocks():
    """One cut for the model: the block whose products cost more FLOPs per byte keeps
    them all before the other keeps any (a share per block would keep half of each)."""
    policy = checkpointing.BudgetPolicy(0.5)
    sig = ((2, 4),)
    narrow, wide = policy.for_call(0, sig), policy.for_call(1, sig)  # the noting pass
    assert not any([_mm_call(narrow, 0, 8, 2, 4), _mm_call(narrow, 1, 8, 2, 4),
                    _mm_call(wide, 0, 8, 16, 4), _mm_call(wide, 1, 8, 16, 4)])
    narrow, wide = policy.for_call(0, sig), policy.for_call(1, sig)
    assert [_mm_call(narrow, 0, 8, 2, 4), _mm_call(narrow, 1, 8, 2, 4)] == [False, False]
    assert [_mm_call(wide, 0, 8, 16, 4), _mm_call(wide, 1, 8, 16, 4)] == [True, True]
    # remembered per block and signature: the third call decides by index alone
    again = policy.for_call(1, sig)
    assert [again(0), again(1), again(2)] == [True, True, False]


def test_budget_keeps_by_rank_at_a_new_input_shape_without_noting_it():
    """Once the cut is fixed, a new input shape keeps what ranks above it at once: a
    product's FLOPs per byte do not depend on the number of rows."""
    policy = checkpointing.BudgetPolicy(0.5)
    first = policy.for_call(0, ((2, 4),))
    assert not _mm_call(first, 0, 8, 16, 4) and not _mm_call(first, 1, 8, 2, 4)
    policy.for_call(0, ((2, 4),))  # the repeat fixes the cut: the first product only
    other = policy.for_call(0, ((6, 4),))
    assert [_mm_call(other, 0, 24, 16, 4), _mm_call(other, 1, 24, 2, 4)] == [True, False]
    # a block the noting pass never saw ranks after those it saw at equal FLOPs per byte
    late = policy.for_call(5, ((2, 4),))
    assert not _mm_call(late, 0, 8, 16, 4)


def test_the_dispatch_mode_watches_only_the_calls_that_run_candidates():
    """Views, elementwise operators and reductions pass the gate without the dispatch
    mode; a linear layer and a directly called aten product are watched and kept."""
    aten = torch.ops.aten
    seen: list = []

    class Spy(checkpointing._KeepMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.overloadpacket)
            return super().__torch_dispatch__(func, types, args, kwargs)

    entries: list = []
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    with checkpointing._Gate(Spy(checkpointing._keep_all, entries)):
        torch.nn.functional.linear((x.relu() * 2).view(3, 4), w).sum()
        aten.mm(x, w.t())
    assert seen and not {aten.relu, aten.mul, aten.view, aten.sum} & set(seen)
    assert [e.func.overloadpacket for e in entries] == [aten.mm, aten.mm]
    assert all(e.out is not None for e in entries)


# -- configuration ------------------------------------------------------------------------

def test_policy_without_checkpointing_is_a_config_error(host, unet_dir, files):
    data = factored_unet_config(unet_dir, files, "lora",
                                {"gradient_checkpointing": False,
                                 "checkpoint_policy": "save_matmuls"})
    with pytest.raises(ConfigError, match="memory.checkpoint_policy: save_matmuls needs "
                                          "memory.gradient_checkpointing: true"):
        parse_config(data, host.registry)


@pytest.mark.parametrize("compile_mode", ["blocks", "model"])
def test_policy_with_compile_is_a_config_error(host, unet_dir, files, compile_mode):
    data = factored_unet_config(unet_dir, files, "lora",
                                {"gradient_checkpointing": True,
                                 "checkpoint_policy": "budget"})
    data["training"]["compile"] = compile_mode
    with pytest.raises(ConfigError, match=f"memory.checkpoint_policy: budget runs eagerly "
                                          f"and cannot be combined with training.compile: "
                                          f"{compile_mode}"):
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
