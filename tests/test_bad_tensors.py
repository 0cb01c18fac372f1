"""Bad training data is refused before the first step: rank, channels, dtype, empty
dimensions, conditioning width and NaN/inf of latents and conditioning against what the
model family states, and files that are not regular files. Each case goes through
``loraengine train``: exit 1, one line naming the file and tensor, no traceback, and
what the output folder held before is untouched."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import save_file

from loraengine.cli.main import cli
from loraengine.core.data import DataExpectations, DataWarning, make_dataset, read_safetensors
from loraengine.core.errors import DataError

Tensors = Callable[[], dict[str, torch.Tensor]]


def _with(shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
          at: tuple[int, ...] | None = None, value: float = float("nan")) -> torch.Tensor:
    """A random tensor (ones for integer/bool dtypes) with ``value`` put at ``at``."""
    t = torch.randn(shape) if dtype.is_floating_point else torch.ones(shape)
    if at is not None:
        t[at] = value
    return t.to(dtype)


def lat(*shape: int, **kw) -> Tensors:
    return lambda: {"latents": _with(shape, **kw)}


def cond(*shape: int, **kw) -> Tensors:
    return lambda: {"cond": _with(shape, **kw)}


NAN, INF = float("nan"), float("inf")

#: (latents tensors, needles the error line must hold besides the file name).
#: The tiny UNet takes [N,4,H,W] latents and a 16-wide cross-attention context; the
#: good data is 6 samples.
BAD_LATENTS: dict[str, tuple[Tensors, tuple[str, ...]]] = {
    "5-D for an image model": (lat(6, 4, 2, 8, 8), ("5-D", "4-D latents", "[6, 4, 2, 8, 8]")),
    "8 channels for 4": (lat(6, 8, 8, 8), ("'latents'", "8 channels", "takes 4")),
    "3 channels for 4": (lat(6, 3, 8, 8), ("3 channels", "takes 4")),
    "1 channel": (lat(6, 1, 8, 8), ("1 channels", "takes 4")),
    "H = 0": (lat(6, 4, 0, 8), ("empty dimension", "[6, 4, 0, 8]")),
    "W = 0": (lat(6, 4, 8, 0), ("empty dimension", "[6, 4, 8, 0]")),
    "C = 0": (lat(6, 0, 8, 8), ("empty dimension",)),
    "no samples": (lat(0, 4, 8, 8), ("holds no samples",)),
    "int64": (lat(6, 4, 8, 8, dtype=torch.int64), ("floating point", "int64")),
    "uint8": (lat(6, 4, 8, 8, dtype=torch.uint8), ("floating point", "uint8")),
    "bool": (lat(6, 4, 8, 8, dtype=torch.bool), ("floating point", "bool")),
    "2-D": (lat(6, 64), ("must be [N,C,H,W]", "[6, 64]")),
    "3-D": (lat(4, 8, 8), ("must be [N,C,H,W]", "[4, 8, 8]")),
    "6-D": (lat(6, 4, 1, 1, 8, 8), ("must be [N,C,H,W]",)),
    "NaN in sample 3": (lat(6, 4, 8, 8, at=(3, 1, 2, 2)), ("'latents' sample 3", "NaN or inf",
                                                           "data.allow_nonfinite")),
    "+inf in sample 0": (lat(6, 4, 8, 8, at=(0, 0, 0, 0), value=INF), ("sample 0", "NaN or inf")),
    "-inf in sample 5": (lat(6, 4, 8, 8, at=(5, 3, 7, 7), value=-INF), ("sample 5",)),
    "NaN in fp16": (lat(6, 4, 8, 8, dtype=torch.float16, at=(2,)), ("sample 2",)),
    "NaN in bf16": (lat(6, 4, 8, 8, dtype=torch.bfloat16, at=(4, 0)), ("sample 4",)),
    "inf in fp64": (lat(6, 4, 8, 8, dtype=torch.float64, at=(1, 2), value=INF), ("sample 1",)),
    "NaN in several, first named": (
        lambda: {"latents": _with((6, 4, 8, 8), at=(4,)).index_fill_(0, torch.tensor([2]), NAN)},
        ("sample 2",)),
    "wrong tensor name": (lambda: {"x": torch.randn(6, 4, 8, 8)}, ("no tensor named 'latents'",)),
}

BAD_CONDITIONING: dict[str, tuple[Tensors, tuple[str, ...]]] = {
    "width 8 for 16": (cond(6, 3, 8), ("'cond'", "8 wide", "takes 16")),
    "width 32 for 16": (cond(6, 3, 32), ("32 wide", "takes 16")),
    "one shared entry, wrong width": (cond(1, 3, 4), ("4 wide",)),
    "int64": (cond(6, 3, 16, dtype=torch.int64), ("'cond' must be floating point", "int64")),
    "int32": (cond(6, 3, 16, dtype=torch.int32), ("floating point", "int32")),
    "bool": (cond(6, 3, 16, dtype=torch.bool), ("floating point", "bool")),
    "L = 0": (cond(6, 0, 16), ("empty dimension", "[6, 0, 16]")),
    "D = 0": (cond(6, 3, 0), ("empty dimension",)),
    "4-D": (cond(6, 1, 3, 16), ("must be [N,L,D]", "[6, 1, 3, 16]")),
    "1-D": (cond(16), ("must be [N,L,D]", "[16]")),
    "NaN in sample 2": (cond(6, 3, 16, at=(2, 0, 5)), ("'cond' sample 2", "NaN or inf")),
    "inf in the shared entry": (cond(1, 3, 16, at=(0, 1, 1), value=INF), ("sample 0",)),
    "-inf in fp16": (cond(6, 3, 16, dtype=torch.float16, at=(5,), value=-INF), ("sample 5",)),
    "count mismatch": (cond(4, 3, 16), ("has 4 entries but there are 6 latents",)),
    "no cond tensor": (lambda: {"pooled": torch.randn(6, 16)}, ("no tensor named 'cond'",)),
}


def write_config(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture
def run_cfg(tmp_path: Path, unet_config: dict) -> dict:
    """The tiny UNet config writing into ``out/``, which already holds a previous run."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "prev.safetensors").write_bytes(b"previous good LoRA")
    (out / "prev.loss.json").write_bytes(b'{"loss": [1.0]}')
    unet_config["output"] = {"dir": str(out), "name": "prev", "plot": False}
    return unet_config


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def train_fails(tmp_path: Path, cfg: dict, *needles: str, code: int = 1) -> str:
    """Train ``cfg`` through the CLI; assert it fails with one ``error:`` line holding
    every needle, no traceback and the output folder as it was. Returns the line."""
    out = Path(cfg["output"]["dir"])
    before = snapshot(out)
    result = CliRunner().invoke(cli, ["train", "-q", str(write_config(tmp_path, cfg))])
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert snapshot(out) == before
    return lines[0]


