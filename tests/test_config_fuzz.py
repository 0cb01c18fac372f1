"""Property-based fuzz of ``loraengine validate``: a valid tiny config, mutated (values
of every type, keys added and removed, sections replaced, values nested, the text
itself cut and spliced), is either accepted or refused as a config error: exit 0 or 2,
never a traceback, and quickly."""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from loraengine.cli.main import cli

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

BASE: dict[str, Any] = {
    "model": {"family": "sd15", "path": "model"},
    "training": {"steps": 2, "batch_size": 1, "seed": 0},
    "adapter": {"algorithm": "lora", "rank": 2, "alpha": 2.0},
    "optimizer": {"name": "adamw", "lr": 1e-3},
    "output": {"dir": "out", "name": "test", "plot": False},
}

KEYS = ["model", "training", "adapter", "optimizer", "output", "data", "memory", "loss",
        "family", "path", "steps", "batch_size", "seed", "rank", "alpha", "lr", "name",
        "dir", "plot", "samples", "every", "algorithm", "include", "<<", "", "x" * 40]

text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=40)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=10**30, max_value=10**80),
    st.floats(allow_nan=True, allow_infinity=True), text, st.sampled_from(KEYS))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)),
    max_leaves=12)


def _paths(node: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    return out


@st.composite
def mutated_config(draw: st.DrawFn) -> str:
    """The YAML text of BASE after a few random edits."""
    cfg = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 4))):
        paths = _paths(cfg)
        path = draw(st.sampled_from(paths)) if paths else ("model",)
        parent: Any = cfg
        for part in path[:-1]:
            parent = parent[part]
        leaf = path[-1]
        kind = draw(st.sampled_from(["set", "delete", "add", "nest", "retype"]))
        if not isinstance(parent, dict):
            continue
        if kind == "set":
            parent[leaf] = draw(values)
        elif kind == "delete":
            parent.pop(leaf, None)
        elif kind == "add":
            parent[draw(st.sampled_from(KEYS))] = draw(values)
        elif kind == "nest":
            parent[leaf] = draw(st.sampled_from([[parent.get(leaf)], {"x": parent.get(leaf)}]))
        else:
            parent[leaf] = draw(st.sampled_from([str(parent.get(leaf)), None, [], {}]))
    body = yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True)
    how = draw(st.sampled_from(["plain", "cut", "splice"]))
    if how == "cut":
        body = body[:draw(st.integers(0, len(body)))]
    elif how == "splice":
        at = draw(st.integers(0, len(body)))
        snippet = draw(st.one_of(text, st.sampled_from(
            ["&a ", "*a", "<<: *a\n", "{", "]", ": ", "\n  - ", "!!int ", "? ", "---\n",
             "\t", "'", '"', "&a [*a]", "\\x1b[31m"])))
        body = body[:at] + snippet + body[at:]
    return body


@pytest.mark.slow
@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(body=mutated_config())
def test_validate_never_tracebacks_on_a_mutated_config(body: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(body, encoding="utf-8")
        start, cpu = time.perf_counter(), time.process_time()
        res = CliRunner().invoke(cli, ["validate", str(path)])
        took, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert res.exit_code in (0, 2), (res.exit_code, res.output[:1000], body[:1000])
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    # 2 s of this process's own work per case; the wall clock only guards against a
    # hang, since other jobs on a shared machine stretch it by their load
    assert cpu < 2.0, cpu
    assert took < 20.0, took
