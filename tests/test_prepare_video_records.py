"""``loraengine prepare`` for the video record families: LTX-2 (clips through its video
VAE and normalisation, captions through Gemma 3 and the text connectors) and
HunyuanVideo 1.5 (its VAE's scaled latents, Qwen2.5-VL and the ByT5 glyph encoder),
each equal to what its pipeline's own components give; then training and a frame strip
from ``sample --frames``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import (
    assert_prepare_cached,
    clip_pixels,
    diffusers_warnings,
    prepare_clips,
    sample_frame_strip,
    smooth_frame,
    train_prepared,
)
from safetensors.torch import load_file

from loraengine.cli.main import cli
from loraengine.testing import tiny_video as tv

FRAMES = 5


#: clip -> caption; HunyuanVideo 1.5's glyph encoder reads the quoted text of the second
CAPTIONS = {"walk": "a person walks", "wave": 'a hand waves a sign reading "HELLO"'}


@pytest.fixture(scope="module")
def ltx2(tmp_path_factory) -> Path:
    return tv.save_video_full("ltx2", tmp_path_factory.mktemp("video") / "ltx2")


@pytest.fixture(scope="module")
def hunyuan(tmp_path_factory) -> Path:
    return tv.save_video_full("hunyuan_video15", tmp_path_factory.mktemp("video") / "hv15")


@pytest.fixture
def clips(tmp_path) -> Path:
    folder = tmp_path / "clips"
    for (name, caption), first in zip(CAPTIONS.items(), (0, 10), strict=True):
        (folder / name).mkdir(parents=True)
        for i in range(FRAMES):
            smooth_frame(first + i).save(folder / name / f"{i:03d}.png")
        (folder / f"{name}.txt").write_text(caption)
    return folder


def _pixels(clip: Path) -> torch.Tensor:
    from PIL import Image

    return clip_pixels([Image.open(p).convert("RGB") for p in sorted(clip.glob("*.png"))])


def _ltx2_reference(root: Path, pixels: torch.Tensor, caption: str):
    """LTX2Pipeline's own VAE latents (normalised as ``prepare_latents`` does) and its
    encode_prompt → connectors output, as ``__call__`` hands them to the transformer."""
    import diffusers

    pipe = diffusers.LTX2Pipeline.from_pretrained(str(root), local_files_only=True,
                                                  transformer=None)
    with torch.no_grad():
        z = pipe.vae.encode(pixels[None]).latent_dist.mean
        z = pipe._normalize_latents(z, pipe.vae.latents_mean, pipe.vae.latents_std,
                                    pipe.vae.config.scaling_factor)
        embeds, mask, _, _ = pipe.encode_prompt([caption], do_classifier_free_guidance=False)
        video, _, video_mask = pipe.connectors(embeds, mask, padding_side="left")
    return z[0], video[0], video_mask[0]


def test_prepare_encodes_clips_as_ltx2_pipeline_does(tmp_path, ltx2, clips):
    args, lat, cond = prepare_clips(ltx2, clips, tmp_path / "data")
    # 8x space, 2x time: 5 frames of 32x32 are 3 latent frames of 4x4
    assert lat["latents"].shape == (2, tv.LTX2_CHANNELS, 3, 4, 4)
    assert cond["cond"].shape == (2, 1024, tv.LTX2_TEXT_DIM)
    for row, (name, caption) in enumerate(CAPTIONS.items()):
        ref_lat, ref_cond, ref_mask = _ltx2_reference(ltx2, _pixels(clips / name), caption)
        torch.testing.assert_close(lat["latents"][row], ref_lat, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cond["cond"][row], ref_cond, rtol=1e-5, atol=1e-5)
        assert torch.equal(cond["mask"][row], ref_mask.long())
    assert_prepare_cached(args)


def _ltx2_loss(root: Path, data: Path, lora: Path | None) -> float:
    """Mean flow-matching loss of the transformer (with ``lora`` merged through
    LTX2Pipeline's own loader) on the prepared data at fixed σ and noise."""
    import diffusers

    pipe = diffusers.LTX2Pipeline.from_pretrained(str(root), local_files_only=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    lat = load_file(str(data / "latents.safetensors"))["latents"]
    cond = load_file(str(data / "conditioning.safetensors"))
    model = pipe.transformer.eval()
    g = torch.Generator().manual_seed(123)
    total = 0.0
    for sigma in (0.3, 0.6, 0.9):
        noise = torch.randn(lat.shape, generator=g)
        x = (1 - sigma) * lat + sigma * noise
        b, c, f, h, w = x.shape
        tokens = pipe._pack_latents(x)
        n = tokens.shape[0]
        with torch.no_grad():
            out = model(hidden_states=tokens, encoder_hidden_states=cond["cond"],
                        encoder_attention_mask=cond["mask"],
                        audio_hidden_states=torch.zeros(n, 1, 4),
                        audio_encoder_hidden_states=torch.zeros(n, 1, tv.LTX2_TEXT_DIM),
                        timestep=torch.full((n,), sigma * 1000), sigma=torch.full((n,), sigma),
                        num_frames=f, height=h, width=w, audio_num_frames=1,
                        isolate_modalities=True, return_dict=False)[0]
        target = pipe._pack_latents(noise - lat)
        total += float(((out - target) ** 2).mean())
    return total / 3


@pytest.mark.slow
def test_ltx2_clips_prepare_train_then_sample_a_frame_strip(tmp_path, ltx2, clips):
    """Clips -> prepare -> train (the loss on fixed draws lower, measured through
    LTX2Pipeline's load_lora_weights) -> ``sample --frames`` decoded by the LTX-2 VAE."""
    data = tmp_path / "data"
    prepare_clips(ltx2, clips, data)
    lora, losses = train_prepared(tmp_path, "ltx2", ltx2, data, steps=30, rank=4, lr=0.01)
    assert len(losses) == 30
    before = _ltx2_loss(ltx2, data, None)
    after = _ltx2_loss(ltx2, data, lora)
    assert after < before, (before, after)

    strip = sample_frame_strip(tmp_path, ltx2, "a person walks", lora, frames=3, size=4,
                               channels=tv.LTX2_CHANNELS)
    # 3 latent frames are 1 + 2·2 pixel frames of 32x32, side by side
    assert strip.shape == (32, 5 * 32, 3)


# -- HunyuanVideo 1.5 -----------------------------------------------------------------

def _hunyuan_reference(root: Path, pixels: torch.Tensor, caption: str):
    """HunyuanVideo15Pipeline's own VAE latents (scaled as its decoder expects them) and
    its encode_prompt, as ``__call__`` hands them to the transformer."""
    import diffusers

    pipe = diffusers.HunyuanVideo15Pipeline.from_pretrained(str(root), local_files_only=True,
                                                            transformer=None)
    with torch.no_grad():
        z = pipe.vae.encode(pixels[None]).latent_dist.mean * pipe.vae.config.scaling_factor
        embeds, mask, glyph, glyph_mask = pipe.encode_prompt([caption])
    return z[0], embeds[0], mask[0], glyph[0], glyph_mask[0]


def test_prepare_encodes_clips_as_hunyuan_video15_pipeline_does(tmp_path, hunyuan, clips):
    args, lat, cond = prepare_clips(hunyuan, clips, tmp_path / "data")
    # 4x space, 2x time: 5 frames of 32x32 are 3 latent frames of 8x8
    assert lat["latents"].shape == (2, tv.HUNYUAN_CHANNELS, 3, 8, 8)
    assert cond["cond"].shape == (2, 1000, tv.HUNYUAN_TEXT_DIM)
    assert cond["byt5"].shape == (2, 256, tv.HUNYUAN_BYT5_DIM)
    for row, (name, caption) in enumerate(CAPTIONS.items()):
        ref = _hunyuan_reference(hunyuan, _pixels(clips / name), caption)
        torch.testing.assert_close(lat["latents"][row], ref[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cond["cond"][row], ref[1], rtol=1e-5, atol=1e-5)
        assert torch.equal(cond["mask"][row], ref[2].long())
        torch.testing.assert_close(cond["byt5"][row], ref[3], rtol=1e-5, atol=1e-5)
        assert torch.equal(cond["byt5_mask"][row], ref[4].long())
    # no quoted text: the glyph stream is empty; quoted text: ByT5 read it
    assert int(cond["byt5_mask"][0].sum()) == 0 and int(cond["byt5_mask"][1].sum()) > 0
    assert_prepare_cached(args)


def _hunyuan_loss(root: Path, data: Path, lora: Path | None) -> float:
    """Mean flow-matching loss of the transformer (``lora``, a file in diffusers'
    names, placed by its own ``load_lora_adapter`` with every key; the pipeline has no
    LoRA loader) called as the text-to-video pipeline calls it, on the prepared data at
    fixed σ and noise."""
    import diffusers
    from peft.tuners.lora import LoraLayer

    model = diffusers.HunyuanVideo15Transformer3DModel.from_pretrained(
        str(root / "transformer"), local_files_only=True).eval()
    if lora is not None:
        tensors = load_file(str(lora))
        with diffusers_warnings() as messages:
            model.load_lora_adapter(tensors, prefix="transformer")
        # diffusers logs unplaced keys as "unexpected keys" / "missing keys"
        assert not [m for m in messages if "unexpected keys" in m or "missing keys" in m], \
            messages
        modules = {k.rsplit(".lora_", 1)[0] for k in tensors}
        assert len([m for m in model.modules() if isinstance(m, LoraLayer)]) == len(modules)
    lat = load_file(str(data / "latents.safetensors"))["latents"]
    cond = load_file(str(data / "conditioning.safetensors"))
    g = torch.Generator().manual_seed(123)
    total = 0.0
    for sigma in (0.3, 0.6, 0.9):
        noise = torch.randn(lat.shape, generator=g)
        x = (1 - sigma) * lat + sigma * noise
        b, c, f, h, w = x.shape
        latent_in = torch.cat([x, torch.zeros(b, c, f, h, w), torch.zeros(b, 1, f, h, w)], 1)
        with torch.no_grad():
            out = model(hidden_states=latent_in, image_embeds=torch.zeros(b, 729, 8),
                        timestep=torch.full((b,), sigma * 1000),
                        encoder_hidden_states=cond["cond"],
                        encoder_attention_mask=cond["mask"].float(),
                        encoder_hidden_states_2=cond["byt5"],
                        encoder_attention_mask_2=cond["byt5_mask"].float(),
                        return_dict=False)[0]
        total += float(((out - (noise - lat)) ** 2).mean())
    return total / 3


@pytest.mark.slow
def test_hunyuan_video15_clips_prepare_train_then_sample_a_frame_strip(tmp_path, hunyuan,
                                                                        clips):
    """Clips -> prepare -> train (the default file, in ComfyUI's names) -> the loss on
    fixed draws lower with it, placed by PEFT after ``convert --to diffusers`` (our
    reader of the ComfyUI names) -> ``sample --frames`` with it (our reader again),
    decoded by the HunyuanVideo 1.5 VAE, unlike the sample at strength 0."""
    data = tmp_path / "data"
    prepare_clips(hunyuan, clips, data)
    # 5 steps: the loss below is then 0.6 of the untrained one
    lora, _ = train_prepared(tmp_path, "hunyuan_video15", hunyuan, data, steps=5, rank=4,
                             lr=0.02)
    assert all(k.startswith("diffusion_model.double_blocks.") for k in load_file(str(lora)))
    converted = tmp_path / "lora.diffusers.safetensors"
    res = CliRunner().invoke(cli, ["convert", str(lora), "--to", "diffusers", "--model",
                                   str(hunyuan), "--out", str(converted)])
    assert res.exit_code == 0 and "warning" not in res.output, res.output
    before = _hunyuan_loss(hunyuan, data, None)
    after = _hunyuan_loss(hunyuan, data, converted)
    assert after < before, (before, after)

    prompt = 'a sign reading "HELLO"'
    strip = sample_frame_strip(tmp_path, hunyuan, prompt, lora, frames=3, size=8,
                               channels=tv.HUNYUAN_CHANNELS)
    # 3 latent frames are 1 + 2·2 pixel frames of 32x32, side by side
    assert strip.shape == (32, 5 * 32, 3)
    plain = sample_frame_strip(tmp_path / "plain", hunyuan, prompt, lora, frames=3, size=8,
                               channels=tv.HUNYUAN_CHANNELS, strength=0.0)
    assert np.abs(strip.astype(int) - plain.astype(int)).max() > 0