@pytest.mark.parametrize("case", list(BAD_LATENTS))
def test_bad_latents_are_one_line_naming_file_and_tensor(tmp_path, run_cfg, case):
    make, needles = BAD_LATENTS[case]
    path = tmp_path / "bad_latents.safetensors"
    save_file(make(), str(path))
    run_cfg["data"]["latents"] = str(path)
    train_fails(tmp_path, run_cfg, str(path), *needles)


@pytest.mark.parametrize("case", list(BAD_CONDITIONING))
def test_bad_conditioning_is_one_line_naming_file_and_tensor(tmp_path, run_cfg, case):
    make, needles = BAD_CONDITIONING[case]
    path = tmp_path / "bad_cond.safetensors"
    save_file(make(), str(path))
    run_cfg["data"]["conditioning"] = str(path)
    train_fails(tmp_path, run_cfg, str(path), *needles)


@pytest.mark.parametrize("kind", ["latents", "conditioning"])
@pytest.mark.parametrize("case", ["8 channels / width 8", "NaN"])
def test_bad_validation_data_is_refused_before_training(tmp_path, run_cfg, data_files, kind,
                                                        case):
    lat_path, cond_path = data_files
    bad = tmp_path / "val_bad.safetensors"
    if kind == "latents":
        save_file(lat(6, 8, 8, 8)() if case != "NaN" else lat(6, 4, 8, 8, at=(1,))(), str(bad))
        val = {"latents": str(bad), "conditioning": str(cond_path)}
    else:
        save_file(cond(6, 3, 8)() if case != "NaN" else cond(6, 3, 16, at=(1,))(), str(bad))
        val = {"latents": str(lat_path), "conditioning": str(bad)}
    run_cfg["data"]["validation"] = val
    train_fails(tmp_path, run_cfg, str(bad),
                "sample 1" if case == "NaN" else ("8 channels" if kind == "latents" else "8 wide"))


