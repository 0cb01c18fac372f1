"""``loraengine plan`` against the measured peak at real size: an SD1.5-size UNet
(859.5 M parameters, random weights) trained with LoRA rank 16 on one 64×64 latent and
77×768 conditioning, fp32, under each memory strategy; with ``--model sdxl`` an
SDXL-size UNet (SDXL's published UNet config, 2.57 B parameters, random weights saved
in bf16) trained in bf16 (model and adapter) on 77×2048 conditioning and a 1280-wide
pooled embedding.

Every row runs in fresh processes, one at a time: one plans the config (the dry run on
``meta``), another trains it for ``--steps`` steps. The training process imports
everything first, resets its peak-RSS counter (``/proc/self/clear_refs``) and records
its resident size as the baseline; the measured peak is its largest ``VmHWM`` less that
baseline (on the CPU the device is the host, so this counts everything the run holds:
weights, adapter, optimizer state, activations, allocator slack). The runs set
``training.host_memory: return`` (freed tensors go back to the system at once), the
mode in which resident memory follows the live tensors that plan counts. The planned figure
is the plan's device peak plus its host-resident weights (offloading's host copies live
in the same memory on a CPU). Linux only; CPU.

    python benchmarks/memory_real_size.py --unet /tmp/sd15/unet   # built there if absent
    python benchmarks/memory_real_size.py --rows "depth 1,bypass" --steps 2
    python benchmarks/memory_real_size.py --model sdxl --unet /tmp/sdxl/unet --latent 64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

MiB = 1024 * 1024

ROWS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # label: (memory section, model section extras)
    "no checkpointing": ({"gradient_checkpointing": False}, {}),
    "depth 1": ({"gradient_checkpointing": True, "checkpoint_depth": 1}, {}),
    "depth 2": ({"gradient_checkpointing": True, "checkpoint_depth": 2}, {}),
    "offload": ({"gradient_checkpointing": False, "offloading": True}, {}),
    "fp8 base": ({"gradient_checkpointing": False, "bypass_mode": True},
                 {"quantize": "fp8"}),
    "bypass": ({"gradient_checkpointing": False, "bypass_mode": True}, {}),
}

CHILD = r"""
import json, sys, time
import torch, accelerate, diffusers
from loraengine.core.build import build_pipeline
from loraengine.core.config.root import parse_config
from loraengine.core.train.loop import Trainer
from loraengine.plugins import build_plugin_manager
from loraengine.tools.plan.logic import estimate

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

mode, data, steps = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
host = build_plugin_manager()
cfg = parse_config(data, host.registry)
if mode == "plan":
    plan = estimate(cfg, host, count_flops=False)  # memory only: one dry step fewer
    print(json.dumps(plan.to_dict()))
    sys.exit(0)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM starts again from the current RSS
base = status("VmRSS")
pipe = build_pipeline(cfg, host)
trainer = Trainer(pipe, write_files=False)
out = {"baseline": base, "loaded": status("VmHWM") - base, "steps": [], "seconds": [],
       "after": [], "optimizer_state": []}
for _ in range(steps):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # this step's own peak
    t0 = time.perf_counter()
    trainer.step()
    out["seconds"].append(time.perf_counter() - t0)
    out["steps"].append(status("VmHWM") - base)
    out["after"].append(status("VmRSS") - base)
    out["optimizer_state"].append(sum(
        v.untyped_storage().nbytes() for st in pipe.optimizer.state.values()
        for v in st.values() if isinstance(v, torch.Tensor)))
    print(json.dumps(out), flush=True)
"""


#: per model: family, compute and adapter dtype, conditioning width, pooled width
MODELS: dict[str, tuple[str, str, int, int]] = {
    "sd15": ("sd15", "fp32", 768, 0),
    "sdxl": ("sdxl", "bf16", 2048, 1280),
}


def config_for(kind: str, unet: Path, data: Path, memory: dict[str, Any],
               model: dict[str, Any]) -> dict[str, Any]:
    family, dtype, _, _ = MODELS[kind]
    return {"model": {"family": family, "path": str(unet), **model},
            "data": {"latents": str(data / "latents.safetensors"),
                     "conditioning": str(data / "cond.safetensors")},
            # return: resident memory follows the live tensors, which plan predicts
            "training": {"steps": 100, "batch_size": 1, "dtype": dtype, "seed": 0,
                         "device": "cpu", "host_memory": "return"},
            "adapter": {"rank": 16, "dtype": dtype},
            "memory": memory, "output": {"plot": False}}


def child(mode: str, cfg: dict[str, Any], steps: int) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out = subprocess.run([sys.executable, "-c", CHILD, mode, json.dumps(cfg), str(steps)],
                         env=env, capture_output=True, text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode or not lines:
        raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def make_data(kind: str, folder: Path, latent: int) -> None:
    import torch
    from safetensors.torch import save_file

    _, _, width, pooled = MODELS[kind]
    g = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"latents": torch.randn(1, 4, latent, latent, generator=g)},
              str(folder / "latents.safetensors"))
    cond = {"cond": torch.randn(1, 77, width, generator=g)}
    if pooled:
        cond["pooled"] = torch.randn(1, pooled, generator=g)
    save_file(cond, str(folder / "cond.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=tuple(MODELS), default="sd15",
                    help="which UNet size (and dtype: sd15 fp32, sdxl bf16)")
    ap.add_argument("--unet", type=Path, required=True, help="UNet folder of that size "
                    "(a random one is saved there when it has none)")
    ap.add_argument("--latent", type=int, default=64, help="latent height and width")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated row labels")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", type=Path, help="write the rows here (after each row)")
    args = ap.parse_args()
    if not (args.unet / "config.json").exists():
        sys.path.insert(0, str(Path(__file__).parent))
        from load_memory import build

        build(args.model, args.unet)
    data = args.unet.parent / f"bench-data-{args.latent}"
    if not (data / "cond.safetensors").exists():
        make_data(args.model, data, args.latent)
    results = (json.loads(args.json.read_text()) if args.json and args.json.exists()
               else [])  # rows run one at a time add up in one file
    print("| strategy | planned MiB | measured MiB, per step | planned / measured | "
          "optimizer state MiB | loaded MiB | step s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label in (r.strip() for r in args.rows.split(",")):
        memory, model = ROWS[label]
        cfg = config_for(args.model, args.unet, data, memory, model)
        plan = child("plan", cfg, 0)
        run = child("train", cfg, args.steps)
        planned = plan["peak"] + plan["weights_host"]
        measured = max(run["steps"])
        results = [r for r in results if r["label"] != label]
        results.append({"label": label, "model": args.model, "latent": args.latent,
                        "plan": plan, "run": run})
        per_step = " / ".join(f"{m / MiB:.0f}" for m in run["steps"])
        print(f"| {label} | {planned / MiB:.0f} | {per_step} | {planned / measured:.2f} | "
              f"{run['optimizer_state'][-1] / MiB:.0f} | {run['loaded'] / MiB:.0f} | "
              f"{min(run['seconds']):.1f} |", flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))

if __name__ == "__main__":
    main()
