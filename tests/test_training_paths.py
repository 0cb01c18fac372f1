"""adapter.path: training through the factored path and through the rebuild path (the
base op with W+ΔW) gives the same losses, and ``auto`` follows the cost model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loraengine.core.build import build_pipeline
from loraengine.core.config.root import parse_config
from loraengine.core.train.loop import Trainer
from loraengine.plugins import build_plugin_manager
from loraengine.testing.conformance import build_adapter, perturb
from loraengine.testing.models import TinyDenoiser, tiny_conditioning, tiny_latents

#: algorithm -> its options (LoKr at rank 1 so the tiny layers store w2 low rank)
ALGOS = {"lora": {}, "loha": {}, "loha-tucker": {"use_tucker": True}, "lokr": {"factor": -1, "rank": 1}, "oft": {},
         "boft": {"block_size": 4}, "lora-dora": {"weight_decompose": True}}


def _train(host, algorithm: str, options: dict, path: str, steps: int = 6
           ) -> tuple[list[float], dict[str, str | None]]:
    opts = dict(options)
    rank = opts.pop("rank", 4)
    cfg = {"model": {"family": "module"},
           "training": {"steps": steps, "batch_size": 2, "dtype": "fp32", "seed": 11},
           "adapter": {"algorithm": algorithm.split("-")[0], "rank": rank, "dtype": "fp32",
                       "path": path, **opts},
           "optimizer": {"name": "adamw", "lr": 1e-3},
           "memory": {"gradient_checkpointing": False}}
    pipe = build_pipeline(parse_config(cfg, host.registry), host, model=TinyDenoiser(),
                          latents=tiny_latents(), conditioning=tiny_conditioning())
    trainer = Trainer(pipe, write_files=False)
    trainer.run()
    taken = {p: layer.last_path for p, layer in pipe.network.items()}
    pipe.close()
    return list(trainer.loss_map["loss"]), taken


@pytest.fixture(scope="module")
def host():
    return build_plugin_manager(entry_points=False)


@pytest.mark.parametrize("algorithm", sorted(ALGOS))
def test_factored_and_rebuild_training_give_the_same_loss_curve(host, algorithm):
    factored, taken_f = _train(host, algorithm, ALGOS[algorithm], "factored")
    rebuild, taken_r = _train(host, algorithm, ALGOS[algorithm], "rebuild")
    assert set(taken_r.values()) == {"rebuild"}
    assert "factored" in set(taken_f.values())  # every algorithm here has a factored form
    assert len(factored) == len(rebuild) == 6
    assert factored[-1] != factored[0]  # the adapter trains
    for step, (f, r) in enumerate(zip(factored, rebuild, strict=True)):
        assert abs(f - r) <= 1e-4 * abs(r), (step, f, r)


def _spec(host, name):
    return host.registry.get("adapter", name)


def test_auto_takes_the_path_the_cost_model_prices_lower(host):
    """A LoHa of rank 8 is a rank-64 LoRA on the factored path: on a 16-channel conv
    the dense weight gradient is cheaper, on a 256-channel one the factors are. The
    figures are recomputed here from the layer sizes."""
    for channels, want in ((16, "rebuild"), (256, "factored")):
        base = nn.Conv2d(channels, channels, 3, padding=1).requires_grad_(False)
        layer = build_adapter(_spec(host, "loha"), base, rank=8)
        perturb(layer)
        x = torch.randn(1, channels, 8, 8)
        n, fan_in, out, r2 = 64, channels * 9, channels, 64
        factored = 3.0 * r2 * (fan_in + out) * (2.0 * n + 1.0)
        rebuild = 3.0 * out * fan_in * (4.0 * 8 + 2.0) + 2.0 * n * fan_in * out
        assert layer.path_flops(x) == pytest.approx((factored, rebuild))
        assert (factored < rebuild) == (want == "factored")
        layer(x)
        assert layer.last_path == want


def test_path_options_override_the_cost_model_and_ia3_always_rebuilds(host):
    base = nn.Conv2d(16, 16, 3, padding=1).requires_grad_(False)
    x = torch.randn(1, 16, 8, 8)
    for path in ("factored", "rebuild"):
        layer = build_adapter(_spec(host, "loha"), base, rank=8)
        layer.path = path
        layer(x)
        assert layer.last_path == path
    ia3 = build_adapter(_spec(host, "ia3"), base)
    ia3.path = "factored"
    ia3(x)
    assert ia3.path_flops(x) is None and ia3.last_path == "rebuild"


def test_the_chosen_path_is_remembered_per_shape_and_path_option(host, monkeypatch):
    """The cost model runs once per input shape; a new shape, a new ``path`` or a
    change of the cost model (DoRA switched on) asks it again."""
    base = nn.Linear(64, 64).requires_grad_(False)
    layer = build_adapter(_spec(host, "lora"), base, rank=4)
    asked = []
    real = type(layer).path_flops

    def counting(self, x):
        asked.append(tuple(x.shape))
        return real(self, x)

    monkeypatch.setattr(type(layer), "path_flops", counting)
    for _ in range(3):
        layer(torch.randn(2, 5, 64))
    assert asked == [(2, 5, 64)]
    layer(torch.randn(3, 64))
    assert asked == [(2, 5, 64), (3, 64)]
    layer.path = "rebuild"
    layer(torch.randn(2, 5, 64))
    assert layer.last_path == "rebuild" and len(asked) == 3
    layer.path = "auto"
    layer(torch.randn(2, 5, 64))
    assert len(asked) == 3  # (auto, 2, 5, 64) is still known
    layer.enable_dora()
    layer(torch.randn(2, 5, 64))
    assert len(asked) == 4


def test_an_unknown_path_is_a_config_error(host):
    from loraengine.core.errors import ConfigError

    cfg = {"model": {"family": "module"}, "adapter": {"algorithm": "lora", "path": "fast"}}
    with pytest.raises(ConfigError, match="adapter.path"):
        parse_config(cfg, host.registry)
