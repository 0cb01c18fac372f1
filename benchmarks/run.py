"""Training-step time and peak memory of loraengine against a hand-written PEFT + torch
loop (LoRA), against LyCORIS (LoHa, LoKr, OFT), and against the floor: the frozen
base's forward+backward alone. Workloads (random init, nothing downloaded), each with
the same data and the same adapted layers (every Linear and Conv2d) for every
contender, all in one run; writes docs/benchmarks.md:

- ``compass``: an SD-style diffusers UNet of about 18 M parameters (blocks 64/128/256,
  two layers per block, cross-attention 128), batch 4, latents 4×32×32, rank 8;
- ``flux``: a tiny FluxTransformer2DModel (2 double-stream and 4 single-stream blocks,
  width 128), batch 4, latents 4×32×32 packed to 256 tokens, rank 8;
- ``small`` / ``quick`` / ``large``: the older small UNets (batch 2, rank 4).

    python benchmarks/run.py [--workload compass,flux] [--quick] [--rounds N]
                             [--steps 2] [--threads 1] [--device cpu|cuda] [--no-write]
                             [--clock wall|cpu] [--no-floor-analysis]

Each loraengine row names the training path its layers took (``adapter.path: auto``:
the per-layer cost model picks factored or rebuild) as ``factored/rebuild`` counts.

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
1.3× the floor, at most 0.6× LyCORIS's step time and at most LyCORIS's peak memory.
A second reference, ``floor + weight gradient``, adds the weight gradient of every
adapted layer to the floor (no optimizer): a layer that trains through the rebuild path
(W+ΔW) must compute that gradient before it reaches the adapter's factors, so it is the
least such a layer can cost; each LoHa, LoKr and OFT row is compared with it too.
For each missed step-time target against the floor the report adds the top operators
of a profiled step of that contender and of the floor. On the CPU each workload also
gets the LoRA floor analysis of ``benchmarks/lora_floor.py``: the lowest ratio to the
floor any LoRA trainer can reach with this machine's kernels.
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


#: The compass UNet: SD-style, about 18 M parameters.
COMPASS = {"channels": (64, 128, 256), "latent": 32, "tokens": 16, "text_dim": 128,
           "layers_per_block": 2, "groups": 32}
#: The tiny Flux-like transformer's data: latents 4×32×32 (256 packed tokens).
FLUX = {"latent": 32, "tokens": 16, "text_dim": 128}


def make_compass_unet(seed: int = 0) -> nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=COMPASS["latent"], in_channels=4, out_channels=4,
        layers_per_block=COMPASS["layers_per_block"], block_out_channels=COMPASS["channels"],
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=COMPASS["text_dim"], attention_head_dim=8,
        norm_num_groups=COMPASS["groups"])
    return unet.eval().requires_grad_(False)


class FluxDenoiser(nn.Module):
    """A FluxTransformer2DModel called as ``model(x_t, t, cond)`` on 4-D latents: packs
    2×2 patches into tokens, pools the text for the pooled projection, and unpacks."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        from loraengine.plugins.models.flow import flux1_image_ids as image_ids
        from loraengine.plugins.models.flow import pack2 as pack
        from loraengine.plugins.models.flow import unpack2 as unpack

        _, _, h, w = x.shape
        txt_ids = torch.zeros(cond.shape[1], 3, device=x.device, dtype=x.dtype)
        out = self.transformer(
            hidden_states=pack(x), encoder_hidden_states=cond,
            pooled_projections=cond.mean(1), timestep=t.to(x.dtype) / 1000,
            img_ids=image_ids(h, w, x.device, x.dtype), txt_ids=txt_ids,
            return_dict=False)[0]
        return unpack(out, h, w)


def make_flux(seed: int = 0) -> nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=4,
        attention_head_dim=32, num_attention_heads=4, joint_attention_dim=FLUX["text_dim"],
        pooled_projection_dim=FLUX["text_dim"], axes_dims_rope=(8, 12, 12))
    return FluxDenoiser(transformer).eval().requires_grad_(False)


@dataclass
class Workload:
    key: str
    title: str
    model: nn.Module
    latents: torch.Tensor
    cond: torch.Tensor
    batch: int
    rank: int
    setup: str = ""


#: Rounds per workload by default: a Flux step takes a tenth of a compass step and its
#: ratios move by 0.1 between runs of 5 rounds on a shared machine, so it gets more.
ROUNDS = {"compass": 10, "flux": 40, "quick": 3}


