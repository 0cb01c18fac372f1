"""The record families flux2 (dev and Klein), qwen_image (and Edit), z_image, lumina2,
chroma and hidream: each calls its transformer as the diffusers pipeline does (checked
against the pipeline's own packing and id helpers), trains through ``loraengine train``
with the loss falling at fixed draws, and writes a LoRA that the pipeline's own ``load_lora_weights`` places
key for key, computing what the engine's merged model computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import diffusers_warnings, train_and_reload

from loraengine.plugins import build_plugin_manager
from loraengine.testing import tiny_pipelines as tp

FAMILY = {"flux2": "flux2", "flux2_klein": "flux2", "qwen_image": "qwen_image",
          "z_image": "z_image", "lumina2": "lumina2", "chroma": "chroma",
          "hidream": "hidream"}
SIDE = {"flux2": 4, "flux2_klein": 4, "qwen_image": 8, "z_image": 8, "lumina2": 8,
        "chroma": 8, "hidream": 8}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("records")
    return {name: tp.save_denoiser(name, root / name) for name in tp.DENOISER_FAMILIES}


def _load(family: str, **options):
    spec = build_plugin_manager().registry.get("model", family)
    return spec.load(spec.config_model(**options), {"base_dir": None, "module": None})


def _draw(name: str, n: int = 2, seed: int = 5, length: int = 7):
    _, _, _, channels, width = tp.DENOISERS[name]
    g = torch.Generator().manual_seed(seed)
    side = SIDE[name]
    x = torch.randn(n, channels, side, side, generator=g)
    cond = {"cond": torch.randn(n, length, width, generator=g)}
    if name in ("lumina2", "chroma"):  # their text comes with an attention mask
        cond["mask"] = torch.ones(n, length, dtype=torch.bool)
        cond["mask"][0, -2:] = False
    if name == "hidream":  # two Llama layers of width 16, CLIP's pooled of width 12
        cond["llama3"] = torch.randn(n, 2, length - 2, 16, generator=g)
        cond["pooled"] = torch.randn(n, 12, generator=g)
    return x, cond


def test_detect_and_load_read_each_pipeline_folder(folders):
    specs = {s.name: s for s in build_plugin_manager().registry.specs("model")
             if s.detect is not None}
    for name, folder in folders.items():
        assert [n for n, s in specs.items() if s.detect(folder)] == [FAMILY[name]]
        loaded = _load(FAMILY[name], path=folder)
        keys = {"lumina2": ("cond", "mask"), "hidream": ("cond", "llama3", "pooled")}
        assert loaded.cond_keys == keys.get(name, ("cond",))
        assert loaded.blocks
        assert loaded.latent_channels == tp.DENOISERS[name][3]
        widths = {"hidream": {"pooled": 12}}  # its caption widths are a list in the config
        assert loaded.cond_widths == widths.get(name, {"cond": tp.DENOISERS[name][4]})
    # a static shift is the scheduler config's; a dynamic one trains unshifted
    assert _load("z_image", path=folders["z_image"]).schedule.shift == 3.0
    assert _load("qwen_image", path=folders["qwen_image"]).schedule.shift == 1.0


# -- the forward call, against each pipeline's own helpers ------------------------------

def _pipeline_call(name: str, model, x, sigma, cond, guidance: float = 1.0):
    """The transformer called as the diffusers pipeline calls it, built from the
    pipeline's own static helpers: the velocity for latents ``x`` at ``sigma``."""
    import diffusers as d

    b, c, h, w = x.shape
    t = sigma * 1000  # the scheduler's timesteps
    if name.startswith("flux2"):
        p = d.Flux2Pipeline
        g = torch.full((b,), guidance) if model.config.guidance_embeds else None
        out = model(hidden_states=p._pack_latents(x), timestep=t / 1000, guidance=g,
                    encoder_hidden_states=cond["cond"], txt_ids=p._prepare_text_ids(cond["cond"]),
                    img_ids=p._prepare_latent_ids(x), return_dict=False)[0]
        return p._unpack_latents_with_ids(out, p._prepare_latent_ids(x))
    if name == "qwen_image":
        p = d.QwenImagePipeline
        out = model(hidden_states=p._pack_latents(x, b, c, h, w), timestep=t / 1000,
                    encoder_hidden_states=cond["cond"], img_shapes=[[(1, h // 2, w // 2)]] * b,
                    return_dict=False)[0]
        # _unpack_latents takes pixel sizes and the VAE factor, giving [B,C,1,H,W]
        return p._unpack_latents(out, h * 8, w * 8, 8)[:, :, 0]
    if name == "chroma":  # the text mask, then ones over the image tokens
        p = d.ChromaPipeline
        mask = p._prepare_attention_mask(None, b, h * w // 4, x.dtype,
                                          cond["mask"].to(x.dtype))
        out = model(hidden_states=p._pack_latents(x, b, c, h, w), timestep=t / 1000,
                    encoder_hidden_states=cond["cond"],
                    txt_ids=torch.zeros(cond["cond"].shape[1], 3),
                    img_ids=p._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype),
                    attention_mask=mask, return_dict=False)[0]
        return p._unpack_latents(out, h * 8, w * 8, 8)
    if name == "hidream":  # the scheduler's timestep; the pipeline negates the output
        out = model(hidden_states=x, timesteps=t, encoder_hidden_states_t5=cond["cond"],
                    encoder_hidden_states_llama3=cond["llama3"].permute(1, 0, 2, 3),
                    pooled_embeds=cond["pooled"], return_dict=False)[0]
        return -out
    if name == "lumina2":  # t = 0 is noise for Lumina; the pipeline negates the output
        out = model(hidden_states=x, timestep=1 - t / 1000, encoder_hidden_states=cond["cond"],
                    encoder_attention_mask=cond["mask"], return_dict=False)[0]
        return -out
    out = model(list(x.unsqueeze(2).unbind(0)), (1000 - t) / 1000,
                list(cond["cond"].unbind(0)), return_dict=False)[0]
    return -torch.stack([o.float() for o in out]).squeeze(2)


@pytest.mark.parametrize("name", tp.DENOISER_FAMILIES)
def test_predict_is_the_pipelines_own_call(folders, name):
    loaded = _load(FAMILY[name], path=folders[name])
    x, cond = _draw(name)
    sigma = torch.tensor([0.3, 0.85])
    with torch.no_grad():
        got = loaded.predict(loaded.module, x, loaded.schedule.model_timesteps(sigma), cond)
        want = _pipeline_call(name, loaded.module, x, sigma, cond)
    assert got.shape == x.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if name == "chroma":  # the mask reaches the model
        with torch.no_grad():
            unmasked = loaded.predict(loaded.module, x, loaded.schedule.model_timesteps(sigma),
                                      {"cond": cond["cond"]})
        assert (got - unmasked).abs().max() > 1e-4


def test_qwen_edit_reference_latents_join_the_tokens_as_the_edit_pipeline_does(folders):
    import diffusers as d

    loaded = _load("qwen_image", path=folders["qwen_image"])
    x, cond = _draw("qwen_image")
    ref = torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(9))
    sigma = torch.tensor([0.4, 0.7])
    p = d.QwenImageEditPipeline
    with torch.no_grad():
        got = loaded.predict(loaded.module, x, loaded.schedule.model_timesteps(sigma),
                             {**cond, "reference": ref})
        plain = loaded.predict(loaded.module, x, loaded.schedule.model_timesteps(sigma), cond)
        tokens = torch.cat([p._pack_latents(x, 2, 4, 8, 8), p._pack_latents(ref, 2, 4, 6, 8)],
                           dim=1)
        out = loaded.module(hidden_states=tokens, timestep=sigma,
                            encoder_hidden_states=cond["cond"],
                            img_shapes=[[(1, 4, 4), (1, 3, 4)]] * 2, return_dict=False)[0]
        want = p._unpack_latents(out[:, :16], 64, 64, 8)[:, :, 0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().max() > 1e-4  # the reference changes the prediction


# -- training through the CLI, and the file in the pipeline's own loader ----------------

#: in the fast default: a Flux.2-style and a Qwen-Image-style transformer; the other
#: families run in the full suite
_FAST_FAMILIES = ("flux2", "qwen_image")


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=() if n in _FAST_FAMILIES else (pytest.mark.slow,))
    for n in tp.DENOISER_FAMILIES])
