"""``training.compile``: what it compiles, its errors, and training through compiled
code equal to eager training (alone and with checkpointing, bypass and offloading, and
the LyCORIS algorithms' training paths), 20 steps each.

The equality tests train ``_Denoiser``, a model made for them: its top-level blocks are
one MLP and two copies of one conv block, so ``blocks`` compiles two graphs per run
(the MLP's, and the conv block's, which both copies share) — the fewest that still put
adapted Linear and Conv2d layers, GroupNorm and a block that checkpointing and
offloading wrap inside compiled code. (``TinyDenoiser``'s six top-level layers and
blocks compile five graphs, each costing seconds of tracing and C++ code generation.)

Tolerance of the equality tests: the compiled graph computes the same operations in
another order (fused kernels, other reduction orders), so the two runs differ by fp32
rounding only. The worst case for one length-n reduction is γ_n ≈ n·u (u = 2⁻²⁴). At
batch 2 and 4×4 latents the longest reduction of ``_Denoiser`` is the input gradient of
its 3×3 convolution (8 output channels × 9 taps = 72 terms; its forward sums 4 × 9 = 36,
the weight gradients batch × pixels = 32, GroupNorm's statistics 4 channels × 16
pixels = 64), ≈ 4.3e-6 relative per step, and Adam passes a relative error of the
gradient to the update about unchanged. The trained adapter (its change from the
initial values) after 20 steps thus differs by at most about 20 × 4.3e-6 ≈ 8.6e-5, and
the loss of a step by that plus its own mean over 2 × 4 × 16 = 128 terms (7.6e-6):
below 1e-4, the tolerance (1e-4 relative). Any real fault of the compiled path (a stale
or missing adapter weight, the wrong training path, a lost scale) changes the trained
adapter by O(1) of itself.

The compiling tests are slow (inductor builds C++ kernels: tens of seconds each on a
cold cache, a few seconds on a warm one) and carry ``slow``; the errors and the choice
of blocks are fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from loraengine.core.build import build_pipeline
from loraengine.core.compile import compile_targets, compile_unavailable
from loraengine.core.config.root import parse_config
from loraengine.core.errors import ConfigError
from loraengine.core.model import LoadedModel
from loraengine.core.train.loop import Trainer, TrainResult
from loraengine.testing.harness import TinyData, deep_merge, tiny_data, tiny_train_config
from loraengine.testing.models import TinyDenoiser, tiny_conditioning, tiny_latents

STEPS = 20
RTOL = 1e-4


class _Denoiser(nn.Module):
    """``model(x_t, t, cond)`` whose top-level blocks are an MLP (adapted Linear layers)
    and two copies of one conv block (adapted 3×3 and 1×1 convolutions, GroupNorm): two
    graphs for ``blocks`` to compile. The MLP's output already depends on the adapter,
    so both conv blocks see an input that requires grad and share one graph."""

    def __init__(self, channels: int = 4, hidden: int = 8, cond_dim: int = 8,
                 seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Sequential(nn.Linear(1 + cond_dim, hidden), nn.SiLU(),
                                   nn.Linear(hidden, channels))
        self.blocks = nn.ModuleList([
            nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1), nn.GroupNorm(2, hidden),
                          nn.SiLU(), nn.Conv2d(hidden, channels, 1))
            for _ in range(2)])
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        e = torch.cat([(t.float().reshape(-1, 1) / 1000.0).to(x.dtype), cond.mean(dim=1)],
                      dim=1)
        h = x + self.embed(e)[:, :, None, None]
        for block in self.blocks:
            h = h + block(h)
        return h


def _data() -> TinyData:
    return TinyData(tiny_latents(size=4), tiny_conditioning())


def _config(host: Any, overlay: dict[str, Any]) -> Any:
    base = tiny_train_config({"training": {"steps": STEPS}, "optimizer": {"lr": 1e-2}})
    return parse_config(deep_merge(base, overlay), host.registry)


def _train(host: Any, overlay: dict[str, Any]) -> tuple[TrainResult, dict[str, torch.Tensor]]:
    """The run's result and each adapter tensor's change over training."""
    data = _data()
    pipe = build_pipeline(_config(host, overlay), host, model=_Denoiser(),
                          latents=data.latents, conditioning=data.conditioning)
    try:
        before = {k: v.detach().clone() for k, v in pipe.network.state_dict().items()}
        result = Trainer(pipe, write_files=False).run()
        after = pipe.network.state_dict()
        return result, {k: after[k].detach() - before[k] for k in before}
    finally:
        pipe.close()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# -- fast: options, targets, errors ----------------------------------------------------------

def test_compile_option_values(host):
    for value in (False, "blocks", "model"):
        assert _config(host, {"training": {"compile": value}}).training.compile == value
    with pytest.raises(Exception, match="compile"):
        _config(host, {"training": {"compile": "yes"}})


def test_blocks_are_the_familys_blocks_opened_at_declared_repeated_blocks():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

    class Transformer(nn.Module):  # declares its repeated blocks, as diffusers' models do
        _repeated_blocks = ["Block"]

        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(4, 4)
            self.blocks = nn.ModuleList([Block(), Block(), Block()])

    wrapped = nn.Sequential(Transformer())  # the whole transformer is the one block
    loaded = LoadedModel(module=wrapped, predict=lambda *a: a[0], schedule=None,  # type: ignore[arg-type]
                         blocks=[wrapped[0]])
    assert compile_targets(loaded) == list(wrapped[0].blocks)
    plain = TinyDenoiser()
    loaded = LoadedModel(module=plain, predict=lambda *a: a[0], schedule=None,  # type: ignore[arg-type]
                         blocks=list(plain.blocks))
    assert compile_targets(loaded) == list(plain.blocks)


def _no_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    # no compiler on the PATH; not through $CXX, which inductor reads once on import
    import loraengine.core.compile as compile_module

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(compile_module.shutil, "which", lambda name: None)


def test_no_cxx_compiler_is_a_one_line_config_error(host, monkeypatch):
    _no_compiler(monkeypatch)
    assert "C++ compiler" in (compile_unavailable(torch.device("cpu")) or "")
    data = tiny_data()
    with pytest.raises(ConfigError, match=r"^training\.compile: .*C\+\+ compiler"):
        build_pipeline(_config(host, {"training": {"compile": "blocks"}}), host,
                       model=TinyDenoiser(), latents=data.latents,
                       conditioning=data.conditioning)


def test_no_cxx_compiler_from_the_cli_exits_2_with_one_line(monkeypatch, tmp_path):
    from pathlib import Path

    from loraengine.cli.main import cli

    _no_compiler(monkeypatch)
    example = Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml"
    res = CliRunner().invoke(cli, ["train", str(example), "--quiet", "--set",
                                   "training.compile=blocks", "--set",
                                   f"output.dir={tmp_path / 'out'}"])
    assert res.exit_code == 2, res.output[-2000:]
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in res.output
    assert "training.compile" in err and "C++ compiler" in err


def test_model_compile_with_offloading_is_refused(host):
    data = tiny_data()
    config = _config(host, {"training": {"compile": "model"},
                            "memory": {"offloading": True}})
    with pytest.raises(ConfigError, match=r"^training\.compile: 'model' .*offloading"):
        build_pipeline(config, host, model=TinyDenoiser(), latents=data.latents,
                       conditioning=data.conditioning)


@pytest.mark.slow  # torch.compile's first use imports dynamo: seconds
def test_close_puts_the_eager_forwards_back(host):
    data = tiny_data()
    model = TinyDenoiser()
    before = {name: dict(m.__dict__).get("forward") for name, m in model.named_modules()}
    pipe = build_pipeline(_config(host, {"training": {"compile": "blocks"},
                                         "memory": {"gradient_checkpointing": True}}),
                          host, model=model, latents=data.latents,
                          conditioning=data.conditioning)
    assert all("forward" in b.__dict__ for b in model.blocks)
    pipe.close()  # nothing ran, so nothing compiled: fast
    assert {name: dict(m.__dict__).get("forward") for name, m in model.named_modules()} \
        == before


# -- slow: training through compiled code equals eager training ------------------------------

# Each combination puts one more thing inside compiled code. A feature is tried with
# checkpointing on (bypass hooks, the streaming of offloaded blocks, LoKr's factored
# path): compiled code then traces the checkpointed region with the feature inside it,
# which is the case that can break; the same feature without checkpointing is the same
# code of ours traced without the checkpoint around it.
COMBOS = {
    "alone": {},
    "offloading+checkpointing": {"memory": {"offloading": True,
                                            "gradient_checkpointing": True}},
    "bypass+checkpointing": {"memory": {"bypass_mode": True,
                                        "gradient_checkpointing": True}},
    "loha": {"adapter": {"algorithm": "loha"}},
    # the factored paths' own autograd function (LoKr on a Linear), the side path
    # recomputed in backward (LoKr on a conv) and OFT's frozen-weight op, inside
    # compiled, checkpointed blocks
    "lokr_factored+checkpointing": {"adapter": {"algorithm": "lokr", "path": "factored"},
                                    "memory": {"gradient_checkpointing": True}},
    "oft_factored": {"adapter": {"algorithm": "oft", "path": "factored"}},
    # OFT's rebuild node (it keeps its output for backward) in checkpointed blocks
    "oft_rebuild+checkpointing": {"adapter": {"algorithm": "oft", "path": "rebuild"},
                                  "memory": {"gradient_checkpointing": True}},
}


@dataclass
class _Compared:
    """An eager run and the same run compiled, with what compiling did."""

    eager: TrainResult
    eager_deltas: dict[str, torch.Tensor]
    compiled: TrainResult
    deltas: dict[str, torch.Tensor]
    graphs: int  # graphs compiled by the compiled run
    breaks: dict[str, int]  # graph breaks in it


def _compare(host: Any, overlay: dict[str, Any], mode: str) -> _Compared:
    from torch._dynamo.utils import counters

    eager, eager_deltas = _train(host, overlay)
    torch._dynamo.reset()  # graphs of an earlier test may fit this one: compile afresh
    graphs, breaks = _graphs(), dict(counters["graph_break"])
    compiled, deltas = _train(host, deep_merge(overlay, {"training": {"compile": mode}}))
    new_breaks = {k: v - breaks.get(k, 0) for k, v in counters["graph_break"].items()
                  if v != breaks.get(k, 0)}
    return _Compared(eager, eager_deltas, compiled, deltas, _graphs() - graphs, new_breaks)


@pytest.fixture(scope="module")
def blocks_alone() -> _Compared:
    """``blocks`` with no memory strategy against eager: one run for the equality test
    and the progress-line test."""
    from loraengine.plugins import build_plugin_manager

    return _compare(build_plugin_manager(), COMBOS["alone"], "blocks")


def _assert_same(run: _Compared) -> None:
    assert run.graphs > 0, "nothing was compiled"
    assert run.breaks == {}, run.breaks
    loss, eager_loss = run.compiled.loss_map["loss"], run.eager.loss_map["loss"]
    assert len(loss) == len(eager_loss) == STEPS
    err = _relative(torch.tensor(loss), torch.tensor(eager_loss))
    assert err <= RTOL, (loss, eager_loss)
    for key, delta in run.eager_deltas.items():
        assert delta.norm() > 0, key  # every tensor trained, so the comparison can fail
        assert _relative(run.deltas[key], delta) <= RTOL, key


@pytest.mark.slow
@pytest.mark.parametrize("combo", list(COMBOS), ids=list(COMBOS))
def test_blocks_train_like_eager(host, combo, request):
    if combo == "alone":
        _assert_same(request.getfixturevalue("blocks_alone"))
    else:
        _assert_same(_compare(host, COMBOS[combo], "blocks"))


@pytest.mark.slow
@pytest.mark.parametrize("combo", ["checkpointing"])
def test_model_trains_like_eager(host, combo):
    # the whole forward compiled, with the checkpointed blocks inside it
    _assert_same(_compare(host, {"memory": {"gradient_checkpointing": True}}, "model"))


@pytest.mark.slow
def test_first_step_is_reported_apart(blocks_alone):
    from loraengine.cli.progress import summary_line

    compiled, eager = blocks_alone.compiled, blocks_alone.eager
    assert compiled.compile_seconds is not None and compiled.compile_seconds > 0
    assert "first step, compiling" in summary_line(compiled, 10.0)
    assert eager.compile_seconds is None
    assert "compiling" not in summary_line(eager, 10.0)
