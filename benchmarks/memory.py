"""Memory strategies on a small UNet: peak memory and step time against the plain run.

Runs one series in one process: none / gradient checkpointing at depth 1, 2, 3 and
with the selective policies (``checkpoint_policy``: save_matmuls, budgets) /
offloading / bypass / fp8 base / int8 base (the quantized bases in bypass mode, as they
require), plus the quantized backward on both bases. ``--model compass`` runs the
series on benchmarks/run.py's compass UNet (17.8 M parameters, batch 4, text 16×128)
instead of ``small_unet_config``; ``--only`` picks rows. Every row trains the same LoRA
(rank 8, all Linear and Conv layers, fp32) on the same seeded data and prints, as
ratios to the plain row:

- peak: the device peak of one step (``loraengine.tools.plan.logic.measure``: on the CPU, the
  tensors resident at the step's start plus the largest rise of allocated bytes the
  allocator reports to ``torch.profiler``; on CUDA, ``max_memory_allocated``);
- activations: that peak less what was resident at the step's start;
- step: the median wall time of one unprofiled step, timed in ``--steps`` rounds that
  step every row once each, in rotating order (load changes hit all rows alike);
- plan: ``loraengine plan``'s estimate of the peak, over the measured peak.

On a CPU-only machine offloading copies CPU to CPU: its "device" figures leave out the
host copies, but the copies it makes cost time there and save nothing real.

    python benchmarks/memory.py                 # the table, markdown
    python benchmarks/memory.py --steps 9 --json results.json
    python benchmarks/memory.py --model compass --only "checkpointing depth 2, budget 0.1"
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from loraengine.core.build import build_pipeline
from loraengine.core.config.root import parse_config
from loraengine.core.train.loop import Trainer
from loraengine.plugins import build_plugin_manager
from loraengine.testing.models import save_tiny_unet, small_unet_config
from loraengine.tools.plan.logic import estimate, measure

MiB = 1024 * 1024

SERIES: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
    # label, memory section, model section extras, training.dtype
    ("none", {}, {}, "fp32"),
    ("checkpointing depth 1", {"gradient_checkpointing": True, "checkpoint_depth": 1}, {},
     "fp32"),
    ("checkpointing depth 2", {"gradient_checkpointing": True, "checkpoint_depth": 2}, {},
     "fp32"),
    ("checkpointing depth 3", {"gradient_checkpointing": True, "checkpoint_depth": 3}, {},
     "fp32"),
    ("checkpointing depth 1, save_matmuls", {"gradient_checkpointing": True,
                                             "checkpoint_policy": "save_matmuls"}, {}, "fp32"),
    ("checkpointing depth 1, budget 0.5", {"gradient_checkpointing": True,
                                           "checkpoint_policy": "budget",
                                           "checkpoint_budget": 0.5}, {}, "fp32"),
    ("checkpointing depth 2, save_matmuls", {"gradient_checkpointing": True,
                                             "checkpoint_depth": 2,
                                             "checkpoint_policy": "save_matmuls"}, {}, "fp32"),
    ("checkpointing depth 2, budget 0.1", {"gradient_checkpointing": True,
                                           "checkpoint_depth": 2, "checkpoint_policy": "budget",
                                           "checkpoint_budget": 0.1}, {}, "fp32"),
    ("checkpointing depth 2, budget 0.15", {"gradient_checkpointing": True,
                                            "checkpoint_depth": 2,
                                            "checkpoint_policy": "budget",
                                            "checkpoint_budget": 0.15}, {}, "fp32"),
    ("checkpointing depth 2, budget 0.2", {"gradient_checkpointing": True,
                                           "checkpoint_depth": 2, "checkpoint_policy": "budget",
                                           "checkpoint_budget": 0.2}, {}, "fp32"),
    ("offload", {"offloading": True}, {}, "fp32"),
    ("bypass", {"bypass_mode": True}, {}, "fp32"),
    ("fp8 base", {"bypass_mode": True}, {"quantize": "fp8"}, "fp32"),
    ("int8 base", {"bypass_mode": True}, {"quantize": "int8"}, "fp32"),
    ("fp8 base, quantized backward", {"bypass_mode": True, "quantized_backward": True},
     {"quantize": "fp8"}, "none"),
    ("int8 base, quantized backward", {"bypass_mode": True, "quantized_backward": True},
     {"quantize": "int8"}, "none"),
]


def make_inputs(folder: Path, size: int, count: int, model: str = "small") -> dict[str, Any]:
    """The benchmark model (``small_unet_config``, or benchmarks/run.py's compass UNet)
    and seeded latents/conditioning."""
    g = torch.Generator().manual_seed(0)
    if model == "compass":
        from run import COMPASS, make_compass_unet

        unet = make_compass_unet()
        config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
        pipe_dir = save_tiny_unet(folder / "compass", config=config)
        tokens, width = COMPASS["tokens"], COMPASS["text_dim"]
    else:
        from diffusers import UNet2DConditionModel

        pipe_dir = save_tiny_unet(folder / "unet", config=small_unet_config())
        unet = UNet2DConditionModel(**small_unet_config())
        tokens, width = 8, 64
    lat, cond = folder / "latents.safetensors", folder / "cond.safetensors"
    save_file({"latents": torch.randn(count, 4, size, size, generator=g)}, str(lat))
    save_file({"cond": torch.randn(count, tokens, width, generator=g)}, str(cond))
    count_params = sum(p.numel() for p in unet.parameters())
    return {"model": pipe_dir, "latents": lat, "cond": cond, "parameters": count_params}


def config_for(inputs: dict[str, Any], memory: dict[str, Any], model: dict[str, Any],
               dtype: str, batch: int, device: str) -> dict[str, Any]:
    return {
        "model": {"family": "diffusers", "path": str(inputs["model"]), **model},
        "data": {"latents": str(inputs["latents"]), "conditioning": str(inputs["cond"])},
        "training": {"steps": 100, "batch_size": batch, "dtype": dtype, "seed": 0,
                     "device": device},
        "adapter": {"rank": 8, "dtype": "fp32"},
        "memory": {"gradient_checkpointing": False, **memory},
        "output": {"plot": False},
    }


def prepare_row(host: Any, data: dict[str, Any], with_plan: bool) -> dict[str, Any]:
    """Build the row's pipeline, plan it and measure its peak; keep it for timing."""
    cfg = parse_config(data, host.registry)
    planned = estimate(cfg, host).peak if with_plan else None
    pipe = build_pipeline(cfg, host)
    trainer = Trainer(pipe, write_files=False)
    measured = measure(pipe, trainer)
    return {"pipe": pipe, "trainer": trainer, "peak": measured.peak,
            "resident": measured.resident, "activations": measured.peak - measured.resident,
            "plan": planned, "times": [measured.seconds]}


def time_rows(rows: list[dict[str, Any]], rounds: int) -> None:
    """Time one step of every row per round, rotating the order each round, so that a
    change in the machine's load falls on all rows alike."""
    for r in range(rounds):
        for i in range(len(rows)):
            row = rows[(i + r) % len(rows)]
            pipe = row["pipe"]
            t0 = time.perf_counter()
            row["trainer"].step()
            if pipe.device.type == "cuda":
                torch.cuda.synchronize(pipe.device)
            row["times"].append(time.perf_counter() - t0)
    for row in rows:
        row["step_s"] = statistics.median(row["times"])


def table(rows: list[dict[str, Any]]) -> str:
    base = rows[0]
    out = ["| strategy | peak MiB | peak × | activations MiB | activations × | step s | "
           "step × | plan / measured |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        plan = f"{r['plan'] / r['peak']:.2f}" if r.get("plan") else "-"
        out.append(f"| {r['label']} | {r['peak'] / MiB:.1f} | {r['peak'] / base['peak']:.2f} | "
                   f"{r['activations'] / MiB:.1f} | "
                   f"{r['activations'] / base['activations']:.2f} | {r['step_s']:.3f} | "
                   f"{r['step_s'] / base['step_s']:.2f} | {plan} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="timing rounds (one step of "
                    "every row each; the median is reported)")
    ap.add_argument("--size", type=int, default=32, help="latent side")
    ap.add_argument("--batch", type=int, default=None, help="default 2 (compass: 4)")
    ap.add_argument("--model", choices=["small", "compass"], default="small",
                    help="small_unet_config, or benchmarks/run.py's compass UNet (18 M)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--no-plan", action="store_true", help="skip the plan column")
    ap.add_argument("--only", nargs="*", help="labels of the rows to run (none is always run)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.batch = args.batch or (4 if args.model == "compass" else 2)
    host = build_plugin_manager()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        inputs = make_inputs(Path(tmp), args.size, count=max(4, args.batch * 2),
                             model=args.model)
        for label, memory, model, dtype in SERIES:
            if args.only and label != "none" and label not in args.only:
                continue
            data = config_for(inputs, memory, model, dtype, args.batch, args.device)
            row = prepare_row(host, data, not args.no_plan)
            row["label"] = label
            rows.append(row)
            print(f"{label}: peak {row['peak'] / MiB:.1f} MiB", flush=True)
        try:
            time_rows(rows, args.steps)
        finally:
            for row in rows:
                row.pop("trainer")
                row.pop("pipe").close()
    print()
    name = "compass UNet" if args.model == "compass" else "small UNet"
    print(f"{name} ({inputs['parameters'] / 1e6:.2f}M parameters), latents "
          f"{args.batch}×4×{args.size}×{args.size}, LoRA rank 8, device {args.device}, "
          f"{args.threads} thread(s), torch {torch.__version__}")
    print()
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
