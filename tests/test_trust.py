"""NaN watchdog, bucket mode, validation loss and continuing from an existing LoRA."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

import loraengine
from loraengine import LossSpec
from loraengine.core.build import build_pipeline
from loraengine.core.config.root import parse_config
from loraengine.core.data import BucketedDataset, BucketStream
from loraengine.core.errors import NonFiniteError
from loraengine.core.seeding import make_generator
from loraengine.core.train.loop import Trainer
from loraengine.plugins import build_plugin_manager
from loraengine.testing.harness import make_plugin
from loraengine.testing.models import TinyDenoiser, tiny_conditioning, tiny_latents


def base_cfg(tmp_path=None, **training) -> dict:
    cfg = {"model": {"family": "module"},
           "training": {"steps": 6, "batch_size": 2, "dtype": "fp32", **training},
           "adapter": {"rank": 4, "alpha": 4, "dtype": "fp32"},
           "optimizer": {"lr": 0.01},
           "memory": {"gradient_checkpointing": False}}
    if tmp_path is not None:
        cfg["output"] = {"dir": str(tmp_path / "out"), "name": "run", "plot": False}
    return cfg


def nan_loss_host(bad_calls: set[int]):
    """A host whose loss ``flaky`` returns NaN on the chosen (0-based) micro-steps."""
    calls = {"n": 0}

    def make(options):
        def loss(pred, target):
            value = (pred - target) ** 2
            i = calls["n"]
            calls["n"] += 1
            return value * float("nan") if i in bad_calls else value
        return loss

    return build_plugin_manager(entry_points=False,
                                extra=[make_plugin(LossSpec("flaky", make), name="flaky_loss")])


def train(cfg, host=None, **data):
    data.setdefault("latents", tiny_latents())
    data.setdefault("conditioning", tiny_conditioning())
    return loraengine.train(cfg, model=TinyDenoiser(), host=host, **data)


def test_a_nan_step_is_skipped_and_counted(tmp_path):
    cfg = base_cfg(tmp_path)
    cfg["loss"] = {"name": "flaky"}
    result = train(cfg, nan_loss_host({2}))
    assert result.loss_map["skipped"] == [0, 0, 1, 0, 0, 0]
    tensors = load_file(str(result.path))
    assert all(bool(torch.isfinite(v).all()) for v in tensors.values())


def test_k_bad_steps_in_a_row_roll_back_and_stop(tmp_path):
    cfg = base_cfg(tmp_path, max_bad_steps=3, steps=10)
    cfg["loss"] = {"name": "flaky"}
    cfg["output"]["save_every"] = 2
    with pytest.raises(NonFiniteError) as err:
        train(cfg, nan_loss_host(set(range(3, 100))))
    msg = str(err.value)
    assert "3 consecutive non-finite steps (4-6)" in msg
    # the newest checkpoint from before the streak (step 4 was saved during it)
    assert "rolled back to the checkpoint at step 2" in msg and "step_00000002" in msg
    lora = tmp_path / "out" / "run.safetensors"
    assert str(lora) in msg
    assert all(bool(torch.isfinite(v).all()) for v in load_file(str(lora)).values())


def test_bucket_draws_follow_bucket_sizes_and_batches_are_single_resolution():
    sizes = [3, 9, 18]
    from loraengine.core.data import make_dataset

    buckets = BucketedDataset([make_dataset(torch.randn(n, 4, 4 * (i + 1), 4 * (i + 1)),
                                            torch.randn(1, 2, 8)) for i, n in enumerate(sizes)])
    stream = BucketStream(buckets, make_generator(5, "data"))
    counts = [0, 0, 0]
    draws = 6000
    for _ in range(draws):
        idx = stream.take(2)
        x, _ = buckets.batch(idx)  # raises if a batch spans two buckets
        counts[x.shape[-1] // 4 - 1] += 1
    expected = [draws * n / sum(sizes) for n in sizes]
    chi2 = sum((c - e) ** 2 / e for c, e in zip(counts, expected, strict=True))
    assert chi2 < 13.8  # chi-square, 2 degrees of freedom, p = 0.001


def test_bucket_mode_trains_on_mixed_resolutions(tmp_path):
    cfg = base_cfg()
    cfg["data"] = {"bucket_mode": True}
    lat = {"latents.0": torch.randn(4, 4, 8, 8), "latents.1": torch.randn(3, 4, 12, 12)}
    cond = {"cond.0": torch.randn(4, 3, 8), "cond.1": torch.randn(3, 3, 8)}
    result = train(cfg, latents=lat, conditioning=cond)
    assert len(result.loss_map["loss"]) == 6
    assert all(torch.isfinite(torch.tensor(result.loss_map["loss"])))


def test_bucket_mode_reports_a_missing_bucket_conditioning():
    cfg = base_cfg()
    cfg["data"] = {"bucket_mode": True}
    from loraengine.core.errors import DataError

    with pytest.raises(DataError, match=r"bucket 1 has no tensor cond\.1"):
        train(cfg, latents={"latents.0": torch.randn(2, 4, 8, 8),
                            "latents.1": torch.randn(2, 4, 8, 8)},
              conditioning={"cond.0": torch.randn(2, 3, 8)})


def val_config(tmp_path, **extra):
    lat, cond = tmp_path / "val_lat.safetensors", tmp_path / "val_cond.safetensors"
    save_file({"latents": tiny_latents(n=3, seed=9)}, str(lat))
    save_file({"cond": tiny_conditioning(n=3, seed=10)}, str(cond))
    cfg = base_cfg(tmp_path)
    cfg["data"] = {"validation": {"latents": str(lat), "conditioning": str(cond)}}
    cfg["validation"] = {"every": 2}
    cfg.update(extra)
    return cfg


def test_validation_loss_is_deterministic_across_runs_and_resume(tmp_path):
    cfg = val_config(tmp_path)
    a = train(copy.deepcopy(cfg))
    b = train(copy.deepcopy(cfg))
    assert a.loss_map["val_loss_step"] == [2, 4, 6]
    assert a.loss_map["val_loss"] == b.loss_map["val_loss"]
    # interrupted after step 4's checkpoint, then resumed
    cfg["output"]["save_every"] = 4
    cfg["output"]["dir"] = str(tmp_path / "resumed")
    host = build_plugin_manager()
    config = parse_config(cfg, host.registry)
    pipe = build_pipeline(config, host, model=TinyDenoiser(), latents=tiny_latents(),
                          conditioning=tiny_conditioning())
    first = Trainer(pipe)
    first.total_steps = 4
    first.run()
    pipe.close()
    pipe = build_pipeline(config, host, model=TinyDenoiser(), latents=tiny_latents(),
                          conditioning=tiny_conditioning())
    second = Trainer(pipe)
    second.resume("latest")
    c = second.run()
    pipe.close()
    assert c.loss_map["val_loss"] == a.loss_map["val_loss"]
    assert c.loss_map["loss"] == a.loss_map["loss"]


def test_early_stop_and_keep_best(tmp_path):
    cfg = val_config(tmp_path, early_stop={"patience": 1, "min_delta": 10.0})
    cfg["output"]["keep_best"] = True
    result = train(cfg)
    assert result.stopped_early
    assert result.loss_map["val_loss_step"] == [2, 4]  # no gain of 10 → stop at the 2nd
    best = tmp_path / "out" / "run.best.safetensors"
    assert best.exists()


def test_validation_keys_need_validation_data(tmp_path):
    from loraengine.core.errors import ConfigError

    cfg = base_cfg(tmp_path)
    cfg["validation"] = {"every": 2}
    host = build_plugin_manager()
    with pytest.raises(ConfigError, match="validation.every: needs data.validation"):
        parse_config(cfg, host.registry)


def test_existing_lora_continues_exactly_and_adds_steps(tmp_path):
    model = TinyDenoiser()
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([50, 700]), torch.randn(2, 3, 8)
    host = build_plugin_manager()
    cfg = base_cfg(tmp_path, steps=3)
    config = parse_config(cfg, host.registry)
    pipe = build_pipeline(config, host, model=model, latents=tiny_latents(),
                          conditioning=tiny_conditioning())
    first = Trainer(pipe).run()
    with torch.no_grad():
        trained_out = model(x, t, c)
    pipe.close()
    cfg2 = base_cfg(tmp_path, steps=2)
    cfg2["adapter"]["existing"] = str(first.path)
    cfg2["output"]["name"] = "continued"
    config2 = parse_config(cfg2, host.registry)
    pipe = build_pipeline(config2, host, model=model, latents=tiny_latents(),
                          conditioning=tiny_conditioning())
    with torch.no_grad():
        assert torch.equal(model(x, t, c), trained_out)
    second = Trainer(pipe).run()
    pipe.close()
    assert second.steps == 5
    from safetensors import safe_open

    with safe_open(str(second.path), "pt") as fh:
        assert fh.metadata()["loraengine.steps"] == "5"


def test_existing_comfyui_style_file_takes_steps_from_its_name(tmp_path):
    first = train(base_cfg(tmp_path, steps=2))
    tensors = load_file(str(first.path))
    from loraengine.plugins.exporters import COMFYUI, KOHYA

    paths = [n for n, m in TinyDenoiser().named_modules()
             if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    comfy = COMFYUI.to_file(KOHYA.from_file(tensors, paths))
    path = tmp_path / "ComfyUI_trained_lora_7_steps_00001_.safetensors"  # its naming
    save_file(comfy, str(path))
    cfg = base_cfg(tmp_path, steps=1)
    cfg["adapter"]["existing"] = str(path)
    cfg["output"]["name"] = "more"
    assert train(cfg).steps == 8


@pytest.mark.slow
def test_existing_file_with_another_algorithm_is_a_clear_error(tmp_path):
    path = tmp_path / "loha.safetensors"
    save_file({"lora_unet_conv_in.hada_w1_a": torch.zeros(16, 2),
               "lora_unet_conv_in.hada_w1_b": torch.zeros(2, 36),
               "lora_unet_conv_in.hada_w2_a": torch.zeros(16, 2),
               "lora_unet_conv_in.hada_w2_b": torch.zeros(2, 36)}, str(path))
    cfg = base_cfg(tmp_path)
    cfg["adapter"]["existing"] = str(path)
    from loraengine.core.errors import DataError

    with pytest.raises(DataError, match=r"module conv_in holds a loha adapter.*'lora'"):
        train(cfg)


def test_existing_and_apply_read_a_file_the_same_way(tmp_path):
    """A BOFT file without metadata (``oft_blocks``, which OFT also names): ``apply`` and
    ``adapter.existing`` choose the same algorithm for it, through the one reader."""
    cfg = base_cfg(tmp_path, steps=2)
    cfg["adapter"].update({"algorithm": "boft", "rank": 2})
    first = train(cfg)
    plain = tmp_path / "plain_boft.safetensors"
    save_file(load_file(str(first.path)), str(plain))
    with loraengine.apply(TinyDenoiser(), plain) as handle:
        assert set(handle.algorithms.values()) == {"boft"}
    again = base_cfg(tmp_path, steps=1)
    again["adapter"].update({"algorithm": "boft", "rank": 2, "existing": str(plain)})
    again["output"]["name"] = "more"
    assert train(again).steps == 1  # no metadata and no steps in the name
    from loraengine.core.errors import DataError

    again["adapter"]["algorithm"] = "oft"
    with pytest.raises(DataError, match=r"holds a boft adapter.*'oft'"):
        train(again)


def test_bucket_command_groups_mixed_sizes(tmp_path):
    from click.testing import CliRunner

    from loraengine.cli.main import cli

    lat = {"latents.0": torch.randn(4, 8, 8), "latents.1": torch.randn(4, 12, 8),
           "latents.2": torch.randn(4, 8, 8)}
    cond = {f"cond.{k}": torch.randn(3, 8) * (k + 1) for k in range(3)}
    save_file(lat, str(tmp_path / "l.safetensors"))
    save_file(cond, str(tmp_path / "c.safetensors"))
    out = CliRunner().invoke(cli, ["bucket", "--latents", str(tmp_path / "l.safetensors"),
                                   "--conditioning", str(tmp_path / "c.safetensors"),
                                   "--out", str(tmp_path / "b")])
    assert out.exit_code == 0, out.output
    bl = load_file(str(tmp_path / "b" / "latents.safetensors"))
    bc = load_file(str(tmp_path / "b" / "conditioning.safetensors"))
    assert {k: list(v.shape) for k, v in bl.items()} == {"latents.0": [2, 4, 8, 8],
                                                         "latents.1": [1, 4, 12, 8]}
    assert torch.equal(bl["latents.0"][1], lat["latents.2"])
    assert torch.equal(bc["cond.0"][1], cond["cond.2"]) and torch.equal(bc["cond.1"][0], cond["cond.1"])
    cfg = base_cfg()
    cfg["data"] = {"bucket_mode": True}
    assert len(train(cfg, latents=bl, conditioning=bc).loss_map["loss"]) == 6


def test_norm_and_bias_deltas_train_and_a_comfyui_file_continues_with_them(tmp_path):
    """A ComfyUI-trained file: diffusion_model.* keys, LoRA with alpha, diff/diff_b on
    norms and biases, steps only in its name."""
    from loraengine.plugins.exporters import COMFYUI

    host = build_plugin_manager()
    cfg = base_cfg(tmp_path, steps=3)
    cfg["adapter"].update({"norm_and_bias_deltas": True, "exporter": "comfyui", "alpha": 1.0})
    cfg["output"]["name"] = "ComfyUI_trained_lora_3_steps_00001_"
    config = parse_config(cfg, host.registry)
    model = TinyDenoiser()
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([50, 700]), torch.randn(2, 3, 8)
    pipe = build_pipeline(config, host, model=model, latents=tiny_latents(),
                          conditioning=tiny_conditioning())
    first = Trainer(pipe).run()
    with torch.no_grad():
        trained = model(x, t, c)
    pipe.close()
    tensors = load_file(str(first.path))
    assert "diffusion_model.blocks.0.1.diff" in tensors  # the GroupNorm's scale
    assert "diffusion_model.blocks.0.1.diff_b" in tensors
    assert "diffusion_model.conv_in.diff_b" in tensors
    assert float(tensors["diffusion_model.blocks.0.1.diff"].abs().sum()) > 0
    assert all(k.startswith("diffusion_model.") for k in tensors)
    # no metadata: a plain file as ComfyUI writes it
    plain = tmp_path / first.path.name
    save_file(tensors, str(plain))
    cfg2 = base_cfg(tmp_path, steps=2)
    cfg2["adapter"]["existing"] = str(plain)
    cfg2["output"]["name"] = "continued"
    pipe = build_pipeline(parse_config(cfg2, host.registry), host, model=model,
                          latents=tiny_latents(), conditioning=tiny_conditioning())
    assert len(pipe.network.delta_paths) > 0
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, c), trained, rtol=0, atol=0)
    second = Trainer(pipe).run()
    pipe.close()
    assert second.steps == 5
    assert any(k.endswith(".diff_b") for k in second.lora)
    assert COMFYUI.from_file(tensors, ["conv_in"])  # the format is recognised


def test_channel_deltas_merge_equals_hook(tmp_path):
    from loraengine.core.adapter import AdapterNetwork, ChannelDelta

    for base in (torch.nn.GroupNorm(2, 4), torch.nn.LayerNorm(6), torch.nn.Linear(6, 5),
                 torch.nn.Conv2d(4, 3, 3)):
        delta = ChannelDelta.fresh(base)
        with torch.no_grad():
            for p in delta.parameters():
                p.normal_()
        x = torch.randn(2, 4, 6, 6) if not isinstance(base, (torch.nn.LayerNorm, torch.nn.Linear)) \
            else torch.randn(2, 3, 6)
        net = AdapterNetwork({}, {"m": delta})
        net.attach("weight")
        with torch.no_grad():
            hooked = base(x)
        net.merge()
        with torch.no_grad():
            merged = base(x)
        torch.testing.assert_close(hooked, merged, rtol=1e-5, atol=1e-5)


def test_apply_puts_diff_deltas_on_a_fresh_model(tmp_path):
    import loraengine

    cfg = base_cfg(tmp_path, steps=3)
    cfg["adapter"]["norm_and_bias_deltas"] = True
    host = build_plugin_manager()
    model = TinyDenoiser()
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([50, 700]), torch.randn(2, 3, 8)
    pipe = build_pipeline(parse_config(cfg, host.registry), host, model=model,
                          latents=tiny_latents(), conditioning=tiny_conditioning())
    result = Trainer(pipe).run()
    with torch.no_grad():
        trained = model(x, t, c)
    pipe.close()
    for mode in ("bypass", "merge"):
        fresh = TinyDenoiser()
        loraengine.apply(fresh, result.path, mode=mode)
        with torch.no_grad():
            torch.testing.assert_close(fresh(x, t, c), trained, rtol=1e-5, atol=1e-5)


def test_loss_map_file_is_strict_json_after_a_skipped_step(tmp_path):
    import json

    cfg = base_cfg(tmp_path)
    cfg["loss"] = {"name": "flaky"}
    result = train(cfg, nan_loss_host({1}))
    text = (tmp_path / "out" / "run.loss.json").read_text()
    assert "NaN" not in text
    assert json.loads(text)["loss"][1] is None
    assert result.loss_map["skipped"][1] == 1.0


def test_a_failed_build_leaves_the_model_unpatched(tmp_path):
    from loraengine.core.errors import ConfigError

    model = TinyDenoiser()
    cfg = base_cfg()
    cfg["timestep_sampler"] = {"name": "uniform", "shift": 3.0}  # shift needs a flow model
    with pytest.raises(ConfigError):
        loraengine.train(cfg, model=model, latents=tiny_latents(),
                         conditioning=tiny_conditioning())
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_train_end_fires_when_training_stops_with_an_error(tmp_path):
    import json

    from loraengine.cli.progress import EventLog

    host = nan_loss_host(set(range(100)))
    log = tmp_path / "events.jsonl"
    host.register(EventLog(log))
    cfg = base_cfg(tmp_path, max_bad_steps=2)
    cfg["loss"] = {"name": "flaky"}
    with pytest.raises(NonFiniteError):
        train(cfg, host)
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert events[-1]["event"] == "train_end" and events[-1]["error"] is True
    losses = [e["loss"] for e in events if e["event"] == "step"]
    assert losses and all(v is None for v in losses)  # NaN is written as null


def test_fp16_scaler_backoff_is_not_counted_as_bad_steps(tmp_path):
    model = TinyDenoiser().half()
    with torch.no_grad():
        model.conv_out.weight.mul_(10)  # a large loss: the scale must back off a few times
    cfg = base_cfg(tmp_path, dtype="none", max_bad_steps=2, steps=8)
    cfg["adapter"]["dtype"] = "fp32"
    result = loraengine.train(cfg, model=model, latents=tiny_latents(),
                              conditioning=tiny_conditioning())
    assert result.loss_map["skipped"] == [0.0] * 8  # overflow is the scaler's business
    assert all(bool(torch.isfinite(v).all()) for v in result.lora.values())


def test_a_skipped_first_step_leaks_no_scheduler_order_warning_and_keeps_the_schedule():
    import warnings

    cfg = base_cfg(steps=4)
    cfg["loss"] = {"name": "flaky"}
    cfg["lr_scheduler"] = {"name": "cosine"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        skipped = train(cfg, nan_loss_host({0}))
    assert skipped.loss_map["skipped"] == [1, 0, 0, 0]
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)], \
        [str(w.message) for w in caught]
    # the schedule counts steps, skipped or not: the same rates as a run with none skipped
    clean = train(cfg, nan_loss_host(set()))
    assert skipped.loss_map["lr"] == clean.loss_map["lr"]
