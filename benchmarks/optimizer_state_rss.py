"""Why a CPU run's second training step peaks higher than its first: the resident-memory
peak of each step of an SDXL-size LoRA's tensors alone under AdamW, without the UNet.

The LoRA matrices of rank 16 on every Linear and Conv layer of SDXL's down, mid and up
blocks (the UNet built on ``meta`` for their shapes) are made in bf16; each step
allocates a block standing in for the activations, then every gradient, frees the
block, runs ``AdamW.step()`` and sets the gradients to ``None``, as a training step
does. Each step's peak (``VmHWM``, reset before the step) and the resident size after
it are printed, above the size before the first step. AdamW creates its two moments in
the first ``step()``, after the stand-in activations are gone; from the second step on
they are resident at the peak. ``--engine`` applies the engine's allocator setting
(``loraengine.core.devices.return_freed_host_memory``) first. Linux only.

    python benchmarks/optimizer_state_rss.py [--engine]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MiB = 1024 * 1024


def status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", action="store_true", help="the engine's allocator setting")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--activations-mib", type=int, default=256)
    args = ap.parse_args()
    import torch
    from diffusers import UNet2DConditionModel
    from torch import nn

    if args.engine:
        from loraengine.core.devices import return_freed_host_memory

        return_freed_host_memory()
    sys.path.insert(0, str(Path(__file__).parent))
    from load_memory import SDXL_UNET

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
    shapes: list[tuple[int, ...]] = []
    for name, m in unet.named_modules():
        if not name.startswith(("down_blocks", "mid_block", "up_blocks")):
            continue
        if isinstance(m, nn.Linear):
            shapes += [(16, m.in_features), (m.out_features, 16)]
        elif isinstance(m, nn.Conv2d):
            shapes += [(16, m.in_channels, *m.kernel_size), (m.out_channels, 16, 1, 1)]
    del unet
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(s, dtype=torch.bfloat16) * 0.01) for s in shapes]
    opt = torch.optim.AdamW(params, lr=1e-4)
    reset_peak()
    base = status("VmRSS")
    peaks: list[float] = []
    after: list[float] = []
    for _ in range(args.steps):
        reset_peak()
        block = torch.ones(args.activations_mib * MiB, dtype=torch.uint8)
        for p in params:
            p.grad = torch.randn_like(p)
        del block
        opt.step()
        opt.zero_grad(set_to_none=True)
        peaks.append(round((status("VmHWM") - base) / MiB, 1))
        after.append(round((status("VmRSS") - base) / MiB, 1))
    state = sum(v.numel() * v.element_size() for st in opt.state.values()
                for v in st.values() if isinstance(v, torch.Tensor))
    out = {"tensors": len(params), "adapter_MiB": sum(p.numel() * 2 for p in params) / MiB,
           "optimizer_state_MiB": round(state / MiB, 1), "peak_MiB": peaks,
           "after_MiB": after}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
