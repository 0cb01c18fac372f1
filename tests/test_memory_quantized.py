"""Quantized base (``model.quantize: fp8 | int8``): storage with per-output-channel
scales, training in bypass mode, the quantized input-gradient matmul, and the config
errors for combinations that are not supported."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from click.testing import CliRunner
from torch import nn

from loraengine.cli.main import cli
from loraengine.core.build import build_pipeline
from loraengine.core.config.root import parse_config
from loraengine.core.errors import ConfigError
from loraengine.core.train.loop import Trainer
from loraengine.plugins.memory import quantize as qz
from loraengine.testing.models import tiny_unet_train_config
from tests.conftest import child_json

FORMATS = ["fp8", "int8"]


@pytest.fixture
def qconfig(tmp_path, unet_dir, data_files) -> dict:
    return tiny_unet_train_config(unet_dir, data_files, {
        "model": {"quantize": "int8"},
        "training": {"steps": 2},
        "optimizer": {"lr": 0.01},
        "memory": {"bypass_mode": True},
        "output": {"dir": str(tmp_path / "out"), "plot": False},
    })


# -- the number format -------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_rows_quantize_with_one_scale_per_output_channel(fmt):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 40, generator=g) * torch.linspace(0.01, 10, 24)[:, None]
    w[3] = 0  # an all-zero row must not divide by zero
    q, scale = qz.quantize_rows(w, fmt)
    assert q.dtype == (torch.uint8 if fmt == "fp8" else torch.int8) and q.shape == w.shape
    assert scale.shape == (24,) and scale.dtype == torch.float32
    deq = qz.dequantize(q, scale, fmt, torch.float32)
    assert torch.equal(deq[3], torch.zeros(40))
    # each row's largest magnitude maps to the format's largest value
    qmax = qz.FORMATS[fmt][0]
    nz = torch.arange(24) != 3
    assert torch.allclose(scale[nz], w[nz].abs().amax(1) / qmax)
    err = (deq - w).abs()
    if fmt == "int8":  # round to nearest: half a step of that row
        assert (err <= scale[:, None] / 2 + 1e-6).all()
    else:  # e4m3 keeps 3 mantissa bits: ≤ 2^-4 relative, for values above the subnormals
        normal = w.abs() >= scale[:, None] * 2.0 ** -6
        assert (err[normal] <= w.abs()[normal] * 2.0 ** -4 + 1e-7).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_linear_runs_the_dequantized_weight(fmt):
    g = torch.Generator().manual_seed(1)
    layer = nn.Linear(32, 48)
    layer.requires_grad_(False)
    original = layer.weight.detach().clone()
    undo = qz.quantize_linear(layer, fmt)
    assert isinstance(layer, qz.QuantizedLinear) and isinstance(layer, nn.Linear)
    assert "weight" not in layer._parameters
    assert layer.qweight.element_size() == 1 and layer.qweight.numel() == original.numel()
    x = torch.randn(5, 7, 32, generator=g, requires_grad=True)
    deq = qz.dequantize(layer.qweight, layer.weight_scale, fmt, torch.float32)
    y = layer(x)
    assert torch.allclose(y, F.linear(x, deq, layer.bias), atol=1e-6)
    y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    F.linear(x2, deq, layer.bias).square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)
    undo()
    assert type(layer) is nn.Linear and isinstance(layer.weight, nn.Parameter)
    assert torch.equal(layer.weight, deq)  # quantizing is lossy: the dequantized weight
    assert (layer.weight - original).abs().max() < original.abs().max() * 0.07


@pytest.mark.parametrize("fmt,bound", [("int8", 0.02), ("fp8", 0.06)])
def test_quantized_input_gradient_is_within_bound_of_dequantized(fmt, bound):
    """The only extra error is quantizing dY (per row, after folding in the weight
    scales): for int8 a rounding step of max/127 gives about 0.8% relative error on
    Gaussian rows, for fp8 e4m3's 3 mantissa bits about 3%; the bounds leave 2× room."""
    g = torch.Generator().manual_seed(2)
    worst = 0.0
    for _ in range(5):
        w = torch.randn(96, 160, generator=g) * torch.rand(96, 1, generator=g)
        q, scale = qz.quantize_rows(w, fmt)
        dy = torch.randn(40, 96, generator=g)
        ref = dy @ qz.dequantize(q, scale, fmt, torch.float32)
        got = qz.quantized_input_grad(dy, q, scale, fmt)
        worst = max(worst, float((got - ref).norm() / ref.norm()))
    assert 0 < worst <= bound


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_input_gradient_handles_unaligned_shapes(fmt):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(13, 21, generator=g)  # neither side a multiple of 16, 3 rows of dY
    q, scale = qz.quantize_rows(w, fmt)
    dy = torch.randn(3, 13, generator=g)
    ref = dy @ qz.dequantize(q, scale, fmt, torch.float32)
    got = qz.quantized_input_grad(dy, q, scale, fmt)
    assert got.shape == (3, 21)
    assert float((got - ref).norm() / ref.norm()) < 0.06


