"""The README's Python snippet runs as written (issue 15, item 4): with the toy model it
defines, it trains, writes the file its ``apply`` line names, and applies it. The
quickstart's ``loraengine monitor`` line serves a run."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _python_blocks() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_readme_train_snippet_runs_as_written(tmp_path, monkeypatch):
    snippet = next(b for b in _python_blocks() if "loraengine.train(" in b)
    applied = re.search(r'loraengine\.apply\([^,]+, "([^"]+)"', snippet)
    assert applied is not None, "the snippet applies a file it names"
    script = tmp_path / "snippet.py"
    script.write_text(snippet, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    ns = runpy.run_path(str(script), run_name="__main__")
    assert (tmp_path / applied.group(1)).is_file()  # the file apply() reads was written
    result = ns["result"]
    assert result.steps > 0 and result.lora and result.loss_map["loss"]
    assert result.files["lora"].resolve() == (tmp_path / applied.group(1)).resolve()


def _bash_lines() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return [line.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
            for line in block.splitlines() if line.strip()]


@pytest.mark.slow
def test_the_readme_monitor_command_serves_the_quickstart_run(tmp_path):
    """The quickstart's ``loraengine monitor`` line, on a short quickstart run written to
    a temporary folder instead of ``examples/quickstart/output``."""
    import json
    import os
    import subprocess
    import sys
    import urllib.request

    line = next(x for x in _bash_lines() if x.startswith("loraengine monitor "))
    args = line.split()[2:]
    assert args == ["examples/quickstart/output"], line
    out = tmp_path / "output"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "loraengine.cli.main"]
    train = subprocess.run([*cmd, "train", "-q", "examples/quickstart.yaml", "--set",
                            "training.steps=3", "--set", f"output.dir={out}"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr
    proc = subprocess.Popen([*cmd, "monitor", str(out), "--port", "0"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        match = re.match(r"serving (http://127\.0\.0\.1:\d+/) \(Ctrl-C to stop\)", first)
        assert match, (first, proc.stderr.read() if proc.poll() is not None else "")
        with urllib.request.urlopen(match.group(1) + "api/events", timeout=30) as res:
            body = json.loads(res.read())
        assert body["file"] == "quickstart_lora.events.jsonl"
        steps = [e for e in body["events"] if e["event"] == "step"]
        loss = json.loads((out / "quickstart_lora.loss.json").read_text())["loss"]
        assert [e["loss"] for e in steps] == loss and len(loss) == 3
        with urllib.request.urlopen(match.group(1), timeout=30) as res:
            assert b'id="loss-chart"' in res.read()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
