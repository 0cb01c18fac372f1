"""Before/after step time of the LyCORIS-family adapters in one interleaved run: each
``before`` contender trains with the adapter layer classes of another commit (its
``loraengine/plugins/adapters/<algo>.py`` read with git), each ``after`` one with the
working tree's, on the same model, data, start values and adapted layers as
``benchmarks/run.py``'s workloads, against the floor (the frozen base's
forward+backward). Nothing is written.

    python benchmarks/adapters_ab.py --base COMMIT [--workload flux] [--algos oft,lokr]
                                     [--rounds 9] [--before-optimizer same|loop]

Each round runs every contender one step, in a rotated order; the medians are printed
by wall clock and by this thread's CPU time. On a shared machine the wall clock counts
the time other processes held the core; the CPU time does not, so it is the steadier of
the two there (it still varies with cache contention: put an unchanged algorithm, such
as ``loha``, in ``--algos`` as a control and read ratios within its before/after gap as
ties). The user-time column leaves out the kernel's time (mostly minor page faults:
memory the allocator handed back and touches again), and the last column counts those
faults per step; the least CPU time of the rounds is the figure other load inflates
least (it can only add to a step). The base commit's adapter modules must fit the working tree's core (they are
run against it).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import run as bench  # noqa: E402  (benchmarks/run.py: the workloads and contenders)

#: layer class -> its module; the base commit's modules import each other (BOFT's oft,
#: LoRA's and LoHa's fused node) from the base commit too
MODULES = {"OFTLayer": "oft", "BOFTLayer": "boft", "LoKrLayer": "lokr", "LoHaLayer": "loha",
           "LoRALayer": "lora"}
#: modules the others import, loaded first
SHARED = ("lora_fused", "oft")


def load_base_module(commit: str, name: str) -> types.ModuleType:
    """``loraengine/plugins/adapters/<name>.py`` of ``commit`` as module ``base_<name>``
    (its imports of the ``SHARED`` modules go to their ``base_`` copies)."""
    src = subprocess.check_output(
        ["git", "-C", str(REPO), "show", f"{commit}:loraengine/plugins/adapters/{name}.py"],
        text=True)
    for shared in SHARED:
        src = src.replace(f"from loraengine.plugins.adapters.{shared} import",
                          f"from base_{shared} import")
    module = types.ModuleType(f"base_{name}")
    module.__file__ = f"{commit}:{name}.py"
    sys.modules[module.__name__] = module
    exec(compile(src, module.__file__, "exec"), module.__dict__)  # noqa: S102
    return module


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="The commit the 'before' rows run.")
    ap.add_argument("--workload", default="flux", help="compass or flux (benchmarks/run.py).")
    ap.add_argument("--algos", default="loha,lokr,oft,boft", help="Comma-separated; lora too.")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--before-optimizer", choices=("same", "loop"), default="same",
                    help="loop: the before rows' AdamW runs torch's per-parameter loop "
                    "(as before adamw took the fused kernel), not the working tree's.")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    for shared in SHARED:
        load_base_module(args.base, shared)
    classes = {cls: getattr(sys.modules.get(f"base_{mod}") or load_base_module(args.base, mod),
                            cls) for cls, mod in MODULES.items()}
    w = bench.make_workload(args.workload, None, None)
    dev = torch.device("cpu")
    batches = bench.Cycle(bench.make_batches(w.latents, w.cond, w.batch, 16, dev))
    contenders = [bench.floor(w.model, batches)]
    for algo in args.algos.split(","):
        name, options, _, _ = bench.ALGOS.get(algo, (algo, {}, None, None))
        pair = [bench.loraengine(w.model, w.latents, w.cond, name, options, w.rank,
                                 float(w.rank), w.batch, dev, name=f"{when} {algo}")
                for when in ("before", "after")]
        for _, layer in pair[0].keep[0].network.items():
            layer.__class__ = classes[type(layer).__name__]
        if args.before_optimizer == "loop":
            for group in pair[0].keep[0].optimizer.param_groups:
                group["fused"], group["foreach"] = None, False  # read at each step
        with torch.no_grad():  # the same start values
            for p, q in zip(pair[0].trainable, pair[1].trainable, strict=True):
                q.copy_(p)
        contenders += pair
    for c in contenders:
        c.step()  # warm-up
    wall: dict[str, list[float]] = {c.name: [] for c in contenders}
    cpu: dict[str, list[float]] = {c.name: [] for c in contenders}
    user: dict[str, list[float]] = {c.name: [] for c in contenders}
    faults: dict[str, list[float]] = {c.name: [] for c in contenders}
    for r in range(args.rounds):
        shift = r % len(contenders)
        for c in contenders[shift:] + contenders[:shift]:
            u0 = resource.getrusage(resource.RUSAGE_THREAD)
            t0, c0 = time.perf_counter(), time.thread_time()
            c.step()
            wall[c.name].append(time.perf_counter() - t0)
            cpu[c.name].append(time.thread_time() - c0)
            u1 = resource.getrusage(resource.RUSAGE_THREAD)
            user[c.name].append(u1.ru_utime - u0.ru_utime)
            faults[c.name].append((u1.ru_minflt - u0.ru_minflt) / 1e3)

    def med(v: list[float]) -> float:
        return statistics.median(v) * 1e3

    floor = contenders[0].name
    print(f"{w.title}: {w.setup}\nmedian of {args.rounds} rounds, before = {args.base}")
    print("| contender | path (factored/rebuild) | wall ms | × floor | CPU ms | × floor "
          "| user ms | × floor | minor faults (k) | least CPU ms | × floor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for c in contenders:
        print(f"| {c.name} | {c.paths} | {med(wall[c.name]):.1f} | "
              f"{med(wall[c.name]) / med(wall[floor]):.3f} | {med(cpu[c.name]):.1f} | "
              f"{med(cpu[c.name]) / med(cpu[floor]):.3f} | {med(user[c.name]):.1f} | "
              f"{med(user[c.name]) / med(user[floor]):.3f} | "
              f"{statistics.median(faults[c.name]):.1f} | {min(cpu[c.name]) * 1e3:.1f} | "
              f"{min(cpu[c.name]) / min(cpu[floor]):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
