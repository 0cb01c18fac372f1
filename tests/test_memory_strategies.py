"""Memory strategies change memory and speed, never the math: one step's adapter
gradients under each strategy (and their combinations) equal the plain run's in fp32,
and gradient checkpointing wraps the blocks DESIGN.md names at each depth."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import factored_unet_config, first_of_each, seed_adapter
from torch import nn

from loraengine.core.build import build_pipeline
from loraengine.core.config.root import parse_config
from loraengine.core.model import top_level_blocks
from loraengine.core.train.loop import Trainer
from loraengine.plugins.memory import checkpointing
from loraengine.testing.models import save_tiny_unet_data

ALGORITHMS = ["lora", "loha", "lokr", "oft"]
STRATEGIES = {
    "checkpoint-depth-1": {"gradient_checkpointing": True, "checkpoint_depth": 1},
    "checkpoint-depth-2": {"gradient_checkpointing": True, "checkpoint_depth": 2},
    "checkpoint-depth-3": {"gradient_checkpointing": True, "checkpoint_depth": 3},
    "checkpoint-save-matmuls": {"gradient_checkpointing": True,
                                "checkpoint_policy": "save_matmuls"},
    "offloading": {"offloading": True},
    "bypass": {"bypass_mode": True},
    "offloading+checkpoint-depth-1": {"offloading": True, "gradient_checkpointing": True},
    "offloading+checkpoint-depth-3": {"offloading": True, "gradient_checkpointing": True,
                                      "checkpoint_depth": 3},
    "offloading+checkpoint-save-matmuls": {"offloading": True,
                                           "gradient_checkpointing": True,
                                           "checkpoint_policy": "save_matmuls"},
    "bypass+offloading+checkpoint-depth-2": {"bypass_mode": True, "offloading": True,
                                             "gradient_checkpointing": True,
                                             "checkpoint_depth": 2},
}
RTOL = 1e-6
BYPASS_FP32_RTOL = 1e-5


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    return save_tiny_unet_data(tmp_path_factory.mktemp("memory-data"))


def one_step_grads(host, unet_dir, files, algorithm: str, memory: dict
                   ) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and adapter gradients of one micro-batch. Adapter parameters are set to
    seeded random values first: at init some factors are zero, which would make other
    factors' gradients zero and the comparison weak."""
    if algorithm not in host.registry.names("adapter"):
        pytest.skip(f"adapter algorithm {algorithm!r} is not installed")
    cfg = parse_config(factored_unet_config(unet_dir, files, algorithm, memory),
                       host.registry)
    pipe = build_pipeline(cfg, host)
    try:
        seed_adapter(pipe)
        trainer = Trainer(pipe, write_files=False)
        loss = trainer.micro_step(trainer.indices.take(2))
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in pipe.network.named_parameters()
                 if p.requires_grad}
    finally:
        pipe.close()
    return float(loss.detach()), grads


_plain: dict[str, tuple[float, dict[str, torch.Tensor]]] = {}


def plain_grads(host, unet_dir, files, algorithm):
    if algorithm not in _plain:
        _plain[algorithm] = one_step_grads(host, unet_dir, files, algorithm, {})
    return _plain[algorithm]


def relative_errors(g: dict[str, torch.Tensor], g0: dict[str, torch.Tensor]
                    ) -> tuple[float, float]:
    """(error of all gradients as one vector, largest error of one tensor), relative."""
    assert set(g) == set(g0) and g0
    total = torch.sqrt(sum((v.double() ** 2).sum() for v in g0.values()))
    assert total > 0
    diff = torch.sqrt(sum(((g[k].double() - g0[k].double()) ** 2).sum() for k in g0))
    worst = max(float((g[k].double() - g0[k].double()).norm()
                      / g0[k].double().norm().clamp_min(1e-12 * total)) for k in g0)
    return float(diff / total), worst


#: every algorithm with every strategy; the fast default keeps one cell per strategy, its
#: algorithm turning with the strategy, so each algorithm and each strategy is in it
CELLS = first_of_each([(ALGORITHMS[(i + j) % len(ALGORITHMS)], strategy)
                       for i, strategy in enumerate(STRATEGIES) for j in range(len(ALGORITHMS))],
                      kind=lambda cell: cell[1], ids=lambda cell: f"{cell[0]}-{cell[1]}")


