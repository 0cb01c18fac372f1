"""Training-step time and peak memory of loraengine against a hand-written PEFT + torch
loop (LoRA), against LyCORIS (LoHa, LoKr, OFT), and against the floor: the frozen
base's forward+backward alone. One small SD-style diffusers UNet (random init, nothing
downloaded), the same data and the same adapted layers for every contender, all in
one run; writes docs/benchmarks.md.

    python benchmarks/run.py [--quick | --size quick|full|large] [--rank 4] [--rounds 5]
                             [--threads 1]
                             [--device cpu|cuda] [--no-write]

What is timed is one optimizer step of batch ``--batch``: for the floor, forward,
MSE loss and backward with only the input requiring a gradient; for the loops, that
plus AdamW over the adapter; for loraengine, ``Trainer.step()`` (its own noise and
timestep draws, loss, backward, finite checks, AdamW, LR schedule). Times are medians
over ``--rounds`` rounds in which every contender runs ``--steps`` steps in turn, so a
busy machine slows all of them alike. Peak memory is the largest total size of live
tensors during one step (PyTorch's memory profiler on the CPU, the allocator's peak on
CUDA): weights, adapter, optimizer state, activations and gradients.

Ratios are contender / baseline: below 1 is faster or smaller. Targets: loraengine's
LoRA at most 1.05× the PEFT loop and 1.15× the floor; its LoHa, LoKr and OFT at most
1.3× the floor. For each missed target the report adds the top operators of a profiled
step of that contender and of its baseline.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import logging
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
REPORT = REPO / "docs" / "benchmarks.md"

#: UNet sizes: channels per level, latent side, text tokens and width.
SIZES = {
    "full": {"channels": (64, 128, 128), "latent": 16, "tokens": 16, "text_dim": 96},
    "quick": {"channels": (32, 64), "latent": 8, "tokens": 8, "text_dim": 32},
    "large": {"channels": (128, 256, 256), "latent": 16, "tokens": 16, "text_dim": 128},
}

#: contender -> (loraengine algorithm, its options, LyCORIS algo, LyCORIS kwargs)
ALGOS: dict[str, tuple[str, dict, str, dict]] = {
    "loha": ("loha", {}, "loha", {}),
    "lokr": ("lokr", {"factor": -1}, "lokr", {"factor": -1}),
    "oft": ("oft", {}, "diag-oft", {}),
}


# -- the model and data ---------------------------------------------------------------------

def make_unet(size: dict[str, Any], seed: int = 0) -> nn.Module:
    from diffusers import UNet2DConditionModel

    levels = len(size["channels"])
    torch.manual_seed(seed)  # diffusers initialises from the global RNG
    unet = UNet2DConditionModel(
        sample_size=size["latent"], in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=size["channels"],
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        cross_attention_dim=size["text_dim"], attention_head_dim=8, norm_num_groups=16)
    return unet.eval().requires_grad_(False)


def make_data(size: dict[str, Any], n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, 4, size["latent"], size["latent"], generator=g)
    cond = torch.randn(n, size["tokens"], size["text_dim"], generator=g)
    return latents, cond


def alphas_cumprod(steps: int = 1000) -> torch.Tensor:
    """SD's scaled-linear DDPM schedule."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


@dataclass
class Batch:
    x_t: torch.Tensor
    t: torch.Tensor
    cond: torch.Tensor
    target: torch.Tensor


def make_batches(latents: torch.Tensor, cond: torch.Tensor, batch: int, count: int,
                 device: torch.device, seed: int = 1) -> list[Batch]:
    """Noised batches for the hand-written loops (epsilon target), drawn up front."""
    g = torch.Generator().manual_seed(seed)
    ac = alphas_cumprod()
    out = []
    for _ in range(count):
        idx = torch.randint(0, latents.shape[0], (batch,), generator=g)
        x0, noise = latents[idx], torch.randn(latents[idx].shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        a = ac[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - ac[t]).sqrt().view(-1, 1, 1, 1)
        out.append(Batch((a * x0 + s * noise).to(device), t.to(device),
                         cond[idx].to(device), noise.to(device)))
    return out


# -- contenders -----------------------------------------------------------------------------

@dataclass
class Contender:
    name: str
    step: Callable[[], None]
    trainable: list[nn.Parameter]
    keep: Any = None  # whatever must stay alive with the step (a network, a pipeline)
    times: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    profile: dict[str, tuple[int, float]] | None = None

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.trainable)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times) * 1e3


