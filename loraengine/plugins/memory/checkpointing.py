"""Gradient checkpointing at a chosen depth, with an optional selective policy.

Depth 1 wraps each top-level block of the denoiser (each down/mid/up block, each
transformer block); each further level wraps the children of the level above. A
wrapped block keeps only its inputs during the forward pass and recomputes its
activations during the backward pass.

``checkpoint_policy`` chooses what a wrapped block keeps besides its inputs
(selective activation checkpointing):

- ``none``: nothing; everything inside the block is recomputed;
- ``save_matmuls``: the outputs of every matrix product, convolution and attention
  (costly to recompute for their size); the elementwise operations and norms between
  them are recomputed;
- ``budget``: a share ``checkpoint_budget`` of the bytes of those outputs, chosen
  by FLOPs of recomputation per byte kept, highest first. The choice is made per
  block and input shape from one forward pass that recomputes everything and notes
  each candidate's FLOPs and bytes (so the first step of a shape costs what
  ``none`` costs); from the next pass on the chosen outputs are kept.

The selection runs as the pair of dispatch modes ``torch.utils.checkpoint`` takes as
its ``context_fn`` (one in the forward pass, one in the recomputation), as
``create_selective_checkpoint_contexts`` does. Unlike that helper, the modes number
only the candidate operators, not every operator of the region: a recomputation may
run other operators a different number of times than the forward pass did (offloading
loads a block's weights again) and still find each kept output.

A kept output is the very tensor the forward pass computed, and what is recomputed
runs the same operations on the same inputs, so gradients equal those of a run
without checkpointing bit for bit (the tests check it at ≤1e-6, fp32).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import flop_registry

from loraengine.core.model import top_level_blocks
from loraengine.core.patching import patch_forward
from loraengine.core.plugins.assembly import BuildContext, StrategyResult
from loraengine.core.plugins.specs import MemoryStrategySpec, PluginOptions

Policy = Literal["none", "save_matmuls", "budget"]


class CheckpointOptions(PluginOptions):
    gradient_checkpointing: bool = Field(True, description="Recompute block activations "
                                         "in the backward pass to save memory.")
    checkpoint_depth: int = Field(1, ge=1, le=5, description="1 wraps each top-level "
                                  "block; each further level wraps the children of the "
                                  "level above.")
    checkpoint_policy: Policy = Field(
        "none", description="What a wrapped block keeps besides its inputs: none "
        "(recompute everything), save_matmuls (keep every matmul, convolution and "
        "attention output, recompute the elementwise ops and norms between them), "
        "budget (keep the share checkpoint_budget of those outputs' bytes, the ones "
        "costliest to recompute per byte first).")
    checkpoint_budget: float = Field(
        0.5, ge=0.0, le=1.0, description="With checkpoint_policy budget: the share of "
        "the bytes of the matmul, convolution and attention outputs of each wrapped "
        "block that is kept (0 keeps none, as policy none; 1 keeps all, as "
        "save_matmuls).")


def blocks_at_depth(top: list[nn.Module], depth: int) -> list[nn.Module]:
    """The modules wrapped at ``depth``: ``top`` at 1, then the children of the level
    above (module lists opened up). A layer without children cannot be split further
    and stays itself at deeper levels; modules without parameters are left out."""
    level = list(top)
    for _ in range(depth - 1):
        nxt: list[nn.Module] = []
        for mod in level:
            children = top_level_blocks(mod)
            nxt.extend(children if children else [mod])
        level = nxt
    return [m for m in level if any(True for _ in m.parameters())]


# -- which outputs are worth keeping ------------------------------------------------------

aten = torch.ops.aten

#: Operators whose outputs the selective policies keep: matrix products, convolutions,
#: attention (forward operators only; what autograd dispatches below them is not seen).
SAVEABLE: frozenset[Any] = frozenset({
    aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten._scaled_mm, aten.convolution,
    aten._scaled_dot_product_flash_attention_for_cpu,
    aten._scaled_dot_product_flash_attention, aten._scaled_dot_product_efficient_attention,
    aten._scaled_dot_product_cudnn_attention,
})


def _attention_flops(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *_: Any,
                     **__: Any) -> int:
    b, h, lq, d = q.shape
    return 2 * b * h * lq * k.shape[-2] * (d + v.shape[-1])


def op_flops(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    """FLOPs of one call of a ``SAVEABLE`` operator (from its shapes only)."""
    packet = func.overloadpacket
    if packet in (aten._scaled_dot_product_flash_attention_for_cpu,
                  aten._scaled_dot_product_flash_attention,
                  aten._scaled_dot_product_efficient_attention,
                  aten._scaled_dot_product_cudnn_attention):
        return _attention_flops(*args)
    return int(flop_registry[packet](*args, **kwargs, out_val=out))


def output_bytes(out: Any) -> int:
    """Bytes of the tensors an operator returned (each storage once)."""
    seen: set[int] = set()
    total = 0
    for t in tree_flatten(out)[0]:
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            if id(st) not in seen:
                seen.add(id(st))
                total += st.nbytes()
    return total


def choose(candidates: list[tuple[int, int]], budget: float) -> frozenset[int]:
    """Indices of the candidates ``(flops, bytes)`` to keep: by FLOPs per byte, highest
    first (ties: earlier first), each one that still fits within ``budget`` × all
    their bytes."""
    limit = budget * sum(b for _, b in candidates)
    order = sorted(range(len(candidates)),
                   key=lambda i: (-candidates[i][0] / max(candidates[i][1], 1), i))
    kept, used = set(), 0
    for i in order:
        nbytes = candidates[i][1]
        if used + nbytes <= limit:
            kept.add(i)
            used += nbytes
    return frozenset(kept)


def _signature(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    return tuple((tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else None
                 for t in tree_flatten((args, kwargs))[0])


#: ``decide(index, func, args, kwargs, out) -> keep?`` for the index-th candidate
#: operator of one checkpointed call.
Decide = Callable[[int, Any, tuple[Any, ...], dict[str, Any], Any], bool]


class _Entry:
    """A candidate's outputs as the forward pass left them (or None: recompute)."""

    __slots__ = ("func", "out", "versions")

    def __init__(self, func: Any, out: Any):
        self.func = func
        self.out = None if out is None else tree_map(
            lambda t: t.detach() if isinstance(t, torch.Tensor) else t, out)
        self.versions = [t._version for t in tree_flatten(out)[0]
                         if isinstance(t, torch.Tensor)] if out is not None else []


