"""Generate the reference parts of the docs from the code, so they cannot drift from it.

- ``docs/plugins.md``: the text between the ``BEGIN GENERATED`` / ``END GENERATED``
  markers — every hook of ``loraengine/core/plugins/hookspecs.py`` (signature, docstring,
  example) and every spec record of ``loraengine/core/plugins/specs.py`` (fields, types,
  defaults). The prose around the markers is written by hand.
- ``docs/config.md``: all of it, from the pydantic config models built with the
  built-in plugins (installed third-party plugins are left out, so the file is the same
  on every machine).

    python docs/gen_docs.py           # rewrite both files
    python docs/gen_docs.py --check   # exit 1 naming the files that are out of date

``tests/test_docs_meta.py`` runs the check.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import sys
import textwrap
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

DOCS = Path(__file__).resolve().parent
PLUGINS_MD = DOCS / "plugins.md"
CONFIG_MD = DOCS / "config.md"
BEGIN = "<!-- BEGIN GENERATED: python docs/gen_docs.py -->"
END = "<!-- END GENERATED -->"


# -- shared -----------------------------------------------------------------------------

def markdown(text: str) -> str:
    """reStructuredText-isms of the docstrings in Markdown: ``x`` -> `x`."""
    return re.sub(r"``(.+?)``", r"`\1`", text)


def cell(text: str) -> str:
    """Text safe inside a Markdown table cell: one line, pipes escaped, and ``<``/``>``
    outside code spans written as entities (``<name>`` is not an HTML tag)."""
    parts = " ".join(text.split()).replace("|", "\\|").split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return lines


# -- the hook reference ---------------------------------------------------------------

def hookspecs() -> list[Callable[..., Any]]:
    """Every hook specification, in the order of the source file."""
    from loraengine.core.plugins import hookspecs as module

    marker = f"{module.PROJECT}_spec"
    found = [fn for _, fn in inspect.getmembers(module, inspect.isfunction)
             if hasattr(fn, marker)]
    return sorted(found, key=lambda fn: fn.__code__.co_firstlineno)


def split_example(doc: str) -> tuple[str, str]:
    """A docstring's text and the code block after ``Example::``."""
    text, _, example = doc.partition("Example::")
    return text.strip(), textwrap.dedent(example).strip("\n")


def hook_section(fn: Callable[..., Any], categories: dict[str, str],
                 sections: dict[str, str]) -> list[str]:
    params = ", ".join(inspect.signature(fn).parameters)
    doc = inspect.getdoc(fn) or ""
    text, example = split_example(doc)
    lines = [f"### `{fn.__name__}({params})`", "", markdown(text), ""]
    category = categories.get(fn.__name__)
    if category is not None:
        from loraengine.core.plugins.registry import CATEGORIES

        record = CATEGORIES[category][1].__name__
        lines += [f"Returns: an iterable of [`{record}`](#{record.lower()}) — category "
                  f"`{category}`; {sections[category]}.", ""]
    if example:
        lines += ["```python", example, "```", ""]
    return lines


def _field_comments(cls: type) -> dict[str, str]:
    """``#:`` comments written just above dataclass fields."""
    comments: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
            continue
        match = re.match(r"(\w+)\s*:", stripped)
        if match and pending:
            comments[match.group(1)] = " ".join(pending)
        pending = []
    return comments


