"""``loraengine prepare``: buckets, what gets encoded and how, the cache, and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from loraengine.cli.main import cli
from loraengine.core.errors import DataError
from loraengine.testing import tiny_pipelines as tp
from loraengine.tools.prepare.logic import bucket_sizes, choose_bucket, prepare


@pytest.fixture(scope="module")
def pipes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipes")
    return {fam: tp.save(fam, root / fam) for fam in ("sd15", "sdxl", "sd3", "flux")}


def _run(*args: str):
    return CliRunner().invoke(cli, ["prepare", *args])


def _encoder(folder: Path, family: str, **options):
    from loraengine.plugins import build_plugin_manager

    spec = build_plugin_manager().registry.get("model", family)
    return spec.make_encoder(folder, {"device": "cpu", "dtype": "fp32", **options})


def test_bucket_sizes_are_multiples_and_choice_follows_aspect_ratio():
    sizes = bucket_sizes(64, 16)
    assert all(w % 16 == 0 and h % 16 == 0 and w * h <= 64 * 64 for w, h in sizes)
    assert choose_bucket((500, 500), sizes) == (64, 64)
    wide = choose_bucket((1000, 500), sizes)
    assert wide[0] > wide[1] and choose_bucket((500, 1000), sizes) == wide[::-1]


def test_two_image_sizes_give_two_buckets_and_a_rerun_encodes_nothing_new(tmp_path, pipes):
    images = tmp_path / "images"
    tp.write_images(images, [(32, 32), (48, 24), (32, 32), (50, 25)])
    out = tmp_path / "data"
    args = ["--model", str(pipes["sd15"]), "--images", str(images), "--out", str(out),
            "--resolution", "32"]
    first = _run(*args)
    assert first.exit_code == 0, first.output
    assert "in 2 bucket(s)" in first.output
    assert "encoded 4 image(s) and 4 caption(s); reused 0 image(s) and 0" in first.output
    lat = load_file(str(out / "latents.safetensors"))
    cond = load_file(str(out / "conditioning.safetensors"))
    assert set(lat) == {"latents.0", "latents.1"} and set(cond) == {"cond.0", "cond.1"}
    enc = _encoder(pipes["sd15"], "sd15")
    for i in (0, 1):
        n, c, h, w = lat[f"latents.{i}"].shape
        assert n == 2 and c == 4 and cond[f"cond.{i}"].shape[0] == 2
        assert (h * 2) % enc.bucket_multiple == 0 and (w * 2) % enc.bucket_multiple == 0
    with safe_open(str(out / "latents.safetensors"), "pt") as fh:
        meta = fh.metadata()
    buckets = json.loads(meta["loraengine.buckets"])
    files = json.loads(meta["loraengine.images"])
    assert [b[2] for b in buckets] == [2, 2] and buckets[0][:2] != buckets[1][:2]
    assert sorted(sum(files, [])) == sorted(p.name for p in images.glob("*.png"))
    assert meta["loraengine.family"] == "sd15"

    second = _run(*args)
    assert second.exit_code == 0, second.output
    assert "encoded 0 image(s) and 0 caption(s); reused 4 image(s) and 4" in second.output
    for key, value in load_file(str(out / "latents.safetensors")).items():
        assert torch.equal(value, lat[key])
    for key, value in load_file(str(out / "conditioning.safetensors")).items():
        assert torch.equal(value, cond[key])

    (images / "image_02.txt").write_text("a different caption")  # one caption changed
    third = _run(*args)
    assert "encoded 0 image(s) and 1 caption(s); reused 4 image(s) and 3" in third.output


def test_latents_are_the_scaled_shifted_vae_mean_of_the_cropped_image(tmp_path, pipes):
    from diffusers import AutoencoderKL
    from PIL import Image

    images = tmp_path / "images"
    tp.write_images(images, [(40, 24)], seed=3)
    enc = _encoder(pipes["sd3"], "sd3", max_sequence_length=8)
    report = prepare(enc, images, tmp_path / "out", resolution=16)
    (w, h, _), = report.buckets
    lat = load_file(str(report.latents_path))["latents"]
    # by hand: cover the bucket, centre-crop, [-1, 1], VAE posterior mean, (z − shift)·scale
    img = Image.open(images / "image_00.png").convert("RGB")
    scale = max(w / 40, h / 24)
    nw, nh = max(w, round(40 * scale)), max(h, round(24 * scale))
    img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - w) // 2, (nh - h) // 2
    img = img.crop((left, top, left + w, top + h))
    px = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)[None]
    px = px / 127.5 - 1
    vae = AutoencoderKL.from_pretrained(str(pipes["sd3"] / "vae"))
    with torch.no_grad():
        mean = vae.encode(px).latent_dist.mean
    torch.testing.assert_close(lat, (mean - 0.0609) * 1.5305, rtol=1e-5, atol=1e-5)


def test_each_image_gets_its_own_caption_and_sdxl_its_size_and_crop(tmp_path, pipes):
    import diffusers

    images = tmp_path / "images"
    tp.write_images(images, [(32, 32), (36, 32)], seed=4)
    (images / "image_01.txt").write_text("another caption")
    report = prepare(_encoder(pipes["sdxl"], "sdxl"), images, tmp_path / "out",
                     resolution=32)
    assert report.buckets == [(32, 32, 2)]
    cond = load_file(str(report.conditioning_path))
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(pipes["sdxl"]))
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=["picture 0 of a square", "another caption"], device="cpu",
            do_classifier_free_guidance=False)
    torch.testing.assert_close(cond["cond"], embeds)
    torch.testing.assert_close(cond["pooled"], pooled)
    # (original h, w, crop top, left, target h, w): 36×32 covers 32×32 as 36×32, crop 2 left
    assert cond["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32], [32, 36, 0, 2, 32, 32]]


def test_flux_files_hold_t5_states_clip_pooled_and_text_ids(tmp_path, pipes):
    images = tmp_path / "images"
    tp.write_images(images, [(16, 16)] * 2)
    report = prepare(_encoder(pipes["flux"], "flux", max_sequence_length=8), images,
                     tmp_path / "out", resolution=16)
    cond = load_file(str(report.conditioning_path))
    assert cond["cond"].shape == (2, 8, 32) and cond["pooled"].shape == (2, 16)
    assert cond["txt_ids"].shape == (2, 8, 3) and not cond["txt_ids"].any()


def test_captions_file_json_and_jsonl(tmp_path, pipes):
    images = tmp_path / "images"
    tp.write_images(images, [(16, 16)] * 2, captions=False)
    caps = tmp_path / "caps.json"
    caps.write_text(json.dumps({"image_00.png": "one", "image_01.png": "two"}))
    enc = _encoder(pipes["sd15"], "sd15")
    a = prepare(enc, images, tmp_path / "a", captions_file=caps, resolution=16)
    lines = tmp_path / "metadata.jsonl"
    lines.write_text('{"file_name": "image_00.png", "text": "one"}\n'
                     '{"file_name": "image_01.png", "text": "two"}\n')
    b = prepare(enc, images, tmp_path / "b", captions_file=lines, resolution=16)
    assert b.encoded_captions == 2 and b.cached_captions == 0  # separate caches
    assert torch.equal(load_file(str(a.conditioning_path))["cond"],
                       load_file(str(b.conditioning_path))["cond"])


def test_unreadable_images_and_missing_captions_are_listed_and_nothing_is_written(
        tmp_path, pipes):
    images = tmp_path / "images"
    tp.write_images(images, [(16, 16)] * 3)
    (images / "image_01.txt").unlink()
    (images / "broken.png").write_bytes(b"not a png at all")
    (images / "broken.txt").write_text("caption of a broken file")
    out = tmp_path / "data"
    result = _run("--model", str(pipes["sd15"]), "--images", str(images), "--out", str(out),
                  "--resolution", "16")
    assert result.exit_code == 1
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 2
    assert "1 unreadable image(s)" in lines[0] and "broken.png" in lines[0]
    assert "1 image(s) without a caption" in lines[1] and "image_01.png" in lines[1]
    assert "Traceback" not in result.output
    assert not (out / "latents.safetensors").exists()
    assert not (out / "conditioning.safetensors").exists()


def test_family_is_detected_and_a_non_pipeline_folder_is_refused(tmp_path, pipes):
    images = tmp_path / "images"
    tp.write_images(images, [(16, 16)])
    result = _run("--model", str(pipes["flux"]), "--images", str(images), "--out",
                  str(tmp_path / "o"), "--resolution", "16", "--max-sequence-length", "4")
    assert result.exit_code == 0, result.output
    assert "for flux" in result.output
    result = _run("--model", str(pipes["flux"] / "transformer"), "--images", str(images),
                  "--out", str(tmp_path / "o2"))
    assert result.exit_code == 1 and "not a diffusers pipeline folder" in result.output
    with pytest.raises(DataError, match="no images"):
        prepare(_encoder(pipes["sd15"], "sd15"), tmp_path / "o", tmp_path / "x")


def test_bucketed_files_train_in_bucket_mode(tmp_path, pipes):
    """The files prepare makes for several buckets are what bucket mode trains on."""
    import yaml

    images = tmp_path / "images"
    tp.write_images(images, [(32, 32), (48, 24)] * 2)
    out = tmp_path / "data"
    assert _run("--model", str(pipes["sd15"]), "--images", str(images), "--out", str(out),
                "--resolution", "32", "-q").exit_code == 0
    cfg = {"model": {"family": "sd15", "path": str(pipes["sd15"])},
           "data": {"latents": str(out / "latents.safetensors"),
                    "conditioning": str(out / "conditioning.safetensors"),
                    "bucket_mode": True},
           "training": {"steps": 2, "batch_size": 2, "dtype": "fp32"},
           "adapter": {"rank": 2, "dtype": "fp32"},
           "memory": {"gradient_checkpointing": False},
           "output": {"dir": str(tmp_path / "o"), "name": "b", "plot": False}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(cli, ["train", str(tmp_path / "c.yaml"), "-q"])
    assert result.exit_code == 0, result.output


def test_sd3_without_t5_pads_with_zeros_as_the_pipeline_does(tmp_path):
    pipe = tp.build("sd3")
    pipe.register_modules(text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(str(tmp_path / "sd3"))
    images = tmp_path / "images"
    tp.write_images(images, [(16, 16)])
    report = prepare(_encoder(tmp_path / "sd3", "sd3", max_sequence_length=8), images,
                     tmp_path / "out", resolution=16)
    cond = load_file(str(report.conditioning_path))["cond"]
    assert cond.shape == (1, 77 + 8, 32)
    assert not cond[0, 77:].any() and cond[0, :77].abs().max() > 0