class Cycle:
    """Hands out the pre-drawn batches in turn."""

    def __init__(self, batches: list[Batch]):
        self.batches, self.i = batches, 0

    def __call__(self) -> Batch:
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return b


def loop_step(model: nn.Module, batches: Cycle, opt: torch.optim.Optimizer | None
              ) -> Callable[[], None]:
    """A hand-written training step; without an optimizer, the floor."""

    def step() -> None:
        b = batches()
        x_t = b.x_t
        if opt is None:
            x_t = x_t.detach().requires_grad_(True)  # something must want a gradient
        else:
            opt.zero_grad(set_to_none=True)
        pred = model(x_t, b.t, b.cond).sample
        F.mse_loss(pred.float(), b.target).backward()
        if opt is not None:
            opt.step()

    return step


def adapted_layer_names(unet: nn.Module) -> list[str]:
    """What every contender adapts: each Linear and Conv2d (groups 1)."""
    return [n for n, m in unet.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and getattr(m, "groups", 1) == 1]


def floor(unet: nn.Module, batches: Cycle) -> Contender:
    model = copy.deepcopy(unet)
    return Contender("floor (frozen fwd+bwd)", loop_step(model, batches, None), [], model)


def adamw(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)


def peft_lora(unet: nn.Module, batches: Cycle, rank: int, alpha: float) -> Contender:
    from peft import LoraConfig, inject_adapter_in_model

    model = copy.deepcopy(unet)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True,
                        target_modules=adapted_layer_names(unet))
    model = inject_adapter_in_model(config, model)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return Contender("PEFT LoRA loop", loop_step(model, batches, adamw(params)), params, model)


def lycoris(unet: nn.Module, batches: Cycle, name: str, rank: int, alpha: float) -> Contender:
    from lycoris import create_lycoris

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)  # it sets its own level on import
    _, _, algo, kwargs = ALGOS[name]
    model = copy.deepcopy(unet)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = create_lycoris(model, 1.0, linear_dim=rank, linear_alpha=alpha, conv_dim=rank,
                             conv_alpha=alpha, algo=algo, **kwargs)
    net.apply_to()
    net.to(next(model.parameters()).device)
    params = [p for p in net.parameters() if p.requires_grad]
    return Contender(f"LyCORIS {name}", loop_step(model, batches, adamw(params)), params,
                     (model, net))


def loraengine(unet: nn.Module, latents: torch.Tensor, cond: torch.Tensor, algo: str,
               options: dict, rank: int, alpha: float, batch: int, device: torch.device
               ) -> Contender:
    from loraengine.core.build import build_pipeline
    from loraengine.core.config.root import parse_config
    from loraengine.core.train.loop import Trainer
    from loraengine.plugins import build_plugin_manager

    host = build_plugin_manager(entry_points=False)
    config = parse_config({
        "model": {"family": "module"},
        "training": {"steps": 100000, "batch_size": batch, "dtype": "fp32", "seed": 0,
                     "device": str(device)},
        "adapter": {"algorithm": algo, "rank": rank, "alpha": alpha, "dtype": "fp32",
                    "include": adapted_layer_names(unet), **options},
        "optimizer": {"name": "adamw", "lr": 1e-4, "weight_decay": 0.01},
        "memory": {"gradient_checkpointing": False},
    }, host.registry)
    pipe = build_pipeline(config, host, model=copy.deepcopy(unet), latents=latents,
                          conditioning=cond)
    trainer = Trainer(pipe, write_files=False)
    return Contender(f"loraengine {algo}", lambda: trainer.step(),
                     pipe.trainable_parameters(), (pipe, trainer))


# -- measuring --------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_all(contenders: list[Contender], rounds: int, steps: int, warmup: int,
             device: torch.device) -> None:
    for c in contenders:
        for _ in range(warmup):
            c.step()
    sync(device)
    for r in range(rounds):
        shift = r % len(contenders)  # a different contender goes first each round
        for c in contenders[shift:] + contenders[:shift]:
            for _ in range(steps):
                t0 = time.perf_counter()
                c.step()
                sync(device)
                c.times.append(time.perf_counter() - t0)


