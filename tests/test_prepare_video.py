"""``loraengine prepare`` for a video family: clips from video files (PyAV) and frame
folders, frame sampling, the Wan VAE and UMT5 as WanPipeline uses them, the cache, and
training on what it wrote."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import (
    assert_prepare_cached,
    clip_pixels,
    prepare_clips,
    sample_frame_strip,
    smooth_frame,
    train_prepared,
    write_mp4,
)

from loraengine.cli.main import cli
from loraengine.core.errors import DataError
from loraengine.testing import tiny_video as tv
from loraengine.tools.prepare.video import FrameSampling, pick_frames

FRAMES = 9


def _video(path: Path, size: tuple[int, int]) -> None:
    write_mp4(path, [smooth_frame(i, size) for i in range(FRAMES)])


@pytest.fixture(scope="module")
def wan(tmp_path_factory) -> Path:
    return tv.save_video("wan", tmp_path_factory.mktemp("video") / "wan")


@pytest.fixture
def clips(tmp_path) -> Path:
    folder = tmp_path / "clips"
    (folder / "walk").mkdir(parents=True)
    for i in range(FRAMES):
        smooth_frame(i, (32, 32)).save(folder / "walk" / f"{i:03d}.png")
    (folder / "walk.txt").write_text("a person walks")
    pytest.importorskip("av")
    _video(folder / "wave.mp4", (32, 32))
    (folder / "wave.txt").write_text("a hand waves")
    return folder


def test_frame_picking_as_comfyui_video_loaders_offer_it():
    s = FrameSampling(frames=5)
    assert pick_frames(9, s, 4, "c") == [0, 2, 4, 6, 8]
    assert pick_frames(9, FrameSampling(frames=5, mode="head"), 4, "c") == [0, 1, 2, 3, 4]
    assert pick_frames(9, FrameSampling(frames=5, mode="tail"), 4, "c") == [4, 5, 6, 7, 8]
    # counts round down to 1 + 4k: 8 asked of 9 gives 5
    assert len(pick_frames(9, FrameSampling(frames=8), 4, "c")) == 5
    window = pick_frames(30, FrameSampling(frames=5, mode="random", seed=3), 4, "c")
    assert window == list(range(window[0], window[0] + 5))
    assert window == pick_frames(30, FrameSampling(frames=5, mode="random", seed=3), 4, "c")
    starts = {pick_frames(30, FrameSampling(frames=5, mode="random", seed=k), 4, "c")[0]
              for k in range(8)}
    assert len(starts) > 1  # the seed moves the window
    with pytest.raises(DataError, match="no frames left"):
        pick_frames(0, s, 4, "c")


def _reference(wan: Path, pixels: torch.Tensor, caption: str):
    """What WanPipeline's own components make of these frames and this caption."""
    import diffusers

    pipe = diffusers.WanPipeline.from_pretrained(str(wan), local_files_only=True,
                                                 transformer=None)
    with torch.no_grad():
        z = pipe.vae.encode(pixels[None]).latent_dist.mean
        mean = torch.tensor(tv.LATENTS_MEAN).view(1, -1, 1, 1, 1)
        std = torch.tensor(tv.LATENTS_STD).view(1, -1, 1, 1, 1)
        embeds, _ = pipe.encode_prompt([caption], do_classifier_free_guidance=False,
                                       max_sequence_length=512)
    return ((z - mean) / std)[0], embeds[0]


def _frames_of(clip: Path) -> list:
    from PIL import Image

    if clip.is_dir():
        return [Image.open(p).convert("RGB") for p in sorted(clip.glob("*.png"))]
    import av

    with av.open(str(clip)) as c:
        return [f.to_image().convert("RGB") for f in c.decode(video=0)]


def test_prepare_encodes_clips_as_wan_pipeline_does_and_trains(tmp_path, wan, clips):
    args, lat, cond = prepare_clips(wan, clips, tmp_path / "data")
    assert lat["latents"].shape == (2, tv.LATENT_CHANNELS, 2, 4, 4)
    assert cond["cond"].shape == (2, 512, tv.TEXT_DIM)
    for row, (name, caption) in enumerate((("walk", "a person walks"),
                                           ("wave.mp4", "a hand waves"))):
        frames = _frames_of(clips / name)
        picked = [frames[i] for i in (0, 2, 4, 6, 8)]
        ref_lat, ref_cond = _reference(wan, clip_pixels(picked), caption)
        torch.testing.assert_close(lat["latents"][row], ref_lat, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cond["cond"][row], ref_cond, rtol=1e-5, atol=1e-6)

    assert_prepare_cached(args)

    _, losses = train_prepared(tmp_path, "wan", wan, tmp_path / "data", steps=2, rank=2)
    assert len(losses) == 2


def test_clips_of_different_lengths_go_to_different_buckets(tmp_path, wan, clips):
    short = clips / "blink"
    short.mkdir()
    for i in range(5):
        smooth_frame(20 + i, (32, 32)).save(short / f"{i}.png")
    (clips / "blink.txt").write_text("an eye blinks")
    _, lat, _ = prepare_clips(wan, clips, tmp_path / "d", frames=9)
    assert {k: tuple(v.shape) for k, v in lat.items()} == {
        "latents.0": (1, 4, 2, 4, 4), "latents.1": (2, 4, 3, 4, 4)}


def test_a_clip_without_caption_is_one_error_naming_it(tmp_path, wan, clips):
    (clips / "wave.txt").unlink()
    result = CliRunner().invoke(cli, ["prepare", "--model", str(wan), "--images", str(clips),
                                      "--out", str(tmp_path / "d"), "--resolution", "32"])
    assert result.exit_code != 0
    assert "1 clip(s) without a caption" in result.output and "wave.mp4" in result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_prepare_train_then_sample_a_frame_strip_through_the_cli(tmp_path, wan, clips):
    """Clips -> prepare -> train -> ``loraengine sample --frames``: the prompts encoded
    by UMT5, the latents decoded by the Wan VAE into one strip of frames per sample."""
    import numpy as np
    from PIL import Image

    data = tmp_path / "data"
    prepare_clips(wan, clips, data)
    lora, _ = train_prepared(tmp_path, "wan", wan, data, steps=4, rank=2, lr=0.02)
    strip = sample_frame_strip(tmp_path, wan, "a person walks", lora, frames=2, size=4,
                               channels=tv.LATENT_CHANNELS)
    # 2 latent frames are 1 + 4 pixel frames of 32x32, side by side
    assert strip.shape == (32, 5 * 32, 3)
    image = CliRunner().invoke(cli, ["sample", "--model", str(wan), "--prompts",
                                      str(tmp_path / "p.txt"), "--out", str(tmp_path / "i"),
                                      "--steps", "1", "--size", "4", "4"])
    assert image.exit_code == 0, image.output  # one latent frame: one picture
    assert np.asarray(Image.open(tmp_path / "i" / "image_0_0.png")).shape == (32, 32, 3)
