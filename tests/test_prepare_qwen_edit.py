"""``loraengine prepare`` for Qwen-Image-Edit and Edit Plus (one reference image), on
tiny whole pipelines of the real classes with no torchvision: Qwen2.5-VL reads each
caption together with its reference image. The prompt processor that stands in for
``Qwen2VLProcessor`` gives the processor's own tensors (transformers' processor code,
built here with its video-processor class check switched off, the one part that needs
torchvision); the conditioning is what the pipeline's ``encode_prompt`` gives, the
reference latents what its ``_encode_vae_image`` gives; then prepare -> train ->
sample through the command line."""

from __future__ import annotations

import json
from pathlib import Path

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

#: fp32 on the CPU, the same operations as the pipeline's code: summation order only
TOL = dict(rtol=1e-5, atol=1e-5)
EDITS = tuple(tp.EDIT_FAMILIES)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory) -> dict[str, Path]:
    return SavedPipelines(tmp_path_factory.mktemp("edit"), tp.save_edit)


def _real_processor(folder: Path):
    """transformers' own ``Qwen2VLProcessor`` of the folder's processor files."""
    from transformers import AutoTokenizer, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )
    from transformers.processing_utils import ProcessorMixin

    check = ProcessorMixin.check_argument_for_proper_class
    ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: None
    try:
        return Qwen2VLProcessor(
            image_processor=Qwen2VLImageProcessorPil.from_pretrained(str(folder)),
            tokenizer=AutoTokenizer.from_pretrained(str(folder)), video_processor=None)
    finally:
        ProcessorMixin.check_argument_for_proper_class = check


def _pipeline(folder: Path):
    import diffusers

    return diffusers.DiffusionPipeline.from_pretrained(
        str(folder), local_files_only=True, processor=_real_processor(folder / "processor"))


def _encoder(folder: Path):
    spec = build_plugin_manager().registry.get("model", "qwen_image")
    return spec.make_encoder(folder, {"device": "cpu", "dtype": "fp32"})


def _pictures(sizes, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for w, h in sizes]


def test_the_prompt_processor_gives_qwen2vl_processor_s_tensors(pipes):
    """Two prompts with an image each, of different sizes (so different token counts),
    and a prompt with two images: the same ids, mask, patches and grids."""
    from loraengine.plugins.models.flow_encoders import VLPromptProcessor

    folder = pipes["qwen_image_edit"] / "processor"
    ours, real = VLPromptProcessor(folder), _real_processor(folder)
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    cases = [([f"{image}a red square", f"x {image} two discs"], _pictures([(32, 48), (64, 24)])),
             ([f"Picture 1: {image}Picture 2: {image}swap them"], _pictures([(40, 40), (16, 72)]))]
    for text, images in cases:
        want = real(text=text, images=images, padding=True, return_tensors="pt")
        got = ours(text=text, images=images, padding=True, return_tensors="pt")
        for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"):
            assert torch.equal(got[key], want[key]), key
        # each image stands for t·h·w/4 tokens of the text
        count = int((got["input_ids"] == ours.tokenizer.convert_tokens_to_ids(
            "<|image_pad|>")).sum())
        assert count == int(got["image_grid_thw"].prod(-1).sum()) // 4


def _data(tmp_path: Path, side: int = 32) -> tuple[Path, Path]:
    images, refs = tmp_path / "images", tmp_path / "refs"
    tp.write_images(images, [(side, side)] * 3, seed=1)
    (images / "image_02.txt").write_text("picture 0 of a square", encoding="utf-8")
    tp.write_images(refs, [(side + 8, side)] * 3, seed=9, captions=False)
    return images, refs


@pytest.mark.parametrize("name", EDITS)
def test_prepare_gives_the_pipelines_own_conditioning_and_reference_latents(pipes, tmp_path,
                                                                            name):
    from loraengine.tools.prepare.logic import load_picture

    images, refs = _data(tmp_path)
    args = ["prepare", "--model", str(pipes[name]), "--images", str(images), "--references",
            str(refs), "--out", str(tmp_path / "data"), "--device", "cpu", "--dtype", "fp32"]
    result = CliRunner().invoke(cli, [*args, "-q"])
    assert result.exit_code == 0, result.output
    cond = load_file(str(tmp_path / "data" / "conditioning.safetensors"))
    pipe = _pipeline(pipes[name])
    enc = _encoder(pipes[name])
    for i in range(3):
        picture = load_picture(refs / f"image_{i:02d}.png", (32, 32))
        caption = (images / f"image_{i:02d}.txt").read_text()
        with torch.no_grad():
            embeds, mask = pipe.encode_prompt([caption], image=enc.condition_image(picture),
                                              device="cpu")
            pixels = pipe.image_processor.preprocess(picture, 32, 32).unsqueeze(2)
            latents = pipe._encode_vae_image(pixels, generator=None)[:, :, 0]
        assert mask is None  # one prompt: all its rows are real
        n = int(cond["mask"][i].sum())
        assert n == embeds.shape[1]
        torch.testing.assert_close(cond["cond"][i, :n], embeds[0], **TOL)
        assert float(cond["cond"][i, n:].abs().sum()) == 0.0
        torch.testing.assert_close(cond["reference"][i], latents[0], **TOL)
    again = CliRunner().invoke(cli, args)
    assert "encoded 0 image(s) and 0 caption(s)" in again.output, again.output


