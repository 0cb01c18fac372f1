"""The training loop end to end: determinism, exactness at init, what gets gradients,
gradient accumulation, and outputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import REPO
from safetensors import safe_open
from safetensors.torch import load_file

import loraengine
from loraengine.core.build import build_pipeline
from loraengine.core.config.root import parse_config
from loraengine.core.train.loop import Trainer
from loraengine.testing.models import TinyDenoiser, tiny_conditioning, tiny_latents


def module_config(**training) -> dict:
    return {"model": {"family": "module"},
            "training": {"steps": 3, "batch_size": 2, "dtype": "fp32", **training},
            "adapter": {"rank": 4, "alpha": 3, "dtype": "fp32"},
            "memory": {"gradient_checkpointing": False}}


def pipeline(host, cfg: dict, model=None):
    config = parse_config(cfg, host.registry)
    return build_pipeline(config, host, model=model or TinyDenoiser(), latents=tiny_latents(),
                          conditioning=tiny_conditioning())


def test_train_returns_the_nodes_three_outputs():
    result = loraengine.train(module_config(), model=TinyDenoiser(), latents=tiny_latents(),
                              conditioning=tiny_conditioning())
    assert result.steps == 3
    assert len(result.loss_map["loss"]) == 3 and len(result.loss_map["lr"]) == 3
    assert result.loss_map["lr"] == [0.0005] * 3
    assert any(k.endswith("lora_down.weight") for k in result.lora)
    assert result.path is None  # an in-memory config without an output section writes nothing


def test_same_seed_gives_bitwise_identical_file_other_seed_differs(tmp_path, unet_config):
    files = []
    for i, seed in enumerate([7, 7, 8]):
        cfg = copy.deepcopy(unet_config)
        cfg["training"]["seed"] = seed
        cfg["output"]["dir"] = str(tmp_path / f"run{i}")
        files.append(loraengine.train(cfg).path)
    a, b, c = (load_file(str(f)) for f in files)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if k.endswith("lora_up.weight"))


def test_adapted_output_equals_base_output_at_init(host):
    model = TinyDenoiser()
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 3, 8)
    with torch.no_grad():
        before = model(x, t, c)
    pipe = pipeline(host, module_config(), model)
    assert pipe.network.mode == "weight" and len(pipe.network.paths) > 5
    with torch.no_grad():
        after = model(x, t, c)
    assert torch.equal(before, after)
    pipe.close()
    with torch.no_grad():
        assert torch.equal(model(x, t, c), before)


def test_pipeline_is_frozen_once_assembled_and_closing_twice_is_safe(host):
    import dataclasses

    model = TinyDenoiser()
    pipe = pipeline(host, module_config(), model)
    with pytest.raises(dataclasses.FrozenInstanceError):
        pipe.attach_mode = "bypass"
    pipe.close()
    pipe.close()


def test_only_adapter_parameters_get_gradients_and_base_is_untouched(host):
    model = TinyDenoiser()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    pipe = pipeline(host, module_config(steps=4), model)
    trainer = Trainer(pipe, write_files=False)
    pipe.optimizer.zero_grad()
    trainer.micro_step(torch.tensor([0, 1])).backward()
    assert all(p.grad is None for p in model.parameters())
    grads = [p.grad for p in pipe.network.parameters()]
    assert all(g is not None for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)
    result = trainer.run()
    pipe.close()
    assert result.steps == 4
    for k, v in model.state_dict().items():
        assert torch.equal(v, base_state[k]), k
    ups = [v for k, v in result.lora.items() if k.endswith("lora_up.weight")]
    assert any(float(u.abs().sum()) > 0 for u in ups)  # the adapter did learn


def test_gradient_accumulation_equals_one_large_batch(host):
    def one_step(batch, accum):
        cfg = module_config(steps=1, batch_size=batch, grad_accumulation_steps=accum, seed=3)
        cfg["optimizer"] = {"name": "sgd", "lr": 0.1}
        pipe = pipeline(host, cfg)
        trainer = Trainer(pipe, write_files=False)
        trainer.run()
        params = {n: p.detach().clone() for n, p in pipe.network.named_parameters()}
        pipe.close()
        return params, trainer.loss_map["loss"][0]

    small, loss_small = one_step(2, 3)
    large, loss_large = one_step(6, 1)
    assert loss_small == pytest.approx(loss_large, rel=1e-6)
    moved = 0
    for name in small:
        diff = (small[name] - large[name]).abs().max()
        assert float(diff) <= 1e-6 * max(float(large[name].abs().max()), 1e-12), name
        moved += int(name.endswith("lora_up"))
    assert moved > 0


class _PairingRecorder(TinyDenoiser):
    """A ``TinyDenoiser`` that notes, for every row of every call, which sample its
    latent came from and which sample its conditioning came from (see
    ``_indexed_data``), then denoises a rescaled copy so the loss stays ordinary."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[list[int], list[int]]] = []

    def forward(self, x, t, cond):
        with torch.no_grad():
            # channel 1 / channel 0 is the latent's index + 1 whatever the noise level
            ratio = x[:, 1].double().mean((1, 2)) / x[:, 0].double().mean((1, 2))
            latent_ids = (ratio.round() - 1).long().tolist()
            cond_ids = (cond.double().mean((1, 2)).round() - 1).long().tolist()
        self.calls.append((latent_ids, cond_ids))
        scale = x.detach().abs().amax(dim=(1, 2, 3), keepdim=True)
        return super().forward(x / scale, t, cond)


