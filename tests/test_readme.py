"""The README runs as written. Its Python snippet (issue 15, item 4): with the toy model
it defines, it trains, writes the file its ``apply`` line names, and applies it. Its
quickstart on images (item 8): ``prepare``, ``train`` and ``sample`` on the shipped tiny
pipeline, each command exactly as the README shows it. Its ``loraengine monitor`` line serves a
run."""

from __future__ import annotations

import json
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


# -- the quickstart on images: prepare -> train -> sample, as the README writes it ---------

#: The README commands this test runs; any other command in the same block has its own
#: test.
RUN_HERE = ("prepare", "train", "sample")


def _quickstart_commands() -> list[list[str]]:
    import shlex

    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = next(b for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
                 if "loraengine prepare" in b)
    return [shlex.split(line) for line in block.splitlines()
            if line.startswith("loraengine ")]


def _copy_examples(root: Path) -> None:
    """The README's commands run on a copy of the shipped examples (without anything a
    local run left behind), so the test writes nothing into the repository."""
    import shutil

    left_behind = shutil.ignore_patterns("output", "prepared", "samples", "__pycache__")
    shutil.copytree(REPO / "examples" / "quickstart", root / "examples" / "quickstart",
                    ignore=left_behind)
    for config in (REPO / "examples").glob("quickstart*.yaml"):
        shutil.copy(config, root / "examples" / config.name)


@pytest.mark.slow
def test_the_readme_quickstart_prepare_train_sample_runs_as_written(tmp_path, monkeypatch):
    from click.testing import CliRunner
    from PIL import Image
    from safetensors import safe_open
    from safetensors.torch import load_file

    from loraengine.cli.main import cli

    commands = _quickstart_commands()
    assert [c[1] for c in commands if c[1] in RUN_HERE] == list(RUN_HERE)
    _copy_examples(tmp_path)
    monkeypatch.chdir(tmp_path)
    for argv in commands:
        if argv[1] not in RUN_HERE:
            continue
        result = CliRunner().invoke(cli, argv[1:])
        assert result.exit_code == 0, (argv, result.output)
        opts = dict(zip(argv[2::2], argv[3::2], strict=False))
        if argv[1] == "prepare":
            # latents at the images' own size over the VAE's 8x, one bucket per size
            out = Path(opts["--out"])
            with safe_open(str(out / "latents.safetensors"), "pt") as fh:
                files = json.loads(fh.metadata()["loraengine.images"])
            lat = load_file(str(out / "latents.safetensors"))
            for b, names in enumerate(files):
                for name in names:
                    w, h = Image.open(Path(opts["--images"]) / name).size
                    assert lat[f"latents.{b}"].shape[1:] == (4, h // 8, w // 8)
        elif argv[1] == "train":
            import yaml

            steps = yaml.safe_load(Path(argv[2]).read_text())["training"]["steps"]
            assert f"trained {steps} steps" in result.output
        else:
            lora = Path(opts["--lora"])
            assert lora.is_file()  # what train wrote is what sample reads
            out = Path(opts["--out"])
            prompts = Path(opts["--prompts"]).read_text(encoding="utf-8").split("\n")
            prompts = [p for p in prompts if p.strip()]
            grid = Image.open(out / "grid.png").convert("RGB")
            tiles = [Image.open(out / f"image_{p}_0.png").convert("RGB")
                     for p in range(len(prompts))]
            # a row per prompt: each 16x16 latent decoded to 128x128 px, 2 px apart
            assert all(t.size == (128, 128) for t in tiles)
            assert grid.size == (2 + 130, 2 + 130 * len(prompts))
            for p, tile in enumerate(tiles):
                box = (2, 2 + 130 * p, 130, 130 + 130 * p)
                assert grid.crop(box).tobytes() == tile.tobytes()
            assert (out / "compare.png").is_file()


def _bash_lines() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return [line.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
            for line in block.splitlines() if line.strip()]


@pytest.mark.slow
def test_the_readme_monitor_command_serves_the_quickstart_run(tmp_path, monkeypatch):
    """The quickstart's ``loraengine monitor`` line, on a short quickstart run written to
    a temporary folder instead of ``examples/quickstart/output`` (trained in this
    process; the monitor is a server of its own, as a user starts it)."""
    import json
    import os
    import subprocess
    import sys
    import urllib.request

    from click.testing import CliRunner

    from loraengine.cli.main import cli

    line = next(x for x in _bash_lines() if x.startswith("loraengine monitor "))
    args = line.split()[2:]
    assert args == ["examples/quickstart/output"], line
    out = tmp_path / "output"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "loraengine.cli.main"]
    monkeypatch.chdir(REPO)
    train = CliRunner().invoke(cli, ["train", "-q", "examples/quickstart.yaml", "--set",
                                     "training.steps=3", "--set", f"output.dir={out}"])
    assert train.exit_code == 0, train.output
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
