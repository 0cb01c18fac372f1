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


class OutputError(LoraEngineError):
    """An output file could not be written (disk full, an I/O error); the message names
    the file and what was kept."""
