"""Wall time of the README quickstart: ``loraengine train examples/quickstart.yaml``
as a user runs it (a fresh process: imports, model and data loading, training,
writing the files), once with one torch thread and once with the engine's default
thread count, alternating over ``--rounds`` rounds so a busy machine slows both alike.
A run that takes longer than ``--timeout`` seconds is stopped and counted as that.

    python benchmarks/quickstart.py [--rounds 3] [--timeout 900] [--config examples/quickstart.yaml]

Prints the machine, then the median seconds of each setting and their ratio. The
outputs go to a temporary folder; the repository is left as it was. This is the
figure the README's quickstart time quotes (not part of CI).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: (label, extra ``--set`` overrides). ``training.threads`` unset is the default: the
#: physical cores the process may use (``loraengine.core.threads``).
SETTINGS = (("1 thread", ["training.threads=1"]), ("default threads", []))


def machine() -> str:
    """CPU model, logical CPUs usable, physical cores and the load average now."""
    sys.path.insert(0, str(REPO))
    from loraengine.core.threads import affinity_cpus, available_cores

    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return (f"{model}; {len(affinity_cpus())} CPUs usable, {available_cores()} physical "
            f"core(s); load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}; "
            f"Python {platform.python_version()}")


def run_once(config: Path, overrides: list[str], out: Path, timeout: float
             ) -> tuple[float, bool]:
    """Seconds of one ``loraengine train`` process writing to ``out``, and whether it
    finished within ``timeout``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}  # the engine chooses
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "loraengine.cli.main", "train", str(config), "-q",
           "--set", f"output.dir={out}"]
    for item in overrides:
        cmd += ["--set", item]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return time.perf_counter() - start, False
    took = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr}")
    return took, True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds after which one run is stopped")
    parser.add_argument("--config", type=Path, default=REPO / "examples" / "quickstart.yaml")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    times: dict[str, list[float]] = {label: [] for label, _ in SETTINGS}
    stopped = {label: 0 for label, _ in SETTINGS}
    with tempfile.TemporaryDirectory(prefix="loraengine-quickstart-") as tmp:
        for round_ in range(args.rounds):
            for label, overrides in SETTINGS:
                took, finished = run_once(args.config, overrides,
                                          Path(tmp) / f"{round_}-{label[0]}", args.timeout)
                times[label].append(took)
                stopped[label] += not finished
                print(f"round {round_ + 1}: {label}: {'' if finished else '> '}"
                      f"{took:.1f} s", flush=True)
    medians = {label: statistics.median(t) for label, t in times.items()}
    for label, value in medians.items():
        note = f"; {stopped[label]} stopped at the timeout" if stopped[label] else ""
        print(f"{label}: {value:.1f} s (median of {args.rounds}{note})")
    one, default = medians["1 thread"], medians["default threads"]
    print(f"default / 1 thread: {'> ' if stopped['default threads'] else ''}"
          f"{default / one:.2f}")


if __name__ == "__main__":
    main()
