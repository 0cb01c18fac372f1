"""``training.compile``: step time of loraengine's LoRA training eagerly against
``training.compile: blocks`` (and optionally ``model``), on the workloads of
``benchmarks/run.py`` (the compass UNet and the tiny Flux transformer), in one run.

    python benchmarks/compile.py [--workload compass,flux] [--modes blocks,model]
                                 [--rounds 5] [--steps 2] [--threads 1] [--no-write]

Each compiled contender's first step compiles it; that time is printed on its own
(``first step``) and the steps timed afterwards are the same ``Trainer.step()`` as
the eager contender's, median of ``--rounds`` rounds in which the contenders take turns
(so a busy machine slows all of them alike). The ratio is eager / compiled: above 1 the
compiled step is faster. The target is ``blocks`` at least 1.2× on both workloads.
Writes the compile section of docs/benchmarks.md (between its markers) unless
``--no-write``.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (the workloads and the timing loop of run.py)

BEGIN, END = "<!-- BEGIN COMPILE -->", "<!-- END COMPILE -->"
TARGET = 1.2


def measure(key: str, modes: list[str], rounds: int, steps: int) -> tuple[str, list[str]]:
    w = bench.make_workload(key, None, None)
    device = torch.device("cpu")
    rank, alpha = w.rank, float(w.rank)
    print(f"== {w.title}: {w.setup}", flush=True)
    contenders = [bench.loraengine(w.model, w.latents, w.cond, "lora", {}, rank, alpha,
                                   w.batch, device, name="eager")]
    first: dict[str, float] = {}
    for mode in modes:
        c = bench.loraengine(w.model, w.latents, w.cond, "lora", {}, rank, alpha, w.batch,
                             device, training={"compile": mode}, name=f"compile: {mode}")
        t0 = time.perf_counter()
        c.step()  # compiles
        first[c.name] = time.perf_counter() - t0
        print(f"  {c.name}: first step (compiling) {first[c.name]:.1f} s", flush=True)
        contenders.append(c)
    bench.time_all(contenders, rounds, steps, warmup=1, device=device)
    eager = contenders[0]
    lines = ["| contender | first step (s) | step (ms) | eager / this |", "|---|---|---|---|"]
    verdicts = []
    for c in contenders:
        ratio = eager.median_ms / c.median_ms
        shown = f"{first[c.name]:.1f}" if c.name in first else "—"
        lines.append(f"| {c.name} | {shown} | {c.median_ms:.1f} | {ratio:.3f} |")
        if c.name == "compile: blocks":
            met = ratio >= TARGET
            verdicts.append(f"{w.title}: blocks {ratio:.3f}× eager (target ≥ {TARGET}×: "
                            f"{'met' if met else 'not met'})")
    table = "\n".join(lines)
    print(table, flush=True)
    return f"### {w.title}\n\n{w.setup}.\n\n{table}\n", verdicts


def write(sections: list[str], verdicts: list[str], setup: str, command: str) -> None:
    text = "\n".join([
        BEGIN, "", "## training.compile", "",
        f"<!-- Written by `{command}`; rerun it to refresh. -->", "",
        "LoRA training steps (`Trainer.step()`) eagerly and with `training.compile`, "
        "same model, data and adapter, contenders interleaved; the first step of a "
        "compiled contender compiles it and is shown apart, not in the step time. "
        "Ratio: eager step time / compiled step time (above 1: faster). First-step "
        "times depend on the machine's load and on torch's on-disk compile cache (warm "
        "when the same graphs were compiled before on this machine).", "",
        f"- Machine: {bench.machine()}", f"- Software: {bench.versions()}",
        f"- Setup: {setup}", f"- Date: {datetime.date.today().isoformat()}", "",
        *sections, "", *[f"- {v}" for v in verdicts], "", END])
    report = bench.REPORT
    old = report.read_text(encoding="utf-8") if report.exists() else "# Benchmarks\n"
    if BEGIN in old and END in old:
        new = old[:old.index(BEGIN)] + text + old[old.index(END) + len(END):]
    else:
        new = old.rstrip() + "\n\n" + text + "\n"
    report.write_text(new, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="compass,flux")
    ap.add_argument("--modes", default="blocks", help="Comma-separated: blocks, model.")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    keys = [k.strip() for k in args.workload.split(",") if k.strip()]
    sections, verdicts = [], []
    for key in keys:
        body, v = measure(key, modes, args.rounds, args.steps)
        sections.append(body)
        verdicts += v
    print("\n".join(verdicts))
    if not args.no_write:
        setup = (f"fp32; LoRA; AdamW; cpu, {args.threads} thread(s) on a shared, loaded "
                 f"machine; median of {args.rounds} rounds × {args.steps} steps")
        command = "python benchmarks/compile.py" + (
            "" if args.workload == "compass,flux" else f" --workload {args.workload}") + (
            "" if args.modes == "blocks" else f" --modes {args.modes}")
        write(sections, verdicts, setup, command)
        print(f"wrote {bench.REPORT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
