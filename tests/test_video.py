"""Video latents ``[N,C,T,H,W]`` outside the family itself: buckets by frames × height ×
width, gradient checkpointing and offload over a video transformer's blocks, and
previews as frame strips decoded by the Wan VAE the way WanPipeline decodes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from loraengine.cli.main import cli
from loraengine.core.data import group_into_buckets
from loraengine.core.errors import DataError
from loraengine.core.model import LoadedModel
from loraengine.core.schedule import NoiseSchedule
from loraengine.testing import tiny_video as tv
from loraengine.tools.sample import logic as S


@pytest.fixture(scope="module")
def wan(tmp_path_factory) -> Path:
    return tv.save_video("wan", tmp_path_factory.mktemp("video") / "wan")


def _mixed(tmp_path: Path) -> tuple[Path, Path]:
    """Five clips of three shapes: (frames, height, width) = (2,4,4) ×2, (3,4,4), (2,4,6) ×2."""
    g = torch.Generator().manual_seed(0)
    shapes = [(2, 4, 4), (3, 4, 4), (2, 4, 6), (2, 4, 4), (2, 4, 6)]
    lat = {f"latents.{k}": torch.randn(tv.LATENT_CHANNELS, *s, generator=g)
           for k, s in enumerate(shapes)}
    cond = {f"cond.{k}": torch.randn(6, tv.TEXT_DIM, generator=g) for k in range(len(shapes))}
    save_file(lat, str(tmp_path / "mixed_lat.st"))
    save_file(cond, str(tmp_path / "mixed_cond.st"))
    return tmp_path / "mixed_lat.st", tmp_path / "mixed_cond.st"


def test_video_buckets_group_by_frames_height_and_width(tmp_path):
    lat_path, cond_path = _mixed(tmp_path)
    lat, cond = group_into_buckets(load_file(str(lat_path)), load_file(str(cond_path)))
    shapes = {k: tuple(v.shape) for k, v in lat.items()}
    assert shapes == {"latents.0": (2, 4, 2, 4, 4), "latents.1": (2, 4, 2, 4, 6),
                      "latents.2": (1, 4, 3, 4, 4)}
    src = load_file(str(lat_path))
    # samples in input order inside a bucket, each with its own conditioning
    torch.testing.assert_close(lat["latents.0"], torch.stack([src["latents.0"],
                                                             src["latents.3"]]))
    assert cond["cond.1"].shape == (2, 6, tv.TEXT_DIM)
    # a 4-D latent is one clip when its text is one [L,D] entry or when told so, and
    # otherwise a batch of images
    clip = {"latents.0": src["latents.0"]}
    for cond_0, video in ((torch.zeros(6, 8), None), (torch.zeros(1, 6, 8), True)):
        assert group_into_buckets(clip, {"cond.0": cond_0}, video=video)[0][
            "latents.0"].shape == (1, 4, 2, 4, 4)
    assert group_into_buckets(clip, {"cond.0": torch.zeros(4, 6, 8)})[0][
        "latents.0"].shape == (4, 2, 4, 4)
    with pytest.raises(DataError, match=r"latents.0: expected \[C,T,H,W\]"):
        group_into_buckets({"latents.0": torch.zeros(4, 4, 4)}, {}, video=True)


def _train(tmp_path: Path, folder: Path, name: str, lat: Path, cond: Path,
           **sections) -> list[float]:
    cfg = {"model": {"family": "wan", "path": str(folder)},
           "data": {"latents": str(lat), "conditioning": str(cond)},
           "training": {"steps": 3, "batch_size": 1, "dtype": "fp32", "seed": 0},
           "optimizer": {"lr": 0.01}, "adapter": {"rank": 4, "dtype": "fp32"},
           "memory": {"gradient_checkpointing": False},
           "output": {"dir": str(tmp_path / name), "name": "lora", "plot": False}}
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(cli, ["train", str(path), "-q"])
    assert result.exit_code == 0, result.output
    return json.loads((tmp_path / name / "lora.loss.json").read_text())["loss"]


def test_bucketed_video_trains_through_the_cli(tmp_path, wan):
    lat_path, cond_path = _mixed(tmp_path)
    result = CliRunner().invoke(cli, ["bucket", "--latents", str(lat_path), "--conditioning",
                                      str(cond_path), "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert "latents.2: [1, 4, 3, 4, 4]" in result.output
    losses = _train(tmp_path, wan, "bucketed", tmp_path / "b" / "latents.safetensors",
                    tmp_path / "b" / "conditioning.safetensors",
                    data={"bucket_mode": True})
    assert len(losses) == 3 and all(v == v for v in losses)


def test_checkpointing_and_offload_over_wan_blocks_change_nothing(tmp_path, wan):
    n = 2
    save_file({"latents": tv.video_latents(n)}, str(tmp_path / "lat.st"))
    save_file({"cond": torch.randn(n, 6, tv.TEXT_DIM,
                                   generator=torch.Generator().manual_seed(0))},
              str(tmp_path / "cond.st"))
    lat, cond = tmp_path / "lat.st", tmp_path / "cond.st"
    plain = _train(tmp_path, wan, "plain", lat, cond)
    ckpt = _train(tmp_path, wan, "ckpt", lat, cond, memory={"gradient_checkpointing": True})
    off = _train(tmp_path, wan, "off", lat, cond, memory={"offloading": True})
    # the same fp32 computation, recomputed or moved: equal up to summation order
    torch.testing.assert_close(torch.tensor(ckpt), torch.tensor(plain), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(off), torch.tensor(plain), rtol=1e-5, atol=1e-6)
    a = load_file(str(tmp_path / "plain" / "lora.safetensors"))
    b = load_file(str(tmp_path / "ckpt" / "lora.safetensors"))
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_video_preview_is_a_frame_strip_decoded_as_wan_pipeline_decodes(wan):
    import diffusers

    from loraengine.plugins.models.wan import wan_vae_loader

    loaded = LoadedModel(torch.nn.Identity(), None, NoiseSchedule.flow(),  # type: ignore[arg-type]
                         vae=wan_vae_loader(wan))
    vae = S.find_vae(loaded)
    assert vae is not None and loaded.vae is vae  # loaded once, kept
    latents = tv.video_latents(2, seed=3)
    strip = S.decode(loaded, latents, vae)
    # WanPipeline: latents / (1/std) + mean, then the VAE, then [-1,1] -> [0,1]
    ref_vae = diffusers.AutoencoderKLWan.from_pretrained(str(wan / "vae"), local_files_only=True)
    mean = torch.tensor(tv.LATENTS_MEAN).view(1, -1, 1, 1, 1)
    std = torch.tensor(tv.LATENTS_STD).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        video = ref_vae.decode(latents / (1.0 / std) + mean).sample  # [2,3,5,32,32]
    frames = video.shape[2]
    assert frames == 1 + tv.TIME_FACTOR * (latents.shape[2] - 1)
    assert strip.shape == (2, 3, 32, frames * 32)
    for f in range(frames):
        torch.testing.assert_close(strip[..., f * 32:(f + 1) * 32],
                                   ((video[:, :, f] + 1) / 2).clamp(0, 1), rtol=0, atol=1e-5)
    grid = S.grid_image(strip, 2)
    assert grid.width > grid.height  # the frames run left to right


def test_video_without_a_video_vae_is_decoded_frame_by_frame():
    from loraengine.testing import tiny_pipelines as tp

    image_vae = tp.vae(latent_channels=4)
    loaded = LoadedModel(torch.nn.Identity(), None, NoiseSchedule.flow(),  # type: ignore[arg-type]
                         vae_scale=0.5)
    latents = torch.randn(2, 4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    strip = S.decode(loaded, latents, image_vae)
    with torch.no_grad():
        for f in range(3):
            one = image_vae.decode(latents[:, :, f] / 0.5).sample
            torch.testing.assert_close(strip[..., f * 8:(f + 1) * 8],
                                       ((one + 1) / 2).clamp(0, 1), rtol=0, atol=1e-5)
    raw = S.decode(loaded, torch.zeros(1, 4, 20, 2, 2))
    assert raw.shape == (1, 3, 2, S.STRIP_FRAMES * 2)  # long clips: evenly spaced frames


def test_training_previews_of_a_video_family_write_frame_strips(tmp_path, wan):
    from PIL import Image

    save_file({"latents": tv.video_latents(2)}, str(tmp_path / "lat.st"))
    save_file({"cond": torch.randn(2, 6, tv.TEXT_DIM)}, str(tmp_path / "cond.st"))
    _train(tmp_path, wan, "prev", tmp_path / "lat.st", tmp_path / "cond.st",
           output={"samples": {"every": 3, "count": 1, "per_prompt": 1, "steps": 2}})
    pngs = sorted((tmp_path / "prev").rglob("*.png"))
    assert pngs, list((tmp_path / "prev").rglob("*"))
    with Image.open(pngs[-1]) as img:
        assert img.width >= 5 * 32 > img.height  # five decoded frames side by side