def _indexed_data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents and conditioning that carry their sample index through noising.

    Latent ``i`` has channel 0 = K and channel 1 = K·(i+1); noising scales both by the
    same sqrt(alpha_bar) >= 0.068 (the tiny UNet's schedule at t=999) and adds unit
    noise whose 8x8 channel mean has std 1/8, so with K = 1000 the ratio of the two
    channel means is i+1 to within about 0.02. Conditioning row ``i`` is i+1 in every
    entry, so a row mixed with another sample's (an average over the batch, a shuffled
    pairing) decodes to a different index.
    """
    big = 1000.0
    latents = torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    latents[:, 0] = big
    latents[:, 1] = big * torch.arange(1, n + 1, dtype=torch.float32)[:, None, None]
    cond = torch.arange(1, n + 1, dtype=torch.float32)[:, None, None].expand(n, 3, 8)
    return latents, cond.contiguous()


def test_conditioning_is_paired_per_sample():
    """Through the real batching and micro-step path (batch 3, two micro-steps per
    step), every sample's latent reaches the model beside its own conditioning row."""
    model = _PairingRecorder()
    latents, cond = _indexed_data(6)
    cfg = module_config(steps=2, batch_size=3, grad_accumulation_steps=2)
    loraengine.train(cfg, model=model, latents=latents, conditioning=cond)
    assert len(model.calls) == 4  # 2 steps x 2 micro-steps, one forward each
    seen: list[int] = []
    for latent_ids, cond_ids in model.calls:
        assert len(latent_ids) == 3
        assert latent_ids == cond_ids
        seen += latent_ids
    # one epoch per step (6 samples, 3 x 2 per step): every sample, each once
    assert sorted(seen[:6]) == sorted(seen[6:]) == list(range(6))


def test_one_conditioning_entry_is_repeated(host):
    cfg = parse_config(module_config(), host.registry)
    pipe = build_pipeline(cfg, host, model=TinyDenoiser(), latents=tiny_latents(),
                          conditioning=tiny_conditioning(n=1))
    assert pipe.dataset.cond["cond"].shape[0] == 6
    assert torch.equal(pipe.dataset.cond["cond"][0], pipe.dataset.cond["cond"][5])
    pipe.close()


@pytest.mark.slow  # 1.5–3.4 s: the full suite runs it
def test_training_never_touches_the_global_rng(host):
    model, lat, cond = TinyDenoiser(), tiny_latents(), tiny_conditioning()  # these use it
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    loraengine.train(module_config(), model=model, latents=lat, conditioning=cond)
    assert torch.equal(torch.rand(3), expected)


def test_bf16_training_keeps_fp32_master_weights(host):
    cfg = module_config(dtype="bf16")
    cfg["adapter"]["dtype"] = "bf16"
    pipe = pipeline(host, cfg)
    assert next(pipe.model.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in pipe.network.parameters())
    result = Trainer(pipe, write_files=False).run()
    pipe.close()
    assert all(v.dtype == torch.bfloat16 for k, v in result.lora.items() if "alpha" not in k)
    assert all(torch.isfinite(torch.tensor(result.loss_map["loss"])))


