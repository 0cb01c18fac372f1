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
  over the whole model by FLOPs of recomputation per byte kept, highest first, until
  the next would exceed the share. One forward pass that recomputes everything notes
  every wrapped block's candidates (FLOPs and bytes, from shapes); when a block is
  called again with inputs it has seen, the cut is fixed for the model: an output is
  kept when it ranks above the cut by (FLOPs per byte, highest first; then the
  block's place in the model; then the operator's place in the block). Later calls,
  new input shapes included, keep by that rank without another noting pass. (A
  convolution's FLOPs per byte do not depend on the image size, so a cut found at one
  bucket keeps the same layers at the others.) One cut for the model rather than one
  share per block keeps the products that are dearest to recompute wherever they
  are: in a UNet, the wide low-resolution blocks' convolutions cost several times
  the FLOPs per byte of the narrow full-resolution ones.

The selection runs as a pair of modes ``torch.utils.checkpoint`` takes as its
``context_fn`` (one in the forward pass, one in the recomputation), as
``create_selective_checkpoint_contexts`` does, with two differences. The modes number
only the candidate operators, not every operator of the region: a recomputation may
run other operators a different number of times than the forward pass did (offloading
loads a block's weights again) and still find each kept output. And the dispatch mode
that sees operators is entered only inside the calls of the few functions that run
candidates (``F.linear``, the convolutions, attention, the matrix products), from a
function mode that lets everything else pass: a dispatch mode over the whole region
takes every view, norm and elementwise operator through Python, twice per step, which
on the compass UNet cost more than what the policy saved.

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
from torch.overrides import TorchFunctionMode
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
        "costliest to recompute per byte first, over the whole model). Not with "
        "training.compile.")
    checkpoint_budget: float = Field(
        0.5, ge=0.0, le=1.0, description="With checkpoint_policy budget: the share of "
        "the bytes of the matmul, convolution and attention outputs of all wrapped "
        "blocks that is kept, ranked over the whole model (0 keeps none, as policy "
        "none; 1 keeps all, as save_matmuls).")


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


def density(flops: int, nbytes: int) -> float:
    """FLOPs of recomputation per byte kept."""
    return flops / max(nbytes, 1)


#: A candidate's rank under the budget policy, smallest first: (−FLOPs per byte, the
#: block's place in the model, the operator's place in the block's call).
Rank = tuple[float, int, int]


def cut_of(candidates: list[tuple[Rank, int]], budget: float) -> Rank | None:
    """The rank of the last candidate kept when ``(rank, bytes)`` candidates are kept
    in order of rank until the next would exceed ``budget`` × all their bytes (None:
    none is kept)."""
    limit = budget * sum(b for _, b in candidates)
    cut, used = None, 0
    for rank, nbytes in sorted(candidates):
        if used + nbytes > limit:
            break
        cut, used = rank, used + nbytes
    return cut


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


#: Names of the functions (torch.*, torch.nn.functional.*, Tensor methods) whose
#: operators may be ``SAVEABLE``: only inside their calls do the dispatch modes watch.
GATED: frozenset[str] = frozenset({
    "linear", "bilinear", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
    "conv_transpose2d", "conv_transpose3d", "convolution", "_convolution",
    "scaled_dot_product_attention", "mm", "addmm", "bmm", "baddbmm", "matmul",
    "__matmul__", "__rmatmul__", "einsum", "tensordot", "_scaled_mm",
})


def _gated(func: Any) -> bool:
    """Whether the dispatch mode watches this call: a ``GATED`` function, or one of
    the ``SAVEABLE`` operators called directly (``torch.ops.aten...``)."""
    if getattr(func, "__name__", None) in GATED:
        return True
    return getattr(func, "overloadpacket", func) in SAVEABLE


class _Gate(TorchFunctionMode):
    """Enters ``mode`` only for the calls of the ``GATED`` functions. A dispatch mode
    sees every operator of the region (views, elementwise ops, norms), each a round
    trip into Python; the candidates come from a few functions, so the other
    operators run without it. Both passes of a checkpointed call run the same code, so
    both see the same candidates in the same order."""

    def __init__(self, mode: _KeepMode | _ReuseMode):
        super().__init__()
        self.mode = mode

    def __enter__(self) -> _Gate:
        if isinstance(self.mode, _ReuseMode):
            self.mode.next = 0
        return super().__enter__()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        kwargs = kwargs or {}
        if not _gated(func):
            return func(*args, **kwargs)
        with self.mode:
            return func(*args, **kwargs)


