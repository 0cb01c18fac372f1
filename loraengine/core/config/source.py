"""Where a config comes from: YAML with a line for every key, ``--set`` overrides, and
pydantic errors turned into ``path.to.key: message (file:line)``.

YAML is read defensively: a config file may come from anywhere, so the document is
checked before anything walks it. Nesting, the length of a scalar, the digits of an
integer and the number of values (as written, and as aliases expand them) are bounded,
a document holding too many values is refused while it is parsed, a recursive alias
and a key given twice in one mapping are errors, and every check visits each node once
(an alias is a reference to a node already seen, never a copy of it).
"""

from __future__ import annotations

import copy
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from loraengine.core.errors import ConfigError

#: Deepest nesting of mappings and sequences a config may have (aliases included).
MAX_DEPTH = 64
#: Longest scalar (a string, a key) in characters.
MAX_SCALAR = 64 * 1024
#: Longest mapping key in characters (keys are option names; error messages echo them).
MAX_KEY = 256
#: Most digits an integer may have (the largest config integer, a seed, has 20).
MAX_INT_DIGITS = 64
#: Most values a document may hold once its aliases are expanded.
MAX_VALUES = 100_000
#: Longest echo of a user's value in an error message.
ECHO_CHARS = 80

_INT_TAG = "tag:yaml.org,2002:int"
_MERGE_TAG = "tag:yaml.org,2002:merge"


def shorten(text: str, limit: int = ECHO_CHARS) -> str:
    """``text`` cut to ``limit`` characters (with an ellipsis) for an error message."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def echo(value: Any) -> str:
    """The repr of a user's value, cut for an error message."""
    return shorten(repr(value))


class _Checked:
    """One pass over a composed YAML node graph: the limits, duplicate keys, and the
    line of each key path (paths reached through an alias are not expanded)."""

    def __init__(self, where: str):
        self.where = where
        self.lines: dict[tuple[str, ...], int] = {}

    def fail(self, node: yaml.Node, message: str) -> ConfigError:
        return ConfigError(f"{self.where}:{node.start_mark.line + 1}: {message}")

    def check(self, root: yaml.Node) -> None:
        self._bounds(root)
        self._record(root, (), set())

    def _children(self, node: yaml.Node) -> list[yaml.Node]:
        if isinstance(node, yaml.MappingNode):
            return [n for pair in node.value for n in pair]
        if isinstance(node, yaml.SequenceNode):
            return list(node.value)
        return []

    def _bounds(self, root: yaml.Node) -> None:
        """Cycles, scalar limits, and the expanded height and size of every node,
        computed once per node (an iterative depth-first walk: no recursion limit)."""
        height: dict[int, int] = {}
        size: dict[int, int] = {}
        active: set[int] = set()
        aliased = False  # some node was reached a second time (an alias)
        stack: list[tuple[yaml.Node, bool]] = [(root, False)]
        while stack:
            node, done = stack.pop()
            key = id(node)
            if done:
                kids = self._children(node)
                height[key] = 1 + max((height[id(k)] for k in kids), default=0)
                size[key] = 1 + sum(size[id(k)] for k in kids)
                active.discard(key)
                if height[key] > MAX_DEPTH:
                    raise self.fail(node, f"nested deeper than {MAX_DEPTH} levels")
                if size[key] > MAX_VALUES:
                    # ``load_yaml`` refuses a document of too many values as written
                    # before it gets here, so this is the aliases' doing there
                    raise self.fail(node, f"aliases expand to more than {MAX_VALUES} values"
                                    if aliased else _too_many_values())
                continue
            if key in height:
                aliased = True
                continue  # an alias of a node already checked
            if key in active:
                raise self.fail(node, "recursive alias (a node contains itself)")
            if isinstance(node, yaml.ScalarNode):
                self._scalar(node)
                height[key], size[key] = 0, 1  # height counts containers only
                continue
            active.add(key)
            stack.append((node, True))
            # more open nodes than the depth limit can only be a deep document
            if len(active) > MAX_DEPTH:
                raise self.fail(node, f"nested deeper than {MAX_DEPTH} levels")
            stack.extend((k, False) for k in reversed(self._children(node)))

    def _scalar(self, node: yaml.ScalarNode) -> None:
        value = str(node.value)
        if len(value) > MAX_SCALAR:
            raise self.fail(node, f"a value of {len(value)} characters (at most "
                            f"{MAX_SCALAR}): {echo(value)}")
        if node.tag == _INT_TAG and sum(c.isalnum() for c in value) > MAX_INT_DIGITS:
            raise self.fail(node, f"an integer of more than {MAX_INT_DIGITS} digits: "
                            f"{echo(value)}")

    def _record(self, node: yaml.Node, path: tuple[str, ...], seen: set[int]) -> None:
        """Lines of key paths and duplicate keys; each node's children once (the
        depth is bounded by ``_bounds``, so recursion is safe here)."""
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, str], int] = {}
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and len(str(k.value)) > MAX_KEY:
                    raise self.fail(k, f"a key of {len(str(k.value))} characters (at most "
                                    f"{MAX_KEY}): {echo(str(k.value))}")
                if isinstance(k, yaml.ScalarNode) and k.tag != _MERGE_TAG:
                    ident = (k.tag, str(k.value))
                    line = k.start_mark.line + 1
                    if ident in first:
                        raise ConfigError(
                            f"{self.where}:{line}: duplicate key {echo(str(k.value))} "
                            f"(first at line {first[ident]})")
                    first[ident] = line
                key = (*path, str(k.value) if isinstance(k, yaml.ScalarNode) else "?")
                self.lines.setdefault(key, k.start_mark.line + 1)
                self._record(v, key, seen)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                key = (*path, str(i))
                self.lines.setdefault(key, v.start_mark.line + 1)
                self._record(v, key, seen)


