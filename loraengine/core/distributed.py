"""Data-parallel training on torch.distributed, as launched by ``torchrun``.

Every rank draws the same global batch from the same seeded streams and computes its
own slice of it; gradients are averaged by DDP over the adapter parameters only. The
result therefore does not depend on the number of ranks beyond floating-point order,
and a run can resume with another world size. Rank 0 writes the files.
"""

from __future__ import annotations

import datetime
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from loraengine.core.errors import ConfigError, LoraEngineError

T = TypeVar("T")


class RankLostError(LoraEngineError):
    """Another rank stopped answering (it died or hung) — the run cannot go on."""


@dataclass
class DistContext:
    """This process's place in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, timeout_s: float, device_type: str) -> DistContext:
        """Read torchrun's environment; initialise the process group when launched with
        more than one process (nccl on CUDA, gloo on CPU)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        here = False
        if not dist.is_initialized():
            # gloo for the CPU collectives (loss averaging) even beside nccl on GPUs
            backend = "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
            here = True
        return cls(rank, world, local, here)

    def slice_of(self, batch: int) -> slice:
        """This rank's rows of a global batch of ``batch`` samples."""
        if batch % self.world_size:
            raise ConfigError(f"training.batch_size: {batch} does not split evenly over "
                              f"{self.world_size} processes")
        per = batch // self.world_size
        return slice(self.rank * per, (self.rank + 1) * per)

    def mean(self, value: float) -> float:
        """The mean of ``value`` over ranks."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        guarded(lambda: dist.all_reduce(t), "averaging the loss")
        return float(t) / self.world_size

    def close(self) -> None:
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


_PEER_LOST = ("connection", "closed", "timed out", "timeout", "gloo", "nccl", "peer",
              "broken pipe")


def guarded(fn: Callable[[], T], what: str) -> T:
    """Run a collective; turn a lost peer into one clear error. Other failures (an
    out-of-memory error in the backward pass, say) pass through unchanged."""
    try:
        return fn()
    except RuntimeError as exc:
        text = str(exc)
        lost = isinstance(exc, getattr(dist, "DistError", ())) or any(
            word in text.lower() for word in _PEER_LOST)
        if not lost:
            raise
        raise RankLostError(f"lost contact with another process while {what}: "
                            f"{text.splitlines()[0] if text else type(exc).__name__}"
                            ) from None


class Denoise(nn.Module):
    """The model call as one module, so DDP sees the adapter parameters used in it."""

    def __init__(self, model: nn.Module, network: nn.Module, predict: Callable[..., Any]):
        super().__init__()
        self.model = model
        self.network = network
        self._predict = predict

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]
                ) -> torch.Tensor:
        out: torch.Tensor = self._predict(self.model, x_t, t, cond)
        return out


def wrap_ddp(model: nn.Module, network: nn.Module, predict: Callable[..., Any],
             device: torch.device) -> nn.Module:
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    module = Denoise(model, network, predict)
    ids = [device.index] if device.type == "cuda" else None
    # buffers are identical on every rank (same files, same seed): no per-step sync
    no_sync_kw = ("forward_sync_buffers" if "forward_sync_buffers" in
                  inspect.signature(DDP.__init__).parameters else "broadcast_buffers")
    options: dict[str, Any] = {no_sync_kw: False}

    def wrap() -> nn.Module:
        return DDP(module, device_ids=ids, **options)

    return guarded(wrap, "setting up data-parallel training")


def shard_base(model: nn.Module, blocks: list[nn.Module], device: torch.device) -> None:
    """Shard the frozen base over the ranks with FSDP2: each top-level block, then the
    rest of the model. Adapters stay outside (they are not submodules of the model), so
    they are replicated and their gradients averaged by ``average_gradients``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in blocks:
        guarded(functools.partial(fully_shard, block, mesh=mesh), "sharding the base model")
    guarded(lambda: fully_shard(model, mesh=mesh), "sharding the base model")


def average_gradients(params: list[nn.Parameter], world_size: int) -> None:
    """All-reduce the adapter gradients into their mean over ranks (one flat buffer)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    guarded(lambda: dist.all_reduce(flat), "averaging gradients")
    flat /= world_size
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n
