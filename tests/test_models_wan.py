"""The ``wan`` family on tiny Wan 2.1 and Wan 2.2 A14B pipelines of the real classes:
video latents ``[N,C,T,H,W]`` end to end, the schedule against diffusers' flow-matching
scheduler, the two experts' timestep ranges, training through the CLI, and the written
files read by WanPipeline's own LoRA loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import diffusers_warnings
from safetensors.torch import load_file, save_file

from loraengine.api import resolve_config
from loraengine.cli.main import cli
from loraengine.core.build import build_pipeline
from loraengine.core.errors import ConfigError, DataError
from loraengine.core.train.step import draw_noise
from loraengine.plugins import build_plugin_manager
from loraengine.testing import tiny_video as tv


@pytest.fixture(scope="module")
def pipes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("video")
    return {fam: tv.save_video(fam, root / fam) for fam in tv.VIDEO_FAMILIES}


def _load(**options):
    spec = build_plugin_manager().registry.get("model", "wan")
    return spec.load(spec.config_model(**options), {"base_dir": None, "module": None})


def _data(tmp_path: Path, n: int = 4, seed: int = 1) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(seed)
    save_file({"latents": tv.video_latents(n, seed=seed)}, str(tmp_path / "lat.st"))
    save_file({"cond": torch.randn(n, 6, tv.TEXT_DIM, generator=g)}, str(tmp_path / "cond.st"))
    return tmp_path / "lat.st", tmp_path / "cond.st"


def _config(tmp_path: Path, folder: Path, **model) -> Path:
    lat, cond = _data(tmp_path)
    cfg = {"model": {"family": "wan", "path": str(folder), **model},
           "data": {"latents": str(lat), "conditioning": str(cond)},
           "training": {"steps": 12, "batch_size": 2, "dtype": "fp32", "seed": 0},
           "optimizer": {"lr": 0.01},
           "adapter": {"rank": 4, "alpha": 4, "dtype": "fp32"},
           "memory": {"gradient_checkpointing": True},
           "output": {"dir": str(tmp_path / "out"), "name": "lora", "plot": False}}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_detects_wan_pipelines_and_reads_its_settings(pipes):
    spec = build_plugin_manager().registry.get("model", "wan")
    assert spec.detect(pipes["wan"]) and spec.detect(pipes["wan22"])
    loaded = _load(path=pipes["wan"])
    assert loaded.latent_ndim == 5 and loaded.latent_channels == tv.LATENT_CHANNELS
    assert loaded.cond_widths == {"cond": tv.TEXT_DIM} and loaded.cond_keys == ("cond",)
    assert loaded.schedule.shift == 3.0  # the UniPC config's flow_shift
    assert loaded.schedule.timestep_range is None and loaded.file_parts == {}
    assert len(loaded.blocks) == 2  # the transformer's blocks, for checkpointing/offload


def test_flow_targets_shifted_timesteps_and_xt_match_diffusers_flow_match_scheduler(pipes):
    """Our draws against FlowMatchEulerDiscreteScheduler built from the pipeline's
    scheduler config (its shift): σ, the model timestep, x_t and the velocity target."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from loraengine.core.plugins.specs import NoOptions
    from loraengine.plugins.training.timesteps import SPECS

    for family, shift in (("wan", 3.0), ("wan22", 12.0)):
        loaded = _load(path=pipes[family], expert="high_noise")
        sched = loaded.schedule
        assert sched.shift == shift
        ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        uniform = next(s for s in SPECS if s.name == "uniform").factory(NoOptions(), sched)
        u = torch.rand(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        g = torch.Generator().manual_seed(0)
        ours = torch.stack([uniform(g) for _ in range(64)])
        # diffusers: shifted sigmas = s·u/(1+(s−1)·u), timesteps = σ·1000
        ref_sigma = ref.config.shift * u / (1 + (ref.config.shift - 1) * u)
        torch.testing.assert_close(ours, ref_sigma, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(sched.model_timesteps(ours).double(), ref_sigma * 1000,
                                   rtol=1e-5, atol=1e-3)
        # the scheduler's own table: every σ it would sample with is what the shift gives
        ref.set_timesteps(10)
        table = ref.sigmas[:-1].double()
        unshifted = table / (shift - (shift - 1) * table)
        torch.testing.assert_close(sched.shift_sigma(unshifted), table, rtol=1e-5, atol=1e-6)
        x0 = tv.video_latents(3)
        noise = torch.randn_like(x0)
        pick = torch.tensor([1, 4, 8])
        t = ref.sigmas[pick].double()  # σ of three of the scheduler's own timesteps
        x_t = sched.add_noise(x0, noise, t)
        ref_xt = torch.cat([ref.scale_noise(x0[i:i + 1], ref.timesteps[pick[i]][None],
                                            noise[i:i + 1]) for i in range(3)])
        torch.testing.assert_close(sched.model_timesteps(t), ref.timesteps[pick].float(),
                                   rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(x_t, ref_xt, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sched.target(x0, noise, t), noise - x0)


def test_a_low_noise_expert_lora_only_sees_timesteps_below_the_boundary(tmp_path, pipes):
    host = build_plugin_manager()
    for expert, inside in (("low_noise", lambda s: s < tv.BOUNDARY_RATIO),
                           ("high_noise", lambda s: s >= tv.BOUNDARY_RATIO)):
        conf, base = resolve_config(_config(tmp_path, pipes["wan22"], expert=expert), host)
        pipe = build_pipeline(conf, host, base_dir=base)
        try:
            assert pipe.loaded.schedule.timestep_range is not None
            g = torch.Generator().manual_seed(3)
            seen = torch.cat([draw_noise(pipe, torch.zeros(8, 4, 2, 4, 4), g)[1]
                              for _ in range(50)])
            assert all(inside(float(s)) for s in seen), expert
            assert float(seen.min()) < 0.3 if expert == "low_noise" else float(seen.max()) > 0.97
            # the module trained is that expert's own transformer
            folder = "transformer_2" if expert == "low_noise" else "transformer"
            own = load_file(str(next((pipes["wan22"] / folder).glob("*.safetensors"))))
            key = "blocks.0.attn1.to_q.weight"
            assert torch.equal(pipe.loaded.module.get_submodule(
                "blocks.0.attn1.to_q").weight.detach().float(), own[key].float())
        finally:
            pipe.close()


def test_expert_choices_and_data_rank_are_checked(tmp_path, pipes):
    with pytest.raises(ConfigError, match="model.expert: low_noise needs a two-expert"):
        _load(path=pipes["wan"], expert="low_noise")
    host = build_plugin_manager()
    cfg = yaml.safe_load(_config(tmp_path, pipes["wan"]).read_text())
    save_file({"latents": torch.randn(2, 4, 4, 4)}, str(tmp_path / "img.st"))
    cfg["data"]["latents"] = str(tmp_path / "img.st")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    conf, base = resolve_config(tmp_path / "bad.yaml", host)
    with pytest.raises(DataError, match=r"4-D .* the model takes 5-D latents \[N,C,T,H,W\]"):
        build_pipeline(conf, host, base_dir=base)


def _fixed_loss(pipe, seed: int = 11) -> float:
    from loraengine.core.train.step import micro_step

    idx = torch.arange(len(pipe.dataset))
    with torch.no_grad():
        return float(micro_step(pipe, idx, torch.Generator().manual_seed(seed)))


def _diffusers_output(folder: Path, lora: Path | None, x, t, cond, expert: str = "high_noise"):
    """The pipeline's transformer (``transformer_2`` for the low-noise expert) after
    WanPipeline.load_lora_weights, and the warnings diffusers logged while loading."""
    import diffusers
    from peft.tuners.lora import LoraLayer

    pipe = diffusers.WanPipeline.from_pretrained(str(folder), local_files_only=True)
    with diffusers_warnings() as messages:
        if lora is not None:
            pipe.load_lora_weights(str(lora), load_into_transformer_2=expert == "low_noise")
    model = pipe.transformer_2 if expert == "low_noise" else pipe.transformer
    wrapped = sum(isinstance(m, LoraLayer) for m in model.modules())
    with torch.no_grad():
        out = model(hidden_states=x, timestep=t, encoder_hidden_states=cond,
                    return_dict=False)[0]
    return out, wrapped, messages


def _inputs(seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 2, 4, 4, generator=g), torch.tensor([300.0, 950.0]),
            torch.randn(2, 6, tv.TEXT_DIM, generator=g))


def test_trains_through_the_cli_and_the_file_loads_in_wan_pipeline(tmp_path, pipes):
    config = _config(tmp_path, pipes["wan"])
    host = build_plugin_manager()
    conf, base = resolve_config(config, host)
    before_pipe = build_pipeline(conf, host, base_dir=base)
    try:
        before = _fixed_loss(before_pipe)
    finally:
        before_pipe.close()
    result = CliRunner().invoke(cli, ["train", str(config), "-q"])
    assert result.exit_code == 0, result.output
    lora = tmp_path / "out" / "lora.safetensors"
    tensors = load_file(str(lora))
    assert tensors and all(k.startswith("diffusion_model.blocks.") for k in tensors)
    modules = {k.rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k}

    conf, base = resolve_config(config, host, overrides=[f"adapter.existing={lora}"])
    engine = build_pipeline(conf, host, base_dir=base)
    x, t, cond = _inputs()
    try:
        after = _fixed_loss(engine)
        engine.network.merge()
        with torch.no_grad():
            merged = engine.loaded.predict(engine.model, x, t, {"cond": cond})
    finally:
        engine.close()
    assert after < before  # loss on fixed draws fell

    loaded, wrapped, messages = _diffusers_output(pipes["wan"], lora, x, t, cond)
    assert not [m for m in messages if "unexpected keys" in m or "missing keys" in m]
    assert wrapped == len(modules)
    torch.testing.assert_close(loaded, merged, rtol=1e-4, atol=1e-4)
    plain, _, _ = _diffusers_output(pipes["wan"], None, x, t, cond)
    assert (loaded - plain).abs().max() > 1e-3  # the LoRA does something


def test_both_experts_train_together_and_write_one_file_each(tmp_path, pipes):
    config = _config(tmp_path, pipes["wan22"], expert="both")
    result = CliRunner().invoke(cli, ["train", str(config), "-q"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "lora.high_noise.safetensors", "lora.low_noise.safetensors"]
    x, t, cond = _inputs()
    host = build_plugin_manager()
    for expert in ("high_noise", "low_noise"):
        path = out / f"lora.{expert}.safetensors"
        tensors = load_file(str(path))
        assert tensors and all(k.startswith("diffusion_model.blocks.") for k in tensors)
        # the engine with that expert alone and its file: merged output
        (tmp_path / expert).mkdir()
        one = _config(tmp_path / expert, pipes["wan22"], expert=expert)
        conf, base = resolve_config(one, host, overrides=[f"adapter.existing={path}"])
        engine = build_pipeline(conf, host, base_dir=base)
        try:
            engine.network.merge()
            with torch.no_grad():
                merged = engine.loaded.predict(engine.model, x, t, {"cond": cond})
        finally:
            engine.close()
        loaded, wrapped, messages = _diffusers_output(pipes["wan22"], path, x, t, cond,
                                                      expert)
        assert not [m for m in messages if "unexpected keys" in m or "missing keys" in m]
        torch.testing.assert_close(loaded, merged, rtol=1e-4, atol=1e-4)
        assert wrapped == len({k.rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k})


#: The key layout ComfyUI's Wan model places (its own module names under
#: ``diffusion_model.``; checked against ComfyUI's loader, which placed every key of
#: such a file and none of a diffusers-named one): one block's LoRA modules.
COMFYUI_WAN_BLOCK = sorted(f"diffusion_model.blocks.0.{m}" for m in (
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q",
    "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"))


def test_the_default_key_layout_is_wan_s_original_names_which_comfyui_places(tmp_path, pipes):
    from loraengine.plugins.models import wan_keys

    host = build_plugin_manager()
    conf, base = resolve_config(_config(tmp_path, pipes["wan"]), host)
    engine = build_pipeline(conf, host, base_dir=base)
    try:
        paths = [p for p, _ in engine.network.items()]
        modules = engine.network.file_modules()
    finally:
        engine.close()
    assert engine.loaded.default_exporter == "wan_comfyui"
    tensors = wan_keys.to_file(modules)
    stems = sorted({k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0]
                    for k in tensors})
    assert [s for s in stems if s.startswith("diffusion_model.blocks.0.")] == COMFYUI_WAN_BLOCK
    assert len(stems) == 2 * len(COMFYUI_WAN_BLOCK)
    # and back: every module to its own layer
    back = wan_keys.from_file(tensors, paths)
    assert back is not None and set(back) == set(paths)
    assert all(torch.equal(back[p][k], modules[p][k]) for p in paths for k in modules[p])
    with pytest.raises(ValueError, match="module condition_embedder.norm: the wan_comfyui"):
        wan_keys.to_file({"condition_embedder.norm": {}})


def test_both_experts_keep_their_best_files_apart(tmp_path, pipes):
    config = yaml.safe_load(_config(tmp_path, pipes["wan22"], expert="both").read_text())
    config["training"]["steps"] = 2
    config["data"]["validation"] = {"latents": config["data"]["latents"],
                                    "conditioning": config["data"]["conditioning"]}
    config["validation"] = {"every": 1}
    config["output"]["keep_best"] = True
    (tmp_path / "best.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(cli, ["train", str(tmp_path / "best.yaml"), "-q"])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert names == ["lora.best.high_noise.safetensors", "lora.best.low_noise.safetensors",
                     "lora.high_noise.safetensors", "lora.low_noise.safetensors"]
    high = load_file(str(tmp_path / "out" / "lora.best.high_noise.safetensors"))
    assert high and all(k.startswith("diffusion_model.blocks.") for k in high)
