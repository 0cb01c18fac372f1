"""Error kinds. Each carries the exit status the CLI uses for it."""

from __future__ import annotations


class LoraEngineError(Exception):
    """Base of every error the engine reports to a user (runtime problems: exit 1)."""

    exit_code = 1


class ConfigError(LoraEngineError):
    """The configuration is invalid. ``problems`` holds one line per problem."""

    exit_code = 2

    def __init__(self, problems: list[str] | str):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class DataError(LoraEngineError):
    """A latents, conditioning or LoRA file is missing, unreadable or malformed."""


class PluginError(LoraEngineError):
    """A plugin clashes with another, failed to load, or broke its contract."""


class NonFiniteError(LoraEngineError):
    """Training produced NaN or inf values that cannot be written."""


class PluginFailed(PluginError):
    """A plugin's factory or lifecycle hook raised an exception that is not one of the
    engine's own errors. The message names the plugin, its distribution and what was
    called; the original exception is chained for ``--debug``."""

    def __init__(self, plugin: str, distribution: str | None, what: str,
                 error: BaseException):
        self.plugin, self.distribution, self.what = plugin, distribution, what
        text = str(error).strip()
        first = text.splitlines()[0] if text else ""
        if len(first) > 300:  # one readable line, whatever the plugin put in its message
            first = first[:300] + " ..."
        detail = f"{type(error).__name__}: {first}" if first else type(error).__name__
        super().__init__(f"plugin {plugin!r} (distribution "
                         f"{distribution or 'unknown'!r}) failed in {what}: {detail}")


class OutputError(LoraEngineError):
    """An output file could not be written (disk full, an I/O error); the message names
    the file and what was kept."""