@pytest.mark.parametrize("algorithm,strategy", CELLS)
def test_strategy_gradients_equal_plain_run(host, unet_dir, files, algorithm, strategy):
    """Checkpointing and offloading run the very same operations: ≤1e-6 (in practice
    0). Bypass mode computes f(x) + h(x) where the plain run computes (W+ΔW)·x: the same
    function rounded differently, so for algorithms whose two paths differ (LoHa, OFT)
    fp32 agrees to a few 1e-6 and the fp64 test below shows the paths are equal. LoRA's
    paths differ only in the order dx is summed (weight mode adds the side path's share
    into the base op's in its fused node, bypass mode leaves the sum to autograd), so
    it is reordered too; LoKr's paths coincide and are held to 1e-6 as well."""
    memory = STRATEGIES[strategy]
    loss0, g0 = plain_grads(host, unet_dir, files, algorithm)
    loss, g = one_step_grads(host, unet_dir, files, algorithm, memory)
    overall, worst = relative_errors(g, g0)
    reordered = memory.get("bypass_mode") and algorithm != "lokr"
    tol = BYPASS_FP32_RTOL if reordered else RTOL
    assert abs(loss - loss0) <= tol * abs(loss0)
    assert overall <= tol and worst <= tol, (overall, worst)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_bypass_gradients_equal_plain_run_in_fp64(host, unet_dir, files, algorithm):
    def grads(bypass: bool) -> dict[str, torch.Tensor]:
        if algorithm not in host.registry.names("adapter"):
            pytest.skip(f"adapter algorithm {algorithm!r} is not installed")
        cfg = parse_config(factored_unet_config(unet_dir, files, algorithm,
                                                {"bypass_mode": bypass}), host.registry)
        pipe = build_pipeline(cfg, host)
        try:
            pipe.model.double()
            pipe.network.double()
            g = torch.Generator().manual_seed(3)
            with torch.no_grad():
                for p in pipe.network.parameters():
                    p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.05)
            x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
            cond = torch.randn(2, 3, 16, generator=g, dtype=torch.float64)
            out = pipe.loaded.predict(pipe.model, x, torch.tensor([10, 700]), {"cond": cond})
            (out ** 2).mean().backward()
            return {n: p.grad.clone() for n, p in pipe.network.named_parameters()
                    if p.requires_grad}
        finally:
            pipe.close()

    overall, worst = relative_errors(grads(True), grads(False))
    # OFT builds its rotation in fp32 whatever the input dtype (a Cayley solve), so its
    # fp64 run still carries fp32 rounding; the others compute in the input's dtype.
    tol = 1e-6 if algorithm == "oft" else 1e-10
    assert overall <= tol and worst <= tol, (overall, worst)


# -- checkpoint depth semantics ---------------------------------------------------------

def _children(mod: nn.Module) -> list[nn.Module]:
    out = []
    for child in mod.children():
        out.extend(child.children() if isinstance(child, (nn.ModuleList, nn.ModuleDict))
                   else [child])
    return out


def _has_params(mod: nn.Module) -> bool:
    return next(mod.parameters(), None) is not None


def expected_at_depth(top: list[nn.Module], depth: int) -> list[nn.Module]:
    """DESIGN.md: depth 1 is the top-level blocks; each further level the children of
    the level above (a block without children stays itself)."""
    level = top
    for _ in range(depth - 1):
        level = [c for m in level for c in (_children(m) or [m])]
    return [m for m in level if _has_params(m)]


def test_checkpoint_depth_1_wraps_each_top_level_block_not_the_model(unet_dir):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(unet_dir / "unet"))
    top = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    assert checkpointing.blocks_at_depth(top, 1) == top
    assert unet not in checkpointing.blocks_at_depth(top, 1)


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_checkpoint_deeper_levels_wrap_children_of_the_level_above(unet_dir, depth):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(unet_dir / "unet"))
    top = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    got = checkpointing.blocks_at_depth(top, depth)
    assert [id(m) for m in got] == [id(m) for m in expected_at_depth(top, depth)]
    if depth == 2:  # resnets, attentions, down/upsamplers of each block
        names = {type(m).__name__ for m in got}
        assert {"ResnetBlock2D", "Transformer2DModel", "Downsample2D"} <= names


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_checkpoint_runs_once_per_wrapped_block_per_forward(host, unet_dir, files, depth,
                                                            monkeypatch):
    calls: list[int] = []
    real = checkpointing.checkpoint

    def counting(fn, *args, **kwargs):
        calls.append(1)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(checkpointing, "checkpoint", counting)
    cfg = parse_config(factored_unet_config(unet_dir, files, "lora",
                                            {"gradient_checkpointing": True,
                                             "checkpoint_depth": depth}), host.registry)
    pipe = build_pipeline(cfg, host)
    try:
        wrapped = checkpointing.blocks_at_depth(pipe.loaded.blocks, depth)
        trainer = Trainer(pipe, write_files=False)
        trainer.micro_step(trainer.indices.take(2)).backward()
        assert len(calls) == len(wrapped) > 0
        with torch.no_grad():  # inference does not checkpoint
            calls.clear()
            trainer.micro_step(trainer.indices.take(2))
            assert calls == []
    finally:
        pipe.close()
    assert all("forward" not in m.__dict__ for m in pipe.model.modules())


def test_module_family_depth_1_wraps_top_level_children():
    from loraengine.testing.models import TinyDenoiser

    model = TinyDenoiser()
    top = top_level_blocks(model)
    assert list(model.blocks) == [m for m in top if m in list(model.blocks)]
    assert checkpointing.blocks_at_depth(top, 1) == [m for m in top if _has_params(m)]
