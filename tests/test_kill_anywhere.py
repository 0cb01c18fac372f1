"""kill -9 anywhere in a run, inside saves and the final write included, then
``--resume latest``: the final LoRA and loss map are bit for bit those of a run never
interrupted, and no temporary file is left in the output folder."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import REPO
from safetensors.torch import load_file

HELPER = REPO / "tests" / "helpers" / "kill_server.py"
STEPS = 20


def _config(tmp_path, unet_config, name):
    cfg = json.loads(json.dumps(unet_config))
    cfg["training"]["steps"] = STEPS
    cfg["output"] = {"dir": str(tmp_path / name), "name": "run", "plot": False,
                     "save_every": 1, "keep_last": 2}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _serve(config, points):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(HELPER), str(config), *points], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"set-up and each run, seconds: {report['seconds']}")
    return report["statuses"], done.stderr


@pytest.mark.slow
def test_kill_9_at_20_random_points_then_resume_is_bitwise_identical(tmp_path, unet_config):
    seed = int(os.environ.get("LORAENGINE_KILL_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    # Each step ends with one event and its checkpoint has six file syncs, so a kill at
    # the N-th event (N <= 12) lands in one of the next two steps or their saves: the
    # run advances at most one step per kill and twenty kills never reach the end early.
    # The last four land inside the final write (the LoRA and loss file, before and
    # after their renames) of a run that has trained to the end.
    points = [f"any:{rng.randint(1, 12)}" for _ in range(16)]
    points += [f"final:{rng.randint(1, 4)}" for _ in range(4)]
    crashy = _config(tmp_path, unet_config, "crashy")
    plain = _config(tmp_path, unet_config, "plain")
    statuses, err = _serve(crashy, [*points, "none", f"plain:{plain}"])
    why = f"seed {seed}, points {points}, statuses {statuses}\n{err[-3000:]}"
    assert statuses == [-signal.SIGKILL] * 20 + [0, 0], why
    assert "Traceback" not in err, why
    a = load_file(str(tmp_path / "plain" / "run.safetensors"))
    b = load_file(str(tmp_path / "crashy" / "run.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), why
    la = json.loads((tmp_path / "plain" / "run.loss.json").read_text())
    lb = json.loads((tmp_path / "crashy" / "run.loss.json").read_text())
    assert la == lb, why
    out = tmp_path / "crashy"
    everything = [p.relative_to(out) for p in out.rglob("*")]
    hidden = [p for p in everything if any(part.startswith(".") for part in p.parts)]
    assert hidden == [], why
    assert not [p for p in everything if p.name.endswith((".tmp", ".old"))], why
