"""``loraengine inspect`` describes a LoRA file."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import loraengine
from loraengine.cli.main import cli


def test_inspect_reports_what_was_trained(unet_config):
    result = loraengine.train(unet_config)
    out = CliRunner().invoke(cli, ["inspect", "--json", str(result.path)])
    assert out.exit_code == 0, out.output
    info = json.loads(out.output)
    n_modules = sum(1 for k in result.lora if k.endswith(".alpha"))
    params = sum(v.numel() for k, v in result.lora.items() if not k.endswith(".alpha"))
    assert info["algorithm"] == "lora"
    assert (info["rank"], info["alpha"]) == ("4", "2")
    assert info["modules"] == n_modules > 10
    assert info["parameters"] == params
    assert info["steps"] == 3
    text = CliRunner().invoke(cli, ["inspect", str(result.path)])
    assert "algorithm:   lora" in text.output and f"{params:,}" in text.output


def test_inspect_a_foreign_file_without_metadata(tmp_path):
    path = tmp_path / "other_steps_120_.safetensors"
    save_file({"lora_unet_a.lora_down.weight": torch.zeros(2, 5),
               "lora_unet_a.lora_up.weight": torch.zeros(3, 2),
               "lora_unet_a.alpha": torch.tensor(1.0)}, str(path))
    info = json.loads(CliRunner().invoke(cli, ["inspect", "--json", str(path)]).output)
    assert (info["algorithm"], info["rank"], info["alpha"], info["modules"], info["parameters"],
            info["steps"]) == ("lora", "2", "1", 1, 16, 120)


def test_inspect_a_bad_file_is_a_clean_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_text("nope")
    out = CliRunner().invoke(cli, ["inspect", str(bad)])
    assert out.exit_code == 1
    assert "bad.safetensors" in out.stderr and "Traceback" not in out.stderr


def test_inspect_names_the_algorithm_the_one_reader_chooses(tmp_path):
    """Without metadata a module's algorithm is the one ``apply`` would load it as: a
    BOFT file's 4-D ``oft_blocks`` read as BOFT, PEFT's lora_A/lora_B as LoRA."""
    boft = tmp_path / "boft.safetensors"
    save_file({"lora_unet_a.oft_blocks": torch.zeros(1, 2, 4, 4),
               "lora_unet_a.alpha": torch.tensor(0.0)}, str(boft))
    peft = tmp_path / "peft.safetensors"
    save_file({"transformer.blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 5),
               "transformer.blocks.0.attn.to_q.lora_B.weight": torch.zeros(3, 2),
               "transformer.blocks.0.attn.to_k.lora_A.weight": torch.zeros(2, 5),
               "transformer.blocks.0.attn.to_k.lora_B.weight": torch.zeros(3, 2)}, str(peft))
    got = {p.name: json.loads(CliRunner().invoke(cli, ["inspect", "--json", str(p)]).output)
           for p in (boft, peft)}
    assert got["boft.safetensors"]["algorithm"] == "boft"
    assert (got["peft.safetensors"]["algorithm"], got["peft.safetensors"]["modules"],
            got["peft.safetensors"]["rank"]) == ("lora", 2, "2")


def test_inspect_a_models_own_weights_says_it_is_not_an_adapter(tmp_path, unet_dir):
    """A model's weights hold bias-less layers whose only tensor is ``weight``: IA3's key
    name. Asked with the tensors, IA3 refuses a weight that is not one vector, so the
    file is reported as no adapter at all (it used to read as 116 IA3 modules)."""
    weights = unet_dir / "unet" / "diffusion_pytorch_model.safetensors"
    out = CliRunner().invoke(cli, ["inspect", str(weights)])
    assert out.exit_code == 1 and "Traceback" not in out.output
    assert "no installed adapter algorithm claims its tensors" in out.output
    assert len(out.output.strip().splitlines()) == 1


def test_an_ia3_vector_file_is_still_ia3(tmp_path):
    path = tmp_path / "ia3.safetensors"
    save_file({"lora_unet_mid_block_attentions_0_proj_in.weight": torch.ones(16),
               "lora_unet_down_blocks_0_attentions_0_proj_out.weight": torch.ones(8)},
              str(path))
    info = json.loads(CliRunner().invoke(cli, ["inspect", "--json", str(path)]).output)
    assert info["algorithm"] == "ia3" and info["modules"] == 2
