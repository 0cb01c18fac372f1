"""Shared pieces of the command line: the per-invocation state and error reporting."""

from __future__ import annotations

import functools
import sys
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import click

from loraengine.core.errors import LoraEngineError
from loraengine.core.plugins.host import PluginHost, PluginLoadWarning
from loraengine.plugins import build_plugin_manager


class State:
    def __init__(self, debug: bool, strict: bool):
        self.debug, self.strict = debug, strict
        self._host: PluginHost | None = None

    @property
    def host(self) -> PluginHost:
        if self._host is None:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", PluginLoadWarning)
                self._host = build_plugin_manager(strict=self.strict)
            for w in caught:
                click.echo(f"warning: {w.message}", err=True)
        return self._host


def reports_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn engine errors into one line per problem and the error's exit status."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = bool(click.get_current_context().find_root().params.get("debug"))
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        except LoraEngineError as exc:
            if debug:
                traceback.print_exc()
            for line in str(exc).splitlines() or [type(exc).__name__]:
                click.echo(f"error: {line}", err=True)
            sys.exit(exc.exit_code)

    return wrapper