def make_workload(key: str, batch: int | None, rank: int | None) -> Workload:
    if key == "compass":
        model, size, title = make_compass_unet(), COMPASS, "compass UNet (SD-style, ~18 M)"
        kind = (f"UNet2DConditionModel, channels {COMPASS['channels']}, "
                f"{COMPASS['layers_per_block']} layers per block")
        default_batch, default_rank = 4, 8
    elif key == "flux":
        model, size, title = make_flux(), FLUX, "tiny Flux transformer"
        kind = "FluxTransformer2DModel, 2 double + 4 single blocks, width 128"
        default_batch, default_rank = 4, 8
    else:
        size = SIZES[key]
        model, title = make_unet(size), f"small UNet ({key})"
        kind = f"UNet2DConditionModel, channels {size['channels']}"
        default_batch, default_rank = 2, 4
    latents, cond = make_data(size, n=8)
    params = sum(p.numel() for p in model.parameters())
    w = Workload(key, title, model, latents, cond, batch or default_batch,
                 rank or default_rank)
    w.setup = (f"{kind}, {params:,} parameters, {len(adapted_layer_names(model))} adapted "
               f"Linear/Conv2d layers; latents 4×{size['latent']}×{size['latent']}, text "
               f"{size['tokens']}×{size['text_dim']}; batch {w.batch}; rank {w.rank}, "
               f"alpha {w.rank}")
    return w


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
    #: loraengine only: the layers' training paths, read after the steps
    path_counts: Callable[[], str] | None = None

    @property
    def paths(self) -> str:
        return self.path_counts() if self.path_counts is not None else "—"

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
        out = model(x_t, b.t, b.cond)
        pred = out.sample if hasattr(out, "sample") else out
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
    return Contender(FLOOR, loop_step(model, batches, None), [], model)


def floor_with_weight_gradient(unet: nn.Module, batches: Cycle) -> Contender:
    """The floor plus the weight gradient of every adapted layer (no optimizer): the
    least a trainer that rebuilds W+ΔW in those layers can do, since its backward must
    produce dL/dW′ there (one more product the size of the layer's forward) before it
    reaches the adapter's factors."""
    model = copy.deepcopy(unet)
    names = set(adapted_layer_names(model))
    weights = [m.weight for n, m in model.named_modules() if n in names]
    for weight in weights:
        weight.requires_grad_(True)
    inner = loop_step(model, batches, None)

    def step() -> None:
        inner()
        for weight in weights:
            weight.grad = None

    return Contender(REBUILD_FLOOR, step, [], model)


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
               options: dict, rank: int, alpha: float, batch: int, device: torch.device,
               training: dict | None = None, name: str | None = None) -> Contender:
    from loraengine.core.build import build_pipeline
    from loraengine.core.config.root import parse_config
    from loraengine.core.train.loop import Trainer
    from loraengine.plugins import build_plugin_manager

    host = build_plugin_manager(entry_points=False)
    config = parse_config({
        "model": {"family": "module"},
        "training": {"steps": 100000, "batch_size": batch, "dtype": "fp32", "seed": 0,
                     "device": str(device), **(training or {})},
        "adapter": {"algorithm": algo, "rank": rank, "alpha": alpha, "dtype": "fp32",
                    "include": adapted_layer_names(unet), **options},
        "optimizer": {"name": "adamw", "lr": 1e-4, "weight_decay": 0.01},
        "memory": {"gradient_checkpointing": False},
    }, host.registry)
    pipe = build_pipeline(config, host, model=copy.deepcopy(unet), latents=latents,
                          conditioning=cond)
    trainer = Trainer(pipe, write_files=False)

    def path_counts() -> str:
        taken = [layer.last_path for _, layer in pipe.network.items()]
        return f"{taken.count('factored')}/{taken.count('rebuild')}"

    return Contender(name or f"loraengine {algo}", lambda: trainer.step(),
                     pipe.trainable_parameters(), (pipe, trainer), path_counts=path_counts)


# -- measuring --------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: ``--clock``: wall time, or this process's CPU time (with one thread, the work a step
#: does, much less sensitive to other load on a shared machine than wall time).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def time_all(contenders: list[Contender], rounds: int, steps: int, warmup: int,
             device: torch.device, clock: Callable[[], float] = time.perf_counter) -> None:
    for c in contenders:
        for _ in range(warmup):
            c.step()
    sync(device)
    for r in range(rounds):
        shift = r % len(contenders)  # a different contender goes first each round
        for c in contenders[shift:] + contenders[:shift]:
            for _ in range(steps):
                t0 = clock()
                c.step()
                sync(device)
                c.times.append(clock() - t0)


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
    metric: str = "step time"  # or "peak memory"

    def value(self, by_name: dict[str, Contender]) -> float | None:
        a, b = by_name[self.contender], by_name[self.baseline]
        if self.metric == "step time":
            return a.median_ms / b.median_ms
        if a.peak_bytes is None or not b.peak_bytes:
            return None
        return a.peak_bytes / b.peak_bytes


def mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None or not b else f"{a / b:.3f}"


FLOOR = "floor (frozen fwd+bwd)"
REBUILD_FLOOR = "floor + weight gradient"


def report(by_name: dict[str, Contender], targets: list[Target], comparisons: list[tuple]
           ) -> tuple[str, list[Target]]:
    floor_c = by_name[FLOOR]
    lines = ["| contender | trainable params | path (factored/rebuild layers) | step (ms) "
             "| × floor | peak memory (MiB) | × floor |", "|---|---|---|---|---|---|---|"]
    for c in by_name.values():
        lines.append(f"| {c.name} | {c.params:,} | {c.paths} | {c.median_ms:.1f} | "
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
        value = t.value(by_name)
        met = value is not None and value <= t.limit
        if not met:
            missed.append(t)
        shown = "n/a" if value is None else f"{value:.3f}"
        lines.append(f"| {t.contender} {t.metric} / {t.baseline} | {shown} | "
                     f"≤ {t.limit:g} | {'yes' if met else '**no**'} |")
    return "\n".join(lines), missed


@dataclass
class Section:
    workload: Workload
    body: str
    missed: list[Target]
    by_name: dict[str, Contender]
    #: the LoRA floor analysis of ``benchmarks/lora_floor.py`` (a markdown paragraph)
    lora_bound: str = ""


def write_report(sections: list[Section], setup: str, command: str,
                 path: Path = REPORT) -> None:
    text = [
        "# Benchmarks", "",
        f"<!-- Written by `{command}`; rerun it to refresh. -->", "",
        "Training-step time and peak memory of loraengine against a hand-written PEFT + "
        "torch loop (LoRA), against LyCORIS (LoHa, LoKr, OFT), and against the frozen "
        "base's forward+backward (the floor no adapter trainer can beat) and that floor "
        "plus the adapted layers' weight gradient (the least a layer trained through "
        "W+ΔW can cost), measured in one run on the same model, data and adapted "
        "layers. Ratios are contender / "
        "baseline: below 1 is faster or smaller. The path column gives, for loraengine, "
        "how many adapted layers trained through the factored path and how many "
        "rebuilt W+ΔW (`adapter.path: auto`, the per-layer cost model). How it is "
        "measured: see the docstring of `benchmarks/run.py`.", "",
        "The machine is shared: other work ran on its cores during the run, which slows "
        "every contender of a round alike (rounds interleave them) but adds noise; treat "
        "ratios within a few percent as ties.", "",
        f"- Machine: {machine()}",
        f"- Software: {versions()}",
        f"- Setup: {setup}",
        f"- Date: {datetime.date.today().isoformat()}", ""]
    for sec in sections:
        text += [f"## {sec.workload.title}", "", f"{sec.workload.setup}.", "", sec.body, ""]
        if sec.lora_bound:
            text += [sec.lora_bound, ""]
        profiled = [t for t in sec.missed if t.metric == "step time" and t.baseline == FLOOR]
        if profiled:
            text += ["### Where the time goes in the missed targets", "",
                     "One profiled step of the contender and of the floor: the operators "
                     "that add the most self time, then the totals.", ""]
            for t in profiled:
                ours, base = sec.by_name[t.contender], sec.by_name[t.baseline]
                text += [f"#### {t.contender} / {t.baseline}", "",
                         profile_diff(ours.profile or {}, base.profile or {},
                                      ("ours", "base")), ""]
    # the training.compile section comes from benchmarks/compile.py: kept as it was
    begin, end = "<!-- BEGIN COMPILE -->", "<!-- END COMPILE -->"
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if begin in old and end in old:
        text += ["", old[old.index(begin):old.index(end) + len(end)]]
    path.write_text("\n".join(text).rstrip() + "\n", encoding="utf-8")


def run_workload(w: Workload, args: argparse.Namespace, rounds: int, device: torch.device
                 ) -> Section:
    print(f"== {w.title}: {w.setup}", flush=True)
    model = w.model.to(device)
    batches = Cycle(make_batches(w.latents, w.cond, w.batch, 16, device))
    rank, alpha = w.rank, float(w.rank)
    contenders = [floor(model, batches), floor_with_weight_gradient(model, batches),
                  peft_lora(model, batches, rank, alpha),
                  loraengine(model, w.latents, w.cond, "lora", {}, rank, alpha, w.batch,
                             device)]
    comparisons = [("loraengine lora", "PEFT LoRA loop")]
    targets = [Target("loraengine lora", "PEFT LoRA loop", 1.05),
               Target("loraengine lora", FLOOR, 1.15)]
    for name, (algo, options, _, _) in ALGOS.items():
        contenders.append(lycoris(model, batches, name, rank, alpha))
        contenders.append(loraengine(model, w.latents, w.cond, algo, options, rank, alpha,
                                     w.batch, device))
        ours, theirs = f"loraengine {algo}", f"LyCORIS {name}"
        comparisons += [(ours, theirs), (ours, REBUILD_FLOOR)]
        targets += [Target(ours, FLOOR, 1.3), Target(ours, theirs, 0.6),
                    Target(ours, theirs, 1.0, "peak memory")]
    by_name = {c.name: c for c in contenders}
    t0 = time.perf_counter()
    time_all(contenders, rounds, args.steps, warmup=2, device=device,
             clock=CLOCKS[args.clock])
    for c in contenders:
        c.peak_bytes = peak_memory(c, device)
    body, missed = report(by_name, targets, comparisons)
    for t in missed:
        if t.metric == "step time" and t.baseline == FLOOR:
            for name in (t.contender, t.baseline):
                if by_name[name].profile is None:
                    by_name[name].profile = op_profile(by_name[name], device)
    print(body)
    bound = ""
    if device.type == "cpu" and not args.no_floor_analysis:
        bound = lora_bound(w, by_name)
        print("\n" + bound)
    print(f"\n({time.perf_counter() - t0:.0f} s of measuring)", flush=True)
    return Section(w, body, missed, by_name, bound)


def lora_bound(w: Workload, by_name: dict[str, Contender]) -> str:
    """The lowest step time a LoRA trainer can reach on ``w`` with this machine's
    kernels, next to the measured ratio (``benchmarks/lora_floor.py``)."""
    import lora_floor

    b = lora_floor.analyse(w)
    measured = by_name["loraengine lora"].median_ms / by_name[FLOOR].median_ms
    return (f"**How low LoRA can go here** (`benchmarks/lora_floor.py`, in this run): "
            f"LoRA adds {b.side_flops / 1e9:.2f} GFLOP to the floor's "
            f"{b.floor_flops / 1e9:.2f} ({b.side_flops / b.floor_flops:.1%}), so even at "
            f"the floor's FLOP rate a step is {b.flop_ratio:.3f}× floor; timing the least "
            f"side-path work of every adapted layer (bare kernels, fastest layout) and "
            f"AdamW gives {b.ratio:.3f}× floor as the lowest reachable with these "
            f"kernels. loraengine lora measured {measured:.3f}× floor.")


# -- main -------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="compass,flux",
                    help="Comma-separated: compass, flux, small, quick, large "
                    "(default compass,flux).")
    ap.add_argument("--quick", action="store_true", help="Only the quick UNet, 3 rounds "
                    "(the same as --workload quick).")
    ap.add_argument("--rank", type=int, default=None, help="Default: the workload's.")
    ap.add_argument("--batch", type=int, default=None, help="Default: the workload's.")
    ap.add_argument("--rounds", type=int, default=None, help="Default: the workload's "
                    "(ROUNDS: compass 10, flux 40, the others 5, quick 3).")
    ap.add_argument("--steps", type=int, default=2, help="Steps per contender per round.")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-write", action="store_true", help="Print only.")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="Time steps by "
                    "wall clock (default) or by this process's CPU time (steadier on a "
                    "loaded machine; CPU only, with --threads 1).")
    ap.add_argument("--no-floor-analysis", action="store_true", help="Skip the LoRA floor "
                    "analysis (benchmarks/lora_floor.py) of each workload.")
    ap.add_argument("--output", type=Path, default=REPORT, help="Report file (default "
                    "docs/benchmarks.md).")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    device = torch.device(args.device)
    keys = ["quick"] if args.quick else [k.strip() for k in args.workload.split(",") if k]
    for k in keys:
        if k not in ("compass", "flux", *SIZES):
            ap.error(f"--workload: unknown workload {k!r}")
    setup = (f"fp32; AdamW; {args.device}, {args.threads} thread(s); median of the rounds "
             f"each workload names × {args.steps} steps, contenders interleaved; "
             f"{'CPU' if args.clock == 'cpu' else 'wall'} time")
    sections = []
    for k in keys:
        rounds = args.rounds or ROUNDS.get(k, 5)
        w = make_workload(k, args.batch, args.rank)
        w.setup += f"; median of {rounds} rounds"
        sections.append(run_workload(w, args, rounds, device))
    if not args.no_write:
        command = "python benchmarks/run.py" + (
            "" if keys == ["compass", "flux"] else f" --workload {','.join(keys)}") + (
            " --clock cpu" if args.clock == "cpu" else "")
        write_report(sections, setup, command, args.output)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
