"""Forward+backward time of a stack of adapted layers, per algorithm, relative to
PEFT's and LyCORIS's implementations measured in the same run.

    python benchmarks/adapters.py [--width 256] [--layers 6] [--iters 20] [--threads 1]

Two stacks: Linear layers on a batch of tokens and 3×3 convolutions on a feature map.
Every adapter parameter is perturbed first (so no zero factor short-cuts anything),
and each configuration is timed as the median of ``--iters`` steps after a warm-up,
the implementations taking turns step by step.
Printed ratios are ours / theirs: below 1 means faster. Absolute times depend on the
machine and are printed only to read the ratios against.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from loraengine.core.adapter import AdapterNetwork
from loraengine.plugins import build_plugin_manager

#: name -> (our algorithm, our options, PEFT config factory or None, LyCORIS algo + kwargs)
CONFIGS: dict[str, tuple[str, dict, str | None, tuple[str, dict] | None]] = {
    "lora": ("lora", {}, "lora", ("lora", {})),
    "dora": ("lora", {"weight_decompose": True}, "dora", ("lora", {"weight_decompose": True})),
    "loha": ("loha", {}, "loha", ("loha", {})),
    "lokr": ("lokr", {"factor": -1}, "lokr", ("lokr", {"factor": -1})),
    "full": ("full", {}, None, ("full", {})),
}


def stacks(width: int, layers: int) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    lin = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    conv = nn.Sequential(*[nn.Conv2d(width // 4, width // 4, 3, padding=1)
                           for _ in range(layers)])
    for m in (lin, conv):
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        m.requires_grad_(False)
    return {"linear": (lin, torch.randn(64, width, generator=g)),
            "conv3x3": (conv, torch.randn(4, width // 4, 16, 16, generator=g))}


@torch.no_grad()
def perturb(params: list[nn.Parameter]) -> None:
    g = torch.Generator().manual_seed(1)
    for p in params:
        p.add_(torch.randn(p.shape, generator=g) * 0.01)


def timed(steps: dict[str, Callable[[], None]], iters: int) -> dict[str, float]:
    """Median ms per step of each variant. The variants take turns, so a busy machine
    slows them alike and the ratios stay meaningful."""
    for step in steps.values():
        for _ in range(3):
            step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(iters):
        for key, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def make_step(model: nn.Module, x: torch.Tensor, params: list[nn.Parameter]
              ) -> Callable[[], None]:
    def step() -> None:
        for p in params:
            p.grad = None
        model(x).square().mean().backward()
    return step


def ours(model: nn.Module, algo: str, options: dict, rank: int, alpha: float, mode: str
         ) -> tuple[nn.Module, list[nn.Parameter]]:
    spec = build_plugin_manager().registry.get("adapter", algo)
    opts = spec.config_model.model_validate(options)
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    layers = {p: spec.create(m, rank, alpha, opts, g) for p, m in model.named_modules()
              if isinstance(m, (nn.Linear, nn.Conv2d))}
    net = AdapterNetwork(layers)
    net.attach(mode)  # type: ignore[arg-type]
    object.__setattr__(model, "_bench_net", net)  # alive with the model, not a child
    return model, list(net.parameters())


def peft_stack(model: nn.Module, kind: str, rank: int, alpha: float
               ) -> tuple[nn.Module, list[nn.Parameter]]:
    import peft

    targets = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    config = {
        "lora": lambda: peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets),
        "dora": lambda: peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                                        use_dora=True),
        "loha": lambda: peft.LoHaConfig(r=rank, alpha=alpha, target_modules=targets),
        "lokr": lambda: peft.LoKrConfig(r=rank, alpha=alpha, target_modules=targets,
                                        decompose_factor=-1),
    }[kind]()
    wrapped = peft.get_peft_model(copy.deepcopy(model), config)
    return wrapped, [p for p in wrapped.parameters() if p.requires_grad]


def lycoris_stack(model: nn.Module, algo: str, kwargs: dict, rank: int, alpha: float
                  ) -> tuple[nn.Module, list[nn.Parameter]]:
    from lycoris import create_lycoris

    model = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = create_lycoris(model, 1.0, linear_dim=rank, linear_alpha=alpha, conv_dim=rank,
                             conv_alpha=alpha, algo=algo, **kwargs)
    net.apply_to()
    object.__setattr__(model, "_bench_net", net)
    return model, list(net.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    rank, alpha = args.rank, args.rank / 2
    print(f"forward+backward, median of {args.iters}, ms; ratio = ours / theirs "
          f"(width {args.width}, {args.layers} layers, rank {rank})")
    print(f"{'stack':8} {'algo':6} {'ours(w)':>8} {'ours(b)':>8} {'peft':>8} {'w/peft':>7} "
          f"{'lycoris':>8} {'w/lyco':>7}")
    for stack, (model, x) in stacks(args.width, args.layers).items():
        for name, (algo, options, peft_kind, lyco) in CONFIGS.items():
            steps = {}
            for mode in ("weight", "bypass"):
                m, params = ours(model, algo, options, rank, alpha, mode)
                perturb(params)
                steps[mode] = make_step(m, x, params)
            if peft_kind is not None:
                m, params = peft_stack(model, peft_kind, rank, alpha)
                perturb(params)
                steps["peft"] = make_step(m, x, params)
            if lyco is not None:
                m, params = lycoris_stack(model, lyco[0], lyco[1], rank, alpha)
                perturb(params)
                steps["lycoris"] = make_step(m, x, params)
            row = timed(steps, args.iters)
            print(f"{stack:8} {name:6} {_ms(row, 'weight')} {_ms(row, 'bypass')} "
                  f"{_ms(row, 'peft')} {_ratio(row, 'peft')} {_ms(row, 'lycoris')} "
                  f"{_ratio(row, 'lycoris')}")


def _ratio(row: dict[str, float], key: str) -> str:
    return f"{row['weight'] / row[key]:7.2f}" if key in row else f"{'-':>7}"


def _ms(row: dict[str, float], key: str) -> str:
    return f"{row[key]:8.2f}" if key in row else f"{'-':>8}"


if __name__ == "__main__":
    main()
