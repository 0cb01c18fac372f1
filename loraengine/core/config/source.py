"""Where a config comes from: YAML with a line for every key, ``--set`` overrides, and
pydantic errors turned into ``path.to.key: message (file:line)``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from loraengine.core.errors import ConfigError


def yaml_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path of a YAML mapping document to its 1-based line."""
    lines: dict[tuple[str, ...], int] = {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = (*path, str(k.value))
                lines[key] = k.start_mark.line + 1
                walk(v, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                key = (*path, str(i))
                lines[key] = v.start_mark.line + 1
                walk(v, key)

    if root is not None:
        walk(root, ())
    return lines


def read_yaml(path: Path) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    """Read a YAML config file; return the data and its line map."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of sections, "
                          f"not {type(data).__name__}")
    return data, yaml_lines(text)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> set[tuple[str, ...]]:
    """Apply ``key.path=value`` overrides in place (values parsed as YAML)."""
    touched: set[tuple[str, ...]] = set()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        parts = tuple(p for p in key.strip().split(".") if p)
        if not parts:
            raise ConfigError(f"--set {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {key}: {p!r} is not a section")
            node = nxt
        node[parts[-1]] = value
        touched.add(parts)
    return touched


class ConfigSource:
    """Where a config came from, for error messages."""

    def __init__(self, path: Path | None = None, lines: Mapping[tuple[str, ...], int] | None
                 = None, overrides: set[tuple[str, ...]] | None = None):
        self.path = path
        self.lines = dict(lines or {})
        self.overrides = overrides or set()

    def where(self, loc: tuple[str, ...]) -> str:
        if loc in self.overrides:
            return " (--set)"
        probe = loc
        while probe:
            if probe in self.lines and self.path is not None:
                return f" ({self.path}:{self.lines[probe]})"
            probe = probe[:-1]
        return f" ({self.path})" if self.path is not None else ""


def data_loc(raw: Any, loc: tuple[Any, ...]) -> tuple[str, ...]:
    """Drop union-tag elements from a pydantic error location by walking the data."""
    out: list[str] = []
    node = raw
    for part in loc:
        if isinstance(node, dict) and part in node:
            out.append(str(part))
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            out.append(str(part))
            node = node[part]
        elif isinstance(node, dict) and isinstance(part, str) and (
                part in node.values() or part[:1].isupper()):
            continue  # a union tag (the plugin name) or a member's class name
        elif isinstance(node, dict):
            out.append(str(part))
            node = None
        else:
            continue
    return tuple(out)


def error_message(err: Mapping[str, Any]) -> str:
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    msg = str(err.get("msg", "invalid value"))
    if "input" in err and kind not in ("union_tag_invalid",) and not isinstance(
            err["input"], (dict, list)):
        msg += f" (got {err['input']!r})"
    return msg
