"""Peak resident memory while loading a UNet model folder: the engine's loader against
``from_pretrained`` followed by ``module.to(dtype)`` (what the engine did before).

Each load runs in a fresh process, one at a time. The process imports everything first,
then resets its peak-RSS counter (``/proc/self/clear_refs``), records its resident size
as the baseline, loads and reads its peak (``VmHWM``). Every weight is read once
after loading (memory-mapped pages count only once read, and training reads them all).
Printed: the peak less the baseline over the loaded weights' bytes (1.00 means exactly one copy of the weights).
Linux only.

    python benchmarks/load_memory.py --unet DIR            # an existing model folder
    python benchmarks/load_memory.py --build sd15 --unet /tmp/sd15/unet
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

MiB = 1024 * 1024

CHILD = r"""
import json, sys, torch, diffusers
from loraengine.plugins.models.weights import load_folder

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)

path, how, dtype = sys.argv[1], sys.argv[2], sys.argv[3]
dtype = None if dtype == "none" else getattr(torch, dtype)
cls = diffusers.UNet2DConditionModel
diffusers.utils.logging.set_verbosity_error()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
base = status("VmRSS")
if how == "engine":
    module = load_folder(cls, path, dtype)
    assert module is not None, "the engine's loader declined the folder"
else:
    module = cls.from_pretrained(path, local_files_only=True)
    if dtype is not None:
        module.to(dtype)
with torch.no_grad():  # pages of a memory-mapped file count once they are read
    for t in module.state_dict().values():
        t.sum()
peak = status("VmHWM")
weights = sum(t.numel() * t.element_size() for t in module.state_dict().values())
print(json.dumps({"baseline": base, "peak": peak, "weights": weights}))
"""


def measure_load(unet: Path, how: str, dtype: str) -> dict[str, int]:
    """One load in a fresh process: its baseline RSS, peak RSS and weight bytes."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out = subprocess.run([sys.executable, "-c", CHILD, str(unet), how, dtype], env=env,
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{how} {dtype}: the load failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


#: SDXL's published UNet config (the arguments that differ from the class defaults)
SDXL_UNET = dict(
    sample_size=128, cross_attention_dim=2048, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)


def build(kind: str, out: Path) -> None:
    """Save a randomly initialised SD1.5-size UNet (fp32) or SDXL-size UNet (bf16, as
    built: half the memory and disk of an fp32 one) to ``out``."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if kind == "sdxl":  # 2.57 B parameters: built in bf16, never held in fp32
        torch.set_default_dtype(torch.bfloat16)
    if kind == "sd15":
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    else:
        unet = UNet2DConditionModel(**SDXL_UNET)
    unet.save_pretrained(str(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--unet", type=Path, required=True, help="UNet model folder")
    ap.add_argument("--build", choices=("sd15", "sdxl"), help="first save a random "
                    "UNet of that size there (when the folder has none)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--loaders", default="from_pretrained,engine")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.build and not (args.unet / "config.json").exists():
        build(args.build, args.unet)
    rows = []
    print("| loader | dtype | weights MiB | peak − baseline MiB | ratio |")
    print("|---|---|---:|---:|---:|")
    for dtype in args.dtypes.split(","):
        for how in args.loaders.split(","):
            r = measure_load(args.unet, how, dtype)
            rise = r["peak"] - r["baseline"]
            rows.append({"loader": how, "dtype": dtype, **r})
            print(f"| {how} | {dtype} | {r['weights'] / MiB:.0f} | {rise / MiB:.0f} | "
                  f"{rise / r['weights']:.2f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
