"""The video record families ltx2 (LTX-2, video stream) and hunyuan_video15
(HunyuanVideo 1.5, text-to-video): each calls its transformer as the diffusers pipeline
does (checked against the pipeline's own packing helpers and inputs), trains through
``loraengine train`` with the loss falling at fixed draws, and writes a LoRA that
diffusers' own loader places key for key, computing what the engine's merged model
computes. Their schedules match ``FlowMatchEulerDiscreteScheduler`` with the released
configs, LTX-2's shift by token count at two clip sizes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import diffusers_warnings, train_and_reload
from safetensors.torch import load_file, save_file

from loraengine.api import resolve_config
from loraengine.cli.main import cli
from loraengine.core.build import build_pipeline
from loraengine.plugins import build_plugin_manager
from loraengine.testing import tiny_video as tv

FAMILIES = tuple(tv.VIDEO_DENOISERS)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("video_records")
    return {name: tv.save_video_denoiser(name, root / name) for name in FAMILIES}


def _load(family: str, **options):
    spec = build_plugin_manager().registry.get("model", family)
    return spec.load(spec.config_model(**options), {"base_dir": None, "module": None})


def _latents(name: str, n: int, frames: int = 2, height: int = 4, width: int = 6,
             seed: int = 0) -> torch.Tensor:
    """Smooth random video latents (a learnable signal)."""
    channels = tv.VIDEO_DENOISERS[name][3]
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, channels, frames, 2, 2, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(frames, height, width),
                                           mode="trilinear", align_corners=False)


def _draw(name: str, n: int = 2, seed: int = 5, length: int = 7):
    width = tv.VIDEO_DENOISERS[name][4]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, tv.VIDEO_DENOISERS[name][3], 2, 4, 6, generator=g)
    cond = {"cond": torch.randn(n, length, width, generator=g),
            "mask": torch.ones(n, length, dtype=torch.long)}
    cond["mask"][0, -2:] = 0
    return x, cond


def test_detect_and_load_read_each_pipeline_folder(folders):
    specs = {s.name: s for s in build_plugin_manager().registry.specs("model")
             if s.detect is not None}
    for name, folder in folders.items():
        assert [n for n, s in specs.items() if s.detect(folder)] == [name]
        loaded = _load(name, path=folder)
        assert loaded.latent_ndim == 5 and loaded.cond_keys == ("cond",)
        assert loaded.latent_channels == tv.VIDEO_DENOISERS[name][3]
        assert loaded.cond_widths["cond"] == tv.VIDEO_DENOISERS[name][4]
        # LTX-2's diffusers export is the file both its pipeline and ComfyUI read;
        # HunyuanVideo 1.5's pipeline reads none, so its default is ComfyUI's names
        assert len(loaded.blocks) == 2 and loaded.default_exporter == \
            {"ltx2": "diffusers", "hunyuan_video15": "comfyui"}[name]
    ltx, hv = _load("ltx2", path=folders["ltx2"]), _load("hunyuan_video15",
                                                          path=folders["hunyuan_video15"])
    assert ltx.schedule.shift_by_shape is not None  # it shifts by the clip's token count
    assert (hv.schedule.shift, hv.schedule.shift_by_shape) == (5.0, None)
    # LTX-2 trains the video stream only: no audio module is a default target
    assert all("audio" not in p for p in ltx.default_include)


def _ltx2_pipeline_call(model, x, sigma, cond, audio_text: int = 12):
    """LTX-2 called as LTX2Pipeline calls it (its packing, its rope coordinates at 24
    fps, timestep σ·1000 as timestep and sigma), the audio stream isolated on one
    silent token."""
    import diffusers as d

    b, _, f, h, w = x.shape
    p = d.LTX2Pipeline
    t = sigma * 1000
    coords = model.rope.prepare_video_coords(b, f, h, w, x.device, fps=24.0)
    audio_coords = model.audio_rope.prepare_audio_coords(b, 1, x.device)
    out = model(hidden_states=p._pack_latents(x), audio_hidden_states=torch.zeros(b, 1, 4),
                encoder_hidden_states=cond["cond"],
                audio_encoder_hidden_states=torch.zeros(b, 1, audio_text), timestep=t, sigma=t,
                encoder_attention_mask=cond["mask"], num_frames=f, height=h, width=w,
                audio_num_frames=1, video_coords=coords, audio_coords=audio_coords,
                isolate_modalities=True, return_dict=False)[0]
    return p._unpack_latents(out, f, h, w)


def _hunyuan_pipeline_call(model, x, sigma, cond, byt5=None, byt5_mask=None):
    """HunyuanVideo 1.5 called as its text-to-video pipeline calls it: zero condition
    latents and mask appended, a zero image embedding of 729 tokens, timestep σ·1000."""
    b, c, f, h, w = x.shape
    latent_in = torch.cat([x, torch.zeros(b, c, f, h, w), torch.zeros(b, 1, f, h, w)], dim=1)
    return model(hidden_states=latent_in, image_embeds=torch.zeros(b, 729, 8),
                 timestep=sigma * 1000, encoder_hidden_states=cond["cond"],
                 encoder_attention_mask=cond["mask"], encoder_hidden_states_2=byt5,
                 encoder_attention_mask_2=byt5_mask, return_dict=False)[0]


def test_ltx2_predict_is_the_pipelines_own_call(folders):
    loaded = _load("ltx2", path=folders["ltx2"])
    x, cond = _draw("ltx2")
    sigma = torch.tensor([0.3, 0.85])
    with torch.no_grad():
        got = loaded.predict(loaded.module, x, loaded.schedule.model_timesteps(sigma), cond)
        want = _ltx2_pipeline_call(loaded.module, x, sigma, cond)
        unmasked = loaded.predict(loaded.module, x, loaded.schedule.model_timesteps(sigma),
                                  {"cond": cond["cond"]})
    assert got.shape == x.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - unmasked).abs().max() > 1e-4  # the mask reaches the model
    with pytest.raises(ValueError, match=r"takes latents \[N,C,T,H,W\]"):
        loaded.predict(loaded.module, x[:, :, 0], sigma * 1000, cond)


def test_ltx23_is_the_ltx2_family_with_its_text_at_the_attention_widths(tmp_path):
    """LTX-2.3 is LTX2VideoTransformer3DModel configured otherwise: the ltx2 record
    loads it, expects text at the video attention width (no caption projection), gives
    the isolated audio stream a zero text token at the audio attention width, and calls
    it as the pipeline does (``sigma`` feeds its prompt modulation)."""
    import diffusers as d

    folder = tmp_path / "ltx23"
    model = tv.ltx23_transformer(0)
    model.save_pretrained(str(folder / "transformer"))
    d.FlowMatchEulerDiscreteScheduler(**tv.VIDEO_DENOISERS["ltx2"][2]).save_pretrained(
        str(folder / "scheduler"))
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": "LTX2Pipeline", "transformer": ["diffusers", type(model).__name__],
         "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}))
    loaded = _load("ltx2", path=folder)
    assert loaded.cond_widths["cond"] == 16 and loaded.latent_channels == 8
    assert not hasattr(loaded.module, "caption_projection")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 8, 2, 4, 6, generator=g)
    cond = {"cond": torch.randn(2, 7, 16, generator=g),
            "mask": torch.ones(2, 7, dtype=torch.long)}
    cond["mask"][0, -2:] = 0
    sigma = torch.tensor([0.3, 0.85])
    with torch.no_grad():
        got = loaded.predict(loaded.module, x, loaded.schedule.model_timesteps(sigma), cond)
        want = _ltx2_pipeline_call(loaded.module, x, sigma, cond, audio_text=8)
        # σ reaches the prompt modulation: another sigma, same timestep, differs
        other = loaded.module(**{**_ltx23_kwargs(loaded.module, x, sigma, cond),
                                 "sigma": sigma.flip(0) * 1000}, return_dict=False)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    packed = d.LTX2Pipeline._pack_latents(want)
    assert (other - packed).abs().max() > 1e-4


def _ltx23_kwargs(model, x, sigma, cond):
    b, _, f, h, w = x.shape
    t = sigma * 1000
    return dict(hidden_states=_ltx2_pack(x), audio_hidden_states=torch.zeros(b, 1, 4),
                encoder_hidden_states=cond["cond"],
                audio_encoder_hidden_states=torch.zeros(b, 1, 8), timestep=t, sigma=t,
                encoder_attention_mask=cond["mask"], num_frames=f, height=h, width=w,
                audio_num_frames=1,
                video_coords=model.rope.prepare_video_coords(b, f, h, w, x.device, fps=24.0),
                audio_coords=model.audio_rope.prepare_audio_coords(b, 1, x.device),
                isolate_modalities=True)


def _ltx2_pack(x):
    import diffusers as d

    return d.LTX2Pipeline._pack_latents(x)


@pytest.mark.slow  # seconds a run: kept out of the fast default
def test_ltx23_real_size_record_is_ltx2_configured_otherwise():
    """The LTX-2.3 record (diffusers' converter's 2.3 config) builds on the meta device
    as an ltx2 model with gated attention and prompt modulation and no caption
    projection; the text width it is planned with is what the ltx2 record reads from
    that config (4096, LTX-2's 3840)."""
    from loraengine.plugins.models.ltx2 import LTX2
    from loraengine.tools.plan import real_size

    for name, width in (("ltx2", 3840), ("ltx2.3", 4096)):
        rec, model = real_size.record(name), real_size.real_model(name)
        assert rec["family"] == "ltx2" and rec["text_width"] == width
        assert LTX2.inputs(model)[1]["cond"] == width
        names = [n for n, _ in model.named_parameters()]
        projects = name == "ltx2"
        assert any("caption_projection" in n for n in names) == projects
        assert any("to_gate_logits" in n for n in names) != projects
        assert any(n.startswith("prompt_adaln") for n in names) != projects
    assert real_size.latent_shape("ltx2.3") == [128, 11, 15, 26]


def test_hunyuan_predict_is_the_pipelines_own_call(folders):
    loaded = _load("hunyuan_video15", path=folders["hunyuan_video15"])
    x, cond = _draw("hunyuan_video15")
    sigma = torch.tensor([0.3, 0.85])
    g = torch.Generator().manual_seed(2)
    byt5 = torch.randn(2, 5, 12, generator=g)
    byt5_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    t = loaded.schedule.model_timesteps(sigma)
    with torch.no_grad():
        got = loaded.predict(loaded.module, x, t, {**cond, "byt5": byt5,
                                                   "byt5_mask": byt5_mask})
        want = _hunyuan_pipeline_call(loaded.module, x, sigma, cond, byt5, byt5_mask)
        # without glyph text: as the pipeline with every ByT5 token masked out
        plain = loaded.predict(loaded.module, x, t, cond)
        masked = _hunyuan_pipeline_call(loaded.module, x, sigma, cond, byt5,
                                        torch.zeros_like(byt5_mask))
        no_mask = loaded.predict(loaded.module, x, t, {"cond": cond["cond"]})
        ones = _hunyuan_pipeline_call(loaded.module, x, sigma,
                                      {**cond, "mask": torch.ones_like(cond["mask"])},
                                      byt5, torch.zeros_like(byt5_mask))
    assert got.shape == x.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, masked, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(no_mask, ones, rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().max() > 1e-4 and (plain - no_mask).abs().max() > 1e-4


# -- the schedules -----------------------------------------------------------------------

#: LTX-2 latents (C, T, H, W): 2×16×24 = 768 and 3×32×32 = 3072 tokens
LTX2_SHAPES = ((8, 2, 16, 24), (8, 3, 32, 32))


def _ltx2_mu(tokens: int, cfg: dict) -> float:
    """μ as LTX2Pipeline.__call__ computes it from its packed latents."""
    from diffusers.pipelines.ltx2 import pipeline_ltx2

    return pipeline_ltx2.calculate_shift(
        tokens, cfg.get("base_image_seq_len", 1024), cfg.get("max_image_seq_len", 4096),
        cfg.get("base_shift", 0.95), cfg.get("max_shift", 2.05))


@pytest.mark.parametrize("shape", LTX2_SHAPES)
def test_ltx2_schedule_matches_the_scheduler_at_two_clip_sizes(folders, shape):
    """σ' of every draw at a clip size is the scheduler's ``time_shift(μ, 1, σ)`` with
    the pipeline's μ for that size; the pipeline's inference sigmas
    (``retrieve_timesteps`` with that μ) are what the shift gives; x_t is its
    ``scale_noise`` and the target is the velocity its Euler step follows."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.ltx2.pipeline_ltx2 import retrieve_timesteps

    from loraengine.plugins.models.flow import inference_sigmas
    from loraengine.plugins.models.ltx2 import LTX2

    cfg = tv.VIDEO_DENOISERS["ltx2"][2]
    schedule = _load("ltx2", path=folders["ltx2"]).schedule
    sched = FlowMatchEulerDiscreteScheduler(**cfg)
    tokens = shape[1] * shape[2] * shape[3]
    mu = _ltx2_mu(tokens, cfg)
    u = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    with schedule.shifted_for(shape):
        got = schedule.shift_sigma(u)
    want = torch.as_tensor(sched.time_shift(mu, 1.0, u.numpy())).double()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    steps = 20
    retrieve_timesteps(sched, steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    ours = inference_sigmas(LTX2.shift_rule, cfg, shape[1] * shape[2], shape[3], steps)
    torch.testing.assert_close(ours, sched.sigmas[:-1].double(), rtol=1e-5, atol=1e-5)

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, *shape, generator=g), torch.randn(2, *shape, generator=g)
    for i in (1, 9):
        sigma = sched.sigmas[i].double().expand(2)
        x_t = schedule.add_noise(x0, noise, sigma)
        theirs = sched.scale_noise(x0, sched.timesteps[i:i + 1], noise)
        torch.testing.assert_close(x_t, theirs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(schedule.model_timesteps(sigma),
                                   sched.timesteps[i].float().expand(2), rtol=1e-5, atol=1e-3)
        sched._step_index = i
        stepped = sched.step(schedule.target(x0, noise, sigma).float(), sched.timesteps[i],
                             x_t.float(), return_dict=False)[0]
        nxt = schedule.add_noise(x0, noise, sched.sigmas[i + 1].double().expand(2))
        torch.testing.assert_close(stepped, nxt.float(), rtol=1e-5, atol=1e-5)


def test_hunyuan_schedule_is_the_schedulers_static_shift(folders):
    from diffusers import FlowMatchEulerDiscreteScheduler

    schedule = _load("hunyuan_video15", path=folders["hunyuan_video15"]).schedule
    sched = FlowMatchEulerDiscreteScheduler(**tv.VIDEO_DENOISERS["hunyuan_video15"][2])
    steps = 10
    sched.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])  # as the pipeline
    table = sched.sigmas[:-1].double()
    unshifted = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[:-1]
    for shape in LTX2_SHAPES:  # the same shift at every size
        with schedule.shifted_for(shape):
            torch.testing.assert_close(schedule.shift_sigma(unshifted), table, rtol=1e-5,
                                       atol=1e-6)
    torch.testing.assert_close(schedule.model_timesteps(table), sched.timesteps.float(),
                               rtol=1e-5, atol=1e-3)


# -- training through the CLI, and the file in diffusers' own loader ---------------------

def _place(name: str, lora: Path):
    """A fresh tiny transformer with the file loaded by diffusers: LTX2Pipeline's
    ``load_lora_weights``; HunyuanVideo15Pipeline has no LoRA loader, so the
    transformer's own ``load_lora_adapter`` (the PEFT mixin every pipeline loader ends
    in). Returns (model, warnings logged)."""
    import diffusers as d

    model = tv.VIDEO_DENOISERS[name][1](0)
    with diffusers_warnings() as messages:
        if name == "ltx2":
            sched = d.FlowMatchEulerDiscreteScheduler(**tv.VIDEO_DENOISERS[name][2])
            names = d.LTX2Pipeline.__init__.__code__.co_varnames[
                1:d.LTX2Pipeline.__init__.__code__.co_argcount]
            parts = {n: None for n in names}
            parts.update(transformer=model, scheduler=sched)
            d.LTX2Pipeline(**parts).load_lora_weights(str(lora))
        else:
            model.load_lora_adapter(load_file(str(lora)), prefix="transformer")
    return model, messages


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_trains_and_the_file_loads_in_diffusers_with_every_key(folders, tmp_path, name):
    from peft.tuners.lora import LoraLayer

    x = _latents(name, 4, seed=1)
    x = x[:1] + 0.1 * x  # one clip, four takes: something a few steps can learn
    _, cond = _draw(name, n=4, seed=1)
    xe, ce = _draw(name, seed=7)
    # LTX-2's default file is in the original names, which LTX2Pipeline converts and
    # ComfyUI reads (exporters.BOTH_READ). HunyuanVideo 1.5's default is ComfyUI's
    # names (no file serves both: ComfyUI reads none of diffusers' names for it, PEFT
    # only those); what PEFT reads is the explicit ``diffusers`` export, tested here
    exporter = "diffusers" if name == "hunyuan_video15" else None
    run = train_and_reload(tmp_path, name, folders[name], x, cond, xe, ce, exporter)
    prefix = "diffusion_model." if name == "ltx2" else "transformer."
    assert run.tensors and all(k.startswith(f"{prefix}transformer_blocks.")
                               for k in run.tensors)
    if name == "ltx2":
        assert not [m for m in run.modules if "audio" in m]

    model, messages = _place(name, run.lora)
    # diffusers warns "led to unexpected keys" / "led to missing keys" for unplaced keys
    assert not [m for m in messages if "unexpected keys" in m or "missing keys" in m], \
        messages
    wrapped = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert len(wrapped) == len(run.modules)
    with torch.no_grad():
        placed = run.predict(model, xe, run.t, ce)
        plain = run.predict(tv.VIDEO_DENOISERS[name][1](0), xe, run.t, ce)
    torch.testing.assert_close(placed, run.merged, rtol=1e-4, atol=1e-4)
    assert (placed - plain).abs().max() > 1e-3


# -- the released models at real size ------------------------------------------------------

@pytest.mark.slow
def test_real_size_records_have_the_published_parameter_counts():
    """LTX-2 is published as a 19 B-parameter audio-video model, HunyuanVideo 1.5 as an
    8.3 B-parameter one; the records build those shapes on the meta device."""
    from loraengine.tools.plan import real_size

    for name, low, high in (("ltx2", 18.5e9, 19.5e9),
                            ("hunyuan_video15_480p_t2v", 8.2e9, 8.4e9)):
        rec = real_size.record(name)
        model = real_size.real_model(name)
        assert all(p.device.type == "meta" for p in model.parameters())
        assert low < sum(p.numel() for p in model.parameters()) < high, name
        assert len(model.transformer_blocks) == rec["config"]["num_layers"]
        family = build_plugin_manager().registry.get("model", rec["family"])
        assert family.name == rec["family"]
    # the clip planned: 81 frames of 480×832 through each VAE
    assert real_size.latent_shape("ltx2") == [128, 11, 15, 26]  # 8× time, 32× space
    assert real_size.latent_shape("hunyuan_video15_480p_t2v") == [32, 21, 30, 52]


@pytest.mark.slow
def test_ltx2_plans_at_real_size_and_hunyuan_says_why_it_cannot():
    from loraengine.tools.plan import real_size

    host = build_plugin_manager()
    rows = dict(real_size.plan_scenarios("ltx2", host, labels=["bf16 + checkpointing"]))
    plan = rows["bf16 + checkpointing"]
    assert plan is not None
    params = sum(p.numel() for p in real_size.real_model("ltx2").parameters())
    assert plan.weights_device == pytest.approx(2 * params, rel=0.01)  # bf16 weights
    assert plan.peak > plan.weights_device
    result = CliRunner().invoke(cli, ["plan", "--real", "hunyuan_video15_480p_t2v"])
    assert result.exit_code == 2, result.output
    assert "--real: hunyuan_video15_480p_t2v: HunyuanVideo15Transformer3DModel's forward " \
        "reads tensor values" in result.output
    assert "Traceback" not in result.output


def test_ltx2_trains_on_clips_of_two_sizes_each_with_its_own_shift(folders, tmp_path):
    """Buckets of two clip sizes in one run: training goes through both, and each
    bucket's draws use the shift LTX2Pipeline computes for its token count."""
    import math

    from loraengine.core.train.step import draw_noise

    shapes = ((2, 4, 6), (3, 8, 8))  # 48 and 192 tokens
    latents, cond = {}, {}
    for i, (f, h, w) in enumerate(shapes):
        latents[f"latents.{i}"] = _latents("ltx2", 2, f, h, w, seed=i)
        cond[f"cond.{i}"] = _draw("ltx2", n=2, seed=i)[1]["cond"]
    save_file(latents, str(tmp_path / "lat.st"))
    save_file(cond, str(tmp_path / "cond.st"))
    cfg = {"model": {"family": "ltx2", "path": str(folders["ltx2"])},
           "data": {"latents": str(tmp_path / "lat.st"),
                    "conditioning": str(tmp_path / "cond.st"), "bucket_mode": True},
           "timestep_sampler": {"name": "uniform"},
           "training": {"steps": 4, "batch_size": 2, "dtype": "fp32", "seed": 0},
           "adapter": {"rank": 2, "alpha": 2, "dtype": "fp32"},
           "output": {"dir": str(tmp_path / "out"), "name": "lora", "plot": False}}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(cli, ["train", str(path), "-q"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "lora.safetensors").exists()

    host = build_plugin_manager()
    conf, base = resolve_config(path, host)
    pipe = build_pipeline(conf, host, base_dir=base)
    try:
        for i, (f, h, w) in enumerate(shapes):
            bucket = pipe.dataset.buckets[i]
            x0, _ = bucket.batch(torch.arange(len(bucket)))
            _, t, _ = draw_noise(pipe, x0, torch.Generator().manual_seed(4))
            g = torch.Generator().manual_seed(4)
            u = []
            for _ in range(len(bucket)):  # per sample: its noise, then u
                torch.randn(x0.shape[1:], generator=g)
                u.append(torch.rand((), generator=g, dtype=torch.float64))
            s = math.exp(_ltx2_mu(f * h * w, tv.VIDEO_DENOISERS["ltx2"][2]))
            want = s * torch.stack(u) / (1 + (s - 1) * torch.stack(u))
            torch.testing.assert_close(t, want, rtol=1e-5, atol=1e-7)
    finally:
        pipe.close()
