"""``training.dtype: none`` on an fp16 model: the model keeps fp16, the trainer scales
the loss with a GradScaler, an overflowing step is skipped (the adapter is untouched
and the scale backs off) and the saved LoRA is finite."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from loraengine.api import train
from loraengine.core.build import build_pipeline
from loraengine.core.config.root import parse_config
from loraengine.core.plugins.hookspecs import hookimpl
from loraengine.core.train.loop import Trainer
from loraengine.testing.models import tiny_conditioning, tiny_latents, tiny_unet_config


def fp16_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)  # diffusers initialises from the global generator
    return UNet2DConditionModel(**tiny_unet_config()).half()


def config(tmp_path, steps: int) -> dict:
    return {
        "model": {"family": "module"},
        "training": {"steps": steps, "batch_size": 2, "dtype": "none", "seed": 0},
        "optimizer": {"lr": 0.01},
        "adapter": {"rank": 4, "dtype": "fp32"},
        "memory": {"gradient_checkpointing": False},
        "output": {"dir": str(tmp_path / "out"), "name": "fp16", "plot": False},
    }


@pytest.mark.slow
def test_fp16_model_with_dtype_none_trains_with_a_grad_scaler(host, tmp_path):
    cfg = parse_config(config(tmp_path, 25), host.registry)
    pipe = build_pipeline(cfg, host, model=fp16_unet(), latents=tiny_latents(),
                          conditioning=tiny_conditioning(dim=16))
    try:
        assert pipe.compute_dtype == torch.float16
        assert all(p.dtype == torch.float16 for p in pipe.model.parameters())

        def fixed_loss() -> float:
            with torch.no_grad():
                return float(Trainer(pipe, write_files=False).micro_step(torch.arange(6)))

        before = fixed_loss()
        trainer = Trainer(pipe, write_files=False)
        assert isinstance(trainer.scaler, torch.amp.GradScaler)
        result = trainer.run()
        after = fixed_loss()
    finally:
        pipe.close()
    assert result.loss_map["skipped"] == [0.0] * 25
    assert math.isfinite(after) and after < before * 0.95, (before, after)


class StepSnapshots:
    """Keeps the adapter weights and the loss scale after every optimizer step."""

    def __init__(self) -> None:
        self.params: list[dict[str, torch.Tensor]] = []
        self.scales: list[float] = []
        self.dtypes: list[torch.dtype] = []

    @hookimpl
    def loraengine_on_step_end(self, run, step, metrics):
        self.params.append({n: p.detach().clone()
                            for n, p in run.network.named_parameters()})
        self.scales.append(float(run.scaler.get_scale()))
        self.dtypes.append(run.compute_dtype)


def test_injected_overflow_is_skipped_and_the_saved_lora_is_finite(host, tmp_path):
    model = fp16_unet()
    calls = {"n": 0}

    def overflow_on_second_step(module, args, out):
        calls["n"] += 1
        return out * torch.tensor(float("inf"), dtype=out.dtype) if calls["n"] == 2 else out

    model.conv_out.register_forward_hook(overflow_on_second_step)
    snaps = StepSnapshots()
    host.register(snaps, name="test.snapshots")
    result = train(config(tmp_path, 4), model=model, latents=tiny_latents(),
                   conditioning=tiny_conditioning(dim=16), host=host)
    assert snaps.dtypes == [torch.float16] * 4
    assert result.loss_map["skipped"] == [0.0, 1.0, 0.0, 0.0]
    assert not math.isfinite(result.loss_map["loss"][1])
    # the skipped step left the adapter as it was; the ones around it moved it
    after1, after2, after3 = snaps.params[0], snaps.params[1], snaps.params[2]
    assert all(torch.equal(after1[k], after2[k]) for k in after1)
    assert any(not torch.equal(after2[k], after3[k]) for k in after2)
    assert snaps.scales[1] == pytest.approx(snaps.scales[0] * 0.5)  # the scale backed off
    saved = load_file(str(result.path))
    assert saved and all(torch.isfinite(t).all() for t in saved.values())
    final = {k: v.float() for k, v in result.lora.items()}
    assert all(torch.equal(saved[k].float(), final[k]) for k in final)