class _KeepMode(TorchDispatchMode):
    """The forward pass of a checkpointed call: notes every candidate operator in
    order and keeps the outputs ``decide`` picks. Other operators are not seen, so a
    recomputation may run more or fewer of them (offloading's loads)."""

    def __init__(self, decide: Decide, entries: list[_Entry]):
        super().__init__()
        self.decide, self.entries = decide, entries

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.overloadpacket in SAVEABLE:
            keep = self.decide(len(self.entries), func, args, kwargs, out)
            self.entries.append(_Entry(func, out if keep else None))
        return out


class _ReuseMode(TorchDispatchMode):
    """The recomputation: the n-th candidate operator returns what the forward pass
    kept for it (once), or runs again."""

    def __init__(self, entries: list[_Entry]):
        super().__init__()
        self.entries, self.next = entries, 0

    def __enter__(self) -> _ReuseMode:
        self.next = 0
        return super().__enter__()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        kwargs = kwargs or {}
        if func.overloadpacket not in SAVEABLE:
            return func(*args, **kwargs)
        index = self.next
        self.next += 1
        if index >= len(self.entries) or self.entries[index].func is not func:
            raise RuntimeError(f"selective checkpointing: the recomputation ran {func} as "
                               f"candidate {index}, which the forward pass did not")
        entry = self.entries[index]
        if entry.out is None:
            return func(*args, **kwargs)
        out, entry.out = entry.out, None  # one backward pass per forward
        now = [t._version for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if now != entry.versions:
            raise RuntimeError(f"selective checkpointing: an output of {func} kept for "
                               f"the backward pass was modified in place afterwards")
        return out


def _contexts(decide: Decide) -> tuple[_KeepMode, _ReuseMode]:
    entries: list[_Entry] = []
    return _KeepMode(decide, entries), _ReuseMode(entries)


def _keep_all(index: int, func: Any, args: Any, kwargs: Any, out: Any) -> bool:
    return True


class BudgetPolicy:
    """The ``budget`` policy of one wrapped block: per input signature, the first pass
    notes the candidates (recomputing everything) and later passes keep the chosen."""

    def __init__(self, budget: float):
        self.budget = budget
        self.noted: dict[tuple[Any, ...], list[tuple[int, int]]] = {}
        self.kept: dict[tuple[Any, ...], frozenset[int]] = {}

    def for_call(self, signature: tuple[Any, ...]) -> Decide:
        """The decision of one checkpointed call with these inputs."""
        if signature not in self.kept and signature in self.noted:
            self.kept[signature] = choose(self.noted.pop(signature), self.budget)
        kept = self.kept.get(signature)
        if kept is not None:
            return lambda index, *_: index in kept
        notes: list[tuple[int, int]] = []
        self.noted[signature] = notes

        def note(index: int, func: Any, args: Any, kwargs: Any, out: Any) -> bool:
            notes.append((op_flops(func, args, kwargs, out), output_bytes(out)))
            return False

        return note


def _context_maker(policy: Policy, budget: float
                   ) -> Callable[[tuple[Any, ...], dict[str, Any]], Any] | None:
    """``make(args, kwargs) -> context_fn`` for one block, or None (plain checkpoint)."""
    if policy == "save_matmuls" or (policy == "budget" and budget >= 1.0):
        return lambda args, kwargs: functools.partial(_contexts, _keep_all)
    if policy == "budget" and budget > 0.0:
        per_block = BudgetPolicy(budget)
        return lambda args, kwargs: functools.partial(
            _contexts, per_block.for_call(_signature(args, kwargs)))
    return None


def _wrap(block: nn.Module, policy: Policy = "none", budget: float = 0.0
          ) -> Callable[[], None]:
    contexts = _context_maker(policy, budget)

    def make(inner: Callable[..., Any]) -> Callable[..., Any]:
        def forward(_self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            if torch.is_grad_enabled():
                extra = {} if contexts is None else {"context_fn": contexts(args, kwargs)}
                # preserve_rng_state off: the base runs in eval mode and draws no random
                # numbers
                return checkpoint(inner, *args, use_reentrant=False,
                                  preserve_rng_state=False, **extra, **kwargs)
            return inner(*args, **kwargs)

        return forward

    return patch_forward(block, make)


def apply(ctx: BuildContext, memory: Any) -> StrategyResult:
    top = ctx.loaded.blocks or top_level_blocks(ctx.model)
    undos = [_wrap(b, memory.checkpoint_policy, memory.checkpoint_budget)
             for b in blocks_at_depth(top, memory.checkpoint_depth)]

    def undo_all() -> None:
        for u in reversed(undos):
            u()

    return StrategyResult(undo=undo_all)


def validate(config: Any) -> list[str]:
    memory = config.memory
    if memory.checkpoint_policy != "none" and not memory.gradient_checkpointing:
        return [f"memory.checkpoint_policy: {memory.checkpoint_policy} needs "
                f"memory.gradient_checkpointing: true"]
    return []


def describe(config: Any) -> str:
    memory = config.memory
    policy = memory.checkpoint_policy
    detail = ("" if policy == "none" else
              f", budget {memory.checkpoint_budget:g}" if policy == "budget" else
              f", {policy}")
    return f"gradient_checkpointing(depth {memory.checkpoint_depth}{detail})"


SPEC = MemoryStrategySpec("gradient_checkpointing", CheckpointOptions,
                          enabled=lambda c: c.memory.gradient_checkpointing, apply=apply, order=50,
                          validate=validate, describe=describe,
                          description="Gradient checkpointing at checkpoint_depth, "
                                      "optionally selective (checkpoint_policy).")
