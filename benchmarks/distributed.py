"""Samples per second of data-parallel training with 1 and 2 processes (torchrun, gloo
on CPU / nccl on GPUs) on the quickstart model, measured in the same run.

    python benchmarks/distributed.py [--steps 20] [--batch 8]

Each configuration trains the same global batch; the rate is taken from the event log's
step timestamps after a warm-up step, so process start-up is not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
QS = REPO / "examples" / "quickstart"


def run(nproc: int, steps: int, batch: int, work: Path, fsdp: bool = False) -> float:
    out = work / f"n{nproc}{'f' if fsdp else ''}"
    cfg = {
        "model": {"family": "diffusers", "path": str(QS / "model")},
        "data": {"latents": str(QS / "latents.safetensors"),
                 "conditioning": str(QS / "conditioning.safetensors")},
        "training": {"steps": steps, "batch_size": batch, "dtype": "fp32", "fsdp": fsdp},
        "adapter": {"rank": 8, "dtype": "fp32"},
        "memory": {"gradient_checkpointing": False},
        "output": {"dir": str(out), "name": "bench", "plot": False},
    }
    path = work / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    events = work / f"{out.name}.jsonl"
    threads = max(1, (os.cpu_count() or 2) // nproc)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0", "-m", "loraengine.cli.main",
           "train", str(path), "-q", "--events", str(events)]
    subprocess.run(cmd, env=env, check=True, cwd=REPO)
    times = [json.loads(line)["time"] for line in events.read_text().splitlines()
             if json.loads(line)["event"] == "step"]
    return (len(times) - 1) * batch / (times[-1] - times[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="global batch (even)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        one = run(1, args.steps, args.batch, work)
        two = run(2, args.steps, args.batch, work)
        two_fsdp = run(2, args.steps, args.batch, work, fsdp=True)
    print(f"machine: {os.cpu_count()} CPU cores")
    print("| processes | samples/s | vs 1 process |")
    print("|---|---|---|")
    print(f"| 1 | {one:.2f} | 1.00x |")
    print(f"| 2 (DDP) | {two:.2f} | {two / one:.2f}x |")
    print(f"| 2 (FSDP2 base) | {two_fsdp:.2f} | {two_fsdp / one:.2f}x |")


if __name__ == "__main__":
    main()
