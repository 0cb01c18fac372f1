"""The added optimizers: Lion against its update rule, the packaged ones against their
packages built directly (options reach them), schedule-free saving its averaged point,
and a missing package or GPU as a clear exit-2 error naming the extra."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml
from conftest import REPO

import loraengine
from loraengine.core.build import build_pipeline
from loraengine.core.config.root import parse_config
from loraengine.core.errors import ConfigError
from loraengine.core.train.loop import Trainer
from loraengine.plugins import optimizers
from loraengine.testing.models import TinyDenoiser, tiny_conditioning, tiny_latents


def optimizer_section(host, section: dict):
    return parse_config({"model": {"family": "module"}, "optimizer": section},
                        host.registry).optimizer


def fixed_grads(step: int, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g) for s in shapes]


def run(opt_factory, steps: int = 4) -> list[torch.Tensor]:
    """Step an optimizer over two parameters with fixed gradients; return the params."""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4, generator=g)),
              torch.nn.Parameter(torch.randn(5, generator=g))]
    opt = opt_factory(params)
    for k in range(steps):
        for p, grad in zip(params, fixed_grads(k, [p.shape for p in params]), strict=True):
            p.grad = grad
        opt.step()
    return [p.detach() for p in params]


def test_lion_follows_its_update_rule(host):
    lr, b1, b2, wd = 0.01, 0.8, 0.95, 0.1
    o = optimizer_section(host, {"name": "lion", "lr": lr, "betas": [b1, b2],
                                 "weight_decay": wd})
    spec = host.registry.get("optimizer", "lion")
    got = run(lambda ps: spec.factory(ps, o.lr, o))
    # the rule, written out: c = b1 m + (1-b1) g; w <- w (1 - lr wd) - lr sign(c);
    # m <- b2 m + (1-b2) g
    g0 = torch.Generator().manual_seed(0)
    ws = [torch.randn(3, 4, generator=g0), torch.randn(5, generator=g0)]
    ms = [torch.zeros_like(w) for w in ws]
    for k in range(4):
        for i, grad in enumerate(fixed_grads(k, [w.shape for w in ws])):
            c = b1 * ms[i] + (1 - b1) * grad
            ws[i] = ws[i] * (1 - lr * wd) - lr * torch.sign(c)
            ms[i] = b2 * ms[i] + (1 - b2) * grad
    for a, b in zip(got, ws, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_adafactor_is_torchs_with_the_given_options(host):
    o = optimizer_section(host, {"name": "adafactor", "lr": 0.02, "beta2_decay": -0.5,
                                 "d": 2.0, "weight_decay": 0.1, "eps": [None, 0.01]})
    spec = host.registry.get("optimizer", "adafactor")
    got = run(lambda ps: spec.factory(ps, o.lr, o))
    want = run(lambda ps: torch.optim.Adafactor(ps, lr=0.02, beta2_decay=-0.5, d=2.0,
                                                weight_decay=0.1, eps=(None, 0.01)))
    default = run(lambda ps: torch.optim.Adafactor(ps, lr=0.02))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(not torch.equal(a, c) for a, c in zip(got, default, strict=True))


def test_prodigy_is_prodigyopts_with_the_given_options(host):
    prodigyopt = pytest.importorskip("prodigyopt")
    o = optimizer_section(host, {"name": "prodigy", "lr": 1.0, "d0": 1e-4,
                                 "weight_decay": 0.01, "use_bias_correction": True})
    spec = host.registry.get("optimizer", "prodigy")
    got = run(lambda ps: spec.factory(ps, o.lr, o))
    want = run(lambda ps: prodigyopt.Prodigy(ps, lr=1.0, d0=1e-4, weight_decay=0.01,
                                             use_bias_correction=True))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_schedule_free_trains_at_y_and_saves_the_average_x(host, tmp_path):
    schedulefree = pytest.importorskip("schedulefree")
    cfg = parse_config({
        "model": {"family": "module"},
        "training": {"steps": 4, "batch_size": 2, "dtype": "fp32"},
        "optimizer": {"name": "schedule_free_adamw", "lr": 0.01, "warmup_steps": 1},
        "adapter": {"rank": 2, "dtype": "fp32"},
        "memory": {"gradient_checkpointing": False},
        "output": {"dir": str(tmp_path), "name": "sf", "plot": False}}, host.registry)
    pipe = build_pipeline(cfg, host, model=TinyDenoiser(), latents=tiny_latents(),
                          conditioning=tiny_conditioning())
    assert isinstance(pipe.optimizer, schedulefree.AdamWScheduleFree)
    trainer = Trainer(pipe)
    modes = []
    host.register(type("Spy", (), {"loraengine_on_step_end": loraengine.hookimpl(
        lambda run, step, metrics: modes.append(pipe.optimizer.param_groups[0]["train_mode"]))
    })(), name="spy")
    result = trainer.run()
    assert modes == [True] * 4  # every step took its gradient in train mode (at y)
    assert pipe.optimizer.param_groups[0]["train_mode"] is False
    x = [p.detach().clone() for p in pipe.trainable_parameters()]
    from safetensors.torch import load_file

    saved = load_file(str(result.path))
    assert saved.keys() == trainer.lora_tensors().keys()
    for k, v in trainer.lora_tensors().items():  # the file holds the eval point x
        torch.testing.assert_close(saved[k], v, rtol=0, atol=0)
    pipe.optimizer.train()
    y = [p.detach() for p in pipe.trainable_parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(x, y, strict=True))
    pipe.close()


@pytest.mark.parametrize("name,module,extra", [
    ("prodigy", "prodigyopt", "prodigy"),
    ("schedule_free_adamw", "schedulefree", "schedulefree"),
])
def test_missing_package_is_a_config_error_naming_the_extra(host, monkeypatch, name, module,
                                                            extra):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(ConfigError) as err:
        optimizer_section(host, {"name": name})
    assert f"pip install 'loraengine[{extra}]'" in str(err.value)
    assert str(err.value).startswith("optimizer: ")
    # the factory says the same when it is reached without validation
    spec = host.registry.get("optimizer", name)
    with pytest.raises(ConfigError, match=rf"loraengine\[{extra}\]"):
        spec.factory([torch.nn.Parameter(torch.zeros(1))], 1e-3, None)


@pytest.mark.slow
def test_missing_package_on_the_command_line_exits_2_without_traceback(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"family": "module"},
                                   "optimizer": {"name": "prodigy", "lr": 1.0}}))
    # a tiny launcher that hides prodigyopt before the CLI starts
    code = ("import sys; sys.modules['prodigyopt'] = None; "
            "from loraengine.cli.main import main; sys.argv = ['loraengine', 'validate', "
            f"{str(cfg)!r}]; main()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: optimizer: ")
    assert "pip install 'loraengine[prodigy]'" in proc.stderr


def test_adamw8bit_without_cuda_says_so(host, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="CUDA GPU, and this machine has none"):
        optimizer_section(host, {"name": "adamw8bit"})


def test_adamw8bit_with_cuda_but_no_bitsandbytes_names_the_extra(host, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ConfigError, match=r"pip install 'loraengine\[bitsandbytes\]'"):
        optimizer_section(host, {"name": "adamw8bit"})


def test_adamw8bit_refuses_an_adapter_off_the_gpu():
    with pytest.raises(ConfigError, match="needs the adapter on a CUDA device, but it is on cpu"):
        optimizers.make_adamw8bit([torch.nn.Parameter(torch.zeros(2))], 1e-3, None)


def test_every_named_extra_exists_in_pyproject():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    for opts in (optimizers.ProdigyOptions, optimizers.ScheduleFreeOptions,
                 optimizers.AdamW8bitOptions):
        _, module, extra = opts.package
        assert extra in extras, extra
        assert any(req.lower().startswith({"prodigyopt": "prodigyopt",
                                           "schedulefree": "schedulefree",
                                           "bitsandbytes": "bitsandbytes"}[module])
                   for req in extras[extra])


@pytest.mark.parametrize("section", [
    {"name": "lion", "eps": 1e-8},
    {"name": "adafactor", "betas": [0.9, 0.99]},
    {"name": "prodigy", "lr": 1.0, "warmup_steps": 3},
])
def test_unknown_optimizer_option_is_an_error(host, section):
    bad = [k for k in section if k not in ("name", "lr")][0]
    with pytest.raises(ConfigError, match=rf"optimizer\.{bad}: unknown key"):
        optimizer_section(host, section)


@pytest.mark.slow
@pytest.mark.parametrize("section", [
    {"name": "lion", "lr": 3e-4},
    {"name": "adafactor", "lr": 1e-2},
    {"name": "prodigy", "lr": 1.0},
    {"name": "schedule_free_adamw", "lr": 3e-3},
])
def test_each_added_optimizer_trains_the_adapter(section):
    result = loraengine.train(
        {"model": {"family": "module"},
         "training": {"steps": 3, "batch_size": 2, "dtype": "fp32"},
         "optimizer": section, "adapter": {"rank": 2, "dtype": "fp32"},
         "memory": {"gradient_checkpointing": False}},
        model=TinyDenoiser(), latents=tiny_latents(), conditioning=tiny_conditioning())
    ups = [v for k, v in result.lora.items() if k.endswith("lora_up.weight")]
    assert all(torch.isfinite(v).all() for v in result.lora.values())
    assert any(v.abs().sum() > 0 for v in ups)  # the zero-initialised factor moved