def peak_memory(c: Contender, device: torch.device) -> int | None:
    """Largest total size of live tensors during one step (None when unmeasurable)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        c.step()
        sync(device)
        return int(torch.cuda.max_memory_allocated(device))
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch.profiler._memory_profiler import Action

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True,
                     record_shapes=True, with_stack=True) as prof:
            c.step()
        live = peak = 0
        for _, action, _, size in prof._memory_profile().timeline:
            if action in (Action.PREEXISTING, Action.CREATE):
                live += size
            elif action == Action.DESTROY:
                live -= size
            peak = max(peak, live)
        return peak
    except Exception as exc:  # noqa: BLE001 — a private API; report, do not fail the run
        print(f"  (peak memory of {c.name} not measured: {type(exc).__name__}: {exc})",
              file=sys.stderr)
        return None


def op_profile(c: Contender, device: torch.device) -> dict[str, tuple[int, float]]:
    """``{operator: (calls, self time in ms)}`` over one profiled step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                           if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        c.step()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return {e.key: (e.count, getattr(e, key) / 1e3) for e in prof.key_averages()}


def profile_diff(ours: dict[str, tuple[int, float]], base: dict[str, tuple[int, float]],
                 names: tuple[str, str], rows: int = 10) -> str:
    """Where the extra time goes: operators by self time added over the baseline."""
    ops = set(ours) | set(base)
    added = sorted(ops, key=lambda o: ours.get(o, (0, 0.0))[1] - base.get(o, (0, 0.0))[1],
                   reverse=True)
    a, b = names
    lines = [f"| operator | calls: {a} / {b} | self ms: {a} / {b} | added ms |",
             "|---|---|---|---|"]

    def row(label: str, x: tuple[int, float], y: tuple[int, float]) -> str:
        return (f"| {label} | {x[0]} / {y[0]} | {x[1]:.2f} / {y[1]:.2f} | "
                f"{x[1] - y[1]:+.2f} |")

    for op in added[:rows]:
        lines.append(row(f"`{op}`", ours.get(op, (0, 0.0)), base.get(op, (0, 0.0))))
    def total(p: dict[str, tuple[int, float]]) -> tuple[int, float]:
        return sum(n for n, _ in p.values()), sum(t for _, t in p.values())

    lines.append(row("**all operators**", total(ours), total(base)))
    return "\n".join(lines)


# -- the report -------------------------------------------------------------------------------

def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return f"{cpu}, {os.cpu_count()} logical cores, {platform.system()} {platform.release()}"


def versions() -> str:
    names = ["loraengine", "torch", "diffusers", "peft", "lycoris-lora"]
    out = []
    for n in names:
        try:
            out.append(f"{n} {metadata.version(n)}")
        except metadata.PackageNotFoundError:
            out.append(f"{n} (not installed)")
    return ", ".join(out) + f", Python {platform.python_version()}"


@dataclass
class Target:
    contender: str
    baseline: str
    limit: float


def mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None or not b else f"{a / b:.3f}"


def report(by_name: dict[str, Contender], targets: list[Target], comparisons: list[tuple],
           setup: str, device: torch.device) -> tuple[str, list[Target]]:
    floor_c = by_name["floor (frozen fwd+bwd)"]
    lines = ["| contender | trainable params | step (ms) | × floor | peak memory (MiB) "
             "| × floor |", "|---|---|---|---|---|---|"]
    for c in by_name.values():
        lines.append(f"| {c.name} | {c.params:,} | {c.median_ms:.1f} | "
                     f"{ratio(c.median_ms, floor_c.median_ms)} | {mib(c.peak_bytes)} | "
                     f"{ratio(c.peak_bytes, floor_c.peak_bytes)} |")
    lines += ["", "| loraengine vs | step time ratio | peak memory ratio |", "|---|---|---|"]
    for ours, theirs in comparisons:
        a, b = by_name[ours], by_name[theirs]
        lines.append(f"| {ours} / {theirs} | {ratio(a.median_ms, b.median_ms)} | "
                     f"{ratio(a.peak_bytes, b.peak_bytes)} |")
    lines += ["", "| target | reached | limit | met |", "|---|---|---|---|"]
    missed = []
    for t in targets:
        value = by_name[t.contender].median_ms / by_name[t.baseline].median_ms
        met = value <= t.limit
        if not met:
            missed.append(t)
        lines.append(f"| {t.contender} step time / {t.baseline} | {value:.3f} | "
                     f"≤ {t.limit:g} | {'yes' if met else '**no**'} |")
    body = "\n".join(lines)
    return body, missed


