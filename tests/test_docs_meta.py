"""Meta-tests that keep the plugin contract honest: every hook of
``loraengine/core/plugins/hookspecs.py`` has a docstring with an example, a section in
``docs/plugins.md``, and at least one test that names it; and the generated parts of
the docs match the code.

The check itself is tested on doctored copies: take a hook's section out of the docs,
or the tests that name it out of the test folders, and it must fail naming that hook.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import pytest
from conftest import REPO

HOOKSPECS = REPO / "loraengine" / "core" / "plugins" / "hookspecs.py"
PLUGINS_MD = REPO / "docs" / "plugins.md"
THIS = Path(__file__).resolve()


def test_roots(repo: Path = REPO) -> list[Path]:
    """Folders whose Python files count as tests: ``tests/`` and each example plugin's
    ``tests/``."""
    return [repo / "tests", *sorted((repo / "examples" / "plugins").glob("*/tests"))]


test_roots.__test__ = False  # a helper, not a test


# -- the check --------------------------------------------------------------------------

def hookspecs_in(source: str) -> dict[str, str]:
    """``{hook name: docstring}`` of every ``@hookspec`` function in ``source``."""
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and any(
                isinstance(d, ast.Name) and d.id == "hookspec" for d in node.decorator_list):
            found[node.name] = ast.get_docstring(node) or ""
    return found


def documented_in(markdown: str) -> set[str]:
    """Hooks with a ``### `name(...)``` heading followed by some text."""
    found = set()
    sections = re.split(r"^(?=#{1,3} )", markdown, flags=re.MULTILINE)
    for section in sections:
        match = re.match(r"### `(loraengine_\w+)\(", section)
        body = section.split("\n", 1)[1].strip() if "\n" in section else ""
        if match and body:
            found.add(match.group(1))
    return found


@functools.cache
def names_in(source: str) -> frozenset[str]:
    """Every identifier the code uses or defines, keyword names and string constants
    included; comments and docstrings do not count. (Cached: the doctored copies share
    most files with the real tree.)"""
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef,
                                       ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.keyword) and node.arg:
            names.add(node.arg)
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and id(node) not in docstrings):
            names.add(node.value)
    return frozenset(names)


def test_files(roots: Iterable[Path], exclude: Path = THIS) -> list[Path]:
    return sorted(p for root in roots for p in root.rglob("*.py")
                  if p.resolve() != exclude and "__pycache__" not in p.parts)


test_files.__test__ = False


def meta_problems(hookspecs_source: str, plugins_md: str, files: Iterable[Path]) -> list[str]:
    """One line per hook that lacks an example docstring, a docs section or a test."""
    hooks = hookspecs_in(hookspecs_source)
    documented = documented_in(plugins_md)
    used: set[str] = set()
    for path in files:
        used |= names_in(path.read_text(encoding="utf-8")) & set(hooks)
    problems = []
    for hook, doc in hooks.items():
        if "Example::" not in doc:
            problems.append(f"{hook}: its hookspec needs a docstring with an Example::")
        if hook not in documented:
            problems.append(f"{hook}: not documented in docs/plugins.md (run python "
                            f"docs/gen_docs.py)")
        if hook not in used:
            problems.append(f"{hook}: no test names it (implement it in a test plugin "
                            f"and drive it through the engine)")
    return problems


# -- the real thing -----------------------------------------------------------------------

def _current() -> tuple[str, str, list[Path]]:
    return (HOOKSPECS.read_text(encoding="utf-8"), PLUGINS_MD.read_text(encoding="utf-8"),
            test_files(test_roots()))


def test_every_hook_has_an_example_a_docs_section_and_a_test():
    assert meta_problems(*_current()) == []


def test_generated_docs_are_up_to_date():
    spec = importlib.util.spec_from_file_location("gen_docs", REPO / "docs" / "gen_docs.py")
    gen_docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_docs)
    stale = [str(p.relative_to(REPO)) for p in gen_docs.stale()]
    assert stale == [], f"{stale} out of date: run python docs/gen_docs.py"


def test_the_check_sees_every_hook():
    hooks = hookspecs_in(HOOKSPECS.read_text(encoding="utf-8"))
    from loraengine.core.plugins import hookspecs

    declared = {n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n),
                                                     f"{hookspecs.PROJECT}_spec")}
    assert set(hooks) == declared and len(hooks) >= 15


# -- the check fails on doctored copies ---------------------------------------------------

HOOKS = sorted(hookspecs_in(HOOKSPECS.read_text(encoding="utf-8")))


@functools.cache
def _baseline() -> frozenset[str]:
    return frozenset(meta_problems(*_current()))