def _buckets(tmp_path: Path, lat1: torch.Tensor, cond0: torch.Tensor) -> tuple[Path, Path]:
    lp, cp = tmp_path / "bucket_lat.safetensors", tmp_path / "bucket_cond.safetensors"
    save_file({"latents.0": torch.randn(3, 4, 8, 8), "latents.1": lat1}, str(lp))
    save_file({"cond.0": cond0, "cond.1": torch.randn(2, 3, 16)}, str(cp))
    return lp, cp


@pytest.mark.parametrize("case", ["channels in bucket 1", "NaN in bucket 0's cond",
                                  "width in bucket 0"])
def test_bucketed_data_names_the_bucket(tmp_path, run_cfg, case):
    lat1, cond0 = torch.randn(2, 4, 8, 12), torch.randn(3, 3, 16)
    if case == "channels in bucket 1":
        lat1, needles = torch.randn(2, 8, 8, 12), ("(latents.1)", "8 channels")
    elif case == "width in bucket 0":
        cond0, needles = torch.randn(3, 3, 8), ("(bucket 0)", "8 wide")
    else:
        cond0[1, 0, 0] = NAN
        needles = ("(bucket 0)", "'cond' sample 1")
    lp, cp = _buckets(tmp_path, lat1, cond0)
    run_cfg["data"] = {"latents": str(lp), "conditioning": str(cp), "bucket_mode": True}
    train_fails(tmp_path, run_cfg, *needles)


# -- files that are not safetensors files ----------------------------------------------

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")


@needs_fifo
@pytest.mark.parametrize("key", ["latents", "conditioning", "validation latents"])
def test_a_fifo_is_refused_without_being_opened(tmp_path, run_cfg, data_files, key):
    """Opening a FIFO nobody writes to blocks forever; it is refused from its stat."""
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    if key == "validation latents":
        run_cfg["data"]["validation"] = {"latents": str(fifo),
                                         "conditioning": str(data_files[1])}
    else:
        run_cfg["data"][key] = str(fifo)
    train_fails(tmp_path, run_cfg, str(fifo), "FIFO", "not a safetensors file")


@pytest.mark.skipif(sys.platform == "win32" or not Path("/dev/zero").exists(),
                    reason="no /dev/zero")
@pytest.mark.parametrize("device", ["/dev/null", "/dev/zero"])
def test_a_device_is_refused(tmp_path, run_cfg, device):
    run_cfg["data"]["conditioning"] = device
    train_fails(tmp_path, run_cfg, device, "character device")


@pytest.mark.parametrize("case", ["folder", "missing", "empty", "truncated", "junk"])
def test_unreadable_files_are_one_line(tmp_path, run_cfg, data_files, case):
    path = tmp_path / "broken.safetensors"
    needles = {"folder": "is a folder", "missing": "not found", "empty": "not a readable",
               "truncated": "not a readable", "junk": "not a readable"}[case]
    if case == "folder":
        path.mkdir()
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        path.write_bytes(data_files[0].read_bytes()[:200])
    elif case == "junk":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    run_cfg["data"]["latents"] = str(path)
    train_fails(tmp_path, run_cfg, str(path), needles)


def test_a_nul_byte_in_a_path_is_a_data_error():
    with pytest.raises(DataError, match="^latents: cannot read .*: embedded null byte$"):
        read_safetensors(Path("lat\0ents.safetensors"), "latents")


# -- data.allow_nonfinite ----------------------------------------------------------------

def test_allow_nonfinite_skips_exactly_the_bad_samples():
    latents, conditioning = torch.randn(6, 4, 8, 8), torch.randn(6, 3, 16)
    latents[1, 0, 0, 0] = NAN
    conditioning[4, 2, 3] = INF
    expect = DataExpectations(latent_ndim=4, latent_channels=4, cond_widths={"cond": 16},
                              allow_nonfinite=True)
    with pytest.warns(DataWarning, match="skipped 2 of 6 samples.*first is sample 1"):
        ds = make_dataset(latents, conditioning, expect=expect)
    keep = [0, 2, 3, 5]
    assert len(ds) == 4
    assert torch.equal(ds.latents, latents[keep])
    assert torch.equal(ds.cond["cond"], conditioning[keep])


