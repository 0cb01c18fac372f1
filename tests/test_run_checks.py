"""Settings that run but do not do what they say are reported (issue 15, item 6):
``adapter.rank`` beside an ``adapter.existing`` of another rank (the file's rank is
kept), and a batch larger than the data (each batch repeats samples)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from loraengine.cli.main import cli
from loraengine.testing.harness import tiny_data, train_tiny


def _rank_file(host, tmp_path: Path, rank: int) -> Path:
    result = train_tiny(host, {"adapter": {"rank": rank},
                               "output": {"dir": str(tmp_path), "name": "r", "plot": False}},
                        write_files=True)
    return Path(result.path)


def test_a_rank_beside_an_existing_file_of_another_rank_warns_and_the_file_wins(host, tmp_path):
    existing = _rank_file(host, tmp_path, 8)
    with pytest.warns(UserWarning, match=r"adapter.rank: 16 is ignored .* hold rank 8") as rec:
        result = train_tiny(host, {"adapter": {"rank": 16, "existing": str(existing)}})
    assert str(existing) in str(rec[0].message)
    assert {v.shape[0] for k, v in result.lora.items() if k.endswith("lora_down.weight")} == {8}


def test_no_warning_when_the_ranks_agree(host, tmp_path):
    existing = _rank_file(host, tmp_path, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        train_tiny(host, {"adapter": {"rank": 8, "existing": str(existing)}})


def test_a_batch_larger_than_the_data_warns(host):
    with pytest.warns(UserWarning, match=r"training.batch_size: 64 is more than the 8 samples"):
        train_tiny(host, {"training": {"batch_size": 64}}, data=tiny_data(n=8))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        train_tiny(host, {"training": {"batch_size": 8}}, data=tiny_data(n=8))


def test_the_cli_prints_the_warnings_as_one_line_each(tmp_path, unet_config):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**unet_config, "training": {
        **unet_config["training"], "batch_size": 64, "steps": 1}}))
    out = CliRunner().invoke(cli, ["train", str(path), "--quiet"])
    assert out.exit_code == 0, out.output
    lines = [ln for ln in out.output.splitlines() if ln.startswith("warning:")]
    # this config adapts every layer of the UNet: the kohya exporter's consumer limit for
    # its conv_in, conv_out and time_embedding LoRAs is one line too
    assert lines == ["warning: training.batch_size: 64 is more than the 6 samples of the data; "
                     "each batch repeats samples (a batch of 6 sees the same data for less "
                     "compute)",
                     "warning: adapter.exporter: sd-scripts: LoRA outside the UNet blocks its "
                     "network adapts (conv_in, conv_out, time and label embeddings) is not "
                     "placed (4 layer(s), e.g. conv_in)"]
    assert "Traceback" not in out.output


def test_no_warning_when_rank_is_left_at_its_default(host, tmp_path):
    import loraengine
    from loraengine.testing.harness import tiny_train_config
    from loraengine.testing.models import TinyDenoiser

    existing = _rank_file(host, tmp_path, 4)
    config = tiny_train_config({"adapter": {"existing": str(existing)}})
    del config["adapter"]["rank"]  # the default (8) differs from the file's 4: no warning
    data = tiny_data()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        loraengine.train(config, model=TinyDenoiser(), latents=data.latents,
                         conditioning=data.conditioning, host=host)


def test_an_exporter_whose_consumer_cannot_hold_the_algorithm_warns(host):
    """IA3 for ComfyUI (it has no IA3) and LoHa for diffusers (it reads LoRA only): one
    warning naming the key, the consumer and the layers; LoRA for either: none."""
    with pytest.warns(UserWarning, match=r"adapter.exporter: ComfyUI has no IA3; .* \(\d+ "
                      r"layer\(s\)"):
        train_tiny(host, {"adapter": {"algorithm": "ia3", "exporter": "comfyui"}})
    with pytest.warns(UserWarning, match=r"adapter.exporter: diffusers reads only LoRA .*; "
                      r"\d+ layer\(s\) of loha"):
        train_tiny(host, {"adapter": {"algorithm": "loha", "exporter": "diffusers"}})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        train_tiny(host, {"adapter": {"algorithm": "lora", "exporter": "comfyui"}})
        train_tiny(host, {"adapter": {"algorithm": "lora", "exporter": "diffusers"}})
