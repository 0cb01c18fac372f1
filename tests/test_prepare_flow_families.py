"""``loraengine prepare`` for the record families (FLUX.2 dev and Klein, Qwen-Image, Z-Image,
Chroma, Lumina 2), on tiny whole pipelines of the real classes: latents are what the
pipeline's own VAE code gives its denoiser (its ``_encode_vae_image``, or the inverse
of the normalisation it undoes before decoding), captions what its ``encode_prompt``
gives; then prepare -> train -> sample through the command line, and the trained file
changes what the diffusers pipeline itself renders."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import SavedPipelines
from PIL import Image
from safetensors.torch import load_file

from loraengine.api import resolve_config
from loraengine.cli.main import cli
from loraengine.core.build import build_pipeline
from loraengine.plugins import build_plugin_manager
from loraengine.testing import tiny_pipelines as tp

FAMILY = {"flux2": "flux2", "flux2_klein": "flux2", "qwen_image": "qwen_image", "z_image": "z_image",
          "chroma": "chroma", "lumina2": "lumina2", "hidream": "hidream"}
CAPTIONS = ["a red square", "two blue discs on grey, small", "x"]
#: fp32 encoders on the CPU against the pipeline's own fp32 code: the same operations,
#: so only summation order can differ
TOL = dict(rtol=1e-5, atol=1e-5)
STEPS = 20


@pytest.fixture(scope="module")
def pipes(tmp_path_factory) -> dict[str, Path]:
    return SavedPipelines(tmp_path_factory.mktemp("full"), tp.save_full)


def _encoder(name: str, folder: Path, **options):
    spec = build_plugin_manager().registry.get("model", FAMILY[name])
    return spec.make_encoder(folder, {"device": "cpu", "dtype": "fp32", **options})


def _pixels(n: int = 2, side: int = 32, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, side, side, generator=g) * 2 - 1


@torch.no_grad()
def _reference_latents(name: str, pipe, pixels: torch.Tensor) -> torch.Tensor:
    if name.startswith("flux2"):
        return pipe._encode_vae_image(pixels, generator=None)
    if name == "qwen_image":
        from diffusers import QwenImageEditPipeline

        edit = SimpleNamespace(vae=pipe.vae, latent_channels=pipe.vae.config.z_dim)
        return QwenImageEditPipeline._encode_vae_image(edit, pixels.unsqueeze(2), None)[:, :, 0]
    # the pipelines decode latents / scaling_factor + shift_factor
    mean = pipe.vae.encode(pixels).latent_dist.mean
    return (mean - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor


@torch.no_grad()
def _reference_text(name: str, pipe, captions: list[str]) -> list[torch.Tensor]:
    """Each caption's conditioning rows as the pipeline gives them to its transformer
    (the rows its mask keeps, where it has one)."""
    if name.startswith("flux2"):
        embeds, _ = pipe.encode_prompt(captions, device="cpu")
        return list(embeds)
    if name == "qwen_image":
        embeds, mask = pipe.encode_prompt(captions, device="cpu")
        mask = torch.ones(embeds.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
        return [e[m] for e, m in zip(embeds, mask, strict=True)]
    if name == "z_image":
        rows, _ = pipe.encode_prompt(list(captions), device="cpu",
                                     do_classifier_free_guidance=False)
        return rows
    if name == "chroma":
        embeds, _, mask, *_ = pipe.encode_prompt(captions, device="cpu",
                                                 do_classifier_free_guidance=False)
        return [e[m.bool()] for e, m in zip(embeds, mask, strict=True)]
    if name == "hidream":
        t5, _, llama, _, pooled, _ = pipe.encode_prompt(
            prompt=captions, device="cpu", do_classifier_free_guidance=False)
        return [{"cond": t5[i], "llama3": llama[:, i], "pooled": pooled[i]}
                for i in range(len(captions))]
    embeds, mask, _, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False,
                                            device="cpu")
    return [e[m.bool()] for e, m in zip(embeds, mask, strict=True)]


#: FLUX.2 dev's 30-layer Mistral reading 512 tokens a caption, HiDream's four text
#: encoders: several seconds each
QUICK = [pytest.param(n, marks=pytest.mark.slow) if n in ("flux2", "hidream") else n
         for n in tp.FULL_FAMILIES]


@pytest.mark.parametrize("name", QUICK)
def test_latents_and_captions_are_the_pipelines_own(pipes, name):
    import diffusers

    enc = _encoder(name, pipes[name])
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(pipes[name]), local_files_only=True)
    pixels = _pixels()
    got = enc.encode_images(pixels)
    want = _reference_latents(name, pipe, pixels)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want.float(), **TOL)
    # batches of one and of three give the same rows; the longest caption sets the width
    enc.caption_batch = 1
    cond = enc.encode_captions(CAPTIONS)
    rows = _reference_text(name, pipe, CAPTIONS)
    mask = cond.get("mask")
    if name == "hidream":  # three tensors a caption, none of them masked
        assert set(cond) == {"cond", "llama3", "pooled"}
        for i, row in enumerate(rows):
            for key, want_row in row.items():
                torch.testing.assert_close(cond[key][i], want_row.float(), **TOL)
        return
    for i, row in enumerate(rows):
        kept = cond["cond"][i][mask[i].bool()] if mask is not None else cond["cond"][i]
        torch.testing.assert_close(kept, row.float(), **TOL)
        if mask is not None:  # what the mask drops is zero padding or the pipeline's own
            assert int(mask[i].sum()) == row.shape[0]
    if name in ("qwen_image", "z_image"):  # padded to the longest caption, no further
        assert cond["cond"].shape[1] == max(r.shape[0] for r in rows)
        assert float(cond["cond"][2][~mask[2].bool()].abs().sum()) == 0.0


#: 2x VAE and 2x2 patches (FLUX.2: patchified latents; Chroma: packed tokens; the
#: others' transformers patchify 2x2); Qwen-Image's VAE is 8x
BUCKET_STEP = {"flux2": 4, "flux2_klein": 4, "qwen_image": 16, "z_image": 4, "chroma": 4,
               "lumina2": 4, "hidream": 4}


@pytest.mark.parametrize("name", QUICK)
def test_the_bucket_step_is_the_vae_factor_times_the_patch(pipes, name):
    assert _encoder(name, pipes[name]).bucket_multiple == BUCKET_STEP[name]


def _images(folder: Path, side: int) -> Path:
    tp.write_images(folder, [(side, side)] * 3, seed=1)
    # one caption shared: a rerun must encode it once
    (folder / "image_02.txt").write_text("picture 0 of a square", encoding="utf-8")
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("name", tp.FULL_FAMILIES)
def test_prepare_train_and_sample_through_the_cli(pipes, tmp_path, name):
    runner = CliRunner()
    side = 64 if name == "qwen_image" else 16
    images = _images(tmp_path / "images", side)
    data = tmp_path / "data"
    args = ["prepare", "--model", str(pipes[name]), "--images", str(images), "--out",
            str(data), "--device", "cpu", "--dtype", "fp32"]
    if name in ("flux2_klein", "chroma"):
        args += ["--max-sequence-length", "48"]
    elif name == "flux2":  # FLUX.2 dev's system prompt comes first: 170 tokens here
        args += ["--max-sequence-length", "200"]
    result = runner.invoke(cli, [*args, "-q"])
    assert result.exit_code == 0, result.output
    lat, cond = load_file(str(data / "latents.safetensors")), \
        load_file(str(data / "conditioning.safetensors"))
    assert lat["latents"].shape[0] == 3 and cond["cond"].shape[0] == 3
    again = runner.invoke(cli, args)
    assert "encoded 0 image(s) and 0 caption(s)" in again.output, again.output

    cfg = {"model": {"family": FAMILY[name], "path": str(pipes[name])},
           "data": {"latents": str(data / "latents.safetensors"),
                    "conditioning": str(data / "conditioning.safetensors")},
           "training": {"steps": STEPS, "batch_size": 3, "dtype": "fp32", "seed": 0},
           "optimizer": {"lr": 0.02}, "adapter": {"rank": 4, "alpha": 4, "dtype": "fp32"},
           "output": {"dir": str(tmp_path / "out"), "name": "lora", "plot": False}}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    result = runner.invoke(cli, ["train", str(tmp_path / "train.yaml"), "-q"])
    assert result.exit_code == 0, result.output
    losses = json.loads((tmp_path / "out" / "lora.loss.json").read_text())["loss"]
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    lora = tmp_path / "out" / "lora.safetensors"
    host = build_plugin_manager()
    conf, base = resolve_config(tmp_path / "train.yaml", host,
                                overrides=[f"adapter.existing={lora}"])
    engine = build_pipeline(conf, host, base_dir=base)
    try:
        trained = tp.fixed_draw_loss(engine)
        engine.network.set_multiplier(0.0)
        untouched = tp.fixed_draw_loss(engine)
    finally:
        engine.close()
    assert trained < untouched * 0.97, (trained, untouched)

    (tmp_path / "prompts.txt").write_text("a red square\npicture 1 of a square\n")
    h, w = lat["latents"].shape[-2:]
    result = runner.invoke(cli, ["sample", "--model", str(pipes[name]), "--prompts",
                                 str(tmp_path / "prompts.txt"), "--lora",
                                 str(tmp_path / "out" / "lora.safetensors"), "--out",
                                 str(tmp_path / "s"), "--steps", "2", "--size", str(h),
                                 str(w)])
    assert result.exit_code == 0, result.output
    tile = Image.open(tmp_path / "s" / "image_0_0.png")
    assert tile.size == (side, side)  # decoded by the family's VAE back to pixels
    assert {"grid.png", "compare.png", "image_1_0.png"} <= \
        {p.name for p in (tmp_path / "s").iterdir()}
    # compare.png holds the base grid and the adapted one side by side: the LoRA shows
    pair = torch.from_numpy(np.asarray(Image.open(tmp_path / "s" / "compare.png").convert("L"),
                                       dtype=np.float32))
    grid = Image.open(tmp_path / "s" / "grid.png")
    pair = pair[16:16 + grid.height]
    assert (pair[:, :grid.width] - pair[:, grid.width + 12:]).abs().max() > 0

    # the same file in the diffusers pipeline itself, run from the same seed
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(str(pipes[name]), local_files_only=True)
    call = dict(prompt="a red square", num_inference_steps=2, height=side, width=side,
                output_type="np")
    if "--max-sequence-length" in args:
        call["max_sequence_length"] = int(args[args.index("--max-sequence-length") + 1])
    before = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(str(lora))
    after = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert np.isfinite(after).all() and np.abs(after - before).max() > 0


def test_frames_are_refused_for_an_image_family_in_one_line(pipes, tmp_path):
    (tmp_path / "p.txt").write_text("a red square\n")
    result = CliRunner().invoke(cli, ["sample", "--model", str(pipes["z_image"]),
                                      "--prompts", str(tmp_path / "p.txt"), "--out",
                                      str(tmp_path / "s"), "--size", "4", "4",
                                      "--frames", "2"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == \
        "error: --frames: the z_image model makes images, not video"
    assert "Traceback" not in result.output


def test_the_cache_key_covers_every_text_encoder_hidream_has(tmp_path):
    """The fourth text encoder and tokenizer (HiDream's Llama) are part of what the
    encoding depends on: editing them makes the cache miss."""
    from loraengine.plugins.models.encoders import ENCODING, folder_fingerprint

    root = tmp_path / "pipe"
    for comp in ("vae", "text_encoder_4", "tokenizer_4"):
        (root / comp).mkdir(parents=True)
        (root / comp / "config.json").write_text('{"a": 1}')
    before = folder_fingerprint(root, ENCODING)
    for comp in ("text_encoder_4", "tokenizer_4"):
        (root / comp / "config.json").write_text('{"a": 2}')
        assert folder_fingerprint(root, ENCODING) != before
        before = folder_fingerprint(root, ENCODING)


@pytest.mark.slow
def test_references_become_the_reference_latents_an_edit_model_trains_on(pipes, tmp_path):
    """FLUX.2 edits: each image's reference (same name in --references) is encoded as
    the pipeline encodes a condition image, to the image's bucket, and training reads
    it; an image without a reference is one error naming it."""
    import diffusers

    from loraengine.tools.prepare.logic import load_pixels

    images = _images(tmp_path / "images", 16)
    refs = tmp_path / "refs"
    tp.write_images(refs, [(24, 24)] * 3, seed=9, captions=False)
    runner = CliRunner()
    args = ["prepare", "--model", str(pipes["flux2_klein"]), "--images", str(images),
            "--references", str(refs), "--out", str(tmp_path / "data"), "--device", "cpu",
            "--dtype", "fp32", "--max-sequence-length", "48", "-q"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    cond = load_file(str(tmp_path / "data" / "conditioning.safetensors"))
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(pipes["flux2_klein"]),
                                                       local_files_only=True)
    pixels = torch.stack([load_pixels(refs / f"image_{i:02d}.png", (16, 16))[0]
                          for i in range(3)])
    with torch.no_grad():
        want = pipe._encode_vae_image(pixels, generator=None)
    torch.testing.assert_close(cond["reference"], want, **TOL)

    cfg = {"model": {"family": "flux2", "path": str(pipes["flux2_klein"])},
           "data": {"latents": str(tmp_path / "data" / "latents.safetensors"),
                    "conditioning": str(tmp_path / "data" / "conditioning.safetensors")},
           "training": {"steps": 2, "batch_size": 3, "dtype": "fp32", "seed": 0},
           "adapter": {"rank": 2, "dtype": "fp32"},
           "output": {"dir": str(tmp_path / "out"), "name": "lora", "plot": False}}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(cfg))
    trained = runner.invoke(cli, ["train", str(tmp_path / "t.yaml"), "-q"])
    assert trained.exit_code == 0, trained.output

    (refs / "image_01.png").unlink()
    missing = runner.invoke(cli, args)
    assert missing.exit_code == 1
    assert missing.output.strip().splitlines()[-1] == (
        f"error: --references: 1 image(s) without a reference image of the same name in "
        f"{refs}: image_01.png")


def test_guidance_with_a_negative_prompt_of_another_length(pipes, tmp_path):
    """Z-Image's captions keep their own token count: a negative prompt longer than
    the prompts is padded with its mask, and guidance renders."""
    (tmp_path / "p.txt").write_text("a red square\n")
    (tmp_path / "n.txt").write_text("blurry, dark and grey, low quality, noisy\n")
    result = CliRunner().invoke(cli, ["sample", "--model", str(pipes["z_image"]),
                                      "--prompts", str(tmp_path / "p.txt"), "--negative",
                                      str(tmp_path / "n.txt"), "--guidance", "3",
                                      "--out", str(tmp_path / "s"), "--steps", "2",
                                      "--size", "8", "8"])
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "s" / "image_0_0.png").size == (16, 16)
