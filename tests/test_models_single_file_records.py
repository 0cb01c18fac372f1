"""Single-file checkpoints of the 2026 families: Flux.2 dev and Klein, Qwen-Image,
Z-Image, HiDream-I1, Wan 2.1/2.2 and LTX-2, in their released layouts (ComfyUI's
``diffusion_models`` files; ``model.diffusion_model.`` names as in an all-in-one
checkpoint). diffusers' own converter is the judge of the layouts the tests write;
``loraengine train`` reads such a file with ``model.config`` bit for bit as the folder,
trains the same LoRA from it, and ``validate`` and ``plan`` take it. A file that does
not fit is one line naming what does not, and the model it looks made for."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from loraengine.cli.main import cli
from loraengine.core import build as orchestrator
from loraengine.core.errors import ConfigError, DataError
from loraengine.core.files import looks_like
from loraengine.plugins import build_plugin_manager
from loraengine.testing import tiny_pipelines as tp
from loraengine.testing import tiny_video as tv
from loraengine.testing.single_files import CHECKPOINT_PREFIX, to_single_file

#: tiny folder name -> model family
FAMILY = {"flux2": "flux2", "flux2_klein": "flux2", "qwen_image": "qwen_image",
          "z_image": "z_image", "hidream": "hidream", "wan": "wan", "ltx2": "ltx2"}
NAMES = tuple(FAMILY)
PREFIXES = ("", CHECKPOINT_PREFIX)
#: the layouts that rename diffusers' tensors (Qwen-Image's and HiDream's files use
#: diffusers' names)
RENAMED = ("flux2", "flux2_klein", "z_image", "wan", "ltx2")
#: stand-ins for the other parts of an all-in-one checkpoint (VAE, text encoder)
BUNDLED = ("first_stage_model.encoder.conv_in.weight",
           "cond_stage_model.transformer.shared.weight", "vae.decoder.conv_in.weight")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("single_file_records")
    out = {name: tp.save_denoiser(name, root / name)
           for name in ("flux2", "flux2_klein", "qwen_image", "z_image", "hidream")}
    out["ltx2"] = tv.save_video_denoiser("ltx2", root / "ltx2")
    out["wan"] = tv.save_video("wan", root / "wan")
    return out


@pytest.fixture
def offline(monkeypatch) -> None:
    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)


def _model(folder: Path, sub: str = "transformer") -> Any:
    import diffusers

    cfg = json.loads((folder / sub / "config.json").read_text())
    return getattr(diffusers, cfg["_class_name"]).from_pretrained(str(folder / sub))


def _write(model: Any, dest: Path, prefix: str = "", bundled: bool = False) -> Path:
    tensors = {k: v.contiguous() for k, v in to_single_file(model, prefix).items()}
    if bundled:
        tensors.update({key: torch.ones(2, 2) for key in BUNDLED})
    save_file(tensors, str(dest))
    return dest


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].device.type != "meta", key
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


def _load(name: str, context: dict[str, Any] | None = None, **options: Any) -> Any:
    host = build_plugin_manager()
    spec = host.registry.get("model", FAMILY[name])
    ctx = {"base_dir": None, "module": None,
           "looks_like": lambda names: looks_like(host.registry, names), **(context or {})}
    return spec.load(spec.config_model(**options), ctx)


# -- the layouts written, judged by diffusers' converter ---------------------------------

@pytest.mark.parametrize("prefix", PREFIXES, ids=("bare", "prefixed"))
@pytest.mark.parametrize("name", NAMES)
def test_the_written_layout_reads_back_exactly_through_diffusers(folders, tmp_path, offline,
                                                                 name, prefix):
    model = _model(folders[name])
    want = model.state_dict()
    tensors = to_single_file(model, prefix)
    if name in RENAMED:
        assert set(tensors) != set(want)  # really another layout
    assert sum(t.numel() for t in tensors.values()) == sum(t.numel() for t in want.values())
    # ComfyUI takes the checkpoint prefix off before reading the names; so does the judge
    bare = {k[len(prefix):]: v.contiguous().clone() for k, v in tensors.items()}
    got = type(model).from_single_file(bare, config=str(folders[name]),
                                       subfolder="transformer", local_files_only=True)
    _assert_same(got.state_dict(), want)


def test_a_few_released_names_and_reordered_rows():
    flux2 = tp.flux2_transformer()
    sd, out = flux2.state_dict(), to_single_file(flux2)
    qkv = out["double_blocks.0.img_attn.qkv.weight"]
    assert torch.equal(qkv, torch.cat([sd[f"transformer_blocks.0.attn.to_{x}.weight"]
                                       for x in "qkv"]))
    shift, scale = out["final_layer.adaLN_modulation.1.weight"].chunk(2)
    assert torch.equal(torch.cat([scale, shift]), sd["norm_out.linear.weight"])
    assert torch.equal(out["double_blocks.0.txt_attn.norm.key_norm.scale"],
                       sd["transformer_blocks.0.attn.norm_added_k.weight"])
    wan = tv.wan_transformer()
    sd, out = wan.state_dict(), to_single_file(wan, CHECKPOINT_PREFIX)
    p = CHECKPOINT_PREFIX
    assert torch.equal(out[p + "blocks.0.norm3.weight"], sd["blocks.0.norm2.weight"])
    assert torch.equal(out[p + "head.modulation"], sd["scale_shift_table"])
    assert p + "blocks.0.self_attn.q.weight" in out and p + "head.head.weight" in out
    ltx2 = to_single_file(tv.ltx2_transformer())
    assert "patchify_proj.weight" in ltx2 and "adaln_single.linear.weight" in ltx2
    assert "transformer_blocks.0.attn1.q_norm.weight" in ltx2
    z = to_single_file(tp.z_image_transformer())
    assert "layers.0.attention.qkv.weight" in z and "x_embedder.weight" in z


# -- loading through the family ----------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_the_family_loads_bare_and_all_in_one_files_exactly(folders, tmp_path, offline, name):
    model = _model(folders[name])
    want = model.state_dict()
    for prefix, bundled in (("", False), (CHECKPOINT_PREFIX, True)):
        ckpt = _write(model, tmp_path / f"m{len(prefix)}.safetensors", prefix, bundled)
        for config in (folders[name], folders[name] / "transformer"):
            loaded = _load(name, path=ckpt, config=config)
            _assert_same(loaded.module.state_dict(), want)
            assert loaded.single_file is True and loaded.source == str(ckpt)
    # in the training dtype straight away, as from a folder
    half = _load(name, {"dtype": torch.bfloat16}, path=ckpt, config=folders[name])
    _assert_same(half.module.state_dict(), {k: v.to(torch.bfloat16) if v.is_floating_point()
                                            else v for k, v in want.items()})


def test_a_wan_2_2_expert_reads_from_its_own_file(tmp_path, offline):
    pipe = tv.save_video("wan22", tmp_path / "wan22")
    low = _model(pipe, "transformer_2")
    ckpt = _write(low, tmp_path / "low_noise.safetensors")
    loaded = _load("wan", path=ckpt, config=pipe, subfolder="transformer_2")
    _assert_same(loaded.module.state_dict(), low.state_dict())
    # the other expert's config: the same shapes, so it loads; the weights are the file's
    other = _load("wan", path=ckpt, config=pipe / "transformer")
    _assert_same(other.module.state_dict(), low.state_dict())


# -- training from the file ------------------------------------------------------------------

def _data(name: str, folder: Path, n: int = 4) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(3)
    if name in ("wan", "ltx2"):
        channels = tv.LATENT_CHANNELS if name == "wan" else tv.VIDEO_DENOISERS[name][3]
        width = tv.TEXT_DIM if name == "wan" else tv.VIDEO_DENOISERS[name][4]
        lat = torch.randn(n, channels, 2, 4, 4, generator=g)
        cond = {"cond": torch.randn(n, 6, width, generator=g)}
        if name == "ltx2":
            cond["mask"] = torch.ones(n, 6, dtype=torch.long)
    else:
        _, _, _, channels, width = tp.DENOISERS[name]
        side = 4 if name.startswith("flux2") else 8
        lat = torch.randn(n, channels, side, side, generator=g)
        cond = {"cond": torch.randn(n, 7, width, generator=g)}
        if name == "hidream":
            cond["llama3"] = torch.randn(n, 2, 5, 16, generator=g)
            cond["pooled"] = torch.randn(n, 12, generator=g)
    save_file({"latents": lat}, str(folder / "latents.safetensors"))
    save_file(cond, str(folder / "conditioning.safetensors"))
    return folder / "latents.safetensors", folder / "conditioning.safetensors"


def _config(tmp_path: Path, name: str, model: dict[str, Any], out: str) -> Path:
    lat, cond = _data(name, tmp_path)
    cfg = {"model": {"family": FAMILY[name], **model},
           "data": {"latents": str(lat), "conditioning": str(cond)},
           "training": {"steps": 2, "batch_size": 2, "dtype": "fp32", "seed": 0},
           "optimizer": {"lr": 0.01},
           "adapter": {"rank": 4, "alpha": 2, "dtype": "fp32"},
           "memory": {"gradient_checkpointing": False},
           "output": {"dir": str(tmp_path / out), "name": name, "plot": False}}
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _spy_on_load(monkeypatch) -> list[dict[str, torch.Tensor]]:
    """A copy of every denoiser ``build_pipeline`` loads, as the family gives it."""
    seen: list[dict[str, torch.Tensor]] = []
    real: Callable[..., Any] = orchestrator.load_model

    def spy(*args: Any, **kwargs: Any) -> Any:
        loaded = real(*args, **kwargs)
        seen.append({k: v.detach().clone() for k, v in loaded.module.state_dict().items()})
        return loaded

    monkeypatch.setattr(orchestrator, "load_model", spy)
    return seen


#: the layout each family's training run reads: as released (LTX-2's release is an
#: all-in-one checkpoint) or as a ComfyUI "Save Checkpoint" writes it
TRAIN_LAYOUT = {"flux2": "", "flux2_klein": CHECKPOINT_PREFIX, "qwen_image": "",
                "z_image": CHECKPOINT_PREFIX, "hidream": "", "wan": "",
                "ltx2": CHECKPOINT_PREFIX}


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_training_from_the_file_writes_the_lora_the_folder_does(folders, tmp_path,
                                                                monkeypatch, offline, name):
    folder = folders[name]
    model = _model(folder)
    prefix = TRAIN_LAYOUT[name]
    ckpt = _write(model, tmp_path / "model.safetensors", prefix, bundled=bool(prefix))
    seen = _spy_on_load(monkeypatch)
    runs = {}
    for kind, options in (("folder", {"path": str(folder)}),
                          ("file", {"path": str(ckpt), "config": str(folder)})):
        cfg = _config(tmp_path, name, options, kind)
        result = CliRunner().invoke(cli, ["train", str(cfg), "-q"])
        assert result.exit_code == 0, result.output
        runs[kind] = load_file(str(tmp_path / kind / f"{name}.safetensors"))
    assert len(seen) == 2
    _assert_same(seen[1], seen[0])
    _assert_same(seen[1], model.state_dict())
    _assert_same(runs["file"], runs["folder"])
    assert any(t.abs().sum() > 0 for k, t in runs["file"].items() if "up" in k or "B" in k)


def test_a_quantized_base_read_from_the_file_trains_as_from_the_folder(folders, tmp_path,
                                                                       offline):
    """``model.quantize`` on a base read from the file trains the same LoRA bit for bit
    as from the folder; the loader hands each module to the strategies' ``prepare`` as
    its tensors arrive (weights in place, not on ``meta``)."""
    folder = folders["flux2"]
    model = _model(folder)
    ckpt = _write(model, tmp_path / "model.safetensors", CHECKPOINT_PREFIX)
    arrived: dict[str, bool] = {}

    def prepare(path: str, module: torch.nn.Module) -> None:
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            arrived[path] = arrived.get(path, True) and weight.device.type != "meta"

    _load("flux2", {"prepare": prepare}, path=ckpt, config=folder)
    linears = {p for p, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears <= set(arrived) and all(arrived.values())
    runs = {}
    for kind, options in (("folder", {"path": str(folder)}),
                          ("file", {"path": str(ckpt), "config": str(folder)})):
        cfg = _config(tmp_path, "flux2", {**options, "quantize": "int8"}, kind)
        data = yaml.safe_load(cfg.read_text())
        data["memory"]["bypass_mode"] = True
        cfg.write_text(yaml.safe_dump(data))
        result = CliRunner().invoke(cli, ["train", str(cfg), "-q"])
        assert result.exit_code == 0, result.output
        runs[kind] = load_file(str(tmp_path / kind / "flux2.safetensors"))
    _assert_same(runs["file"], runs["folder"])


def test_validate_takes_the_single_file_and_reads_only_its_header(folders, tmp_path,
                                                                   monkeypatch, offline):
    from safetensors import safe_open

    ckpt = _write(_model(folders["flux2"]), tmp_path / "flux2.safetensors")
    cfg = _config(tmp_path, "flux2", {"path": str(ckpt), "config": str(folders["flux2"])},
                  "run")
    real_open = safe_open

    class HeaderOnly:  # safe_open with get_tensor refused
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.inner = real_open(*args, **kwargs)

        def __enter__(self) -> Any:
            inner = self.inner.__enter__()

            class View:
                keys = inner.keys
                get_slice = inner.get_slice

                def get_tensor(self, name: str) -> Any:
                    raise AssertionError(f"validate read tensor {name}")

            return View()

        def __exit__(self, *exc: Any) -> Any:
            return self.inner.__exit__(*exc)

    import safetensors

    monkeypatch.setattr(safetensors, "safe_open", HeaderOnly)
    checked = CliRunner().invoke(cli, ["validate", str(cfg)])
    assert checked.exit_code == 0, checked.output
    assert f"{cfg}: ok" in checked.output
    # Wan is checked from the file's header too (it was not checkable before)
    wan = _write(_model(folders["wan"]), tmp_path / "wan.safetensors")
    cfg = _config(tmp_path, "wan", {"path": str(wan), "config": str(folders["wan"])}, "wan")
    checked = CliRunner().invoke(cli, ["validate", str(cfg)])
    assert checked.exit_code == 0, checked.output
    assert "cannot be checked without loading" not in checked.output


@pytest.mark.slow
def test_plan_takes_the_single_file(folders, tmp_path, offline):
    ckpt = _write(_model(folders["flux2"]), tmp_path / "flux2.safetensors")
    by_file = _config(tmp_path, "flux2",
                      {"path": str(ckpt), "config": str(folders["flux2"])}, "file")
    by_folder = _config(tmp_path, "flux2", {"path": str(folders["flux2"])}, "folder")
    plans = []
    for cfg in (by_file, by_folder):
        planned = CliRunner().invoke(cli, ["plan", str(cfg), "--json"])
        assert planned.exit_code == 0, planned.output
        plans.append(json.loads(planned.output[planned.output.index("{"):]))
    assert plans[0]["peak"] > 0
    keys = ("weights_device", "adapter", "optimizer_state", "gradients", "peak")
    assert [plans[0][k] for k in keys] == [plans[1][k] for k in keys]


# -- files that do not fit -------------------------------------------------------------------

#: (family's folder, file written from) -> the model the message names
WRONG = [("flux2", "wan", "a Wan 2.x transformer"),
         ("wan", "flux2", "a Flux.2 transformer"),
         ("qwen_image", "ltx2", "an LTX-2 transformer"),
         ("ltx2", "qwen_image", "a Qwen-Image transformer"),
         ("z_image", "hidream", "a HiDream-I1 transformer")]


@pytest.mark.parametrize("name, other, made_for", WRONG)
def test_another_familys_file_names_the_family_it_looks_made_for(folders, tmp_path, name,
                                                                 other, made_for):
    ckpt = _write(_model(folders[other]), tmp_path / f"{other}.safetensors")
    with pytest.raises(DataError) as err:
        _load(name, path=ckpt, config=folders[name])
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"model.path: {ckpt} does not hold the ")
    assert "tensors are not in it" in line and line.endswith(f"looks made for {made_for}")


def test_wrong_files_through_the_cli_are_one_line_from_validate_and_train(folders, tmp_path):
    wan = _write(_model(folders["wan"]), tmp_path / "wan.safetensors")
    cfg = _config(tmp_path, "flux2", {"path": str(wan), "config": str(folders["flux2"])},
                  "run")
    trained = CliRunner().invoke(cli, ["train", str(cfg), "-q"])
    assert trained.exit_code == 1
    lines = [line for line in trained.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: model.path: {wan} does not hold")
    assert lines[0].endswith("looks made for a Wan 2.x transformer")
    assert "Traceback" not in trained.output
    checked = CliRunner().invoke(cli, ["validate", str(cfg)])
    assert checked.exit_code == 2
    assert "looks made for a Wan 2.x transformer" in checked.output
    assert not (tmp_path / "run").exists()


def test_missing_config_is_the_existing_config_error(folders, tmp_path):
    ckpt = _write(_model(folders["qwen_image"]), tmp_path / "qwen.safetensors")
    with pytest.raises(ConfigError, match=r"model\.config: required for the single-file "
                                          r"checkpoint .*QwenImageTransformer2DModel"):
        _load("qwen_image", path=ckpt)
    cfg = _config(tmp_path, "qwen_image", {"path": str(ckpt)}, "run")
    result = CliRunner().invoke(cli, ["train", str(cfg), "-q"])
    assert result.exit_code == 2 and "error: model.config: required" in result.output
    assert "Traceback" not in result.output


def test_partial_files_other_sizes_and_extra_tensors_say_what_does_not_fit(folders, tmp_path):
    model = _model(folders["flux2"])
    tensors = {k: v.contiguous() for k, v in to_single_file(model).items()}
    partial = dict(tensors)
    del partial["single_blocks.0.linear2.weight"]
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(DataError, match=r"1 of the model's 31 tensors are not in it "
                                        r"\(single_transformer_blocks\.0\.attn\.to_out\."
                                        r"weight\)$"):
        _load("flux2", path=tmp_path / "partial.safetensors", config=folders["flux2"])
    # dev's file with Klein's config: two guidance tensors more than Klein has
    save_file(tensors, str(tmp_path / "dev.safetensors"))
    with pytest.raises(DataError, match=r"2 of its tensors have no place in the model "
                                        r"\(time_guidance_embed\.guidance_embedder.*"
                                        r"is model\.config the config of this file's model"):
        _load("flux2_klein", path=tmp_path / "dev.safetensors",
              config=folders["flux2_klein"])
    wider = dict(tensors, **{"txt_in.weight": torch.zeros(16, 32)})
    save_file(wider, str(tmp_path / "wider.safetensors"))
    with pytest.raises(DataError, match=r"context_embedder\.weight is \[16, 32\] in the "
                                        r"file and \[16, 24\] in the model"):
        _load("flux2", path=tmp_path / "wider.safetensors", config=folders["flux2"])


def test_a_family_diffusers_reads_no_single_file_of_says_so(tmp_path):
    pipe = tv.save_video_denoiser("hunyuan_video15", tmp_path / "hv")
    ckpt = tmp_path / "hv.safetensors"
    save_file({"x": torch.zeros(1)}, str(ckpt))
    spec = build_plugin_manager().registry.get("model", "hunyuan_video15")
    with pytest.raises(ConfigError, match=r"family 'hunyuan_video15' reads no single-file "
                                          r"checkpoint .*HunyuanVideo15Transformer3DModel"):
        spec.load(spec.config_model(path=ckpt, config=pipe), {"base_dir": None})


# -- the released sizes, by names and shapes (on the meta device) -------------------------

#: families checked at the released sizes by name and shape only, with the
#: ``real_sizes.json`` record of each (one block of each kind)
RELEASED = {"flux": "flux1_dev", "lumina2": "lumina2"}


def _released_models() -> list[tuple[str, Any]]:

    from loraengine.tools.plan.real_size import real_model, real_sizes

    out = []
    for name, rec in real_sizes().items():
        if rec["class"] in SINGLE_FILE_CLASSES:
            out.append((name, real_model(name, {key: 2 for key in rec["blocks"]})))
    for name, record in RELEASED.items():
        blocks = real_sizes()[record]["blocks"]
        out.append((name, real_model(record, {key: 1 for key in blocks})))
    return out


SINGLE_FILE_CLASSES = ("Flux2Transformer2DModel", "QwenImageTransformer2DModel",
                       "ZImageTransformer2DModel", "ChromaTransformer2DModel",
                       "WanTransformer3DModel", "LTX2VideoTransformer3DModel")


def test_released_sizes_convert_by_name_and_shape_through_diffusers():
    """At the released widths (two blocks of each kind, so that it stays on the meta
    device and quick), every layout written goes through diffusers' converter onto the
    model's tensors with their shapes, bare and prefixed: also for FLUX.1, Chroma and
    Lumina 2, whose converters split fused layers at exactly those widths."""
    from loraengine.plugins.models import single_file

    models = _released_models()
    assert {name for name, _ in models} >= {"qwen_image", "flux2_dev", "flux2_klein_4b",
                                           "z_image", "chroma", "wan2.1_t2v_14b",
                                           "wan2.2_t2v_a14b", "ltx2", "flux", "lumina2"}
    for name, model in models:
        expected = model.state_dict()
        for prefix in PREFIXES:
            tensors = dict(to_single_file(model, prefix), **(
                {key: torch.empty(2, 2, device="meta") for key in BUNDLED} if prefix else {}))
            taken, names = single_file.plan(type(model), dict(model.config),
                                            Path(f"{name}.safetensors"), tensors, expected,
                                            name, None)
            assert taken in ("", prefix), name  # plan() raises where anything does not fit
            if taken:  # read without the prefix: the other parts are left unread
                assert not set(names) & set(BUNDLED), name


def _scaled_fp8(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A file as ComfyUI's scaled-fp8 files are (``comfy/ops.py``, ``model_base.py``):
    each 2-D weight in float8_e4m3fn with its float32 ``scale_weight`` (and a
    ``scale_input``), the ``scaled_fp8`` marker of the fp8 dtype."""
    out: dict[str, torch.Tensor] = {"scaled_fp8": torch.tensor([], dtype=torch.float8_e4m3fn)}
    for key, tensor in tensors.items():
        if key.endswith(".weight") and tensor.ndim == 2:
            scale = tensor.abs().max().float() / 448
            out[key] = (tensor / scale).to(torch.float8_e4m3fn)
            out[key[:-len("weight")] + "scale_weight"] = scale
            out[key[:-len("weight")] + "scale_input"] = torch.ones(())
        else:
            out[key] = tensor.contiguous()
    return out


