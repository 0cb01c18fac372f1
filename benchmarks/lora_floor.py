"""How close to the floor a LoRA trainer can get on a workload of ``benchmarks/run.py``.

The floor is the frozen base's forward+backward (input gradient only). Any LoRA trainer
adds, per adapted layer with ``N`` output positions, fan-in ``I`` (in · kernel), ``O``
outputs and rank ``r``: the down and up products forward (``2·N·r·I + 2·N·r·O``
FLOPs), and backward the up gradient (``2·N·r·O``), ``dh`` (``2·N·r·O``), the down
gradient (``2·N·r·I``) and the down path's share of ``dx`` (``2·N·r·I``): in all
``6·N·r·(I+O)``, against the base layer's ``4·N·I·O`` in the floor. Then AdamW over
the adapter's parameters.

Those FLOPs do not run at the base's rate: a product with a contraction or an output
of ``r`` = 8 is bound by reading and writing its ``N``-row operands. So this script
also times, per distinct layer shape, the least work a LoRA step must do there — the
six products above as bare kernels, no autograd, the results added in place into
preallocated outputs, each in the fastest operand layout found (the rank-r
intermediate kept rank-axis first) — next to the base layer's own forward and input gradient. The
lowest reachable ratio is then

    (floor step + Σ over layers of that least side-path time + AdamW step) / floor step

with every term timed in the same run (rounds interleave them; CPU time of this
process, so other load on the machine slows the terms alike). A trainer can beat it
only with kernels faster than these (fusing the thin products into the base's), not
by trimming overhead. The pure FLOP bound (thin products at the floor's own FLOP rate)
is printed too.

    python benchmarks/lora_floor.py [--workload compass,flux] [--rounds 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # noqa: E402  (benchmarks/run.py: the workloads)

CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


@dataclass(frozen=True)
class Shape:
    """One adapted layer as it runs: kind, input shape, weight shape, conv geometry."""

    kind: str  # "linear" or "conv"
    x: tuple[int, ...]
    w: tuple[int, ...]
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    bias: bool = True

    def label(self) -> str:
        if self.kind == "linear":
            return f"Linear {self.w[1]}→{self.w[0]} on {list(self.x)}"
        k = "×".join(map(str, self.w[2:]))
        s = "" if set(self.stride) == {1} else f" stride {self.stride[0]}"
        return f"Conv {self.w[1]}→{self.w[0]} {k}{s} on {list(self.x)}"


def layer_shapes(w: run.Workload) -> Counter[Shape]:
    """Every adapted layer of the workload's model with the input it sees on a batch."""
    names = set(run.adapted_layer_names(w.model))
    seen: Counter[Shape] = Counter()
    hooks = []

    def record(mod: nn.Module, args: tuple, _out: torch.Tensor) -> None:
        x = args[0]
        if isinstance(mod, nn.Linear):
            seen[Shape("linear", tuple(x.shape), tuple(mod.weight.shape),
                       bias=mod.bias is not None)] += 1
        else:
            conv = mod  # Conv2d (groups 1, by adapted_layer_names)
            seen[Shape("conv", tuple(x.shape), tuple(conv.weight.shape),
                       tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation),
                       conv.bias is not None)] += 1

    for n, m in w.model.named_modules():
        if n in names:
            hooks.append(m.register_forward_hook(record))
    b = run.make_batches(w.latents, w.cond, w.batch, 1, torch.device("cpu"))[0]
    with torch.no_grad():
        w.model(b.x_t, b.t, b.cond)
    for h in hooks:
        h.remove()
    return seen


def dims(s: Shape) -> tuple[int, int, int]:
    """(N output positions, fan-in I, outputs O)."""
    out, fan_in = s.w[0], 1
    for d in s.w[1:]:
        fan_in *= d
    if s.kind == "linear":
        n = 1
        for d in s.x[:-1]:
            n *= d
        return n, fan_in, out
    y = F.conv2d(torch.empty(1, s.x[1], *s.x[2:]), torch.empty(s.w), None, s.stride,
                 s.padding, s.dilation) if len(s.x) == 4 else None
    assert y is not None, "only Conv2d layers are adapted in these workloads"
    return s.x[0] * y.shape[2] * y.shape[3], fan_in, out