def _too_many_values() -> str:
    return (f"the document holds more than {MAX_VALUES} values (each key, list item and "
            f"section counts one)")


def _check_events(text: str, where: str) -> None:
    """Refuse deep nesting and too many values before composing: the composer recurses
    per level, and composing and checking a node graph cost several times what parsing
    does. Every event but an alias is a node of its own, so more than ``MAX_VALUES`` of
    them is a document too large whatever its aliases, found as soon as the limit is
    passed rather than after the whole file is read."""
    depth = values = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise ConfigError(f"{where}:{event.start_mark.line + 1}: nested deeper than "
                                  f"{MAX_DEPTH} levels")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
            continue
        elif not isinstance(event, yaml.ScalarEvent):
            continue  # stream and document events, and aliases
        values += 1
        if values > MAX_VALUES:
            raise ConfigError(f"{where}:{event.start_mark.line + 1}: {_too_many_values()}")


def load_yaml(text: str, where: str) -> tuple[Any, dict[tuple[str, ...], int]]:
    """Parse one YAML document within the limits; return the data and its line map.

    ``where`` names the source in errors (a file, or ``--set item``). Raises
    ``ConfigError`` for a limit and lets ``yaml.YAMLError`` through for a syntax error."""
    _check_events(text, where)
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is None:
        return None, {}
    checked = _Checked(where)
    checked.check(root)
    loader = yaml.SafeLoader("")
    try:
        data = loader.construct_document(root)
    except (ValueError, TypeError, OverflowError, AttributeError) as exc:
        # a constructor refusing a tagged scalar, e.g. ``!!int abc``
        raise ConfigError(f"{where}: cannot read a value: {shorten(str(exc))}") from None
    finally:
        loader.dispose()
    return data, checked.lines


def yaml_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path of a YAML mapping document to its 1-based line (empty when the
    text is not YAML within the limits)."""
    try:
        return load_yaml(text, "<yaml>")[1]
    except (yaml.YAMLError, ConfigError):
        return {}


def _special_kind(path: Path) -> str | None:
    """What ``path`` is when it is neither a regular file nor a folder (reading a FIFO
    would wait for a writer forever)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    for test, name in ((stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return None


def read_yaml(path: Path) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    """Read a YAML config file; return the data and its line map."""
    kind = _special_kind(Path(path))
    if kind is not None:
        raise ConfigError(f"{path}: the config is a {kind}, not a regular file")
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        data, lines = load_yaml(text, str(path))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML: {shorten(str(problem))}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of sections, "
                          f"not {type(data).__name__}")
    return data, lines


def deep_merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overlay`` merged in, section by section, ``overlay`` winning
    (neither is modified)."""
    out = copy.deepcopy(dict(base))
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> set[tuple[str, ...]]:
    """Apply ``key.path=value`` overrides in place (values parsed as YAML)."""
    touched: set[tuple[str, ...]] = set()
    for item in overrides:
        shown = echo(item)
        if "=" not in item:
            raise ConfigError(f"--set {shown}: expected key.path=value")
        key, raw = item.split("=", 1)
        segments = key.strip().split(".")
        if not any(segments):
            raise ConfigError(f"--set {shown}: empty key")
        if not all(p.strip() for p in segments):
            raise ConfigError(f"--set {shown}: empty key segment in {echo(key.strip())}")
        if max(len(p) for p in segments) > MAX_KEY:
            raise ConfigError(f"--set {shown}: a key of more than {MAX_KEY} characters")
        parts = tuple(segments)
        try:
            value = load_yaml(raw, f"--set {shown}")[0] if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {echo(key)}: {echo(p)} is not a section")
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
        # the key itself, a section or list above it, or a section only --set made
        if any(loc[:n] in self.overrides for n in range(len(loc), 0, -1)) or (
                loc not in self.lines and any(o[:len(loc)] == loc for o in self.overrides)):
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
    if kind == "value_error":  # a validator's own sentence, without pydantic's label
        msg = msg.removeprefix("Value error, ")
    if "input" in err and kind not in ("union_tag_invalid",) and not isinstance(
            err["input"], (dict, list)):
        msg += f" (got {echo(err['input'])})"
    return msg