@pytest.mark.parametrize("name", ("wan", "flux2"))
def test_comfyuis_scaled_fp8_files_load_dequantised_as_comfyui_computes(folders, tmp_path,
                                                                       offline, name):
    model = _model(folders[name])
    scaled = _scaled_fp8(to_single_file(model))
    save_file(scaled, str(tmp_path / "fp8.safetensors"))
    # the same weights as ComfyUI's scaled-fp8 layer computes them, in a float file
    plain = {k: (v.float() * scaled[k[:-len("weight")] + "scale_weight"]
                 if v.dtype == torch.float8_e4m3fn else v)
             for k, v in scaled.items() if k != "scaled_fp8" and "scale_" not in k}
    want = type(model).from_single_file(
        {k: v.clone() for k, v in plain.items()}, config=str(folders[name]),
        subfolder="transformer", local_files_only=True).state_dict()
    loaded = _load(name, path=tmp_path / "fp8.safetensors", config=folders[name])
    _assert_same(loaded.module.state_dict(), want)
    fused = "double_blocks.0.img_attn.qkv.weight" if name == "flux2" else None
    if fused:  # a fused layer's scale covers all its parts
        to_q = loaded.module.state_dict()["transformer_blocks.0.attn.to_q.weight"]
        assert torch.equal(to_q, plain[fused].chunk(3)[0])
    # really fp8: off the float weights by at most e4m3's rounding (3 mantissa bits:
    # half a step is 2^-4 of the value; below its normal range, half of 2^-9 · scale;
    # and float32 rounding of the division and product)
    key = "proj_out.weight"
    original, got = model.state_dict()[key], loaded.module.state_dict()[key]
    bound = original.abs() * (2 ** -4 + 2 ** -20) + original.abs().max() / 448 * 2 ** -10
    assert not torch.equal(got, original) and bool(((got - original).abs() <= bound).all())
