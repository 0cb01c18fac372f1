"""Shared pieces of the command line: the per-invocation state, error reporting, and
click options made from the config fields they mirror."""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from pydantic import BaseModel

from loraengine.core.errors import LoraEngineError
from loraengine.core.plugins.host import PluginHost, PluginLoadWarning
from loraengine.plugins import build_plugin_manager

F = TypeVar("F", bound=Callable[..., Any])

#: The exit status of an error the engine did not foresee (BSD's EX_SOFTWARE).
INTERNAL_ERROR = 70


class State:
    """What one command-line invocation shares: ``--debug``, ``--strict`` and the plugin
    host, built on first use (plugin load failures are echoed as warnings, and so are
    the records of installed plugins left out when the host makes its registry)."""

    def __init__(self, debug: bool, strict: bool):
        self.debug, self.strict = debug, strict
        self._host: PluginHost | None = None

    @property
    def host(self) -> PluginHost:
        if self._host is None:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", PluginLoadWarning)
                host = build_plugin_manager(strict=self.strict)
            for w in caught:
                _echo_warning(str(w.message))
            host.report = _echo_warning
            self._host = host
        return self._host


def _echo_warning(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


def reports_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn engine errors into one line per problem and the error's exit status; any
    other exception into one line and ``INTERNAL_ERROR``, with its traceback only under
    ``--debug``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = bool(click.get_current_context().find_root().params.get("debug"))
        _command_handles_ctrl_c()
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            click.echo("error: interrupted (SIGINT); what was written is complete, nothing "
                       "is half-written", err=True)
            sys.exit(130)
        except LoraEngineError as exc:
            if debug:
                traceback.print_exc()
            for line in str(exc).splitlines() or [type(exc).__name__]:
                click.echo(f"error: {line}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException:
            raise  # click's own usage errors print themselves
        except BrokenPipeError:
            # the reader went away (``| head``): nothing to report, and nothing more may
            # be written to the closed pipe, not even at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(128 + signal.SIGPIPE)
        except Exception as exc:  # a bug: one line, the traceback only with --debug
            if debug:
                traceback.print_exc()
            text = str(exc).strip()
            detail = f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text \
                else type(exc).__name__
            click.echo(f"error: unexpected {detail} (a bug in loraengine; --debug shows "
                       f"the traceback to report)", err=True)
            sys.exit(INTERNAL_ERROR)

    return wrapper


def _command_handles_ctrl_c() -> None:
    """From here on Ctrl-C is the command's (``KeyboardInterrupt``, reported below, or
    training's own guard), not the start-up handler of ``cli/main.py``."""
    if threading.current_thread() is not threading.main_thread():
        return
    if getattr(signal.getsignal(signal.SIGINT), "startup_handler", False):
        signal.signal(signal.SIGINT, signal.default_int_handler)


_UNSET: Any = object()


def field_option(model: type[BaseModel], field: str, *decls: str, default: Any = _UNSET,
                 help: str | None = None, **extra: Any) -> Callable[[F], F]:
    """A ``click.option`` for an option that mirrors a config field: its type, range,
    default and help come from ``model.model_fields[field]`` (``default`` and ``help``
    may differ where the command's use differs, e.g. one image per prompt by default).

    Numbers take a ``click.IntRange``/``FloatRange`` from the field's ``ge``/``gt``/
    ``le``/``lt`` bounds, so the command accepts exactly what the config does."""
    info = model.model_fields[field]
    kind = info.annotation
    bounds: dict[str, Any] = {}
    for item in info.metadata:
        for key, name, closed in (("ge", "min", True), ("gt", "min", False),
                                  ("le", "max", True), ("lt", "max", False)):
            value = getattr(item, key, None)
            if value is not None:
                bounds[name] = value
                bounds[f"{name}_open"] = not closed
    option_type: Any
    if kind is bool:
        option_type = None
    elif kind is int:
        option_type = click.IntRange(**bounds) if bounds else int
    elif kind is float:
        option_type = click.FloatRange(**bounds) if bounds else float
    else:
        option_type = str
    if default is _UNSET:
        default = info.get_default(call_default_factory=True)
    kwargs: dict[str, Any] = {"default": default, "show_default": True,
                              "help": help if help is not None else info.description}
    if option_type is not None:
        kwargs["type"] = option_type
    return click.option(*decls, **kwargs, **extra)


def path_option(*decls: str, help: str, required: bool = False) -> Callable[[F], F]:
    """A ``click.option`` taking a filesystem path (a ``pathlib.Path``; default ``None``)."""
    return click.option(*decls, type=click.Path(path_type=Path), required=required,
                        default=None, help=help)
