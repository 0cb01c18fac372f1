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


# -- the shipped quickstart images, sizes kept, the folder checked first --------------------

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart"


def _image_sizes(folder: Path) -> dict[str, tuple[int, int]]:
    from PIL import Image

    sizes = {}
    for p in sorted(folder.glob("*.png")):
        with Image.open(p) as img:
            sizes[p.name] = img.size
    return sizes


@pytest.mark.slow  # 1.5–3.4 s: the full suite runs it
def test_the_shipped_images_keep_their_own_size(tmp_path):
    """Each latent is its image's size over the VAE's factor (8 for the shipped
    pipeline, read from its config): nothing is enlarged to the family's 512 px."""
    out = tmp_path / "data"
    result = _run("--model", str(QUICKSTART / "model"), "--images",
                  str(QUICKSTART / "images"), "--out", str(out))
    assert result.exit_code == 0, result.output
    vae_cfg = json.loads((QUICKSTART / "model" / "vae" / "config.json").read_text())
    factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    assert factor == 8
    sizes = _image_sizes(QUICKSTART / "images")
    assert len(set(sizes.values())) == 2  # two sizes, so two buckets
    lat = load_file(str(out / "latents.safetensors"))
    with safe_open(str(out / "latents.safetensors"), "pt") as fh:
        files = json.loads(fh.metadata()["loraengine.images"])
    assert len(files) == 2
    for b, names in enumerate(files):
        (w, h), = {sizes[n] for n in names}
        assert lat[f"latents.{b}"].shape == (len(names), 4, h // factor, w // factor)
    assert "enlarged" not in result.output
    assert "scaled" not in result.output and "cropped" not in result.output
    # by hand: the image's own pixels in [-1, 1], the VAE's posterior mean, scaled
    from diffusers import AutoencoderKL
    from PIL import Image

    vae = AutoencoderKL.from_pretrained(str(QUICKSTART / "model" / "vae"))
    for b, names in enumerate(files):
        img = Image.open(QUICKSTART / "images" / names[0]).convert("RGB")
        px = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)[None]
        with torch.no_grad():
            mean = vae.encode(px / 127.5 - 1).latent_dist.mean
        torch.testing.assert_close(lat[f"latents.{b}"][:1], mean * vae_cfg["scaling_factor"],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_prepare_prints_no_torchvision_notices(tmp_path):
    """transformers' "requires torchvision; falling back" notices, issued when diffusers
    imports the pipeline's modules, are not shown (a fresh process: each is issued once
    per process)."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "loraengine.cli.main", "prepare", "--model",
         str(QUICKSTART / "model"), "--images", str(QUICKSTART / "images"), "--out",
         str(tmp_path / "data"), "-q"],
        capture_output=True, text=True, timeout=240,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "torchvision" not in proc.stdout + proc.stderr
    assert (tmp_path / "data" / "latents.safetensors").is_file()


@pytest.fixture
def encoders_made(monkeypatch) -> list[Path]:
    """Records every encoder (VAE + text encoders) prepare loads."""
    from loraengine.plugins.models import encoders

    made: list[Path] = []
    real = encoders.PipelineEncoder.__init__

    def record(self, family, root, options):
        made.append(Path(root))
        real(self, family, root, options)

    monkeypatch.setattr(encoders.PipelineEncoder, "__init__", record)
    return made


def _garbage_model(tmp_path: Path) -> Path:
    model = tmp_path / "garbage-model"
    model.mkdir()
    (model / "model_index.json").write_text("{ this is not a pipeline")
    return model


def test_a_missing_images_folder_fails_in_one_line_before_the_model_is_read(
        tmp_path, encoders_made):
    model = _garbage_model(tmp_path)
    missing = tmp_path / "no-such-images"
    for model_arg in (model, tmp_path / "no-such-model"):
        result = _run("--model", str(model_arg), "--images", str(missing), "--out",
                      str(tmp_path / "out"))
        assert result.exit_code == 1
        assert result.output.strip().splitlines() == [
            f"error: --images: {missing} is not a folder"]
    assert encoders_made == []
    assert not (tmp_path / "out").exists()
    # with the images fine, the garbage model is what fails
    images = tmp_path / "images"
    tp.write_images(images, [(16, 16)])
    result = _run("--model", str(model), "--images", str(images), "--out",
                  str(tmp_path / "out"))
    assert result.exit_code != 0 and "--images" not in result.output


def test_missing_captions_are_listed_before_the_model_is_read(tmp_path, encoders_made):
    images = tmp_path / "images"
    tp.write_images(images, [(16, 16)] * 3)
    (images / "image_00.txt").unlink()
    (images / "image_02.txt").unlink()
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _run("--model", str(_garbage_model(tmp_path)), "--images", str(images),
                  "--out", str(tmp_path / "out"))
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: 2 image(s) without a caption (looked for a .txt file beside the image): "
        "image_00.png, image_02.png"]
    result = _run("--model", str(tmp_path / "nothing"), "--images", str(empty), "--out",
                  str(tmp_path / "out"))
    assert result.exit_code == 1 and "error: --images: no images" in result.output
    assert encoders_made == []


def test_small_images_are_not_enlarged_unless_asked_and_resizes_are_reported(
        tmp_path, pipes):
    """The tiny sd15 pipeline's step is 4 px (a 2× VAE, a 2-level UNet)."""
    images = tmp_path / "images"
    tp.write_images(images, [(16, 16), (40, 24), (18, 18)])
    args = ["--model", str(pipes["sd15"]), "--images", str(images)]
    kept = _run(*args, "--out", str(tmp_path / "a"), "--resolution", "24")
    assert kept.exit_code == 0, kept.output
    # 16x16 fits as it is; 40x24 (960 px) is scaled down into the 24² = 576 px area, to
    # the fitting bucket nearest its 5:3 (28x20: 7:5; 32x16 is 2:1); 18x18 is cropped by
    # its odd 2 px
    assert "1 image(s) scaled down to fit --resolution 24: image_01.png 40x24 -> 28x20" \
        in kept.output
    assert "1 image(s) cropped to multiples of the family's size step 4: " \
        "image_02.png 18x18 -> 16x16" in kept.output
    assert "enlarged" not in kept.output
    lat = load_file(str(tmp_path / "a" / "latents.safetensors"))
    assert sorted(t.shape[2:] for t in lat.values()) == [(8, 8), (10, 14)]
    assert [t.shape[0] for t in lat.values() if t.shape[2:] == (8, 8)] == [2]

    up = _run(*args, "--out", str(tmp_path / "b"), "--resolution", "24", "--upscale")
    assert up.exit_code == 0, up.output
    assert "2 image(s) enlarged to the --resolution 24 buckets (--upscale): " \
        "image_00.png 16x16 -> 24x24, image_02.png 18x18 -> 24x24" in up.output

    tiny = tmp_path / "tiny"
    tp.write_images(tiny, [(3, 8), (16, 16)])
    small = _run("--model", str(pipes["sd15"]), "--images", str(tiny), "--out",
                 str(tmp_path / "c"))
    assert small.exit_code == 1
    assert small.output.strip().splitlines() == [
        "error: 1 image(s) smaller than the family's size step 4 px on a side, which "
        "prepare does not enlarge unless asked (--upscale): image_00.png (3x8)"]


@pytest.mark.slow
def test_own_size_buckets_never_exceed_the_image_or_the_area():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from loraengine.tools.prepare.logic import own_bucket, own_size_buckets

    @settings(max_examples=100, deadline=None, derandomize=True, database=None)
    @given(st.integers(16, 700), st.integers(16, 700), st.sampled_from([2, 8, 32]),
           st.sampled_from([4, 8, 16]))
    def check(w, h, res_steps, multiple):
        res = res_steps * multiple
        fits = own_size_buckets((w, h), res, multiple)
        assert fits, (w, h, res, multiple)
        for bw, bh in fits:
            assert bw % multiple == 0 and bh % multiple == 0
            assert bw <= w and bh <= h and bw * bh <= res * res
        (bw, bh), crop_only = own_bucket((w, h), res, multiple)
        assert bw % multiple == 0 and bh % multiple == 0
        assert bw <= w and bh <= h and bw * bh <= res * res
        # an image within the area keeps its size, less what is under a step
        assert crop_only == (w * h <= res * res)
        if crop_only:
            assert w - bw < multiple and h - bh < multiple

    check()


def test_a_family_that_is_not_the_pipelines_is_one_line_not_a_traceback(tmp_path):
    """--family sdxl on the quickstart's SD1.5 pipeline failed inside SDXL's prompt
    encoding with a ValueError traceback; it is a config error naming both."""
    result = _run("--model", str(QUICKSTART / "model"), "--family", "sdxl",
                  "--images", str(QUICKSTART / "images"), "--out", str(tmp_path / "d"), "-q")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    assert "StableDiffusionPipeline" in lines[0] and "sdxl" in lines[0]
    assert "StableDiffusionXLPipeline" in lines[0]
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("kind", ["16-bit", "float"])
def test_deep_greyscale_images_are_scaled_not_clipped(tmp_path, kind):
    # PIL's own RGB conversion clips: a 16-bit image came out nearly white, a float one
    # in [0, 1] black; each must read as the 8-bit image of the same picture
    import numpy as np
    from PIL import Image

    from loraengine.tools.prepare.logic import load_pixels

    eight = np.arange(256, dtype=np.uint8).repeat(64).reshape(128, 128)
    deep = (eight.astype(np.uint16) * 257 if kind == "16-bit"
            else eight.astype(np.float32) / 255)
    paths = tmp_path / "eight.png", tmp_path / ("deep.png" if kind == "16-bit" else "deep.tif")
    Image.fromarray(eight).save(paths[0])
    Image.fromarray(deep).save(paths[1])
    want, _, _ = load_pixels(paths[0], (64, 64))
    got, _, _ = load_pixels(paths[1], (64, 64))
    assert torch.equal(got, want)
