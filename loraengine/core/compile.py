"""``training.compile``: ``torch.compile`` over the denoiser, per block or whole.

``blocks`` (regional compilation) compiles the forward of each of the family's blocks
(the units gradient checkpointing depth 1 wraps: a UNet's down/mid/up blocks, a
transformer's blocks); a block that declares diffusers' ``_repeated_blocks`` (a whole
transformer used as one block, as the ``module`` family sees a wrapped model) is opened
up into the modules of those classes. Blocks of the same class and shapes share one
compiled graph, so the compile time is about that of one block per kind, and whatever
runs between the blocks stays eager. ``model`` compiles the denoiser's whole forward:
more to fuse, a longer compile.

The compiled forward is installed last, over what the memory strategies did: it wraps
a block's checkpointing (traced as a checkpointed region), and the adapters' layer
forwards or bypass hooks inside the block are traced with it, so every path trains
through the compiled code. Offloading swaps a block's weights in and out around each
use; with ``blocks`` the streaming strategy loads a block eagerly before its compiled
forward runs (``HostStreaming.enter``); ``model`` cannot be combined with it.

Shapes are static (``dynamic=False``): each kind of block compiles once per input
shape it meets (a block class used at two resolutions, as a UNet's down blocks are,
compiles twice; a bucketed run once more per bucket shape), and runs eagerly past
torch's recompile limit (``torch._dynamo.config.recompile_limit``, 8 by default) with a
warning. Not dynamic: torch 2.13's inductor fails to compile the UNet's blocks with
symbolic sizes (a stride comparison it cannot decide), which the automatic dynamic
shapes of ``dynamic=None`` switch on as soon as one block class meets a second shape.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from loraengine.core.errors import ConfigError
from loraengine.core.model import LoadedModel, top_level_blocks
from loraengine.core.patching import ForwardMaker, patch_forward
from loraengine.core.plugins.assembly import HostStreaming

CompileMode = Literal[False, "blocks", "model"]


def compile_unavailable(device: torch.device) -> str | None:
    """Why ``torch.compile`` cannot run here (``None`` when it can): inductor on the CPU
    builds C++ kernels and needs a compiler (``$CXX``, else g++/c++/clang++)."""
    if importlib.util.find_spec("torch._inductor") is None:  # pragma: no cover
        return "this torch build has no inductor backend"
    if device.type == "cpu":
        names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
        if not any(shutil.which(n) for n in names):
            return ("compiling on the CPU needs a C++ compiler and none was found "
                    f"({', '.join(names)}); install one or set training.compile: false")
    return None


def compile_targets(loaded: LoadedModel) -> list[nn.Module]:
    """What ``blocks`` compiles: the family's blocks, each one that declares diffusers'
    ``_repeated_blocks`` replaced by its modules of those classes."""
    out: list[nn.Module] = []
    for block in loaded.blocks or top_level_blocks(loaded.module):
        names = set(getattr(block, "_repeated_blocks", None) or ())
        inner = [m for m in block.modules() if type(m).__name__ in names] if names else []
        out.extend(inner or [block])
    return [m for m in out if any(True for _ in m.parameters())]


def _compiling(enter: Callable[[], None] | None) -> ForwardMaker:
    """The forward maker that compiles a forward; ``enter`` runs eagerly before each
    call (the streaming strategy's loading of the block)."""

    def make(inner: Callable[..., Any]) -> Callable[..., Any]:
        fn = torch.compile(inner, dynamic=False)

        def forward(_self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            if enter is not None:
                enter()
            return fn(*args, **kwargs)

        return forward

    return make


def apply_compile(mode: CompileMode, loaded: LoadedModel, device: torch.device,
                  streaming: HostStreaming | None = None) -> Callable[[], None]:
    """Install the compiled forwards; return the undo (the eager forwards back)."""
    if not mode or device.type == "meta":
        return lambda: None  # a dry run (``plan``) runs nothing to compile
    why = compile_unavailable(device)
    if why is not None:
        raise ConfigError(f"training.compile: {why}")
    if mode == "model":
        if streaming is not None:
            raise ConfigError("training.compile: 'model' cannot be combined with a "
                              "strategy that streams the base from the host "
                              "(memory.offloading); use 'blocks'")
        return patch_forward(loaded.module, _compiling(None))
    if streaming is not None and not callable(getattr(streaming, "enter", None)):
        raise ConfigError("training.compile: the strategy that streams the base from the "
                          "host cannot load a block before compiled code runs (it has no "
                          "enter()); set training.compile: false")
    undos = [patch_forward(block, _compiling(None if streaming is None else
                                             _entering(streaming, block)))
             for block in compile_targets(loaded)]

    def undo_all() -> None:
        for u in reversed(undos):
            u()

    return undo_all


def _entering(streaming: HostStreaming, block: nn.Module) -> Callable[[], None]:
    return lambda: streaming.enter(block)