def test_trains_and_the_file_loads_in_the_pipeline_with_every_key(folders, tmp_path, name):
    import diffusers as d
    from peft.tuners.lora import LoraLayer

    x, cond = _draw(name, n=4, seed=1)
    x = x[:1] + 0.1 * x  # one picture, four takes: something a few steps can learn
    xe, ce = _draw(name, seed=7)
    run = train_and_reload(tmp_path, FAMILY[name], folders[name], x, cond, xe, ce)
    # Flux.2: the released checkpoint's names under diffusion_model. with lora_A/lora_B
    # (ComfyUI reads them too), q/k/v as one fused qkv module each
    prefix = "diffusion_model." if name.startswith("flux2") else "transformer."
    assert run.tensors and all(k.startswith(prefix) for k in run.tensors)
    layers = len(run.modules) + 2 * sum(m.endswith("_attn.qkv") for m in run.modules)

    # The pipeline class's own loader, on the same tiny transformer.
    make, sched_cfg = tp.DENOISERS[name][1], tp.DENOISERS[name][2]
    pipe = tp.denoiser_pipeline(name, make(0), d.FlowMatchEulerDiscreteScheduler(**sched_cfg))
    with diffusers_warnings() as messages:
        pipe.load_lora_weights(str(run.lora))
    # diffusers warns "led to unexpected keys" / "led to missing keys" for unplaced keys
    # (Chroma's loader also notes that the absent text encoder gets no keys: harmless)
    assert not [m for m in messages if "unexpected keys" in m or "missing keys" in m], \
        messages
    wrapped = [m for m in pipe.transformer.modules() if isinstance(m, LoraLayer)]
    assert len(wrapped) == layers
    with torch.no_grad():
        loaded = run.predict(pipe.transformer, xe, run.t, ce)
        plain = run.predict(make(0), xe, run.t, ce)
    torch.testing.assert_close(loaded, run.merged, rtol=1e-4, atol=1e-4)
    assert (loaded - plain).abs().max() > 1e-3
