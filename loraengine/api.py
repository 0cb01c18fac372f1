"""The programmatic entry point: ``loraengine.train(config, model=..., latents=...,
conditioning=...)``, the node's inputs in, ``TrainResult(lora, loss_map, steps)`` out."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn

from loraengine.core.build import build_pipeline
from loraengine.core.checks import pipeline_warnings
from loraengine.core.config.root import load_config, parse_config
from loraengine.core.errors import ConfigError, DataError
from loraengine.core.plugins.host import PluginHost
from loraengine.core.threads import training_threads
from loraengine.core.train.loop import Trainer, TrainResult
from loraengine.core.train.output_lock import lock_early
from loraengine.plugins import build_plugin_manager


def resolve_config(config: Any, host: PluginHost, *, has_model: bool = False,
                   overrides: list[str] | None = None) -> tuple[Any, Path | None]:
    """Accept a path, a mapping or a validated config; return (config, base folder)."""
    if isinstance(config, (str, Path)):
        path = Path(config)
        return load_config(path, host.registry, overrides), path.resolve().parent
    if isinstance(config, BaseModel):
        return config, None
    if isinstance(config, Mapping):
        data = dict(config)
        if has_model and "model" not in data:
            data["model"] = {"family": "module"}
        return parse_config(data, host.registry, base_dir=Path.cwd()), Path.cwd()
    raise TypeError(f"config must be a path, a mapping or a config model, not "
                    f"{type(config).__name__}")


@dataclass
class _ModuleState:
    """What one module of the caller's model held before training."""

    module: nn.Module
    cls: type
    training: bool
    params: dict[str, tuple[nn.Parameter | None, torch.Tensor | None, bool,
                            torch.Tensor | None]] = field(default_factory=dict)
    buffers: dict[str, torch.Tensor | None] = field(default_factory=dict)


@contextmanager
def _model_kept_as_it_came(model: nn.Module | None) -> Iterator[None]:
    """Give the model back as it came: the same parameter objects holding the same
    storage (so dtype, device and values are bitwise what they were), their
    ``requires_grad`` and ``.grad``, the same buffers, and each module's class and
    train/eval mode; also when the body raises.

    Building a run converts the base in place (``module.to``, frozen, eval mode; memory
    strategies swap parameters), so the original tensors are held here while training
    and put back afterwards rather than converted back (a bf16 round trip is lossy)."""
    if model is None:
        yield
        return
    states: list[_ModuleState] = []
    for mod in model.modules():
        state = _ModuleState(mod, type(mod), mod.training)
        for name, p in mod._parameters.items():
            state.params[name] = (p, None if p is None else p.data,
                                  False if p is None else p.requires_grad,
                                  None if p is None else p.grad)
        state.buffers = dict(mod._buffers)
        states.append(state)
    try:
        yield
    finally:
        with torch.no_grad():
            for state in states:
                mod = state.module
                if type(mod) is not state.cls:
                    mod.__class__ = state.cls
                mod.training = state.training
                for name in [n for n in mod._parameters if n not in state.params]:
                    del mod._parameters[name]
                for name, (p, data, grad_on, grad) in state.params.items():
                    if p is not None and data is not None:
                        p.data = data
                        p.requires_grad_(grad_on)
                        p.grad = grad
                    mod._parameters[name] = p
                for name in [n for n in mod._buffers if n not in state.buffers]:
                    del mod._buffers[name]
                mod._buffers.update(state.buffers)


def _check_caller_inputs(model: object, latents: object, conditioning: object) -> None:
    """Refuse, naming the argument, what no run can use: a ``model`` that is no
    ``nn.Module`` or holds inference tensors (which autograd cannot train through, nor
    the model be given back as it came), and data tensors without values (meta)."""
    if model is not None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model: expected a torch.nn.Module called as model(x_t, t, "
                              f"cond), got {type(model).__name__}")
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_inference():
                raise ConfigError(f"model: {name} is an inference tensor (made under "
                                  f"torch.inference_mode), which training cannot use; "
                                  f"build or load the model outside inference_mode")
    for what, given in (("latents", latents), ("conditioning", conditioning)):
        tensors = given.items() if isinstance(given, Mapping) else [(what, given)]
        for key, value in tensors:
            if isinstance(value, torch.Tensor) and value.device.type == "meta":
                shown = what if key == what else f"{what}[{key!r}]"
                raise DataError(f"{shown}: a tensor on the meta device holds no values to "
                                f"train on")


def train(config: Any, *, model: nn.Module | None = None,
          latents: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
          conditioning: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
          host: PluginHost | None = None, write_files: bool | None = None,
          resume: str | Path | None = None) -> TrainResult:
    """Train an adapter and return ``TrainResult(lora, loss_map, steps)``.

    ``config`` is a YAML path, a mapping or a validated config. ``model`` (an
    ``nn.Module`` called as ``model(x_t, t, cond)``) selects the ``module`` family when
    the config names no model. ``latents``/``conditioning`` replace the data files.
    Files are written when the config came from a file or has an ``output`` section,
    or when ``write_files=True``. ``resume`` (``"latest"``, a checkpoints folder or one
    ``step_N`` folder, as ``Trainer.resume`` takes) continues from a checkpoint of the
    run's output folder when there is one, and starts afresh when there is none.

    The caller's ``model`` comes back as it came, also when training fails: every
    parameter and buffer is the same object with the same dtype, device, values and
    ``requires_grad``, and every module keeps its train/eval mode (the run works on it
    converted to ``training.dtype``, frozen and in eval mode, and holds the original
    tensors meanwhile). The adapter is not left attached: apply ``result.lora`` with
    ``loraengine.apply``.

    torch's intra-op thread count is ``training.threads``, or by default the physical
    cores available to the process unless ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` or an
    earlier ``torch.set_num_threads`` chose one; the previous count is restored on
    return. Settings the run cannot honour as written (``adapter.rank`` beside a file of
    another rank, a batch larger than the data) are reported as ``UserWarning``.
    """
    _check_caller_inputs(model, latents, conditioning)
    host = host or build_plugin_manager()
    cfg, base_dir = resolve_config(config, host, has_model=model is not None)
    if write_files is None:
        write_files = isinstance(config, (str, Path)) or (
            isinstance(config, Mapping) and "output" in config) or isinstance(config, BaseModel)
    # a second run of this output is refused before the model is built
    early = lock_early(cfg.output.dir, cfg.output.name) if write_files else None
    try:
        with _model_kept_as_it_came(model), training_threads(cfg.training.threads):
            pipe = build_pipeline(cfg, host, model=model, latents=latents,
                                  conditioning=conditioning, base_dir=base_dir)
            try:
                for message in pipeline_warnings(pipe):
                    warnings.warn(message, UserWarning, stacklevel=2)
                trainer = Trainer(pipe, write_files=write_files, output_lock=early)
                if resume is not None:
                    trainer.resume(resume)
                return trainer.run()
            finally:
                pipe.close()
    finally:
        if early is not None:
            early.release()