# -- in the pipeline ----------------------------------------------------------------------

def fixed_loss(pipe) -> float:
    """The loss of the same batch, noise and timesteps every time (a fresh trainer
    reseeds its generators)."""
    trainer = Trainer(pipe, write_files=False)
    with torch.no_grad():
        return float(trainer.micro_step(torch.arange(6)))


@pytest.mark.parametrize("fmt", [pytest.param("fp8"),
                                 pytest.param("int8", marks=pytest.mark.slow)])
def test_quantized_base_trains_in_bypass_mode(host, qconfig, fmt):
    qconfig["model"]["quantize"] = fmt
    qconfig["training"]["steps"] = 25
    pipe = build_pipeline(parse_config(qconfig, host.registry), host)
    try:
        linears = [m for m in pipe.model.modules() if isinstance(m, nn.Linear)]
        assert linears and all(isinstance(m, qz.QuantizedLinear) for m in linears)
        assert all(m.quant_format == fmt and m.qweight.element_size() == 1 for m in linears)
        assert not any(isinstance(m, nn.Linear) and "weight" in m._parameters
                       for m in pipe.model.modules())
        before = fixed_loss(pipe)
        result = Trainer(pipe, write_files=False).run()
        after = fixed_loss(pipe)
    finally:
        pipe.close()
    assert all(torch.isfinite(t).all() for t in result.lora.values())
    assert after < before * 0.95, (before, after)
    # closing turns the layers back into plain Linear layers
    assert not any(isinstance(m, qz.QuantizedLinear) for m in pipe.model.modules())


@pytest.mark.parametrize("fmt,kernel", [("fp8", "_scaled_mm"), ("int8", "_int_mm")])
@pytest.mark.parametrize("quantized_backward", [True, False])
def test_quantized_backward_runs_the_quantized_matmul(host, qconfig, monkeypatch, fmt,
                                                      kernel, quantized_backward):
    calls: list[tuple[torch.dtype, torch.dtype]] = []
    real = getattr(torch, kernel)

    def counting(a, b, *args, **kwargs):
        calls.append((a.dtype, b.dtype))
        return real(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, kernel, counting)
    qconfig["model"]["quantize"] = fmt
    qconfig["training"]["dtype"] = "none"
    qconfig["memory"]["quantized_backward"] = quantized_backward
    pipe = build_pipeline(parse_config(qconfig, host.registry), host)
    try:
        trainer = Trainer(pipe, write_files=False)
        loss = trainer.micro_step(trainer.indices.take(2))
        assert calls == []  # the forward pass dequantizes
        loss.backward()
        grads = [p.grad for p in pipe.trainable_parameters()]
    finally:
        pipe.close()
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if quantized_backward:
        want = torch.float8_e4m3fn if fmt == "fp8" else torch.int8
        assert calls and all(a == want and b == want for a, b in calls)
    else:
        assert calls == []