def _new(problems: list[str]) -> list[str]:
    """The problems a doctored copy adds to those of the real tree (which the first test
    reports), so each doctoring is judged on its own."""
    return [p for p in problems if p not in _baseline()]


def _without_section(markdown: str, hook: str) -> str:
    """``markdown`` with the section of ``hook`` cut out, up to the next heading."""
    pattern = rf"^### `{hook}\(.*?(?=^#{{1,3}} |\Z)"
    doctored, n = re.subn(pattern, "", markdown, flags=re.MULTILINE | re.DOTALL)
    assert n == 1, f"no section for {hook}"
    return doctored


@pytest.mark.parametrize("hook", HOOKS)
def test_removing_a_hooks_docs_fails_the_check(hook, tmp_path):
    source, markdown, files = _current()
    doctored = tmp_path / "plugins.md"
    doctored.write_text(_without_section(markdown, hook), encoding="utf-8")
    problems = meta_problems(source, doctored.read_text(encoding="utf-8"), files)
    assert _new(problems) == [f"{hook}: not documented in docs/plugins.md (run python "
                              f"docs/gen_docs.py)"]


@pytest.fixture(scope="module")
def tests_copy(tmp_path_factory) -> Path:
    """The Python files of every test folder, copied once (layout kept)."""
    root = tmp_path_factory.mktemp("repo_copy")
    for path in test_files(test_roots()):
        dest = root / path.relative_to(REPO)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
    return root


def _cut_statements_naming(path: Path, hook: str) -> set[str]:
    """Delete from ``path`` every top-level statement (test function, test plugin's hook
    function, class, ...) that names ``hook``; return the hooks those statements named."""
    source = path.read_text(encoding="utf-8")
    if hook not in source:
        return set()
    lines = source.splitlines(keepends=True)
    tree = ast.parse(source)
    cut: set[int] = set()
    named: set[str] = set()
    for node in tree.body:
        text = ast.get_source_segment(source, node) or ""
        found = names_in(text) if not isinstance(node, (ast.Import, ast.ImportFrom)) \
            else set()
        if hook in found:
            start = min([node.lineno, *[d.lineno for d in
                                        getattr(node, "decorator_list", [])]])
            cut.update(range(start - 1, node.end_lineno))
            named |= {n for n in found if n.startswith("loraengine_")}
    if cut:
        path.write_text("".join(line for i, line in enumerate(lines) if i not in cut),
                        encoding="utf-8")
    return named


@pytest.mark.parametrize("hook", HOOKS)
def test_removing_a_hooks_tests_fails_the_check(hook, tests_copy, tmp_path):
    doctored = tmp_path / "repo"
    shutil.copytree(tests_copy, doctored)
    named: set[str] = set()
    for path in test_files(test_roots(doctored)):
        named |= _cut_statements_naming(path, hook)
    if not named:
        pytest.skip(f"no test names {hook} yet: test_every_hook_... fails for it")
    source, markdown, _ = _current()
    added = _new(meta_problems(source, markdown, test_files(test_roots(doctored))))
    assert f"{hook}: no test names it (implement it in a test plugin and drive it " \
           f"through the engine)" in added
    # Only hooks that the removed tests also named can lose their last test.
    assert {p.split(":")[0] for p in added} <= named


def test_removing_a_hookspec_docstring_fails_the_check():
    source, markdown, files = _current()
    hook = "loraengine_on_save"
    doctored = re.sub(rf'(def {hook}\(.*?\) -> None:\n)    """.*?"""\n', r"\1    ...\n",
                      source, count=1, flags=re.DOTALL)
    assert doctored != source
    assert _new(meta_problems(doctored, markdown, files)) == [
        f"{hook}: its hookspec needs a docstring with an Example::"]


def test_a_new_hook_without_docs_or_tests_fails_the_check():
    source, markdown, files = _current()
    doctored = source + ('\n\n@hookspec\ndef loraengine_brand_new() -> None:\n'
                         '    """New.\n\n    Example::\n\n        pass\n    """\n')
    problems = _new(meta_problems(doctored, markdown, files))
    assert [p.split(":")[0] for p in problems] == ["loraengine_brand_new"] * 2


def test_a_hook_named_only_in_a_comment_or_docstring_is_not_exercised():
    code = ('"""Mentions loraengine_on_save."""\n'
            '# loraengine_on_save\n'
            'def test_x():\n    """loraengine_on_save"""\n')
    assert "loraengine_on_save" not in names_in(code)
    assert "loraengine_on_save" in names_in("def loraengine_on_save(run, path, kind): ...")
    assert "loraengine_on_save" in names_in("plugin(loraengine_on_save=lambda *a: None)")
