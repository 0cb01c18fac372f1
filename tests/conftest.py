"""The suite's short fixture names, each one of the ``loraengine.testing`` fixtures that
plugin authors get from the pytest plugin (``loraengine.testing.pytest_plugin``)."""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("MPLBACKEND", "Agg")
# A worker holds some 700k long-lived objects (torch, diffusers, transformers, the
# collected tests), and every full collection walks them all (~0.3 s here). At the
# default thresholds one runs every ten young ones, 40 in four of the matrix files;
# a tenth as often cut those files from 84 s to 68 s. Tests that need cycles freed
# call gc.collect() themselves.
gc.set_threshold(700, 10, 100)

REPO = Path(__file__).resolve().parents[1]


class _Collect(logging.Handler):
    def __init__(self, into: list[str]):
        super().__init__(logging.WARNING)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record.getMessage())


@contextmanager
def diffusers_warnings() -> Iterator[list[str]]:
    """The warnings diffusers logs in the body (its loaders report file keys they could
    not place this way), collected in the yielded list."""
    messages: list[str] = []
    handler, logger = _Collect(messages), logging.getLogger("diffusers")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


@pytest.fixture
def host(loraengine_host: Any) -> Any:
    """A fresh plugin host: the built-ins and installed plugins."""
    return loraengine_host


@pytest.fixture
def builtin_host(loraengine_builtin_host: Any) -> Any:
    """A fresh plugin host with the built-ins only."""
    return loraengine_builtin_host


@pytest.fixture(scope="session")
def unet_dir(tiny_unet_dir: Path) -> Path:
    """A tiny diffusers pipeline folder (unet + scheduler), built once per session."""
    return tiny_unet_dir


@pytest.fixture
def data_files(tiny_unet_files: tuple[Path, Path]) -> tuple[Path, Path]:
    """latents [6,4,8,8] and conditioning [6,3,16] files matching the tiny UNet."""
    return tiny_unet_files


@pytest.fixture
def unet_config(tiny_unet_train_config: dict[str, Any]) -> dict[str, Any]:
    """A small, fast config dict for the tiny UNet (fp32, no checkpointing)."""
    return tiny_unet_train_config


@dataclass
class TrainedFile:
    """What :func:`train_and_reload` gives back: the trained file, its tensors and the
    modules they adapt, the reloaded adapter's merged prediction on the probe at ``t``, and
    the family's ``predict`` to call on the consumer's model."""

    config: Path
    lora: Path
    tensors: dict[str, torch.Tensor]
    modules: set[str]
    t: torch.Tensor
    merged: torch.Tensor
    predict: Callable[..., torch.Tensor]  # the family's predict, for the consumer's model


def train_and_reload(tmp_path: Path, family: str, folder: Path, latents: torch.Tensor,
                     cond: dict[str, torch.Tensor], probe_x: torch.Tensor,
                     probe_cond: dict[str, torch.Tensor], exporter: str | None = None
                     ) -> TrainedFile:
    """Train 30 steps through the CLI on ``latents``/``cond`` (rank 4, fp32, gradient
    checkpointing; ``adapter.exporter: exporter`` where given, else the family's
    default), check the loss curve, then load the file back with
    ``adapter.existing``: it must lower the fixed-draw loss by 3 %; the merged
    prediction on the probe at sigma 0.3 and 0.8 is returned for the consumer's loader
    to match."""
    import json

    import yaml
    from click.testing import CliRunner
    from safetensors.torch import load_file, save_file

    from loraengine.api import resolve_config
    from loraengine.cli.main import cli
    from loraengine.core.build import build_pipeline
    from loraengine.plugins import build_plugin_manager
    from loraengine.testing import tiny_pipelines as tp

    save_file({"latents": latents}, str(tmp_path / "lat.st"))
    save_file(cond, str(tmp_path / "cond.st"))
    cfg = {"model": {"family": family, "path": str(folder)},
           "data": {"latents": str(tmp_path / "lat.st"),
                    "conditioning": str(tmp_path / "cond.st")},
           "training": {"steps": 30, "batch_size": 4, "dtype": "fp32", "seed": 0},
           "optimizer": {"lr": 0.02},
           "adapter": {"rank": 4, "alpha": 2, "dtype": "fp32",
                       **({"exporter": exporter} if exporter else {})},
           "memory": {"gradient_checkpointing": True},
           "output": {"dir": str(tmp_path / "out"), "name": "lora", "plot": False}}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(cli, ["train", str(path), "-q"])
    assert result.exit_code == 0, result.output
    losses = json.loads((tmp_path / "out" / "lora.loss.json").read_text())["loss"]
    assert len(losses) == 30 and all(torch.isfinite(torch.tensor(losses)))
    lora = tmp_path / "out" / "lora.safetensors"
    tensors = load_file(str(lora))
    modules = {k.rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k}

    host = build_plugin_manager()
    conf, base = resolve_config(path, host, overrides=[f"adapter.existing={lora}"])
    engine = build_pipeline(conf, host, base_dir=base)
    t = engine.loaded.schedule.model_timesteps(torch.tensor([0.3, 0.8]))
    try:
        trained = tp.fixed_draw_loss(engine)
        engine.network.set_multiplier(0.0)
        untouched = tp.fixed_draw_loss(engine)
        engine.network.set_multiplier(1.0)
        engine.network.merge()
        with torch.no_grad():
            merged = engine.loaded.predict(engine.model, probe_x, t, probe_cond)
    finally:
        engine.close()
    assert trained < untouched * 0.97, (trained, untouched)
    return TrainedFile(path, lora, tensors, modules, t, merged, engine.loaded.predict)