def test_a_bad_shared_conditioning_entry_leaves_nothing_to_train_on():
    expect = DataExpectations(allow_nonfinite=True)
    shared = torch.randn(1, 3, 16)
    shared[0, 0, 0] = NAN
    with pytest.raises(DataError, match="every one of the 6 samples"):
        make_dataset(torch.randn(6, 4, 8, 8), shared, expect=expect)


def test_allow_nonfinite_trains_on_the_rest_through_the_cli(tmp_path, run_cfg):
    path = tmp_path / "some_nan.safetensors"
    save_file(lat(6, 4, 8, 8, at=(2, 0, 1, 1))(), str(path))
    run_cfg["data"].update({"latents": str(path), "allow_nonfinite": True})
    with pytest.warns(DataWarning, match="skipped 1 of 6 samples.*first is sample 2"):
        result = CliRunner().invoke(cli, ["train", "-q", str(write_config(tmp_path, run_cfg))])
    assert result.exit_code == 0, result.output
    out = Path(run_cfg["output"]["dir"])
    assert (out / "prev.safetensors").read_bytes() != b"previous good LoRA"  # trained


def test_allow_nonfinite_with_every_sample_bad_is_one_line(tmp_path, run_cfg):
    path = tmp_path / "all_nan.safetensors"
    save_file({"latents": torch.full((6, 4, 8, 8), NAN)}, str(path))
    run_cfg["data"].update({"latents": str(path), "allow_nonfinite": True})
    train_fails(tmp_path, run_cfg, str(path), "every one of the 6 samples")


def test_a_bucket_of_only_bad_samples_is_left_out(tmp_path):
    from loraengine.core.data import make_bucketed_dataset

    lat = {"latents.0": torch.full((2, 4, 8, 8), NAN), "latents.1": torch.randn(3, 4, 8, 12)}
    cnd = {"cond.0": torch.randn(2, 3, 16), "cond.1": torch.randn(3, 3, 16)}
    with pytest.warns(DataWarning, match="bucket 0 is skipped"):
        ds = make_bucketed_dataset(lat, cnd, expect=DataExpectations(allow_nonfinite=True))
    assert len(ds) == 3 and len(ds.buckets) == 1
    assert torch.equal(ds.buckets[0].latents, lat["latents.1"])


# -- what each family says it takes ------------------------------------------------------

@pytest.fixture(scope="module")
def pipes(tmp_path_factory) -> dict[str, Path]:
    from loraengine.testing import tiny_pipelines as tp

    root = tmp_path_factory.mktemp("expect_pipes")
    return {fam: tp.save(fam, root / fam) for fam in tp.FAMILIES}


#: From the tiny pipelines' own constructors (loraengine.testing.tiny_pipelines): the
#: UNets' cross_attention_dim 32; SD3/Flux joint_attention_dim 32 and pooled 16; Flux's
#: in_channels 16 are 2×2 packs of 4 channels; every VAE has 4 latent channels.
EXPECTED = {"sd15": (4, {"cond": 32}), "sd2": (4, {"cond": 32}), "sdxl": (4, {"cond": 32}),
            "sd3": (4, {"cond": 32, "pooled": 16}), "flux": (4, {"cond": 32, "pooled": 16})}


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_each_family_states_what_its_denoiser_takes(pipes, family):
    from loraengine.plugins import build_plugin_manager

    spec = build_plugin_manager().registry.get("model", family)
    loaded = spec.load(spec.config_model(path=pipes[family]), {"base_dir": None,
                                                               "module": None})
    assert (loaded.latent_ndim, loaded.latent_channels, loaded.cond_widths) == (
        4, *EXPECTED[family])


def test_the_module_family_leaves_everything_unchecked():
    from loraengine.plugins import build_plugin_manager
    from loraengine.testing.models import TinyDenoiser

    spec = build_plugin_manager().registry.get("model", "module")
    loaded = spec.load(spec.config_model(), {"base_dir": None, "module": TinyDenoiser()})
    assert (loaded.latent_ndim, loaded.latent_channels, loaded.cond_widths) == (None, None, {})
