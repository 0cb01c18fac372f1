"""``training.compile``: what it compiles, its errors, and training through compiled
code equal to eager training (alone and with checkpointing, bypass and offloading).

Tolerance of the equality tests: the compiled graph computes the same operations in
another order (fused kernels, other reduction orders), so the two runs differ by fp32
rounding only. The worst case for one length-n reduction is γ_n ≈ n·u (u = 2⁻²⁴); the
longest reduction of ``TinyDenoiser`` is a weight gradient over batch × pixels
(2 × 8 × 8 = 128 terms), ≈ 7.6e-6 relative per step, and Adam passes a relative error
of the gradient to the update about unchanged. The trained adapter (its change from
the initial values) and the loss at each step, after 12 steps, thus differ by at most
about 12 × 7.6e-6 ≈ 9e-5 < 1e-4 — the tolerance (1e-4 relative). Any real fault of the
compiled path (a stale or missing adapter weight, the wrong training path, a lost
scale) changes the trained adapter by O(1) of itself.

The compiling tests are slow (inductor builds C++ kernels: tens of seconds each on a
cold cache) and carry ``slow``; the errors and the choice of blocks are fast.
"""

from __future__ import annotations

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
from loraengine.core.train.loop import Trainer
from loraengine.testing.harness import deep_merge, tiny_data, tiny_train_config
from loraengine.testing.models import TinyDenoiser

STEPS = 12
RTOL = 1e-4


def _config(host: Any, overlay: dict[str, Any]) -> Any:
    base = tiny_train_config({"training": {"steps": STEPS}, "optimizer": {"lr": 1e-2}})
    return parse_config(deep_merge(base, overlay), host.registry)


def _train(host: Any, overlay: dict[str, Any]) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The loss per step and each adapter tensor's change over training."""
    data = tiny_data()
    pipe = build_pipeline(_config(host, overlay), host, model=TinyDenoiser(),
                          latents=data.latents, conditioning=data.conditioning)
    try:
        before = {k: v.detach().clone() for k, v in pipe.network.state_dict().items()}
        result = Trainer(pipe, write_files=False).run()
        after = pipe.network.state_dict()
        return result.loss_map["loss"], {k: after[k].detach() - before[k] for k in before}
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

COMBOS = {
    "alone": {},
    "checkpointing": {"memory": {"gradient_checkpointing": True}},
    "bypass": {"memory": {"bypass_mode": True}},
    "offloading": {"memory": {"offloading": True}},
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


def _assert_same(host: Any, overlay: dict[str, Any], mode: str) -> None:
    from torch._dynamo.utils import counters

    eager_loss, eager = _train(host, overlay)
    torch._dynamo.reset()  # graphs of an earlier test may fit this one: compile afresh
    graphs, breaks = _graphs(), sum(counters["graph_break"].values())
    loss, trained = _train(host, deep_merge(overlay, {"training": {"compile": mode}}))
    assert _graphs() > graphs, "nothing was compiled"
    assert sum(counters["graph_break"].values()) == breaks, dict(counters["graph_break"])
    assert len(loss) == len(eager_loss) == STEPS
    err = _relative(torch.tensor(loss), torch.tensor(eager_loss))
    assert err <= RTOL, (loss, eager_loss)
    for key, delta in eager.items():
        assert delta.norm() > 0, key  # every tensor trained, so the comparison can fail
        assert _relative(trained[key], delta) <= RTOL, key


@pytest.mark.slow
@pytest.mark.parametrize("combo", list(COMBOS), ids=list(COMBOS))
def test_blocks_train_like_eager(host, combo):
    _assert_same(host, COMBOS[combo], "blocks")


@pytest.mark.slow
@pytest.mark.parametrize("combo", ["alone", "checkpointing"])
def test_model_trains_like_eager(host, combo):
    _assert_same(host, COMBOS[combo], "model")


@pytest.mark.slow
def test_first_step_is_reported_apart(host):
    import loraengine

    data = tiny_data()
    config = tiny_train_config({"training": {"steps": 3, "compile": "blocks"}})
    result = loraengine.train(config, model=TinyDenoiser(), latents=data.latents,
                              conditioning=data.conditioning, host=host)
    assert result.compile_seconds is not None and result.compile_seconds > 0
    from loraengine.cli.progress import summary_line

    assert "first step, compiling" in summary_line(result, 10.0)
    eager = loraengine.train(tiny_train_config({"training": {"steps": 1}}),
                             model=TinyDenoiser(), latents=data.latents,
                             conditioning=data.conditioning, host=host)
    assert eager.compile_seconds is None
    assert "compiling" not in summary_line(eager, 10.0)
