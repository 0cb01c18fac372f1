"""``loraengine sample`` with hostile inputs: prompt files that are not UTF-8 text, text
prompts for a pipeline without its text encoders, an ``--out`` that is a file or holds
an earlier sample; each one line, before rendering."""

from __future__ import annotations

import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from loraengine.cli.main import cli
from loraengine.testing.harness import one_error_line
from loraengine.testing.models import tiny_conditioning


def _run(*args):
    return CliRunner().invoke(cli, list(args))



def test_prompts_that_are_not_utf8_name_the_file_offset_and_line(tmp_path):
    prompts = tmp_path / "p.txt"
    raw = b"a red square\nun caf" + b"\xe9" + b" noir\n"
    prompts.write_bytes(raw)
    line = one_error_line(_run("sample", "--model", str(tmp_path / "no-model"), "--prompts",
                           str(prompts), "--out", str(tmp_path / "o")), 1)
    offset = raw.index(b"\xe9")
    assert line == (f"error: --prompts {prompts}: not UTF-8 text (byte 0xe9 at offset "
                    f"{offset}, line 2)")
    assert not (tmp_path / "o").exists()


def test_negative_prompts_are_checked_too_and_binary_files_are_refused(tmp_path):
    good = tmp_path / "p.txt"
    good.write_text("a cat\n")
    neg = tmp_path / "n.txt"
    neg.write_bytes(b"blurry\nugly\x00\x01\x02")
    line = one_error_line(_run("sample", "--model", str(tmp_path / "m"), "--prompts", str(good),
                           "--negative", str(neg), "--out", str(tmp_path / "o")), 1)
    assert line == f"error: --negative {neg}: a NUL character at line 2 (not a text file?)"
    folder = tmp_path / "folder.txt"
    folder.mkdir()
    line = one_error_line(_run("sample", "--model", str(tmp_path / "m"), "--prompts",
                           str(folder), "--out", str(tmp_path / "o")), 1)
    assert line == f"error: --prompts {folder}: not a regular file"


def test_an_out_that_is_a_file_is_refused_before_the_model_loads(tmp_path):
    out = tmp_path / "result.png"
    out.write_bytes(b"keep me")
    prompts = tmp_path / "p.txt"
    prompts.write_text("x\n")
    # the model does not exist: the --out check comes first, before any loading
    line = one_error_line(_run("sample", "--model", str(tmp_path / "no-model"), "--prompts",
                           str(prompts), "--out", str(out)), 2)
    assert line.startswith(f"error: --out {out}: exists and is not a folder")
    assert out.read_bytes() == b"keep me"
    under = out / "sub"
    line = one_error_line(_run("sample", "--model", str(tmp_path / "no-model"), "--prompts",
                           str(prompts), "--out", str(under)), 2)
    assert line == f"error: --out {under}: {out} is a file, so the folder cannot be made"


def test_an_earlier_sample_is_kept_unless_overwrite(tmp_path, unet_dir):
    prompts = tmp_path / "prompts.safetensors"
    save_file({"cond": tiny_conditioning(1, dim=16, seed=4)}, str(prompts))
    out = tmp_path / "o"
    common = ["sample", "--model", str(unet_dir), "--prompts", str(prompts), "--steps", "2",
              "--out", str(out)]
    first = _run(*common, "--seed", "1")
    assert first.exit_code == 0, first.output
    grid = (out / "grid.png").read_bytes()
    line = one_error_line(_run(*common, "--seed", "2"), 2)
    assert line == (f"error: --out {out}: holds the images of an earlier sample (grid.png, "
                    f"image_0_0.png); add --overwrite to replace them, or give another "
                    f"folder")
    assert (out / "grid.png").read_bytes() == grid
    again = _run(*common, "--seed", "2", "--overwrite")
    assert again.exit_code == 0, again.output
    assert (out / "grid.png").read_bytes() != grid  # another seed, another picture


def test_a_device_that_is_not_here_names_the_option(tmp_path, tiny_unet_dir):
    prompts = tmp_path / "p.safetensors"
    save_file({"cond": tiny_conditioning(1)}, str(prompts))
    cases = [("bogus", "unknown device 'bogus'")]
    if not torch.cuda.is_available():
        cases.append(("cuda:7", "'cuda:7' requested but CUDA is not available"))
    for device, why in cases:
        line = one_error_line(_run("sample", "--model", str(tiny_unet_dir), "--prompts",
                                   str(prompts), "--out", str(tmp_path / "o"), "--device",
                                   device), 2)
        assert line == f"error: --device: {why}"
    assert not (tmp_path / "o").exists()


def _refuse_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("loraengine.tools.sample.logic.load_model_for_sampling", refuse)


def test_text_prompts_without_the_text_encoders_name_the_folders(tmp_path, unet_dir,
                                                                 monkeypatch):
    """The tiny pipeline folder has a UNet and a scheduler only: text prompts are one
    line naming the missing folders and the conditioning file to give instead, before
    the model loads (not diffusers' complaint about the components it was not passed)."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square\n")
    cond = tmp_path / "c.safetensors"
    save_file({"cond": tiny_conditioning(1, dim=16)}, str(cond))
    with monkeypatch.context() as m:
        _refuse_loading(m)
        for model in (unet_dir, unet_dir / "unet"):  # the pipeline or its model folder
            line = one_error_line(_run("sample", "--model", str(model), "--prompts",
                                       str(prompts), "--out", str(tmp_path / "o")), 2)
            assert line == (f"error: --prompts: p.txt holds text prompts, which need the "
                            f"model's text encoders, but {unet_dir} has no text_encoder/, "
                            f"tokenizer/; give --prompts a conditioning .safetensors instead "
                            f"(loraengine prepare writes one with a pipeline folder that has "
                            f"them)")
        line = one_error_line(_run("sample", "--model", str(unet_dir), "--prompts", str(cond),
                                   "--negative", str(prompts), "--out", str(tmp_path / "o")), 2)
        assert line.startswith("error: --negative: p.txt holds text prompts") and \
            "give --negative a conditioning .safetensors" in line
    # a training config as --model: known once loaded, and said the same way
    config = tmp_path / "run.yaml"
    config.write_text(f"model:\n  family: sd15\n  path: {unet_dir}\n")
    line = one_error_line(_run("sample", "--model", str(config), "--prompts", str(prompts),
                               "--out", str(tmp_path / "o")), 2)
    assert line.startswith("error: --prompts: p.txt holds text prompts, which need the "
                           f"model's text encoders, but {unet_dir} has no text_encoder/")


def test_only_the_text_components_a_pipeline_lists_are_needed(tmp_path):
    """An SDXL refiner saves its first text encoder as null: only the second and its
    tokenizer are needed; a folder holding those needs nothing more."""
    import json

    from loraengine.tools.sample.logic import missing_text_components

    root = tmp_path / "refiner"
    root.mkdir()
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLImg2ImgPipeline",
        "text_encoder": [None, None], "tokenizer": [None, None],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"]}))
    assert missing_text_components(root) == ["text_encoder_2", "tokenizer_2"]
    (root / "text_encoder_2").mkdir()
    (root / "tokenizer_2").mkdir()
    assert missing_text_components(root) == []