def _contexts(decide: Decide) -> tuple[_Gate, _Gate]:
    entries: list[_Entry] = []
    return _Gate(_KeepMode(decide, entries)), _Gate(_ReuseMode(entries))


def _keep_all(index: int, func: Any, args: Any, kwargs: Any, out: Any) -> bool:
    return True


def _ranked(block: int, index: int, func: Any, args: Any, kwargs: Any, out: Any
            ) -> tuple[Rank, int]:
    """The rank and bytes of the ``index``-th candidate of the ``block``-th block."""
    nbytes = output_bytes(out)
    return (-density(op_flops(func, args, kwargs, out), nbytes), block, index), nbytes


class BudgetPolicy:
    """The ``budget`` policy of one model: the first pass through each wrapped block
    notes its candidates (recomputing everything); the first repeated call fixes one
    cut for all blocks, and from then on each call keeps the candidates ranked above
    it (remembered per block and input signature)."""

    def __init__(self, budget: float):
        self.budget = budget
        self.notes: list[tuple[Rank, int]] = []
        self.noted: set[tuple[int, tuple[Any, ...]]] = set()
        self.cut: Rank | None = None
        self.decided = False  # the cut is fixed (it may be None: nothing fits)
        self.kept: dict[tuple[int, tuple[Any, ...]], set[int]] = {}

    def for_call(self, block: int, signature: tuple[Any, ...]) -> Decide:
        """The decision of one checkpointed call of the ``block``-th wrapped block with
        these inputs."""
        key = (block, signature)
        if not self.decided and key in self.noted:
            self.cut, self.decided = cut_of(self.notes, self.budget), True
            self.notes, self.noted = [], set()
        if not self.decided:
            self.noted.add(key)

            def note(index: int, func: Any, args: Any, kwargs: Any, out: Any) -> bool:
                self.notes.append(_ranked(block, index, func, args, kwargs, out))
                return False

            return note
        known = self.kept.get(key)
        if known is not None:
            return lambda index, *_: index in known
        cut, chosen = self.cut, set[int]()
        self.kept[key] = chosen  # filled in as this first call runs

        def rank_and_keep(index: int, func: Any, args: Any, kwargs: Any, out: Any) -> bool:
            keep = cut is not None and _ranked(block, index, func, args, kwargs, out)[0] <= cut
            if keep:
                chosen.add(index)
            return keep

        return rank_and_keep


ContextMaker = Callable[[tuple[Any, ...], dict[str, Any]], Any]


def _context_makers(policy: Policy, budget: float, count: int
                    ) -> list[ContextMaker | None]:
    """For each of ``count`` wrapped blocks, ``make(args, kwargs) -> context_fn`` (None:
    plain checkpoint)."""
    if policy == "save_matmuls" or (policy == "budget" and budget >= 1.0):
        return [lambda args, kwargs: functools.partial(_contexts, _keep_all)] * count
    if policy == "budget" and budget > 0.0:
        model = BudgetPolicy(budget)

        def for_block(i: int) -> ContextMaker:
            return lambda args, kwargs: functools.partial(
                _contexts, model.for_call(i, _signature(args, kwargs)))

        return [for_block(i) for i in range(count)]
    return [None] * count


def _wrap(block: nn.Module, contexts: ContextMaker | None) -> Callable[[], None]:
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
    blocks = blocks_at_depth(top, memory.checkpoint_depth)
    makers = _context_makers(memory.checkpoint_policy, memory.checkpoint_budget, len(blocks))
    undos = [_wrap(b, make) for b, make in zip(blocks, makers, strict=True)]

    def undo_all() -> None:
        for u in reversed(undos):
            u()

    return StrategyResult(undo=undo_all)


def validate(config: Any) -> list[str]:
    memory = config.memory
    if memory.checkpoint_policy != "none" and not memory.gradient_checkpointing:
        return [f"memory.checkpoint_policy: {memory.checkpoint_policy} needs "
                f"memory.gradient_checkpointing: true"]
    if memory.checkpoint_policy != "none" and config.training.compile:
        # the policies choose per operator from Python modes, which torch.compile cannot
        # trace into a graph: it would retrace every block call and fall back to eager
        return [f"memory.checkpoint_policy: {memory.checkpoint_policy} runs eagerly and "
                f"cannot be combined with training.compile: "
                f"{config.training.compile} (set checkpoint_policy: none, or compile: "
                f"false)"]
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