def spec_section(cls: type) -> list[str]:
    doc = markdown(inspect.getdoc(cls) or "")
    comments = _field_comments(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if isinstance(f.default, type):
            default = f"`{f.default.__name__}`"
        elif f.default is not dataclasses.MISSING:
            default = f"`{f.default!r}`"
        elif f.default_factory is not dataclasses.MISSING:
            default = f"`{f.default_factory()!r}`"
        else:
            default = "required"
        rows.append([f"`{f.name}`", f"`{f.type}`", default, markdown(comments.get(f.name, ""))])
    return [f"### {cls.__name__}", "", doc, "",
            *table(["field", "type", "default", "notes"], rows), ""]


#: Categories whose records are not picked by a plugin section of the config.
WHERE_CHOSEN = {
    "exporter": "`adapter.exporter` picks the format to write (default: the model "
                "family's); reading a file tries every format",
}


def section_phrases() -> dict[str, str]:
    """How the config reaches each category's records."""
    from loraengine.core.config.root import PLUGIN_SECTIONS
    from loraengine.core.plugins.registry import CATEGORIES

    out = {}
    for category in CATEGORIES:
        picked = [f"`{s}.{key}`" for s, (c, key) in PLUGIN_SECTIONS.items() if c == category]
        if picked:
            out[category] = f"the config picks one with {', '.join(picked)}"
        elif category in ("memory", "recipe"):
            out[category] = (f"their option fields join the `{category}` section and "
                             f"`enabled(config)` switches each on")
        else:
            out[category] = WHERE_CHOSEN.get(category, "chosen by name as described above")
    return out


def hook_reference() -> str:
    from loraengine.core.plugins import specs
    from loraengine.core.plugins.registry import CATEGORIES

    categories = {hook: category for category, (hook, _) in CATEGORIES.items()}
    sections = section_phrases()
    hooks = hookspecs()
    registration = [h for h in hooks if h.__name__ in categories]
    lifecycle = [h for h in hooks if h.__name__ not in categories]
    lines = ["## Hook reference", "",
             "Generated from the docstrings of `loraengine/core/plugins/hookspecs.py`.", "",
             "Registration hooks take no arguments and return spec records; loraengine "
             "calls each once when it builds its registry.", ""]
    for fn in registration:
        lines += hook_section(fn, categories, sections)
    lines += ["Lifecycle and command hooks receive the arguments named in their signature "
              "(implement only the ones you use) and return nothing.", ""]
    for fn in lifecycle:
        lines += hook_section(fn, categories, sections)
    lines += ["## Spec records", "",
              "Generated from `loraengine/core/plugins/specs.py`. Import them from `loraengine`.", ""]
    for _, record in CATEGORIES.values():
        lines += spec_section(record)
    options = specs.PluginOptions
    lines += [f"### {options.__name__}", "", markdown(inspect.getdoc(options) or ""), ""]
    return "\n".join(lines).rstrip() + "\n"


def plugins_md(current: str) -> str:
    """``current`` with the generated part replaced."""
    if BEGIN not in current or END not in current:
        raise SystemExit(f"{PLUGINS_MD}: the {BEGIN!r} / {END!r} markers are missing")
    head, _, rest = current.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n\n{hook_reference()}\n{END}{tail}"


# -- the config reference ---------------------------------------------------------------

def type_text(ann: Any) -> str:
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if ann is type(None):
        return "null"
    if origin is typing.Annotated:
        return type_text(args[0])
    if origin is typing.Literal:
        return " / ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_text(a) for a in args)
    if origin in (list, set, frozenset):
        return f"list of {type_text(args[0])}"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {type_text(args[0])}"
        return "[" + ", ".join(type_text(a) for a in args) + "]"
    if origin is dict:
        return f"mapping of {type_text(args[0])} to {type_text(args[1])}"
    if isinstance(ann, type):
        if issubclass(ann, BaseModel):
            return "section"
        if issubclass(ann, Path):
            return "path"
        return ann.__name__
    return str(ann).replace("typing.", "")


def _number(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def range_text(info: FieldInfo) -> str:
    bounds: dict[str, Any] = {}
    extra = []
    for meta in info.metadata:
        for attr in ("ge", "gt", "le", "lt", "min_length", "max_length", "multiple_of"):
            value = getattr(meta, attr, None)
            if value is not None:
                bounds[attr] = value
        pattern = getattr(meta, "pattern", None)
        if pattern is not None:
            extra.append(f"pattern `{pattern}`")
    parts = []
    if "ge" in bounds and "le" in bounds:
        parts.append(f"{_number(bounds['ge'])} – {_number(bounds['le'])}")
    else:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            if attr in bounds:
                parts.append(f"{sign} {_number(bounds[attr])}")
        if "ge" in bounds and "lt" in bounds:
            parts = [f"{_number(bounds['ge'])} ≤ x < {_number(bounds['lt'])}"]
        if "gt" in bounds and "lt" in bounds:
            parts = [f"{_number(bounds['gt'])} < x < {_number(bounds['lt'])}"]
        if "gt" in bounds and "le" in bounds:
            parts = [f"{_number(bounds['gt'])} < x ≤ {_number(bounds['le'])}"]
    if "min_length" in bounds:
        parts.append(f"length ≥ {bounds['min_length']}")
    if "max_length" in bounds:
        parts.append(f"length ≤ {bounds['max_length']}")
    if "multiple_of" in bounds:
        parts.append(f"multiple of {_number(bounds['multiple_of'])}")
    return ", ".join(parts + extra)


def default_text(info: FieldInfo) -> str:
    if info.default is not PydanticUndefined:
        value = info.default
    elif info.default_factory is not None:
        try:
            value = info.default_factory()  # type: ignore[call-arg]
        except TypeError:
            return "(computed)"
    else:
        return "required"
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{json.dumps(value, default=str)}`"


def _submodels(ann: Any) -> Iterator[type[BaseModel]]:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        yield ann
        return
    for arg in typing.get_args(ann):
        yield from _submodels(arg)


def field_rows(model: type[BaseModel], prefix: str, skip: set[str] = frozenset()
               ) -> list[list[str]]:
    """One row per field, nested sections (``data.validation``) expanded below theirs."""
    rows = []
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        key = f"{prefix}.{name}"
        rows.append([f"`{key}`", type_text(info.annotation), default_text(info),
                     range_text(info), markdown(info.description or "")])
        for sub in _submodels(info.annotation):
            rows += field_rows(sub, key)
    return rows


HEADER = ["key", "type", "default", "range", "description"]


def plugin_section(section: str, ann: Any, registry: Any) -> list[str]:
    from loraengine.core.config.root import PLUGIN_SECTIONS

    category, key = PLUGIN_SECTIONS[section]
    members = [m for m in _submodels(ann)]
    names = [m.model_fields[key].default for m in members]
    common = set.intersection(*(set(m.model_fields) for m in members)) - {key}
    # Keys the engine adds to every member, in the first member's order.
    common_order = [n for n in members[0].model_fields if n in common]
    lines = [f"`{section}.{key}` picks the {category} plugin: "
             + ", ".join(f"`{n}`" for n in names) + ".", ""]
    if common_order:
        lines += ["Keys every choice takes:", ""]
        rows = [[f"`{section}.{n}`", type_text(members[0].model_fields[n].annotation),
                 default_text(members[0].model_fields[n]),
                 range_text(members[0].model_fields[n]),
                 markdown(members[0].model_fields[n].description or "")]
                for n in common_order]
        lines += [*table(HEADER, rows), ""]
    for name, member in zip(names, members, strict=True):
        spec = registry.get(category, name)
        lines += [f"### `{section}.{key}: {name}`", ""]
        if getattr(spec, "description", ""):
            lines += [markdown(spec.description), ""]
        rows = field_rows(member, section, skip=common | {key})
        lines += [*table(HEADER, rows), ""] if rows else ["No options of its own.", ""]
    return lines


def merged_section(section: str, model: type[BaseModel], registry: Any) -> list[str]:
    owners = {f: spec.name for spec in registry.specs(section)
              for f in spec.config_model.model_fields}
    rows = [[*row[:4], f"`{owners.get(row[0].strip('`').split('.')[1], '')}`", row[4]]
            for row in field_rows(model, section)]
    lines = [f"Merged from the options of every {section} plugin; each plugin's "
             f"`enabled(config)` reads them.", ""]
    return lines + [*table(["key", "type", "default", "range", "plugin", "description"],
                           rows), ""]


def config_reference() -> str:
    from loraengine.core.config.root import PLUGIN_SECTIONS, build_config_model
    from loraengine.plugins import build_plugin_manager

    registry = build_plugin_manager(entry_points=False).registry
    root = build_config_model(registry)
    lines = ["# Configuration reference", "",
             "<!-- Generated by python docs/gen_docs.py from the pydantic config models; "
             "do not edit. -->", "",
             "Every key of a loraengine config, with the built-in plugins. An installed "
             "plugin adds its own choices and options to these sections; "
             "`loraengine config schema` prints the JSON Schema of what is installed. "
             "Unknown keys are errors. Relative paths resolve against the config file's "
             "folder.", ""]
    for section, info in root.model_fields.items():
        ann = info.annotation
        lines += [f"## `{section}`", ""]
        if section in PLUGIN_SECTIONS:
            lines += plugin_section(section, ann, registry)
        elif section in registry.entries:
            model = next(_submodels(ann))
            lines += merged_section(section, model, registry)
        else:
            model = next(_submodels(ann))
            if model.__doc__:  # its own docstring, not one inherited from pydantic
                lines += [markdown(inspect.cleandoc(model.__doc__)), ""]
            lines += [*table(HEADER, field_rows(model, section)), ""]
    return "\n".join(lines).rstrip() + "\n"


# -- entry point ------------------------------------------------------------------------

def generated() -> dict[Path, str]:
    """What each generated file should hold."""
    current = PLUGINS_MD.read_text(encoding="utf-8")
    return {PLUGINS_MD: plugins_md(current), CONFIG_MD: config_reference()}


def stale() -> list[Path]:
    return [path for path, text in generated().items()
            if not path.exists() or path.read_text(encoding="utf-8") != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="Write nothing; exit 1 if a generated file is out of date.")
    args = parser.parse_args(argv)
    if args.check:
        old = stale()
        for path in old:
            print(f"{path.relative_to(DOCS.parent)} is out of date: run python "
                  f"docs/gen_docs.py", file=sys.stderr)
        return 1 if old else 0
    for path, text in generated().items():
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path.relative_to(DOCS.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