def side_flops(s: Shape, rank: int) -> float:
    n, i, o = dims(s)
    return 6.0 * n * rank * (i + o)


def base_flops(s: Shape) -> float:
    n, i, o = dims(s)
    return 4.0 * n * i * o


# -- the kernels timed ----------------------------------------------------------------

def _kernels(s: Shape, rank: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """(base: forward + input gradient, side: the least LoRA side-path work)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(s.x, generator=g)
    weight = torch.randn(s.w, generator=g) / s.w[1] ** 0.5
    bias = torch.randn(s.w[0], generator=g) if s.bias else None
    if s.kind == "linear":
        x2 = x.reshape(-1, s.x[-1])
        a = torch.randn(rank, s.w[1], generator=g)
        b = torch.randn(s.w[0], rank, generator=g)
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        gy = torch.randn(y.shape, generator=g)
        dx = gy @ weight

        def base() -> None:
            if bias is not None:
                torch.addmm(bias, x2, weight.t())
            else:
                torch.mm(x2, weight.t())
            torch.mm(gy, weight)

        def side() -> None:  # hᵀ [r, N]: the fastest layout found for these products
            h_t = torch.mm(a, x2.t())
            y.addmm_(h_t.t(), b.t())
            torch.mm(h_t, gy)  # d up (transposed)
            dh_t = torch.mm(b.t(), gy.t())
            torch.mm(dh_t, x2)  # d down
            dx.addmm_(dh_t.t(), a)  # down's share of dx, into the base's dx

        return base, side
    conv = CONV[len(s.w)]
    a = torch.randn(rank, *s.w[1:], generator=g)
    b = torch.randn(s.w[0], rank, generator=g)
    geo = (s.stride, s.padding, s.dilation)
    y = conv(x, weight, bias, *geo)
    gy = torch.randn(y.shape, generator=g)
    zeros = [0] * len(s.stride)
    dx = torch.ops.aten.convolution_backward(gy, x, weight, None, *geo, False, zeros, 1,
                                             (True, False, False))[0]
    n = y.shape[0]
    y3, g3 = y.view(n, s.w[0], -1), gy.view(n, s.w[0], -1)

    def base() -> None:
        conv(x, weight, bias, *geo)
        torch.ops.aten.convolution_backward(gy, x, weight, None, *geo, False, zeros, 1,
                                            (True, False, False))

    def side() -> None:
        h = conv(x, a, None, *geo)
        h3 = h.view(n, rank, -1)
        y3.baddbmm_(b.expand(n, *b.shape), h3)
        torch.matmul(h3, g3.transpose(1, 2)).sum(0)  # d up (transposed)
        dh = torch.matmul(b.t(), g3).view(h.shape)
        dxs, _, _ = torch.ops.aten.convolution_backward(dh, x, a, None, *geo, False, zeros,
                                                        1, (True, True, False))
        dx.add_(dxs)

    return base, side


def cpu_ms(fn: Callable[[], None], repeat: int) -> float:
    """Median CPU time of ``fn`` over ``repeat`` calls, ms."""
    times = []
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times) * 1e3


@dataclass
class Bound:
    workload: str
    floor_ms: float
    side_ms: float
    adamw_ms: float
    floor_flops: float
    side_flops: float
    rows: list[tuple[Shape, int, float, float, float, float]]  # shape, count, ms ×2, flops ×2

    @property
    def ratio(self) -> float:
        return (self.floor_ms + self.side_ms + self.adamw_ms) / self.floor_ms

    @property
    def flop_ratio(self) -> float:
        return 1.0 + self.side_flops / self.floor_flops


def analyse(w: run.Workload, rounds: int = 5, repeat: int = 5) -> Bound:
    shapes = layer_shapes(w)
    rank = w.rank
    kernels = {s: _kernels(s, rank) for s in shapes}
    batches = run.Cycle(run.make_batches(w.latents, w.cond, w.batch, 4, torch.device("cpu")))
    floor = run.floor(w.model, batches)
    with FlopCounterMode(display=False) as counter:
        floor.step()
    floor_flops = float(counter.get_total_flops())
    params = []  # the adapter's parameters, as many and as large as a LoRA's
    for s, count in shapes.items():
        for _ in range(count):
            params += [nn.Parameter(torch.randn(rank, *s.w[1:])),
                       nn.Parameter(torch.randn(s.w[0], rank, *[1] * (len(s.w) - 2)))]
    for p in params:
        p.grad = torch.randn_like(p)
    # torch's fused AdamW (one kernel call per step), as loraengine's optimizer takes it:
    # the least an AdamW step over these tensors costs here
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=True)
    floor.step()
    opt.step()
    floor_t, adamw_t = [], []
    per: dict[Shape, tuple[list[float], list[float]]] = {s: ([], []) for s in shapes}
    for _ in range(rounds):  # interleaved: a floor step, AdamW, then every shape's kernels
        t0 = time.process_time()
        floor.step()
        floor_t.append(time.process_time() - t0)
        t0 = time.process_time()
        opt.step()
        adamw_t.append(time.process_time() - t0)
        for s, (base, side) in kernels.items():
            per[s][0].append(cpu_ms(base, repeat))
            per[s][1].append(cpu_ms(side, repeat))
    rows = []
    side_total = side_fl = 0.0
    for s, count in shapes.items():
        b_ms, s_ms = statistics.median(per[s][0]), statistics.median(per[s][1])
        rows.append((s, count, b_ms, s_ms, base_flops(s), side_flops(s, rank)))
        side_total += count * s_ms
        side_fl += count * side_flops(s, rank)
    return Bound(w.title, statistics.median(floor_t) * 1e3, side_total,
                 statistics.median(adamw_t) * 1e3, floor_flops, side_fl, rows)


def table(bound: Bound, top: int = 12) -> str:
    lines = ["| layer shape (batch × …) | layers | base fwd+dx (ms) | LoRA side least (ms) "
             "| side / base | base GFLOP/s | side GFLOP/s |", "|---|---|---|---|---|---|---|"]
    rows = sorted(bound.rows, key=lambda r: -r[1] * r[3])
    for s, count, b_ms, s_ms, b_fl, s_fl in rows[:top]:
        lines.append(f"| {s.label()} | {count} | {b_ms:.2f} | {s_ms:.2f} | "
                     f"{s_ms / b_ms:.2f} | {b_fl / b_ms / 1e6:.1f} | {s_fl / s_ms / 1e6:.1f} |")
    if len(rows) > top:
        rest = rows[top:]
        lines.append(f"| {len(rest)} other shapes | {sum(r[1] for r in rest)} | "
                     f"{sum(r[1] * r[2] for r in rest):.2f} (all) | "
                     f"{sum(r[1] * r[3] for r in rest):.2f} (all) | | | |")
    return "\n".join(lines)


def summary(bound: Bound) -> str:
    return "\n".join([
        f"- floor: {bound.floor_flops / 1e9:.2f} GFLOP per step (counted), "
        f"{bound.floor_ms:.1f} ms CPU",
        f"- LoRA adds {bound.side_flops / 1e9:.2f} GFLOP ({bound.side_flops / bound.floor_flops:.1%}"
        f" of the floor's): at the floor's FLOP rate the bound would be "
        f"{bound.flop_ratio:.3f}× floor",
        f"- the least side-path work timed per layer: {bound.side_ms:.1f} ms, AdamW over the "
        f"adapter {bound.adamw_ms:.1f} ms",
        f"- **lowest reachable with these kernels: {bound.ratio:.3f}× floor**"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="compass,flux")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for key in args.workload.split(","):
        w = run.make_workload(key.strip(), None, None)
        bound = analyse(w, args.rounds)
        print(f"## {w.title}\n\n{summary(bound)}\n\n{table(bound)}\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