def test_quantized_backward_gradients_stay_close_to_dequantized_backward(host, qconfig):
    def grads(qb: bool) -> torch.Tensor:
        cfg = dict(qconfig, training=dict(qconfig["training"], dtype="none"),
                   memory=dict(qconfig["memory"], quantized_backward=qb))
        pipe = build_pipeline(parse_config(cfg, host.registry), host)
        try:
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for p in pipe.network.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            trainer = Trainer(pipe, write_files=False)
            trainer.micro_step(trainer.indices.take(2)).backward()
            return torch.cat([p.grad.flatten() for p in pipe.trainable_parameters()])
        finally:
            pipe.close()

    exact, quick = grads(False), grads(True)
    rel = float((quick - exact).norm() / exact.norm())
    assert 0 < rel < 0.05, rel


# -- config errors ---------------------------------------------------------------------------

@pytest.mark.parametrize("change,message", [
    ({"memory": {"bypass_mode": False}},
     "model.quantize: int8 needs memory.bypass_mode: true"),
    ({"model": {"quantize": "none"}, "memory": {"quantized_backward": True},
      "training": {"dtype": "none"}},
     "memory.quantized_backward: needs a quantized base"),
    ({"memory": {"quantized_backward": True}, "training": {"dtype": "bf16"}},
     "memory.quantized_backward: needs training.dtype: none (got bf16)"),
])
def test_unsupported_combinations_are_config_errors(host, qconfig, tmp_path, change,
                                                    message):
    for section, values in change.items():
        qconfig[section] = dict(qconfig[section], **values)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_config(qconfig, host.registry)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(qconfig))
    res = CliRunner().invoke(cli, ["validate", str(path)])
    assert res.exit_code == 2
    line = next(ln for ln in res.output.splitlines() if message.split(":")[0] in ln)
    assert line.startswith("error: ") and message in line
    assert f"({path}:" in line  # points at the line of the YAML file
    assert "Traceback" not in res.output


def test_supported_combinations_validate(host, qconfig, tmp_path):
    qconfig["training"]["dtype"] = "none"
    qconfig["memory"]["quantized_backward"] = True
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(qconfig))
    res = CliRunner().invoke(cli, ["validate", str(path)])
    assert res.exit_code == 0, res.output
    assert Path(path).exists()


# -- the build's peak with a quantized base ---------------------------------------------

def test_loader_quantizes_as_it_reads_the_same_values(host, tmp_path):
    """Quantizing each Linear as the loader reads it gives the layers that quantizing
    the loaded model does, and a later ``.to(bf16)`` leaves the fp32 scales alone."""
    from diffusers import UNet2DConditionModel

    from loraengine.plugins.models.weights import load_folder
    from loraengine.testing.models import save_tiny_unet

    folder = save_tiny_unet(tmp_path / "pipe") / "unet"
    config = parse_config(tiny_unet_train_config(folder.parent, (folder, folder), {
        "model": {"quantize": "fp8"}, "memory": {"bypass_mode": True}}), host.registry)
    reference = load_folder(UNet2DConditionModel, folder, torch.bfloat16)
    assert reference is not None
    qz.quantize_model(reference.requires_grad_(False), "fp8")
    seen: list[str] = []

    def prepare(path: str, module: nn.Module) -> None:
        seen.append(path)
        qz.prepare_base(config)(path, module)

    early = load_folder(UNet2DConditionModel, folder, torch.bfloat16, prepare)
    assert early is not None and seen
    early.to(torch.bfloat16)
    ref_layers = {n: m for n, m in reference.named_modules()
                  if isinstance(m, qz.QuantizedLinear)}
    layers = {n: m for n, m in early.named_modules() if isinstance(m, qz.QuantizedLinear)}
    assert ref_layers and set(layers) == set(ref_layers)
    for name, layer in layers.items():
        assert layer.weight_scale.dtype == torch.float32
        assert torch.equal(layer.qweight, ref_layers[name].qweight), name
        assert torch.equal(layer.weight_scale, ref_layers[name].weight_scale), name
    ref_state, state = reference.state_dict(), early.state_dict()
    assert set(ref_state) == set(state)
    assert all(torch.equal(state[k], ref_state[k]) for k in state)