def test_conv_weights_are_saved_4d_with_alpha(tmp_path, unet_config):
    path = loraengine.train(unet_config).path
    tensors = load_file(str(path))
    down = tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"]
    up = tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"]
    assert down.shape == (4, 16, 3, 3) and up.shape == (16, 4, 1, 1)
    assert float(tensors["lora_unet_down_blocks_0_resnets_0_conv1.alpha"]) == 2.0
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    assert meta["loraengine.steps"] == "3" and meta["ss_steps"] == "3"
    assert meta["loraengine.algorithm"] == "lora" and meta["ss_network_dim"] == "4"
    assert json.loads(meta["loraengine.config"])["adapter"]["rank"] == 4


def test_a_full_adapter_with_bias_deltas_trains_each_bias_once(host, unet_config):
    """``full`` trains a layer's Δb itself; ``norm_and_bias_deltas`` must not add a
    second bias delta to that layer (the file holds one ``diff_b`` per module, so the
    written file would not be the trained adapter)."""
    cfg = copy.deepcopy(unet_config)
    cfg["adapter"] = {**cfg["adapter"], "algorithm": "full", "norm_and_bias_deltas": True}
    pipe = build_pipeline(parse_config(cfg, host.registry), host)
    try:
        own = {p for p, layer in pipe.network.items() if layer.delta_bias() is not None}
        assert own and not own & set(pipe.network.delta_paths)
        assert pipe.network.delta_paths  # the norms still get their deltas
    finally:
        pipe.close()


def test_include_exclude_select_layers(host):
    cfg = module_config()
    cfg["adapter"]["include"] = ["blocks.*"]
    cfg["adapter"]["exclude"] = ["*.3"]
    pipe = pipeline(host, cfg)
    assert sorted(pipe.network.paths) == ["blocks.0.0", "blocks.1.0"]
    pipe.close()


@pytest.mark.slow
def test_quickstart_runs_from_the_repository_root(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from loraengine.cli.main import cli

    out = tmp_path / "qs"
    # the README's command, from the repository root; in this process (one torch thread,
    # as conftest sets), which has torch and diffusers imported already
    monkeypatch.chdir(REPO)
    res = CliRunner().invoke(cli, ["train", "examples/quickstart.yaml", "--set",
                                   f"output.dir={out}", "--events",
                                   str(tmp_path / "events.jsonl")])
    assert res.exit_code == 0, res.output[-3000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == ["quickstart_lora.events.jsonl", "quickstart_lora.loss.json",
                     "quickstart_lora.loss.png", "quickstart_lora.safetensors"]
    with safe_open(str(out / "quickstart_lora.safetensors"), "pt") as fh:
        steps = int(fh.metadata()["loraengine.steps"])
    loss = json.loads((out / "quickstart_lora.loss.json").read_text())["loss"]
    assert steps == len(loss) == 60
    assert sum(loss[-10:]) / 10 < 0.6 * sum(loss[:10]) / 10  # visibly falls
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events].count("step") == 60
    assert events[0]["event"] == "train_start" and events[-1]["event"] == "train_end"
    assert (out / "quickstart_lora.loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_progress_bar_shows_steps_loss_rate_and_eta(host, tmp_path):
    import io

    from loraengine.cli.progress import ProgressBar

    stream = io.StringIO()
    host.register(ProgressBar(stream=stream, enabled=True))
    cfg = module_config(steps=3)
    cfg["output"] = {"dir": str(tmp_path), "name": "bar", "plot": False, "save_every": 2}
    pipe = pipeline(host, cfg)
    Trainer(pipe).run()
    pipe.close()
    text = stream.getvalue()
    assert "3/3" in text and "loss " in text and "it/s" in text and "ETA" in text
    assert "checkpoint:" in text and "step_00000002" in text


def test_progress_bar_is_silent_when_not_a_terminal(host):
    import io

    from loraengine.cli.progress import ProgressBar

    stream = io.StringIO()  # isatty() is False
    host.register(ProgressBar(stream=stream))
    pipe = pipeline(host, module_config(steps=2))
    Trainer(pipe, write_files=False).run()
    pipe.close()
    assert stream.getvalue() == ""