def write_report(body: str, missed: list[Target], by_name: dict[str, Contender],
                 setup: str, command: str) -> None:
    text = [
        "# Benchmarks", "",
        f"<!-- Written by `{command}`; rerun it to refresh. -->", "",
        "Training-step time and peak memory of loraengine against a hand-written PEFT + "
        "torch loop (LoRA), against LyCORIS (LoHa, LoKr, OFT), and against the frozen "
        "base's forward+backward (the floor no adapter trainer can beat), measured in "
        "one run on the same UNet, data and adapted layers. Ratios are contender / "
        "baseline: below 1 is faster or smaller. How it is measured: see the docstring "
        "of `benchmarks/run.py`.", "",
        f"- Machine: {machine()}",
        f"- Software: {versions()}",
        f"- Setup: {setup}",
        f"- Date: {datetime.date.today().isoformat()}", "",
        body, ""]
    if missed:
        text += ["## Where the time goes in the missed targets", "",
                 "One profiled step of the contender and of its baseline: the operators "
                 "that add the most self time, then the totals. Operator counts show the "
                 "fixed cost per adapted layer; `convolution_backward` and `mm` growing "
                 "beyond the extra adapter work show weight gradients of the base layers "
                 "being computed (algorithms that rebuild W+ΔW need dL/dW to reach ΔW).",
                 ""]
        for t in missed:
            ours, base = by_name[t.contender], by_name[t.baseline]
            text += [f"### {t.contender} / {t.baseline}", "",
                     profile_diff(ours.profile or {}, base.profile or {},
                                  ("ours", "base")), ""]
    REPORT.write_text("\n".join(text).rstrip() + "\n", encoding="utf-8")


# -- main -------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="A smaller UNet and fewer rounds "
                    "(the same as --size quick).")
    ap.add_argument("--size", choices=sorted(SIZES), default="full",
                    help="UNet size: quick, full (default) or large (4× the compute).")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=None, help="Default 5 (quick: 3).")
    ap.add_argument("--steps", type=int, default=3, help="Steps per contender per round.")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-write", action="store_true", help="Print only.")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    device = torch.device(args.device)
    if args.quick:
        args.size = "quick"
    size = SIZES[args.size]
    rounds = args.rounds or (3 if args.size == "quick" else 5)
    rank, alpha = args.rank, float(args.rank)

    unet = make_unet(size).to(device)
    latents, cond = make_data(size, n=8)
    batches = Cycle(make_batches(latents, cond, args.batch, 16, device))
    base_params = sum(p.numel() for p in unet.parameters())
    setup = (f"UNet2DConditionModel, channels {size['channels']}, {base_params:,} "
             f"parameters, {len(adapted_layer_names(unet))} adapted Linear/Conv2d layers; "
             f"latents 4×{size['latent']}×{size['latent']}, text {size['tokens']}×"
             f"{size['text_dim']}; batch {args.batch}; rank {rank}, alpha {alpha:g}; fp32; "
             f"AdamW; {args.device}, {args.threads} thread(s); median of {rounds} rounds × "
             f"{args.steps} steps")
    print(setup, flush=True)

    contenders = [floor(unet, batches), peft_lora(unet, batches, rank, alpha),
                  loraengine(unet, latents, cond, "lora", {}, rank, alpha, args.batch, device)]
    comparisons = [("loraengine lora", "PEFT LoRA loop")]
    targets = [Target("loraengine lora", "PEFT LoRA loop", 1.05),
               Target("loraengine lora", "floor (frozen fwd+bwd)", 1.15)]
    for name, (algo, options, _, _) in ALGOS.items():
        contenders.append(lycoris(unet, batches, name, rank, alpha))
        contenders.append(loraengine(unet, latents, cond, algo, options, rank, alpha,
                                     args.batch, device))
        comparisons.append((f"loraengine {algo}", f"LyCORIS {name}"))
        targets.append(Target(f"loraengine {algo}", "floor (frozen fwd+bwd)", 1.3))
    by_name = {c.name: c for c in contenders}

    t0 = time.perf_counter()
    time_all(contenders, rounds, args.steps, warmup=2, device=device)
    for c in contenders:
        c.peak_bytes = peak_memory(c, device)
    body, missed = report(by_name, targets, comparisons, setup, device)
    for t in missed:
        for name in (t.contender, t.baseline):
            if by_name[name].profile is None:
                by_name[name].profile = op_profile(by_name[name], device)
    print(body)
    print(f"\n({time.perf_counter() - t0:.0f} s of measuring)")
    if not args.no_write:
        command = "python benchmarks/run.py" + ("" if args.size == "full" else
                                                 f" --size {args.size}")
        write_report(body, missed, by_name, setup, command)
        print(f"wrote {REPORT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