def test_an_edit_folder_without_references_is_one_line(pipes, tmp_path):
    images, _ = _data(tmp_path)
    result = CliRunner().invoke(cli, ["prepare", "--model", str(pipes["qwen_image_edit"]),
                                      "--images", str(images), "--out", str(tmp_path / "d"),
                                      "--device", "cpu"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        "error: --references: the qwen_image model given (QwenImageEditPipeline) encodes "
        "each caption together with its reference image; give --references FOLDER (each "
        "image's reference under the same name)")
    assert "Traceback" not in result.output
    (tmp_path / "p.txt").write_text("a red square\n")
    sample = CliRunner().invoke(cli, ["sample", "--model", str(pipes["qwen_image_edit"]),
                                      "--prompts", str(tmp_path / "p.txt"), "--out",
                                      str(tmp_path / "s"), "--size", "4", "4"])
    assert sample.exit_code == 1
    assert sample.output.strip().splitlines()[-1] == (
        "error: QwenImageEditPipeline encodes each caption together with its reference "
        "image; prepare with --references, and sample with --prompts the "
        "conditioning.safetensors it writes")


@pytest.mark.slow
@pytest.mark.parametrize("name", EDITS)
def test_prepare_train_and_sample_an_edit_model_through_the_cli(pipes, tmp_path, name):
    runner = CliRunner()
    images, refs = _data(tmp_path)
    data = tmp_path / "data"
    result = runner.invoke(cli, ["prepare", "--model", str(pipes[name]), "--images",
                                 str(images), "--references", str(refs), "--out", str(data),
                                 "--device", "cpu", "--dtype", "fp32", "-q"])
    assert result.exit_code == 0, result.output
    # 10 steps lower the fixed-draw loss to 0.83 of the untrained one (both pipelines)
    cfg = {"model": {"family": "qwen_image", "path": str(pipes[name])},
           "data": {"latents": str(data / "latents.safetensors"),
                    "conditioning": str(data / "conditioning.safetensors")},
           "training": {"steps": 10, "batch_size": 3, "dtype": "fp32", "seed": 0},
           "optimizer": {"lr": 0.02}, "adapter": {"rank": 4, "alpha": 4, "dtype": "fp32"},
           "output": {"dir": str(tmp_path / "out"), "name": "lora", "plot": False}}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    result = runner.invoke(cli, ["train", str(tmp_path / "train.yaml"), "-q"])
    assert result.exit_code == 0, result.output
    lora = tmp_path / "out" / "lora.safetensors"
    host = build_plugin_manager()
    conf, base = resolve_config(tmp_path / "train.yaml", host,
                                overrides=[f"adapter.existing={lora}"])
    engine = build_pipeline(conf, host, base_dir=base)
    try:
        assert "reference" in engine.dataset.batch(torch.arange(1))[1]
        trained = tp.fixed_draw_loss(engine)
        engine.network.set_multiplier(0.0)
        untouched = tp.fixed_draw_loss(engine)
    finally:
        engine.close()
    assert trained < untouched * 0.97, (trained, untouched)

    result = runner.invoke(cli, ["sample", "--model", str(pipes[name]), "--prompts",
                                 str(data / "conditioning.safetensors"), "--lora", str(lora),
                                 "--out", str(tmp_path / "s"), "--steps", "2", "--size",
                                 "4", "4"])
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "s" / "image_0_0.png").size == (32, 32)

    # the same file in the diffusers edit pipeline itself, from the same seed
    pipe = _pipeline(pipes[name])
    picture = Image.open(refs / "image_00.png").convert("RGB")
    call = dict(image=picture, prompt="a red square", num_inference_steps=2, height=32,
                width=32, output_type="np")
    before = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(str(lora))
    after = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert np.isfinite(after).all() and np.abs(after - before).max() > 0
    assert json.loads((pipes[name] / "model_index.json").read_text())["_class_name"] == \
        tp.EDIT_FAMILIES[name]