BUILD_CHILD = r"""
import json, sys, torch
from torch import nn
import accelerate, diffusers
from safetensors.torch import save_file
import loraengine.core.build as build
from loraengine.core.config.root import parse_config
from loraengine.plugins import build_plugin_manager
from loraengine.plugins.memory import quantize as qz
from loraengine.testing.models import tiny_unet_train_config

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

folder, how = sys.argv[1], sys.argv[2]
lat, cond = folder + "/lat.safetensors", folder + "/cond.safetensors"
save_file({"latents": torch.randn(2, 4, 8, 8)}, lat)
save_file({"cond": torch.randn(2, 3, 256)}, cond)
host = build_plugin_manager()
config = parse_config(tiny_unet_train_config(folder, (lat, cond), {
    "model": {"quantize": "fp8"}, "memory": {"bypass_mode": True},
    "training": {"dtype": "bf16"}, "adapter": {"dtype": "bf16"}}), host.registry)
if how == "after_move":  # the former order: load everything, move, then quantize
    build._base_transform = lambda config, strategies: None
cls = diffusers.UNet2DConditionModel
with torch.device("meta"):  # the class's code imported and run once
    cls(**cls.load_config(folder + "/unet"))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again from the current RSS
base = status("VmRSS")
pipe = build.build_pipeline(config, host)
rise = status("VmHWM") - base
model = pipe.model
linears = [m for m in model.modules() if isinstance(m, qz.QuantizedLinear)]
assert linears and not any(type(m) is nn.Linear for m in model.modules())
held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
adapter = sum(p.numel() * p.element_size() for p in pipe.network.parameters())
print(json.dumps({"rise": rise, "held": held, "adapter": adapter,
                  "bf16": held + sum(m.qweight.numel() for m in linears),
                  "largest": max(m.qweight.numel() for m in linears)}))
"""


def _build_peak(folder: Path, how: str) -> dict[str, int]:
    return child_json(BUILD_CHILD, folder, how)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux /proc")
def test_build_peak_of_a_quantized_base_is_the_quantized_model_plus_one_layer(tmp_path):
    from loraengine.testing.models import save_tiny_unet
    from tests.test_models_loading import MID_UNET

    # ~141M parameters, 63% of them in Linear layers: the bf16 model (281 MB) is well
    # above its fp8 form (~192 MB), and both well above the process's noise
    folder = save_tiny_unet(tmp_path / "pipe",
                            config={**MID_UNET, "transformer_layers_per_block": 4})
    r = _build_peak(folder, "on_load")
    # quantizing one layer holds its bf16 weight (2 bytes an element) and the fp8
    # result (1), and for one block of rows the fp32 copy, magnitudes, scaled and
    # clamped values (4 bytes each)
    transient = 3 * r["largest"] + 16 * qz.BLOCK
    # the module objects and the library's state: 10% of what is held, as the loader's
    # own peak test allows
    bound = 1.1 * (r["held"] + r["adapter"]) + transient
    assert bound < r["bf16"], r  # the bound tells the two orders apart
    assert r["rise"] <= bound, r
    # the measurement sees the bf16 model when it is all loaded before quantizing
    old = _build_peak(folder, "after_move")
    assert old["held"] == r["held"]
    assert old["rise"] > old["bf16"], old


@pytest.mark.parametrize("fmt", FORMATS)
def test_rows_quantized_a_block_at_a_time_match_the_whole(monkeypatch, fmt):
    x = torch.randn(37, 24, generator=torch.Generator().manual_seed(0)) * 3
    x[5] = 0  # an all-zero row keeps scale 1
    whole_q, whole_s = qz.quantize_rows(x, fmt)
    monkeypatch.setattr(qz, "BLOCK", 50)  # two rows a block, the last one short
    q, s = qz.quantize_rows(x.to(torch.bfloat16), fmt)
    ref_q, ref_s = qz.quantize_rows(x.to(torch.bfloat16).float(), fmt)
    assert torch.equal(q, ref_q) and torch.equal(s, ref_s)
    monkeypatch.setattr(qz, "BLOCK", 1 << 20)
    assert torch.equal(qz.quantize_rows(x, fmt)[0], whole_q)
    monkeypatch.setattr(qz, "BLOCK", 50)
    assert torch.equal(qz.quantize_rows(x, fmt)[0], whole_q)
    assert torch.equal(qz.quantize_rows(x, fmt)[1], whole_s) and whole_s[5] == 1
