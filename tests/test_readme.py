"""The README's Python snippet runs as written (issue 15, item 4): with the toy model it
defines, it trains, writes the file its ``apply`` line names, and applies it."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

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