# -- video clips through the CLI: prepare, train, sample -----------------------------------

def smooth_frame(seed: int, size: tuple[int, int] = (32, 32)) -> Any:
    """A picture of ``size`` (width, height): 4x4 random colours blown up bilinearly, so
    a VAE sees smooth content."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(3, 4, 4, generator=g)
    big = torch.nn.functional.interpolate(coarse[None], size=(size[1], size[0]),
                                          mode="bilinear")[0]
    data = (big * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(data, "RGB")


def write_mp4(path: Path, images: list[Any]) -> None:
    """``images`` (PIL, all one size) as an mpeg4 file at 8 frames per second, as a
    camera or an editor writes one (PyAV)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height = images[0].size
        stream.pix_fmt = "yuv420p"
        for image in images:
            for packet in stream.encode(av.VideoFrame.from_image(image)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def clip_pixels(frames: list[Any], size: int = 32) -> torch.Tensor:
    """RGB frames of ``size``² as one [3, frames, size, size] clip in [-1, 1]."""
    return torch.stack([torch.frombuffer(bytearray(f.tobytes()), dtype=torch.uint8)
                        .reshape(size, size, 3).permute(2, 0, 1).float() / 127.5 - 1
                        for f in frames], dim=1)


def prepare_clips(model: Path, clips: Path, out: Path, frames: int = 5,
                  ) -> tuple[list[str], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``loraengine prepare`` of ``clips`` at 32 px (quiet); returns the arguments (to run
    again) and the latents and conditioning it wrote."""
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from loraengine.cli.main import cli

    args = ["prepare", "--model", str(model), "--images", str(clips), "--out", str(out),
            "--frames", str(frames), "--resolution", "32", "-q"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return (args, load_file(str(out / "latents.safetensors")),
            load_file(str(out / "conditioning.safetensors")))


def assert_prepare_cached(args: list[str]) -> None:
    """The same ``prepare`` again, not quiet: everything comes from the cache."""
    from click.testing import CliRunner

    from loraengine.cli.main import cli

    again = CliRunner().invoke(cli, [a for a in args if a != "-q"])
    assert again.exit_code == 0, again.output
    assert "encoded 0 image(s) and 0 caption(s)" in again.output


def train_prepared(tmp_path: Path, family: str, model: Path, data: Path, steps: int,
                   rank: int, lr: float | None = None) -> tuple[Path, list[float]]:
    """Train ``family`` through the CLI on what ``prepare`` wrote to ``data`` (batch 2,
    fp32, output in ``tmp_path/out``); returns the file and its loss curve."""
    import json

    import yaml
    from click.testing import CliRunner

    from loraengine.cli.main import cli

    cfg: dict[str, Any] = {
        "model": {"family": family, "path": str(model)},
        "data": {"latents": str(data / "latents.safetensors"),
                 "conditioning": str(data / "conditioning.safetensors")},
        "training": {"steps": steps, "batch_size": 2, "dtype": "fp32"}}
    if lr is not None:
        cfg["optimizer"] = {"lr": lr}
    cfg["adapter"] = {"rank": rank, "dtype": "fp32"}
    cfg["output"] = {"dir": str(tmp_path / "out"), "name": "lora", "plot": False}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(cfg))
    trained = CliRunner().invoke(cli, ["train", str(tmp_path / "t.yaml"), "-q"])
    assert trained.exit_code == 0, trained.output
    losses = json.loads((tmp_path / "out" / "lora.loss.json").read_text())["loss"]
    return tmp_path / "out" / "lora.safetensors", losses


def sample_frame_strip(tmp_path: Path, model: Path, prompt: str, lora: Path, frames: int,
                       size: int, channels: int, strength: float = 1.0) -> Any:
    """``loraengine sample --frames`` (2 steps, latents ``size``², the prompt written to
    ``tmp_path/p.txt``, images to ``tmp_path/s``, the adapter at ``strength``); checks
    the latent shape it reports and returns the first picture as an array."""
    import numpy as np
    from click.testing import CliRunner
    from PIL import Image

    from loraengine.cli.main import cli

    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "p.txt").write_text(prompt + "\n")
    result = CliRunner().invoke(cli, [
        "sample", "--model", str(model), "--prompts", str(tmp_path / "p.txt"), "--lora",
        str(lora), "--out", str(tmp_path / "s"), "--steps", "2", "--frames", str(frames),
        "--size", str(size), str(size), "--strength", str(strength)])
    assert result.exit_code == 0, result.output
    assert f"(latents {channels}x{frames}x{size}x{size})" in result.output
    return np.asarray(Image.open(tmp_path / "s" / "image_0_0.png"))


# -- gradient comparisons on the tiny UNet ---------------------------------------------

def factored_unet_config(unet_dir: Path, files: tuple[Path, Path], algorithm: str,
                         memory: dict[str, Any]) -> dict[str, Any]:
    """One step of ``algorithm`` on the tiny UNet with ``memory``."""
    from loraengine.testing.models import tiny_unet_train_config

    return tiny_unet_train_config(unet_dir, files, {
        "training": {"steps": 1},
        # alpha ≠ rank where it is a scale; OFT has none (its alpha is a norm bound).
        # The factored training path on every layer: it is what bypass computes, so
        # for LoRA and LoKr the plain and bypass runs are the same operations (with
        # path auto, a layer the cost model rebuilds would round differently).
        "adapter": {"algorithm": algorithm, "path": "factored",
                    **({} if algorithm == "oft" else {"alpha": 2})},
        "memory": memory,
    })


def seed_adapter(pipe: Any) -> torch.Generator:
    """Set the adapter's parameters to seeded random values (at init some factors are
    zero, which would make other factors' gradients zero and a comparison weak); returns
    the generator, for the inputs drawn after them."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in pipe.network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return g


def child_json(script: str, *args: object) -> Any:
    """Run ``script`` in a fresh single-threaded interpreter with this checkout on its
    path and return the JSON on the last line it prints (memory peaks need a process
    of their own: the parent's allocations would hide them)."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", script, *map(str, args)],
                         capture_output=True, text=True, env={"OMP_NUM_THREADS": "1",
                         "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def convert_round_trip(source: Path, folder: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """``loraengine convert`` a diffusers-layout file to ComfyUI's and back (with the model
    at ``folder``), each step warning-free; asserts the file comes back as written (1e-6)
    and returns the ComfyUI file's tensors."""
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from loraengine.cli.main import cli
    from loraengine.testing.conformance import relative_error

    written = load_file(str(source))
    for src, target, out in ((source, "comfyui", "c"), (tmp_path / "c.safetensors",
                                                      "diffusers", "back")):
        res = CliRunner().invoke(cli, ["convert", str(src), "--to", target, "--model",
                                       str(folder), "--out", str(tmp_path / f"{out}.safetensors")])
        assert res.exit_code == 0, res.output
        assert "warning" not in res.output
    back = load_file(str(tmp_path / "back.safetensors"))
    assert sorted(back) == sorted(written)
    for key, tensor in written.items():
        assert relative_error(back[key], tensor) <= 1e-6, key
    return load_file(str(tmp_path / "c.safetensors"))


def fixture_script(name: str) -> Any:
    """The fixture-making script ``tests/fixtures/interop/<name>.py`` as a module: the
    tests read its case lists and summaries, so that what CI checks is what the script
    measured with the consumer's code."""
    import importlib.util
    import sys

    here = Path(__file__).parent / "fixtures" / "interop"
    if str(here) not in sys.path:  # the scripts import their shared modules beside them
        sys.path.append(str(here))
    spec = importlib.util.spec_from_file_location(name, here / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class SavedPipelines(dict):  # type: ignore[type-arg]
    """Tiny pipeline folders under ``root``, each saved by ``save(name, folder)`` the
    first time a test asks for it (``pipes["flux2"]``)."""

    def __init__(self, root: Path, save: Callable[[str, Path], Path]):
        super().__init__()
        self.root, self.save = root, save

    def __missing__(self, name: str) -> Path:
        self[name] = self.save(name, self.root / name)
        return self[name]


def the_error_line(output: str) -> str:
    """The one ``error:`` line of a failed command's ``output``: no traceback, nothing
    after it, and before it only ``warning:`` lines (what the run warned about before
    it failed, such as the exporter's consumer limits of an all-layer config)."""
    assert "Traceback" not in output, output
    lines = [x for x in output.splitlines() if x.strip()]
    assert lines and lines[-1].startswith("error: "), output
    assert all(x.startswith("warning: ") for x in lines[:-1]), output
    return lines[-1]


def first_of_each(cases: list[Any], kind: Callable[[Any], str],
                  ids: Callable[[Any], str] | None = None, slow: Any = ()) -> list[Any]:
    """``cases`` as parameters in which the first case of each ``kind`` (an
    algorithm, say) is part of the fast default and every other one, and those in
    ``slow``, is marked slow: ``-m "not slow"`` keeps one cell of each code path, the
    full suite runs them all."""
    seen: set[str] = set()
    out = []
    for case in cases:
        values = case if isinstance(case, tuple) else (case,)
        marks = () if kind(case) not in seen and case not in slow else (pytest.mark.slow,)
        if case not in slow:
            seen.add(kind(case))
        out.append(pytest.param(*values, marks=marks,
                                id=ids(case) if ids is not None else None))
    return out


# -- order: the longest tests first --------------------------------------------------------

#: The tests that keep one worker busy longest (measured: per-test times of the whole
#: suite; none of them shares a module fixture, which moving it would build twice).
#: Collected first, so that ``-n 2`` starts them at once and spreads
#: the short tests around them, instead of one of them starting late and running alone
#: at the end while the other worker idles. Only the order changes.
LONGEST = (
    "tests/test_interop_diffusers_matrix.py::"
    "test_the_docs_show_the_measured_table_and_every_cell_is_exact_or_warned",
    "tests/test_training.py::test_quickstart_runs_from_the_repository_root",
    "tests/test_models_loading.py::test_load_peak_holds_one_copy_of_the_weights",
    "tests/test_memory_quantized.py::"
    "test_build_peak_of_a_quantized_base_is_the_quantized_model_plus_one_layer",
    "tests/test_kill_anywhere.py::"
    "test_kill_9_at_20_random_points_then_resume_is_bitwise_identical",
    "tests/test_showcase.py::test_the_lora_teaches_the_new_colour_and_keeps_the_old_ones",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {nodeid: i for i, nodeid in enumerate(LONGEST)}
    first = sorted((item for item in items if item.nodeid in rank),
                   key=lambda item: rank[item.nodeid])
    if first:
        items[:] = first + [item for item in items if item.nodeid not in rank]


def linear_network(model: Any, algorithm: str, rank: int, alpha: float,
                   options: dict[str, Any] | None = None,
                   keep: Callable[[str], bool] = lambda path: True) -> Any:
    """An adapter of ``algorithm`` on every Linear of ``model`` whose path ``keep``
    accepts, each seeded and perturbed by its place in path order (so no factor is zero
    and no two layers alike): the network the export tests write and merge."""
    from torch import nn

    from loraengine.core.adapter import ADAPTABLE, AdapterNetwork
    from loraengine.core.adapter.network import select_layers
    from loraengine.plugins import build_plugin_manager
    from loraengine.testing.conformance import perturb

    spec = build_plugin_manager().registry.get("adapter", algorithm)
    config = spec.config_model.model_validate(options or {})
    g = torch.Generator().manual_seed(0)
    layers = {}
    for i, (path, base) in enumerate(sorted(select_layers(model, ["*"], [], ADAPTABLE).items())):
        if isinstance(base, nn.Linear) and keep(path):
            layer = spec.create(base, rank, alpha, config, g)
            layer.algorithm = algorithm
            perturb(layer, i)
            layers[path] = layer
    return AdapterNetwork(layers)


def assert_pipeline_fuses_our_merge(pipe: Any, file: Path, network: Any, ours: Any,
                                    fresh: Any, factors: tuple[str, ...], tol: float) -> None:
    """``pipe.load_lora_weights`` reads ``file`` without a warning and puts an adapter
    (PEFT's ``factors`` attributes) on every layer of ``network``; after ``fuse_lora``
    each layer's weight is ``ours``'s (the model ``network`` was merged into) within
    ``tol`` and differs from the untouched ``fresh`` one by far more."""
    from loraengine.testing.conformance import relative_error

    def weight(module: Any) -> torch.Tensor:
        return getattr(module, "base_layer", module).weight

    with diffusers_warnings() as messages:
        pipe.load_lora_weights(str(file), adapter_name="ours")
    assert messages == []
    theirs = pipe.transformer
    placed = [p for p in network.paths
              if any("ours" in getattr(theirs.get_submodule(p), f, {}) for f in factors)]
    assert placed == network.paths
    pipe.fuse_lora()
    worst = max(relative_error(weight(theirs.get_submodule(p)), ours.get_submodule(p).weight)
                for p in network.paths)
    changed = min(relative_error(weight(theirs.get_submodule(p)), fresh.get_submodule(p).weight)
                  for p in network.paths)
    assert worst <= tol, worst
    assert changed > 100 * tol  # every layer was patched by the file
